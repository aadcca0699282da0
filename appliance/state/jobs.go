package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bolt "go.etcd.io/bbolt"

	"github.com/sigil-appliance/sigil/appliance/jobrule"
)

// Job identity: pipeline runs join by their platform's signed ID token
// (appliance/jobrule verifies it against a join rule). The state holds the
// join rules, the job agents (one per run, each with the run's identity
// in Agent.Job) and the tokens already used. A job agent's entry is not
// stored: it follows from the agent's record (Agent.JobEntry), so a run
// costs one record, which goes when the run ends (job.end) or its SVID
// expires. Used tokens are kept only until they would be refused as too
// old anyway.
const (
	CmdJoinRuleCreate = "join-rule.create"
	CmdJoinRuleDelete = "join-rule.delete"
	CmdJobJoin        = "job.join"
	CmdJobEnd         = "job.end"
)

// JobVersion is the first command version with job identity (join rules,
// job.join and job.end).
const JobVersion = 6

// Bounds of job identity's state.
const (
	// MaxJoinRules bounds the join rules.
	MaxJoinRules = 256
	// MaxJobFacts bounds the claims recorded with a job agent (its audit
	// record also names the rule, run, identity, serial and expiry).
	MaxJobFacts = 24
	// maxReplayWindow bounds how long a used token is remembered: the
	// longest maximum token age (24 h) and clock leeway.
	maxReplayWindow = 25 * time.Hour
	// maxJobExpiryPerCommand bounds the expired job agents and used
	// tokens one command drops, so no command's cost depends on history.
	maxJobExpiryPerCommand = 256
	// MaxRunEndSerials bounds the SVIDs one job.end revokes.
	MaxRunEndSerials = 16
)

var (
	bJoinRules          = []byte("join_rules")
	bJobTokens          = []byte("job_tokens")
	bJobTokensByExpiry  = []byte("idx_job_tokens_by_expiry")
	bJobAgentsByExpiry  = []byte("idx_job_agents_by_expiry")
	jobRunSegmentRE     = regexp.MustCompile(`^[A-Za-z0-9._-]{1,255}$`)
	jobKeyRE            = regexp.MustCompile(`^[0-9a-f]{16}$`)
	jobAttestation      = "job"
	jobAgentPathPrefix  = "/sigil/agent/job/"
	jobEntryIDPrefix    = "job-"
	jobJWTTTL           = 5 * time.Minute
	jobUIDSelectorType  = "unix"
	jobUIDSelectorValue = "uid:"
)

type (
	// JoinRule is a stored join rule (jobrule.Spec with its record).
	JoinRule struct {
		Name             string           `json:"name"`
		Preset           string           `json:"preset,omitempty"`
		Issuer           string           `json:"issuer"`
		JWKS             []byte           `json:"jwks,omitempty"`
		IssuerCA         []byte           `json:"issuer_ca,omitempty"`
		Audience         string           `json:"audience"`
		Conditions       []ClaimCondition `json:"conditions,omitempty"`
		SPIFFEIDTemplate string           `json:"spiffe_id_template"`
		RunTemplate      string           `json:"run_template"`
		TTL              Seconds          `json:"ttl"`
		MaxTokenAge      Seconds          `json:"max_token_age"`
		AuditClaims      []string         `json:"audit_claims,omitempty"`
		CreatedBy        string           `json:"created_by"`
		CreatedAt        time.Time        `json:"created_at"`
		Revision         uint64           `json:"revision"`
	}
	// ClaimCondition is one of a rule's conditions on the token's claims.
	ClaimCondition struct {
		Claim   string `json:"claim"`
		Pattern string `json:"pattern"`
	}
	// JobRun is what a job agent's run may obtain: SPIFFEID, for the rule's
	// TTL, for the run's commands running as UID on the job's machine.
	JobRun struct {
		Rule string `json:"rule"`
		// RuleRevision is the rule's revision that admitted the run: a
		// rule deleted or replaced since ends what it admitted.
		RuleRevision uint64 `json:"rule_revision"`
		Run          string `json:"run"`
		// Key names the run's agent key (the first 16 hex digits of the
		// SHA-256 of its public key): each job of a run (a workflow run's
		// jobs share its claims) has its own agent, and only the same key
		// renews it.
		Key      string  `json:"key"`
		SPIFFEID string  `json:"spiffe_id"`
		UID      uint32  `json:"uid"`
		TTL      Seconds `json:"ttl"`
	}
	// JobJoin records a run's join (or its renewal by a fresh token): the
	// job agent (Agent.Job set; its RuleRevision is the rule the node
	// checked the token against: a rule deleted or replaced since refuses
	// the join) and the token's replay key, kept until ReplayUntil.
	JobJoin struct {
		Agent       Agent     `json:"agent"`
		ReplayKey   string    `json:"replay_key"`
		ReplayUntil time.Time `json:"replay_until"`
	}
	// JobEnd ends a run: the job agent goes and the X.509-SVIDs named by
	// serial (issued to it) are revoked.
	JobEnd struct {
		Agent    string   `json:"agent"`
		Serials  []string `json:"serials,omitempty"`
		ExitCode int      `json:"exit_code"`
	}
	// JobEnded is job.end's response.
	JobEnded struct {
		Revoked []string `json:"revoked,omitempty"`
	}
	// usedJobToken is a replay key's record.
	usedJobToken struct {
		Until time.Time `json:"until"`
		Rule  string    `json:"rule"`
	}
)

