package state

import (
	"fmt"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Operator commands on join tokens and agents. Like every command type
// (commands.go), they are a protocol change: upgrade every node first.
const (
	// CmdTokenRevoke revokes an unused join token: it no longer joins.
	CmdTokenRevoke = "token.revoke"
	// CmdAgentRemove forgets an agent (AgentRemove).
	CmdAgentRemove = "agent.remove"
)

// Payloads. Their JSON names are the stored command format.
type (
	// TokenRevoke names a join token by its ID (the hex SHA-256 of the
	// token).
	TokenRevoke struct {
		ID string `json:"id"`
	}
	// AgentRemove deletes an agent's record. Entries that name the agent
	// as their parent make it a refusal that lists them, unless Force:
	// then the entries are kept as they are (they serve the agent again
	// if it joins again under the same ID).
	AgentRemove struct {
		ID    string `json:"id"`
		Force bool   `json:"force,omitempty"`
	}
	// AgentRemoved is agent.remove's response.
	AgentRemoved struct {
		ID string `json:"id"`
		// KeptEntries are the entries whose parent is the removed agent
		// (removed with Force).
		KeptEntries []string `json:"kept_entries,omitempty"`
	}
)

// maxListedEntries bounds the entry IDs a refusal or an audit record
// lists.
const maxListedEntries = 20

func init() {
	register(CmdTokenRevoke, byAdmin, applyTokenRevoke)
	register(CmdAgentRemove, byAdmin, applyAgentRemove)
}

func applyTokenRevoke(t *txn, p *TokenRevoke) (any, []AuditEvent, error) {
	if !hexHashRE.MatchString(p.ID) {
		return nil, nil, refuse("token id %q: want the token's SHA-256, 64 lowercase hex digits", truncate(p.ID, 80))
	}
	tokens := t.tx.Bucket(bTokens)
	var tok JoinToken
	ok, err := getJSON(tokens, []byte(p.ID), &tok)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case !ok:
		return nil, nil, refuse("no join token %.12s (expired tokens are dropped)", p.ID)
	case !tok.RevokedAt.IsZero():
		return nil, nil, refuse("join token %.12s was already revoked at %s by %s", p.ID, tok.RevokedAt.Format(time.RFC3339), tok.RevokedBy)
	case tok.UsedBy != "":
		return nil, nil, refuse("join token %.12s was already used by %s at %s: revoking it changes nothing (ban or remove the agent)",
			p.ID, tok.UsedBy, tok.UsedAt.Format(time.RFC3339))
	case !tok.ExpiresAt.After(t.c.Time):
		return nil, nil, refuse("join token %.12s expired at %s: it no longer joins", p.ID, tok.ExpiresAt.Format(time.RFC3339))
	}
	tok.RevokedAt, tok.RevokedBy = t.c.Time, truncate(t.c.Actor, maxActor)
	return tok, []AuditEvent{{Action: t.c.Type, Target: p.ID[:12], Detail: map[string]string{"expires": tok.ExpiresAt.Format(time.RFC3339)}}},
		putJSON(tokens, []byte(p.ID), &tok)
}

func applyAgentRemove(t *txn, p *AgentRemove) (any, []AuditEvent, error) {
	a, err := t.agent(p.ID)
	if err != nil {
		return nil, nil, err
	}
	if a == nil {
		return nil, nil, refuse("no agent %s", truncate(p.ID, 128))
	}
	// The ban lives on the record: removing it would let the host join
	// again as a fresh, unbanned agent.
	if a.Banned {
		return nil, nil, refuse("agent %s is banned: removing it would lift the ban (a host the join policy admits could join again); unban it first if that is meant", a.ID)
	}
	children := idsWithPrefix(t.tx.Bucket(bEntriesByParent), a.ID)
	if len(children) > 0 && !p.Force {
		return nil, nil, refuse("agent %s is the parent of %d entries (%s): delete or re-parent them first, or remove with force to keep them",
			a.ID, len(children), listIDs(children))
	}
	detail := map[string]string{"attestation": a.AttestationType, "serial": a.SerialNumber}
	if len(children) > 0 {
		detail["kept_entries"] = listIDs(children)
	}
	if err := t.tx.Bucket(bAgents).Delete([]byte(a.ID)); err != nil {
		return nil, nil, err
	}
	t.touchAgent(a.ID)
	return &AgentRemoved{ID: a.ID, KeptEntries: children}, []AuditEvent{{Action: t.c.Type, Target: a.ID, Detail: detail}}, nil
}

// listIDs joins up to maxListedEntries IDs and says how many more there
// are.
func listIDs(ids []string) string {
	if len(ids) <= maxListedEntries {
		return strings.Join(ids, ",")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ids[:maxListedEntries], ","), len(ids)-maxListedEntries)
}

// Tokens returns every join token the state holds (unexpired ones, and
// expired ones not yet dropped), ordered by ID.
func (f *FSM) Tokens() []JoinToken {
	var out []JoinToken
	f.read("Tokens", func(tx *bolt.Tx) error {
		return tx.Bucket(bTokens).ForEach(func(k, v []byte) error {
			var t JoinToken
			if err := decodeStrict(v, &t); err != nil {
				f.log.Error("stored join token unreadable", "token", string(k[:min(len(k), 12)]), "err", err)
				return nil
			}
			out = append(out, t)
			return nil
		})
	})
	return out
}
