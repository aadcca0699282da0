package api

import (
	"strings"
	"time"
)

// Messages of the operator commands on join tokens, agents, the PCR
// policy and the audit log's filters.
type (
	// JoinToken is a join token as admins see it: its ID (the SHA-256 of
	// the token; the token itself is shown once, at creation, and never
	// stored) and its state.
	JoinToken struct {
		ID        string    `json:"id"`
		CreatedBy string    `json:"created_by"`
		CreatedAt time.Time `json:"created_at"`
		ExpiresAt time.Time `json:"expires_at"`
		UsedBy    string    `json:"used_by,omitempty"`
		UsedAt    time.Time `json:"used_at,omitzero"`
		RevokedBy string    `json:"revoked_by,omitempty"`
		RevokedAt time.Time `json:"revoked_at,omitzero"`
	}
	TokenList struct {
		Tokens []JoinToken `json:"tokens"`
	}
	// AgentRemoveRequest removes an agent's record. An agent that is the
	// parent of entries is refused (the refusal lists them) unless Force:
	// then the entries are kept.
	AgentRemoveRequest struct {
		ID    string `json:"id"`
		Force bool   `json:"force,omitempty"`
	}
	// AgentRemoved is what agent remove did.
	AgentRemoved struct {
		ID          string   `json:"id"`
		KeptEntries []string `json:"kept_entries,omitempty"`
	}
	// PCRPolicyResponse is the PCR policy in force; nil when none is.
	PCRPolicyResponse struct {
		Policy *PCRPolicy `json:"policy"`
	}
	// AuditFilter selects audit records; every field given must match.
	// Actor, Action and Target match exactly or, ending in "*", by
	// prefix. Since and Until bound the record's time (inclusive).
	AuditFilter struct {
		Actor  string    `json:"actor,omitempty"`
		Action string    `json:"action,omitempty"`
		Target string    `json:"target,omitempty"`
		Since  time.Time `json:"since,omitzero"`
		Until  time.Time `json:"until,omitzero"`
	}
)

// MaxAuditScan bounds the records a node reads for one filtered or
// newest-first AuditList, whatever it finds: a selective filter over a
// large log takes several requests (AuditList.Next), each of bounded
// cost, rather than one that reads the whole log.
const MaxAuditScan = 100000

// Match tells whether r is selected by f.
func (f *AuditFilter) Match(r *AuditRecord) bool {
	if f == nil {
		return true
	}
	return matchField(f.Actor, r.Actor) && matchField(f.Action, r.Action) && matchField(f.Target, r.Target) &&
		(f.Since.IsZero() || !r.Time.Before(f.Since)) && (f.Until.IsZero() || !r.Time.After(f.Until))
}

func matchField(want, got string) bool {
	if want == "" {
		return true
	}
	if p, ok := strings.CutSuffix(want, "*"); ok {
		return strings.HasPrefix(got, p)
	}
	return got == want
}