func init() {
	register(CmdJoinRuleCreate, byAdmin, applyJoinRuleCreate)
	register(CmdJoinRuleDelete, byAdmin, applyJoinRuleDelete)
	register(CmdJobJoin, byNode, applyJobJoin)
	register(CmdJobEnd, byNode, applyJobEnd)
}

// Spec is the rule as jobrule verifies against it.
func (r JoinRule) Spec() jobrule.Spec {
	s := jobrule.Spec{Name: r.Name, Preset: r.Preset, Issuer: r.Issuer, Audience: r.Audience,
		JWKS: r.JWKS, IssuerCA: r.IssuerCA, SPIFFEIDTemplate: r.SPIFFEIDTemplate, RunTemplate: r.RunTemplate,
		TTL: r.TTL.Duration(), MaxTokenAge: r.MaxTokenAge.Duration(), AuditClaims: slices.Clone(r.AuditClaims)}
	for _, c := range r.Conditions {
		s.Conditions = append(s.Conditions, jobrule.Condition{Claim: c.Claim, Pattern: c.Pattern})
	}
	return s
}

// checkJoinRule validates a rule as join-rule.create does (and as a
// snapshot's rules are checked).
func checkJoinRule(r *JoinRule) error {
	if err := r.Spec().Validate(); err != nil {
		return refuse("join rule %q: %v", truncate(r.Name, 64), err)
	}
	if len(r.AuditClaims) > MaxJobFacts {
		return refuse("join rule %s: %d audit claims; at most %d", r.Name, len(r.AuditClaims), MaxJobFacts)
	}
	return nil
}

// JobAgentID is the ID of the job agent of a rule's run with an agent
// key (JobKeyName).
func JobAgentID(td spiffeid.TrustDomain, rule, run, key string) (spiffeid.ID, error) {
	return spiffeid.FromSegments(td, "sigil", "agent", "job", rule, run, key)
}

// JobKeyName names a job agent's key in its ID: the first 16 hex digits
// of the SHA-256 of its public key (PKIX DER).
func JobKeyName(spki []byte) string { return hashHex(string(spki))[:16] }

// JobEntryID is the ID of the entry a job agent's record implies.
func JobEntryID(agent string) string {
	return jobEntryIDPrefix + hashHex(agent)[:32]
}

// JobEntry is the entry a job agent's record implies: its run's identity,
// for its run's commands (unix:uid), for the rule's TTL. ok is false for
// other agents.
func (a Agent) JobEntry() (e Entry, ok bool) {
	if a.Job == nil {
		return Entry{}, false
	}
	jwt := min(a.Job.TTL, Seconds(jobJWTTTL/time.Second))
	return Entry{ID: JobEntryID(a.ID), SPIFFEID: a.Job.SPIFFEID, ParentID: a.ID,
		Selectors: []Selector{{Type: jobUIDSelectorType, Value: jobUIDSelectorValue + strconv.FormatUint(uint64(a.Job.UID), 10)}},
		X509TTL:   a.Job.TTL, JWTTTL: jwt, CreatedAt: a.JoinedAt, UpdatedAt: a.UpdatedAt, Revision: a.Revision}, true
}

