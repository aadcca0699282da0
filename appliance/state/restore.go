package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// StateRestore rolls the appliance's configuration back to an archive.
//
// What a restore may change and what it may not:
//   - entries and the join policy become the archive's (each checked as
//     the commands that made them would check it);
//   - agents are never rolled back: the archive may name only agents this
//     appliance knows, and every ban in force stays in force;
//   - join rules become the archive's (each checked as join-rule.create
//     checks it), with this appliance's revision, so no join checked
//     against a rule before the restore commits after it; job agents
//     (runs) are not part of an archive's configuration and stay as
//     they are, as do the platform tokens already used;
//   - federation relationships become the archive's (each checked as
//     federation.add checks it), but a foreign bundle never goes back:
//     where this appliance holds one for the same trust domain, the
//     archive's replaces it only if it is ahead in sequence;
//   - join tokens are the archive's that this appliance still holds, with
//     this appliance's used/unused state (a restore cannot revive a used
//     token or plant a new one);
//   - the trust bundle keeps the current roots and JWT keys (the archive may
//     hold no others) and the union of both revocation lists;
//   - the audit log is never replaced: the archive's chain head must be a
//     record of this log, and the restore is appended to it;
//   - admin roles and revocations are never rolled back: the archive's
//     admin table is checked and ignored (a restore cannot revive a
//     revoked admin certificate).
type StateRestore struct {
	Archive      string       `json:"archive_sha256"`
	Index        uint64       `json:"archive_index"`
	AuditHeadSeq uint64       `json:"audit_head_seq"`
	AuditHead    string       `json:"audit_head"`
	Entries      []Entry      `json:"entries"`
	Agents       []string     `json:"agents"`
	Policy       JoinPolicy   `json:"policy"`
	Tokens       []JoinToken  `json:"tokens"`
	Roots        [][]byte     `json:"roots"`
	JWTKeys      []JWTKey     `json:"jwt_keys"`
	Revocations  []Revocation `json:"revocations"`
	// RootCRLs are merged, never dropped (crl.go, mergeRootCRLs).
	RootCRLs []RootCRL `json:"root_crls,omitempty"`
	// JoinRules replace the appliance's (version 6).
	JoinRules []JoinRule `json:"join_rules,omitempty"`
	// Federations replace the appliance's relationships (version 7), their
	// bundles never going back (replaceFederations).
	Federations []Federation `json:"federations,omitempty"`
}

// ReadArchive verifies an archive completely (layout, checksum, trust
// domain, every record, the audit chain) into a scratch file under dir and
// returns the restore command's payload, the archive's header with counts
// and its SHA-256. It changes nothing.
func (f *FSM) ReadArchive(r io.Reader, dir string) (*StateRestore, ArchiveMeta, string, error) {
	tmp, err := os.CreateTemp(dir, "archive-check-*.db")
	if err != nil {
		return nil, ArchiveMeta{}, "", err
	}
	path := tmp.Name()
	// The scratch file is only a name for readStream, which recreates it:
	// closing the empty handle and removing the file afterwards are cleanup
	// whose failure changes nothing the caller sees.
	_ = tmp.Close()
	defer func() { _ = os.Remove(path) }()
	db, meta, sum, err := f.readStream(r, path)
	if err != nil {
		return nil, meta, "", err
	}
	defer func() { _ = db.Close() }() // scratch, read-only from here on
	p := &StateRestore{Archive: sum, Index: meta.Index, AuditHeadSeq: meta.AuditHeadSeq, AuditHead: meta.AuditHead}
	err = db.View(func(tx *bolt.Tx) error {
		if _, err := getJSON(tx.Bucket(bMeta), keyPolicy, &p.Policy); err != nil {
			return err
		}
		b, err := readBundle(tx, f.td.Name())
		if err != nil {
			return err
		}
		p.Roots, p.JWTKeys, p.Revocations = b.Roots, b.JWTKeys, b.Revoked
		if p.RootCRLs, err = readRootCRLs(tx); err != nil {
			return err
		}
		if err := tx.Bucket(bEntries).ForEach(func(_, v []byte) error {
			var e Entry
			err := decodeStrict(v, &e)
			p.Entries = append(p.Entries, e)
			return err
		}); err != nil {
			return err
		}
		jobs := "spiffe://" + f.td.Name() + jobAgentPathPrefix
		if err := tx.Bucket(bAgents).ForEach(func(k, _ []byte) error {
			// A run's agent is not configuration: it has likely ended
			// since the archive was made.
			if !strings.HasPrefix(string(k), jobs) {
				p.Agents = append(p.Agents, string(k))
			}
			return nil
		}); err != nil {
			return err
		}
		if err := tx.Bucket(bJoinRules).ForEach(func(_, v []byte) error {
			var r JoinRule
			err := decodeStrict(v, &r)
			p.JoinRules = append(p.JoinRules, r)
			return err
		}); err != nil {
			return err
		}
		if err := tx.Bucket(bFederations).ForEach(func(_, v []byte) error {
			var r Federation
			err := decodeStrict(v, &r)
			p.Federations = append(p.Federations, r)
			return err
		}); err != nil {
			return err
		}
		return tx.Bucket(bTokens).ForEach(func(_, v []byte) error {
			var t JoinToken
			err := decodeStrict(v, &t)
			p.Tokens = append(p.Tokens, t)
			return err
		})
	})
	if err != nil {
		return nil, meta, "", fmt.Errorf("%w: %v", ErrBadArchive, err)
	}
	if b, err := json.Marshal(p); err != nil || len(b) > MaxCommandSize-64<<10 {
		return nil, meta, "", fmt.Errorf("%w: %d bytes of entries, policy and tokens; one restore carries at most %d", ErrRestoreTooLarge, len(b), MaxCommandSize-64<<10)
	}
	return p, meta, sum, nil
}