func (t *txn) joinRule(name string) (*JoinRule, error) {
	return getOne[JoinRule](t.tx.Bucket(bJoinRules), name)
}

func applyJoinRuleCreate(t *txn, r *JoinRule) (any, []AuditEvent, error) {
	if t.c.Version < JobVersion {
		return nil, nil, refuse("%s is a command of version %d, not %d", t.c.Type, JobVersion, t.c.Version)
	}
	if err := checkJoinRule(r); err != nil {
		return nil, nil, err
	}
	rules := t.tx.Bucket(bJoinRules)
	if rules.Get([]byte(r.Name)) != nil {
		return nil, nil, refuse("join rule %s exists: delete it first", r.Name)
	}
	if n := rules.Stats().KeyN; n >= MaxJoinRules {
		return nil, nil, refuse("%d join rules: at most %d", n, MaxJoinRules)
	}
	r.CreatedBy, r.CreatedAt, r.Revision = truncate(t.c.Actor, maxActor), t.c.Time, t.index
	detail := map[string]string{"issuer": r.Issuer, "audience": r.Audience, "spiffe_id_template": r.SPIFFEIDTemplate,
		"run_template": r.RunTemplate, "ttl": r.TTL.Duration().String(), "max_token_age": r.MaxTokenAge.Duration().String(),
		"keys": "discovery"}
	if r.Preset != "" {
		detail["preset"] = r.Preset
	}
	if len(r.JWKS) > 0 {
		detail["keys"] = "static jwks sha256:" + hashHex(string(r.JWKS))[:16]
	}
	for i, c := range r.Conditions {
		if i >= maxDetailKeys-len(detail)-1 {
			detail["conditions_more"] = strconv.Itoa(len(r.Conditions) - i)
			break
		}
		detail["condition."+truncate(c.Claim, maxDetailKey-len("condition."))] = truncate(c.Pattern, maxDetailValue)
	}
	return r, []AuditEvent{{Action: t.c.Type, Target: r.Name, Detail: detail}}, putJSON(rules, []byte(r.Name), r)
}

func applyJoinRuleDelete(t *txn, p *EntryID) (any, []AuditEvent, error) {
	if t.c.Version < JobVersion {
		return nil, nil, refuse("%s is a command of version %d, not %d", t.c.Type, JobVersion, t.c.Version)
	}
	r, err := t.joinRule(p.ID)
	if err != nil {
		return nil, nil, err
	}
	if r == nil {
		return nil, nil, refuse("no join rule %q", truncate(p.ID, 64))
	}
	return nil, []AuditEvent{{Action: t.c.Type, Target: r.Name, Detail: map[string]string{"issuer": r.Issuer}}},
		t.tx.Bucket(bJoinRules).Delete([]byte(r.Name))
}

// checkJobAgent checks a job agent's record as job.join stores it.
func checkJobAgent(td spiffeid.TrustDomain, a *Agent) error {
	if a.Job == nil {
		return refuse("job agent %s: no run", truncate(a.ID, 128))
	}
	j := a.Job
	if !jobRunSegmentRE.MatchString(j.Run) {
		return refuse("job agent %s: run %q: want 1-255 of A-Z a-z 0-9 . _ -", truncate(a.ID, 128), truncate(j.Run, 64))
	}
	if !jobKeyRE.MatchString(j.Key) {
		return refuse("job agent %s: key name %q: want 16 hex digits", truncate(a.ID, 128), truncate(j.Key, 64))
	}
	want, err := JobAgentID(td, j.Rule, j.Run, j.Key)
	if err != nil || a.ID != want.String() {
		return refuse("job agent %q: want the ID of rule %q's run %q with key %s", truncate(a.ID, 128), truncate(j.Rule, 64), truncate(j.Run, 64), j.Key)
	}
	if a.AttestationType != jobAttestation {
		return refuse("job agent %s: attestation type %q, want %q", a.ID, truncate(a.AttestationType, 32), jobAttestation)
	}
	id, err := spiffeid.FromString(j.SPIFFEID)
	switch {
	case err != nil || len(j.SPIFFEID) > 2048:
		return refuse("job agent %s: run identity %q is not a SPIFFE ID", a.ID, truncate(j.SPIFFEID, 128))
	case !id.MemberOf(td) || id.Path() == "" || strings.HasPrefix(id.Path(), "/sigil/"):
		return refuse("job agent %s: run identity %s must be a workload ID of %s (not under /sigil/)", a.ID, id, td)
	case j.TTL <= 0:
		return refuse("job agent %s: no TTL", a.ID)
	case len(a.Facts) > MaxJobFacts || len(a.SerialNumber) > 64 || !serialRE.MatchString(a.SerialNumber):
		return refuse("job agent %s: at most %d facts and a hex serial", a.ID, MaxJobFacts)
	case a.Banned:
		return refuse("job agent %s: a join does not record a ban", a.ID)
	}
	for k, v := range a.Facts {
		if len(k) > maxDetailKey-len("fact.") || len(v) > maxDetailValue {
			return refuse("job agent %s: fact %q too long", a.ID, truncate(k, 64))
		}
	}
	return nil
}

func applyJobJoin(t *txn, p *JobJoin) (any, []AuditEvent, error) {
	if t.c.Version < JobVersion {
		return nil, nil, refuse("%s is a command of version %d, not %d", t.c.Type, JobVersion, t.c.Version)
	}
	a := &p.Agent
	if err := checkJobAgent(t.f.td, a); err != nil {
		return nil, nil, err
	}
	rule, err := t.joinRule(a.Job.Rule)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case rule == nil:
		return nil, nil, refuse("no join rule %q (deleted since the token was checked?)", truncate(a.Job.Rule, 64))
	case a.Job.RuleRevision != rule.Revision:
		return nil, nil, refuse("join rule %s changed since the token was checked (revision %d, checked against %d)", rule.Name, rule.Revision, a.Job.RuleRevision)
	case a.Job.TTL != rule.TTL:
		return nil, nil, refuse("job agent %s: TTL %s, the rule's is %s", a.ID, a.Job.TTL.Duration(), rule.TTL.Duration())
	case !hexHashRE.MatchString(p.ReplayKey):
		return nil, nil, refuse("replay key: want a hex SHA-256")
	case !p.ReplayUntil.After(t.c.Time) || p.ReplayUntil.After(t.c.Time.Add(maxReplayWindow)):
		return nil, nil, refuse("replay key kept until %s: want a time within %s of now", p.ReplayUntil.UTC().Format(time.RFC3339), maxReplayWindow)
	case !a.ExpiresAt.After(t.c.Time) || a.ExpiresAt.After(t.c.Time.Add(a.Job.TTL.Duration()+time.Minute)):
		return nil, nil, refuse("job agent %s: expiry %s outside the rule's TTL", a.ID, a.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if err := dropExpiredJobTokens(t.tx, t.c.Time); err != nil {
		return nil, nil, err
	}
	if err := t.dropExpiredJobAgents(); err != nil {
		return nil, nil, err
	}
	used := t.tx.Bucket(bJobTokens)
	if used.Get([]byte(p.ReplayKey)) != nil {
		return nil, nil, refuse("platform token already used (a replay): each token joins once")
	}
	until := p.ReplayUntil.UTC()
	if err := putJSON(used, []byte(p.ReplayKey), usedJobToken{Until: until, Rule: rule.Name}); err != nil {
		return nil, nil, err
	}
	if err := t.tx.Bucket(bJobTokensByExpiry).Put(expiryKey(until, p.ReplayKey), nil); err != nil {
		return nil, nil, err
	}
	old, err := t.agent(a.ID)
	if err != nil {
		return nil, nil, err
	}
	a.JoinedAt = t.c.Time
	// The acknowledged bundle sequence is the state's, never the
	// command's: kept across a run's renewals (a renewed agent does not
	// acknowledge again until its bundle changes).
	a.BundleAck = 0
	if old != nil {
		a.BundleAck = old.BundleAck
		if old.Banned {
			return nil, nil, refuse("agent %s is banned", a.ID)
		}
		// A run renews with the same identity. Another run whose token
		// names the same run (a run template too coarse for the identity
		// template) would otherwise re-point the first run's agent, and
		// the first run's still-valid certificate, at its identity.
		if old.Job == nil || old.Job.SPIFFEID != a.Job.SPIFFEID {
			return nil, nil, refuse("run %s of rule %s already joined with another identity: a run's identity does not change (make the rule's run template name runs more finely)", a.Job.Run, rule.Name)
		}
		a.JoinedAt = old.JoinedAt
		if err := t.tx.Bucket(bJobAgentsByExpiry).Delete(expiryKey(old.ExpiresAt, old.ID)); err != nil {
			return nil, nil, err
		}
	}
	a.ExpiresAt = a.ExpiresAt.UTC()
	a.PreviousSerial, a.PreviousUntil = "", time.Time{}
	a.UpdatedAt, a.Revision = t.c.Time, t.index
	if err := t.tx.Bucket(bJobAgentsByExpiry).Put(expiryKey(a.ExpiresAt, a.ID), nil); err != nil {
		return nil, nil, err
	}
	detail := map[string]string{"rule": rule.Name, "run": a.Job.Run, "spiffe_id": a.Job.SPIFFEID, "serial": a.SerialNumber,
		"expires": a.ExpiresAt.Format(time.RFC3339), "uid": strconv.FormatUint(uint64(a.Job.UID), 10)}
	if old != nil {
		detail["renewed"] = "true"
	}
	for k, v := range a.Facts {
		detail["fact."+k] = v
	}
	t.touchAgent(a.ID)
	return a, []AuditEvent{{Action: t.c.Type, Target: a.ID, Detail: detail}}, putJSON(t.tx.Bucket(bAgents), []byte(a.ID), a)
}

func applyJobEnd(t *txn, p *JobEnd) (any, []AuditEvent, error) {
	if t.c.Version < JobVersion {
		return nil, nil, refuse("%s is a command of version %d, not %d", t.c.Type, JobVersion, t.c.Version)
	}
	a, err := t.agent(p.Agent)
	if err != nil {
		return nil, nil, err
	}
	switch {
	case a == nil:
		return nil, nil, refuse("no agent %s (its run ended, or its SVID expired)", truncate(p.Agent, 128))
	case a.Job == nil:
		return nil, nil, refuse("agent %s is not a job agent: only a run ends", a.ID)
	case len(p.Serials) > MaxRunEndSerials:
		return nil, nil, refuse("%d serials: a run end revokes at most %d", len(p.Serials), MaxRunEndSerials)
	}
	svids, audit, rev := t.tx.Bucket(bSVIDs), t.tx.Bucket(bAudit), t.tx.Bucket(bRevoked)
	var revoked []string
	var toRevoke []Revocation
	for _, raw := range p.Serials {
		s := strings.ToLower(strings.TrimLeft(raw, "0"))
		if !serialRE.MatchString(s) {
			return nil, nil, refuse("serial %q: want hex", truncate(raw, 80))
		}
		var issued IssuedSVID
		ok, err := getJSON(svids, []byte(s), &issued)
		if err != nil {
			return nil, nil, err
		}
		if !ok || !issued.NotAfter.After(t.c.Time) {
			continue // expired (or never this appliance's): nothing to revoke
		}
		// The issuance's audit record names the agent it was issued to; a
		// run revokes only its own SVIDs. A record pruned by retention
		// leaves the serial unrevoked rather than trusting the caller.
		var rec AuditRecord
		if ok, err := getJSON(audit, u64Key(issued.Seq), &rec); err != nil {
			return nil, nil, err
		} else if !ok {
			continue
		}
		if rec.Detail["agent"] != a.ID {
			return nil, nil, refuse("serial %s was not issued to %s: a run revokes only its own SVIDs", s, a.ID)
		}
		if rev.Get(revocationKey(issued.Node, s)) != nil {
			continue
		}
		toRevoke = append(toRevoke, Revocation{Serial: s, Node: issued.Node, NotAfter: issued.NotAfter.UTC(), At: t.c.Time})
		revoked = append(revoked, s)
	}
	if len(toRevoke) > 0 {
		if err := dropExpiredRevocations(rev, t.c.Time); err != nil {
			return nil, nil, err
		}
		for _, r := range toRevoke {
			if err := putJSON(rev, revocationKey(r.Node, r.Serial), r); err != nil {
				return nil, nil, err
			}
		}
		// Only this run held these SVIDs: the CRLs change, but no other
		// agent needs a new view for it (a CI doing a run a second would
		// otherwise send the whole fleet a view a second).
		if _, err := t.bumpBundleQuietly(); err != nil {
			return nil, nil, err
		}
	}
	if err := t.deleteJobAgent(a); err != nil {
		return nil, nil, err
	}
	if err := dropExpiredJobTokens(t.tx, t.c.Time); err != nil {
		return nil, nil, err
	}
	if err := t.dropExpiredJobAgents(); err != nil {
		return nil, nil, err
	}
	detail := map[string]string{"rule": a.Job.Rule, "run": a.Job.Run, "spiffe_id": a.Job.SPIFFEID,
		"exit_code": strconv.Itoa(p.ExitCode), "serial": a.SerialNumber}
	if len(revoked) > 0 {
		detail["revoked"] = strings.Join(revoked, ",")
	}
	return &JobEnded{Revoked: revoked}, []AuditEvent{{Action: t.c.Type, Target: a.ID, Detail: detail}}, nil
}

func (t *txn) deleteJobAgent(a *Agent) error {
	if err := t.tx.Bucket(bJobAgentsByExpiry).Delete(expiryKey(a.ExpiresAt, a.ID)); err != nil {
		return err
	}
	t.touchAgent(a.ID)
	return t.tx.Bucket(bAgents).Delete([]byte(a.ID))
}

// dropExpiredJobAgents deletes job agents whose SVID expired (a bounded
// number per command): an expired job agent can do nothing, and a busy CI
// would otherwise leave one record per run for ever. A banned one is
// kept: its record is what refuses its run.
func (t *txn) dropExpiredJobAgents() error {
	byExp := t.tx.Bucket(bJobAgentsByExpiry)
	limit := u64Key(uint64(t.c.Time.Unix()))
	var drop []*Agent
	var stale [][]byte
	c := byExp.Cursor()
	for k, _ := c.First(); len(k) > 8 && bytes.Compare(k[:8], limit) < 0 && len(drop)+len(stale) < maxJobExpiryPerCommand; k, _ = c.Next() {
		a, err := t.agent(string(k[8:]))
		if err != nil {
			return err
		}
		if a == nil || a.Job == nil || a.ExpiresAt.Unix() != int64(u64FromKey(k)) || a.Banned {
			stale = append(stale, bytes.Clone(k))
			continue
		}
		drop = append(drop, a)
	}
	for _, k := range stale {
		if err := byExp.Delete(k); err != nil {
			return err
		}
	}
	for _, a := range drop {
		if err := t.deleteJobAgent(a); err != nil {
			return err
		}
	}
	return nil
}

// dropExpiredJobTokens forgets used tokens past their replay window (a
// bounded number per command): they are refused as too old by then.
func dropExpiredJobTokens(tx *bolt.Tx, now time.Time) error {
	byExp, used := tx.Bucket(bJobTokensByExpiry), tx.Bucket(bJobTokens)
	limit := u64Key(uint64(now.Unix()))
	var drop [][]byte
	c := byExp.Cursor()
	for k, _ := c.First(); len(k) > 8 && bytes.Compare(k[:8], limit) < 0 && len(drop) < maxJobExpiryPerCommand; k, _ = c.Next() {
		drop = append(drop, bytes.Clone(k))
	}
	for _, k := range drop {
		var u usedJobToken
		if ok, err := getJSON(used, k[8:], &u); err != nil {
			return err
		} else if ok && u.Until.Unix() == int64(u64FromKey(k)) {
			if err := used.Delete(k[8:]); err != nil {
				return err
			}
		}
		if err := byExp.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

func hashHex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// JoinRule returns a join rule by name.
func (f *FSM) JoinRule(name string) (JoinRule, bool) {
	var r JoinRule
	var ok bool
	if !f.read("JoinRule", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bJoinRules), []byte(name), &r)
		return err
	}) {
		return JoinRule{}, false
	}
	return r, ok
}