// applyStateRestore applies a StateRestore after checking all of it; every
// problem found is listed in the refusal.
func applyStateRestore(t *txn, p *StateRestore) (any, []AuditEvent, error) {
	var problems []string
	problem := func(format string, a ...any) {
		if len(problems) < 50 {
			problems = append(problems, fmt.Sprintf(format, a...))
		} else if len(problems) == 50 {
			problems = append(problems, "(more problems not listed)")
		}
	}
	meta := t.tx.Bucket(bMeta)
	var head AuditHead
	if _, err := getJSON(meta, keyAuditHead, &head); err != nil {
		return nil, nil, err
	}
	// History: the archive's head must be a record of this log.
	switch {
	case p.AuditHeadSeq == 0:
		problem("the archive has no audit log")
	case p.AuditHeadSeq < max(head.First, 1):
		problem("the archive's audit head (record %d) precedes the retained log (from %d): it cannot be shown to be this appliance's history", p.AuditHeadSeq, max(head.First, 1))
	case p.AuditHeadSeq > head.Seq:
		problem("the archive's audit head (record %d) is past this appliance's head (%d): its history is not this appliance's", p.AuditHeadSeq, head.Seq)
	default:
		var r AuditRecord
		if ok, err := getJSON(t.tx.Bucket(bAudit), u64Key(p.AuditHeadSeq), &r); err != nil {
			return nil, nil, err
		} else if !ok || r.Hash != p.AuditHead {
			problem("the archive's audit record %d (hash %.16s) is not this appliance's record %d (hash %.16s): its history was rewritten", p.AuditHeadSeq, p.AuditHead, p.AuditHeadSeq, r.Hash)
		}
	}
	// Entries, each as entry.create would check it.
	regs := map[string]string{}
	ids := map[string]bool{}
	for i := range p.Entries {
		e := &p.Entries[i]
		sortSelectors(e.Selectors)
		// An archive of an older state may hold entries stored before the
		// selector rules (EntryRulesVersion): they restore as they were
		// stored, as a raft snapshot of them loads.
		if err := validateEntry(t.f.td, e, false); err != nil {
			problem("entry %s: %v", truncate(e.ID, 64), strings.TrimPrefix(err.Error(), ErrRefused.Error()+": "))
			continue
		}
		if err := t.checkIPSANVersion(e); err != nil {
			problem("%v", strings.TrimPrefix(err.Error(), ErrRefused.Error()+": "))
		}
		// An entry may name a relationship deleted since (as in the state
		// itself): only the field's version is checked, not the name.
		if len(e.FederatesWith) > 0 && t.c.Version < FederationVersion {
			problem("entry %s: federates_with is restored by version %d commands, not %d", truncate(e.ID, 64), FederationVersion, t.c.Version)
		}
		slices.Sort(e.FederatesWith)
		if ids[e.ID] {
			problem("entry %s appears twice", e.ID)
		}
		ids[e.ID] = true
		if other, ok := regs[registrationKey(e)]; ok {
			problem("entries %s and %s register the same thing", other, e.ID)
		}
		regs[registrationKey(e)] = e.ID
	}
	// Agents: only known ones.
	for _, a := range p.Agents {
		if t.tx.Bucket(bAgents).Get([]byte(a)) == nil {
			problem("agent %s is not known to this appliance (agents join by attestation, not by restore)", truncate(a, 128))
		}
	}
	// Policy.
	if err := checkPolicy(&p.Policy); err != nil {
		problem("join policy: %v", err)
	}
	if len(p.JoinRules) > 0 && t.c.Version < JobVersion {
		problem("join rules are restored by version %d commands, not %d", JobVersion, t.c.Version)
	}
	if len(p.JoinRules) > MaxJoinRules {
		problem("%d join rules: at most %d", len(p.JoinRules), MaxJoinRules)
	}
	if len(p.Federations) > 0 && t.c.Version < FederationVersion {
		problem("federation relationships are restored by version %d commands, not %d", FederationVersion, t.c.Version)
	}
	if len(p.Federations) > MaxFederations {
		problem("%d federation relationships: at most %d", len(p.Federations), MaxFederations)
	}
	fedNames := map[string]bool{}
	for i := range p.Federations {
		f := &p.Federations[i]
		if err := checkStoredFederation(t.f.td, f); err != nil {
			problem("%v", strings.TrimPrefix(err.Error(), ErrRefused.Error()+": "))
		}
		if fedNames[f.TrustDomain] {
			problem("federation with %s appears twice", truncate(f.TrustDomain, 128))
		}
		fedNames[f.TrustDomain] = true
	}
	ruleNames := map[string]bool{}
	for i := range p.JoinRules {
		r := &p.JoinRules[i]
		if err := checkJoinRule(r); err != nil {
			problem("%v", strings.TrimPrefix(err.Error(), ErrRefused.Error()+": "))
		}
		if ruleNames[r.Name] {
			problem("join rule %s appears twice", truncate(r.Name, 64))
		}
		ruleNames[r.Name] = true
	}
	// Bundle: no roots or JWT keys the current bundle does not hold.
	cur, err := readBundle(t.tx, t.f.td.Name())
	if err != nil {
		return nil, nil, err
	}
	for i, r := range p.Roots {
		if !slices.ContainsFunc(cur.Roots, func(c []byte) bool { return bytes.Equal(c, r) }) {
			fp, _ := checkRoot(t.f.td, i, r)
			problem("X.509 root %d (sha256 %.16s) is not in this appliance's trust bundle", i, fp)
		}
	}
	for _, k := range p.JWTKeys {
		if !slices.ContainsFunc(cur.JWTKeys, func(c JWTKey) bool { return c.KID == k.KID && bytes.Equal(c.PublicKey, k.PublicKey) }) {
			problem("JWT key %s is not in this appliance's trust bundle", truncate(k.KID, 64))
		}
	}
	for _, r := range p.Revocations {
		if !serialRE.MatchString(r.Serial) || r.Node == "" || len(r.Node) > 64 {
			problem("revocation %q of node %q is malformed", truncate(r.Serial, 64), truncate(r.Node, 64))
		}
	}
	// Tokens: only ones this appliance holds, or expired ones (dropped).
	tokens := t.tx.Bucket(bTokens)
	var keepTokens []JoinToken
	dropped := 0
	for _, tk := range p.Tokens {
		var curTok JoinToken
		ok, err := getJSON(tokens, []byte(tk.ID), &curTok)
		if err != nil {
			return nil, nil, err
		}
		switch {
		case ok:
			keepTokens = append(keepTokens, curTok)
		case !tk.ExpiresAt.After(t.c.Time):
			dropped++
		default:
			problem("join token %.12s is not known to this appliance (tokens are created by token.create, not by restore)", tk.ID)
		}
	}
	if len(problems) > 0 {
		return nil, nil, refuse("restore of archive %.16s: %d problem(s): %s", p.Archive, len(problems), strings.Join(problems, "; "))
	}

	// Apply: entries replaced, policy replaced, tokens narrowed,
	// revocations merged; agents, roots, JWT keys and audit kept.
	added, removed, changed := 0, 0, 0
	old := map[string]Entry{}
	if err := t.tx.Bucket(bEntries).ForEach(func(_, v []byte) error {
		var e Entry
		if err := decodeStrict(v, &e); err != nil {
			return err
		}
		old[e.ID] = e
		return nil
	}); err != nil {
		return nil, nil, err
	}
	for _, b := range [][]byte{bEntries, bEntriesByParent, bEntriesBySPIFFE, bEntriesByReg} {
		if err := t.tx.DeleteBucket(b); err != nil {
			return nil, nil, err
		}
		if _, err := t.tx.CreateBucket(b); err != nil {
			return nil, nil, err
		}
	}
	var addedIDs, changedIDs, removedIDs []string
	for i := range p.Entries {
		e := p.Entries[i]
		o, existed := old[e.ID]
		// Times come from this appliance, never from the archive.
		same := false
		if existed {
			var err error
			if same, err = entriesEqual(&o, &e); err != nil {
				return nil, nil, fmt.Errorf("entry %q: %w", e.ID, err)
			}
		}
		switch {
		case !existed:
			added++
			addedIDs = append(addedIDs, e.ID)
			e.CreatedAt, e.UpdatedAt = t.c.Time, t.c.Time
		case !same:
			changed++
			changedIDs = append(changedIDs, e.ID)
			e.CreatedAt, e.UpdatedAt = o.CreatedAt, t.c.Time
		default:
			e.CreatedAt, e.UpdatedAt = o.CreatedAt, o.UpdatedAt
		}
		delete(old, e.ID)
		e.Revision = t.index
		if err := putEntry(t.tx, nil, &e); err != nil {
			return nil, nil, err
		}
	}
	removed = len(old)
	for id := range old {
		removedIDs = append(removedIDs, id)
	}
	slices.Sort(removedIDs)
	oldPolicy, err := t.policy()
	if err != nil {
		return nil, nil, err
	}
	oldPolicyJSON, err := json.Marshal(oldPolicy)
	if err != nil {
		return nil, nil, fmt.Errorf("current join policy: %w", err)
	}
	newPolicyJSON, err := json.Marshal(p.Policy)
	if err != nil {
		return nil, nil, fmt.Errorf("archive's join policy: %w", err)
	}
	if err := t.putPolicy(p.Policy); err != nil {
		return nil, nil, err
	}
	if err := t.tx.DeleteBucket(bTokens); err != nil {
		return nil, nil, err
	}
	tb, err := t.tx.CreateBucket(bTokens)
	if err != nil {
		return nil, nil, err
	}
	if err := t.tx.DeleteBucket(bTokensByExpiry); err != nil {
		return nil, nil, err
	}
	if _, err := t.tx.CreateBucket(bTokensByExpiry); err != nil {
		return nil, nil, err
	}
	for _, tk := range keepTokens {
		if err := putJSON(tb, []byte(tk.ID), tk); err != nil {
			return nil, nil, err
		}
		if err := indexToken(t.tx, &tk); err != nil {
			return nil, nil, err
		}
	}
	rulesChanged, err := t.replaceJoinRules(p.JoinRules)
	if err != nil {
		return nil, nil, err
	}
	fedsChanged, err := t.replaceFederations(p.Federations)
	if err != nil {
		return nil, nil, err
	}
	rev := t.tx.Bucket(bRevoked)
	merged := 0
	for _, r := range p.Revocations {
		k := revocationKey(r.Node, r.Serial)
		if rev.Get(k) == nil && r.NotAfter.After(t.c.Time) {
			if err := putJSON(rev, k, r); err != nil {
				return nil, nil, err
			}
			merged++
		}
	}
	if merged > 0 {
		if _, err := t.bumpBundle(); err != nil {
			return nil, nil, err
		}
	}
	crlsAdopted, err := t.mergeRootCRLs(p.RootCRLs)
	if err != nil {
		return nil, nil, err
	}
	t.configChanged = true
	return nil, []AuditEvent{{Action: CmdStateRestore, Target: p.Archive, Detail: map[string]string{
		"archive_sha256":       p.Archive,
		"archive_index":        strconv.FormatUint(p.Index, 10),
		"archive_audit_head":   fmt.Sprintf("%d:%.16s", p.AuditHeadSeq, p.AuditHead),
		"replaced_head":        fmt.Sprintf("%d:%.16s", head.Seq, head.Hash),
		"entries":              strconv.Itoa(len(p.Entries)),
		"entries_added":        strconv.Itoa(added),
		"entries_removed":      strconv.Itoa(removed),
		"entries_changed":      strconv.Itoa(changed),
		"policy_changed":       strconv.FormatBool(!bytes.Equal(oldPolicyJSON, newPolicyJSON)),
		"tokens_kept":          strconv.Itoa(len(keepTokens)),
		"tokens_expired":       strconv.Itoa(dropped),
		"revocations_restored": strconv.Itoa(merged),
		"root_crls_adopted":    strconv.Itoa(crlsAdopted),
		"join_rules":           strconv.Itoa(len(p.JoinRules)),
		"join_rules_changed":   strconv.FormatBool(rulesChanged),
		"federations":          strconv.Itoa(len(p.Federations)),
		"federations_changed":  strconv.FormatBool(fedsChanged),
		// Which entries, as far as the detail bound allows (cut with …).
		"entries_added_ids":   strings.Join(addedIDs, ","),
		"entries_changed_ids": strings.Join(changedIDs, ","),
		"entries_removed_ids": strings.Join(removedIDs, ","),
	}}}, nil
}

// entriesEqual compares two entries' content, ignoring revision and times.
func entriesEqual(a, b *Entry) (bool, error) {
	x, y := *a, *b
	x.Revision, y.Revision = 0, 0
	x.CreatedAt, y.CreatedAt, x.UpdatedAt, y.UpdatedAt = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	xb, err := json.Marshal(x)
	if err != nil {
		return false, err
	}
	yb, err := json.Marshal(y)
	if err != nil {
		return false, err
	}
	return bytes.Equal(xb, yb), nil
}

// ErrRestoreTooLarge: the configuration in an archive does not fit one
// raft command.
var ErrRestoreTooLarge = errors.New("archive's configuration exceeds one command")