// JoinRules returns every join rule, by name.
func (f *FSM) JoinRules() []JoinRule {
	var out []JoinRule
	f.read("JoinRules", func(tx *bolt.Tx) error {
		out = f.joinRulesIn(tx)
		return nil
	})
	return out
}

// JobTokensUsed is how many used platform tokens the state remembers.
func (f *FSM) JobTokensUsed() int {
	n := 0
	f.read("JobTokensUsed", func(tx *bolt.Tx) error {
		n = tx.Bucket(bJobTokens).Stats().KeyN
		return nil
	})
	return n
}

// loadJoinRuleFrame checks a snapshot's join rule.
func loadJoinRuleFrame(k, v []byte) error {
	var r JoinRule
	if err := decodeStrict(v, &r); err != nil || r.Name != string(k) {
		return fmt.Errorf("join rule %q: malformed", truncate(string(k), 64))
	}
	return checkJoinRule(&r)
}

// loadJobTokenFrame checks a snapshot's used token and indexes it.
func loadJobTokenFrame(tx *bolt.Tx, k, v []byte) error {
	var u usedJobToken
	if err := decodeStrict(v, &u); err != nil || !hexHashRE.Match(k) {
		return fmt.Errorf("used job token %q: malformed", truncate(string(k), 64))
	}
	return tx.Bucket(bJobTokensByExpiry).Put(expiryKey(u.Until, string(k)), nil)
}

// indexJobAgent indexes a snapshot's job agent by expiry.
func indexJobAgent(tx *bolt.Tx, td spiffeid.TrustDomain, a *Agent) error {
	if a.Job == nil {
		return nil
	}
	if err := checkJobAgent(td, a); err != nil && !a.Banned {
		return err
	}
	return tx.Bucket(bJobAgentsByExpiry).Put(expiryKey(a.ExpiresAt, a.ID), nil)
}

// replaceJoinRules makes rules the join rules (a restore), each with this
// command's revision and time, and says whether anything changed.
func (t *txn) replaceJoinRules(rules []JoinRule) (bool, error) {
	old := map[string]JoinRule{}
	for _, r := range t.f.joinRulesIn(t.tx) {
		old[r.Name] = r
	}
	if err := t.tx.DeleteBucket(bJoinRules); err != nil {
		return false, err
	}
	b, err := t.tx.CreateBucket(bJoinRules)
	if err != nil {
		return false, err
	}
	changed := len(old) != len(rules)
	for _, r := range rules {
		o, ok := old[r.Name]
		o.CreatedBy, o.CreatedAt, o.Revision = "", time.Time{}, 0
		r.CreatedBy, r.CreatedAt, r.Revision = "", time.Time{}, 0
		if a, b := jsonOf(o), jsonOf(r); !ok || !bytes.Equal(a, b) {
			changed = true
		}
		r.CreatedBy, r.CreatedAt, r.Revision = truncate(t.c.Actor, maxActor), t.c.Time, t.index
		if err := putJSON(b, []byte(r.Name), r); err != nil {
			return false, err
		}
	}
	return changed, nil
}

func jsonOf(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func (f *FSM) joinRulesIn(tx *bolt.Tx) []JoinRule {
	var out []JoinRule
	_ = tx.Bucket(bJoinRules).ForEach(func(k, v []byte) error {
		var r JoinRule
		if err := decodeStrict(v, &r); err != nil {
			f.log.Error("stored join rule unreadable", "rule", string(k), "err", err)
			return nil
		}
		out = append(out, r)
		return nil
	})
	return out
}

// JobTokenUsed reports whether a platform token's replay key is recorded.
func (f *FSM) JobTokenUsed(key string) bool {
	used := false
	f.read("JobTokenUsed", func(tx *bolt.Tx) error {
		used = tx.Bucket(bJobTokens).Get([]byte(key)) != nil
		return nil
	})
	return used
}

// JobRuleStands reports whether the rule that admitted a job agent's run
// is still in force, at the revision that admitted it. Other agents: true.
func (f *FSM) JobRuleStands(a Agent) bool {
	if a.Job == nil {
		return true
	}
	r, ok := f.JoinRule(a.Job.Rule)
	return ok && r.Revision == a.Job.RuleRevision
}
