package node

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/jobrule"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Job joins: a pipeline run (GitHub Actions, GitLab CI, a Kubernetes pod,
// any OIDC issuer) presents its platform's signed ID token; jobrule checks
// it against the named join rule; the state machine refuses a token used
// before (on any node: the replay key is replicated) and records the run's
// job agent, whose record implies the run's entry (state.Agent.JobEntry).
// Refusals are anonymous ones (refusals.go): counted by class, logged
// within a budget, and charged to the source's bucket for refused joins
// before any token is parsed. A valid join costs a raft command, as a join
// token's does; it needs a token the platform signed for that run.

// Refusal classes of job joins beyond jobrule's reasons ("job-" + reason).
const (
	classJobRuleUnknown = "job-rule-unknown"
	classJobReplay      = "job-replay"
	classJobRuleChanged = "job-rule-changed"
)

// jobKeys holds the join rules' key sources: a static JWKS, or an
// issuer's discovery with its cached keys. Rules of one issuer (and CA)
// share one source, so a made-up kid costs one refetch per issuer, not
// one per rule.
type jobKeys struct {
	log     *slog.Logger
	fetches *prometheus.CounterVec // sigil_job_jwks_fetches_total{result}

	mu     sync.Mutex
	byKeys map[[sha256.Size]byte]jobrule.KeySource
}

func newJobKeys(log *slog.Logger, reg prometheus.Registerer) *jobKeys {
	k := &jobKeys{log: log, byKeys: map[[sha256.Size]byte]jobrule.KeySource{},
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_job_jwks_fetches_total",
			Help: "Fetches of join rules' issuer keys by OIDC discovery, by result (ok, error)."}, []string{"result"})}
	k.fetches.WithLabelValues("ok")
	k.fetches.WithLabelValues("error")
	if reg != nil {
		reg.MustRegister(k.fetches)
	}
	return k
}

// forRule returns the key source for the rule's issuer, CA and static
// JWKS, made on first use.
func (k *jobKeys) forRule(r state.JoinRule) (jobrule.KeySource, error) {
	h := sha256.New()
	for _, part := range [][]byte{[]byte(r.Issuer), r.IssuerCA, r.JWKS} {
		h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(part))))
		h.Write(part)
	}
	var id [sha256.Size]byte
	h.Sum(id[:0])
	k.mu.Lock()
	defer k.mu.Unlock()
	if src, ok := k.byKeys[id]; ok {
		return src, nil
	}
	issuer := r.Issuer
	src, err := jobrule.KeysFor(r.Spec(), jobrule.DiscoveryOptions{OnFetch: func(err error) {
		if err != nil {
			k.fetches.WithLabelValues("error").Inc()
			k.log.Error("join rule issuer's keys not fetched", "issuer", issuer, "err", err)
			return
		}
		k.fetches.WithLabelValues("ok").Inc()
		k.log.Info("join rule issuer's keys fetched", "issuer", issuer)
	}})
	if err != nil {
		return nil, fmt.Errorf("join rule %s: %w", r.Name, err)
	}
	// Sources of rules since deleted or changed are dropped all at once
	// when the map outgrows what the rules in force can use.
	if len(k.byKeys) >= 2*state.MaxJoinRules {
		clear(k.byKeys)
	}
	k.byKeys[id] = src
	return src, nil
}

func (j *joinSvc) Job(ctx context.Context, r *api.JoinJobRequest) (*api.JobSVID, error) {
	j.m.join("job")
	src := helloSource(ctx)
	// Every job join takes a token from the source's bucket of refused
	// joins and gives it back once its platform token checks out.
	if ok, retry := j.refused.allow(src, time.Now()); !ok {
		return nil, j.refuseAnon(ctx, "job", classRateLimited, "", codes.ResourceExhausted,
			fmt.Errorf("too many refused joins from %s (at most %g a second, bursts of %d); retry in %v", src, refusedRate, refusedBurst, retry.Round(time.Millisecond)))
	}
	if len(r.Token) > api.MaxJobTokenBytes || len(r.Rule) > 64 {
		return nil, j.refuseAnon(ctx, "job", classMalformed, "", codes.InvalidArgument,
			fmt.Errorf("a job join names a rule of at most 64 bytes (or none) and carries a token of at most %d bytes", api.MaxJobTokenBytes))
	}
	csr, err := x509.ParseCertificateRequest(r.CSR)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, j.refuseAnon(ctx, "job", classMalformed, "", codes.InvalidArgument, fmt.Errorf("CSR: %v", err))
	}
	rules, err := j.jobRules(ctx, r)
	if err != nil {
		if status.Code(err) == codes.Unavailable {
			j.refused.refund(src)
		}
		return nil, err
	}
	// The first rule the token satisfies admits it; when none does, the
	// refusal is the first candidate's.
	var rule state.JoinRule
	var v *jobrule.Verified
	var refusal *jobrule.Refusal
	var refusedBy string
	for _, cand := range rules {
		got, ref, err := j.verifyJob(ctx, src, cand, r.Token)
		if err != nil {
			return nil, err
		}
		if ref == nil {
			rule, v = cand, got
			break
		}
		if refusal == nil {
			refusal, refusedBy = ref, cand.Name
		}
	}
	if v == nil {
		return nil, j.refuseAnon(ctx, "job", "job-"+string(refusal.Reason), refusedBy, codes.PermissionDenied, refusal)
	}
	// A token already used is refused here, before anything is signed or
	// proposed (the state machine decides again at commit); the refusal
	// stays charged to the source.
	if j.state.JobTokenUsed(v.ReplayKey) {
		return nil, j.refuseAnon(ctx, "job", classJobReplay, rule.Name, codes.PermissionDenied,
			errors.New("platform token already used (a replay): each token joins once"))
	}
	spki, err := x509.MarshalPKIXPublicKey(csr.PublicKey)
	if err != nil {
		return nil, j.refuseAnon(ctx, "job", classMalformed, "", codes.InvalidArgument, fmt.Errorf("CSR key: %v", err))
	}
	agentID, err := state.JobAgentID(j.td, rule.Name, v.Run, state.JobKeyName(spki))
	if err != nil {
		return nil, j.refuseAnon(ctx, "job", "job-"+string(jobrule.ReasonUnsafeValue), rule.Name, codes.PermissionDenied, fmt.Errorf("run name %q: %v", shownID(v.Run), err))
	}
	runID, err := spiffeid.FromPath(j.td, v.Path)
	if err != nil {
		return nil, j.refuseAnon(ctx, "job", "job-"+string(jobrule.ReasonUnsafeValue), rule.Name, codes.PermissionDenied, fmt.Errorf("run identity %q: %v", shownID(v.Path), err))
	}
	facts := map[string]string{}
	for k, val := range v.Claims {
		if len(facts) < state.MaxJobFacts {
			facts[k] = val
		}
	}
	// Replicas drop used tokens by the proposing node's clock: a margin
	// keeps a token used while the nodes' clocks differ by minutes.
	join := state.JobJoin{ReplayKey: v.ReplayKey, ReplayUntil: v.ReplayUntil.Add(replayMargin).UTC(),
		Agent: state.Agent{ID: agentID.String(), AttestationType: "job", Facts: facts,
			Job: &state.JobRun{Rule: rule.Name, RuleRevision: rule.Revision, Run: v.Run, Key: state.JobKeyName(spki),
				SPIFFEID: runID.String(), UID: r.UID, TTL: rule.TTL}}}
	out, err := j.issuer.jobAgentSVID(ctx, agentID, csr.PublicKey, rule.TTL.Duration(), join)
	if err != nil {
		if !refused(err) {
			j.refused.refund(src) // this node's failure, not the caller's
			return nil, err
		}
		class := classRefusedCommit
		switch msg := err.Error(); {
		case containsAny(msg, "already used"):
			class = classJobReplay
		case containsAny(msg, "changed since", "no join rule"):
			class = classJobRuleChanged
		case containsAny(msg, "banned"):
			class = classBanned
		}
		return nil, j.refuseAnon(ctx, "job", class, agentID.String(), codes.PermissionDenied, err)
	}
	// Admitted: the join does not count against its source.
	j.refused.refund(src)
	return &api.JobSVID{AgentSVID: *out, SPIFFEID: runID.String(), EntryID: state.JobEntryID(agentID.String()), RunID: v.Run}, nil
}

// replayMargin is added to a used token's replay window (see Job).
const replayMargin = 5 * time.Minute

// maxJobRuleCandidates bounds the rules one token is checked against when
// the caller names none (those of the token's issuer, by name).
const maxJobRuleCandidates = 8

// jobRules is the rules a job join's token is checked against: the one
// it names, or when it names none, those of the token's (unverified)
// issuer. Confirmed against the latest committed state before a refusal.
func (j *joinSvc) jobRules(ctx context.Context, r *api.JoinJobRequest) ([]state.JoinRule, error) {
	find := func() ([]state.JoinRule, error) {
		if r.Rule != "" {
			if rule, ok := j.state.JoinRule(r.Rule); ok {
				return []state.JoinRule{rule}, nil
			}
			return nil, fmt.Errorf("no join rule %q", shownID(r.Rule))
		}
		iss, err := jobrule.UnverifiedIssuer(r.Token)
		if err != nil {
			return nil, err
		}
		var out []state.JoinRule
		for _, rule := range j.state.JoinRules() {
			if rule.Issuer == iss && len(out) < maxJobRuleCandidates {
				out = append(out, rule)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("no join rule for issuer %q", shownID(iss))
		}
		return out, nil
	}
	rules, err := find()
	var ref *jobrule.Refusal
	if err != nil && !errors.As(err, &ref) {
		// A rule created a moment ago may not have reached this node: a
		// refusal for want of a rule is confirmed first (not one of a
		// token that does not parse).
		if cerr := j.catchUp(ctx, "job"); cerr != nil {
			return nil, cerr
		}
		rules, err = find()
	}
	if err != nil {
		class := classJobRuleUnknown
		if errors.As(err, &ref) {
			class = "job-" + string(ref.Reason)
		}
		return nil, j.refuseAnon(ctx, "job", class, shownID(r.Rule), codes.PermissionDenied, err)
	}
	return rules, nil
}

// verifyJob checks a token against one rule. A refusal of the token is
// returned as ref; err is this node's failure (keys unavailable, a rule
// that cannot be used), already a gRPC status, with the source's refused
// join refunded.
func (j *joinSvc) verifyJob(ctx context.Context, src string, rule state.JoinRule, token string) (v *jobrule.Verified, ref *jobrule.Refusal, err error) {
	keys, err := j.jobKeys.forRule(rule)
	if err != nil {
		j.refused.refund(src)
		j.log.Error("job join failed: join rule's keys unusable", "rule", rule.Name, "err", err)
		return nil, nil, errUnavailable()
	}
	v, err = jobrule.Verify(ctx, rule.Spec(), keys, token, time.Now())
	if err == nil {
		return v, nil, nil
	}
	if !errors.As(err, &ref) {
		// The stored rule is unusable: this appliance's fault.
		j.refused.refund(src)
		j.log.Error("job join failed: join rule unusable", "rule", rule.Name, "err", err)
		return nil, nil, errUnavailable()
	}
	if ref.Reason == jobrule.ReasonKeysUnavailable {
		// The issuer's keys could not be fetched: this appliance's
		// problem (or the issuer's), not the caller's evidence. It stays
		// charged: after a failed fetch, any unknown kid lands here until
		// the next fetch is due, and must not be free.
		addr, _ := peerSource(ctx)
		j.anon.logFailure(classNoQuorum, "job join failed: issuer keys unavailable", "rule", rule.Name, "remote", addr, "err", err)
		return nil, nil, status.Error(codes.Unavailable, "the join rule's issuer keys are unavailable on this node; retry later")
	}
	return nil, ref, nil
}

// jobAgentSVID signs a job agent's SVID for ttl (the rule's) and records
// the run's join (job.join) before returning it. A refusal by the state
// machine (a replayed token, a rule changed since) is returned as it is.
func (s *issuer) jobAgentSVID(ctx context.Context, id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration, join state.JobJoin) (*api.AgentSVID, error) {
	chain, err := s.x509.SignAgent(ca.Leaf{ID: id, PublicKey: pub, TTL: ttl, Subject: pkix.Name{CommonName: "sigil-agent job"}})
	if err != nil {
		s.log.Error("job agent SVID not issued: signing", "agent", id.String(), "err", err)
		s.m.refuse(svidAgent, refuseUnavailable)
		return nil, errUnavailable()
	}
	leaf := chain[0]
	join.Agent.SerialNumber, join.Agent.ExpiresAt = leaf.SerialNumber.Text(16), leaf.NotAfter.UTC()
	if _, err := s.apply.apply(ctx, s.actor, state.CmdJobJoin, join); err != nil {
		if refused(err) {
			return nil, err
		}
		s.log.Error("job agent SVID withheld: run not recorded", "agent", id.String(), "err", err)
		s.m.refuse(svidAgent, refuseUnavailable)
		return nil, errNoCommit()
	}
	s.m.issue(svidAgent, 1)
	s.log.Info("job run admitted", "agent", id.String(), "rule", join.Agent.Job.Rule, "spiffe_id", join.Agent.Job.SPIFFEID,
		"serial", leaf.SerialNumber.Text(16), "expires", leaf.NotAfter)
	out := &api.AgentSVID{AgentID: id.String(), ExpiresAt: leaf.NotAfter}
	for _, c := range chain {
		out.Chain = append(out.Chain, c.Raw)
	}
	return out, nil
}

// RunEnd ends the calling job agent's run: its record goes (and with it
// the run's entry), and the run's X.509-SVIDs it names are revoked.
func (s *agentSvc) RunEnd(ctx context.Context, r *api.RunEndRequest) (*api.Empty, error) {
	a, err := s.issuer.callingAgent(ctx, callerFrom(ctx).Actor, "run.end")
	if err != nil {
		return nil, err
	}
	if a.Job == nil {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not a job agent: only a run ends", a.ID)
	}
	if len(r.Serials) > api.MaxRunEndSerials {
		return nil, status.Errorf(codes.InvalidArgument, "%d serials: a run end revokes at most %d", len(r.Serials), api.MaxRunEndSerials)
	}
	resp, err := s.issuer.apply.apply(ctx, s.issuer.actor, state.CmdJobEnd, state.JobEnd{Agent: a.ID, Serials: r.Serials, ExitCode: r.ExitCode})
	if err != nil {
		if refused(err) {
			s.issuer.log.Warn("run end refused", "agent", a.ID, "reason", auditReason(err.Error()))
			return nil, status.Error(codes.InvalidArgument, auditReason(err.Error()))
		}
		s.issuer.log.Error("run end not recorded", "agent", a.ID, "err", err)
		return nil, errNoCommit()
	}
	var ended state.JobEnded
	_ = json.Unmarshal(resp, &ended) // only for the log line
	s.issuer.log.Info("job run ended", "agent", a.ID, "rule", a.Job.Rule, "exit_code", r.ExitCode, "revoked", len(ended.Revoked))
	return &api.Empty{}, nil
}

// refuseJobRenew is Renew's answer to a job agent: its platform token,
// not its certificate, is what vouches for the run.
func refuseJobRenew(a state.Agent) error {
	return fmt.Errorf("%s is a job agent of rule %s: it renews by joining again with a fresh platform token, not by renewal", a.ID, a.Job.Rule)
}

// capToAgent cuts a job agent's workload SVID lifetime at the agent's own
// expiry: a run's identity does not outlive the run's agent.
func capToAgent(a state.Agent, ttl time.Duration, now time.Time) time.Duration {
	if a.Job == nil {
		return ttl
	}
	return min(ttl, a.ExpiresAt.Sub(now).Truncate(time.Second))
}

func containsAny(s string, subs ...string) bool {
	return slices.ContainsFunc(subs, func(sub string) bool { return strings.Contains(s, sub) })
}

// Admin: join rules.

func (a *admin) JoinRuleCreate(ctx context.Context, r *api.JoinRule) (*api.JoinRule, error) {
	spec := jobrule.Spec{Name: r.Name, Preset: r.Preset, Issuer: r.Issuer, Audience: r.Audience,
		JWKS: []byte(r.JWKS), IssuerCA: []byte(r.IssuerCA), SPIFFEIDTemplate: r.SPIFFEIDTemplate, RunTemplate: r.RunTemplate,
		TTL: r.TTL.Duration(), MaxTokenAge: r.MaxTokenAge.Duration(), AuditClaims: r.AuditClaims}
	for _, c := range r.Conditions {
		spec.Conditions = append(spec.Conditions, jobrule.Condition{Claim: c.Claim, Pattern: c.Pattern})
	}
	err := spec.ApplyPreset(a.td)
	if err == nil {
		err = spec.Validate()
	}
	if err != nil {
		a.log.Warn("admin request refused", "request", state.CmdJoinRuleCreate, "actor", callerFrom(ctx).Actor, "reason", err.Error())
		return nil, status.Errorf(codes.InvalidArgument, "join rule %q: %v", shownID(r.Name), err)
	}
	st := state.JoinRule{Name: spec.Name, Preset: spec.Preset, Issuer: spec.Issuer, Audience: spec.Audience,
		JWKS: spec.JWKS, IssuerCA: spec.IssuerCA, SPIFFEIDTemplate: spec.SPIFFEIDTemplate, RunTemplate: spec.RunTemplate,
		TTL: state.Seconds(spec.TTL / time.Second), MaxTokenAge: state.Seconds(spec.MaxTokenAge / time.Second), AuditClaims: spec.AuditClaims}
	for _, c := range spec.Conditions {
		st.Conditions = append(st.Conditions, state.ClaimCondition{Claim: c.Claim, Pattern: c.Pattern})
	}
	out, err := write[state.JoinRule](ctx, a, state.CmdJoinRuleCreate, &st)
	if err != nil {
		return nil, err
	}
	res := apiJoinRule(*out)
	return &res, nil
}

func (a *admin) JoinRuleList(ctx context.Context, _ *api.Empty) (*api.JoinRuleList, error) {
	if err := a.read(ctx, "join-rule list"); err != nil {
		return nil, err
	}
	return &api.JoinRuleList{Rules: convertAll(a.state.JoinRules(), apiJoinRule)}, nil
}

func (a *admin) JoinRuleShow(ctx context.Context, r *api.IDRequest) (*api.JoinRule, error) {
	if err := a.read(ctx, "join-rule show"); err != nil {
		return nil, err
	}
	rule, ok := a.state.JoinRule(r.ID)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no join rule %q", shownID(r.ID))
	}
	out := apiJoinRule(rule)
	return &out, nil
}

func (a *admin) JoinRuleDelete(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdJoinRuleDelete, state.EntryID{ID: r.ID})
}

// apiJoinRule is a stored join rule as the API serves it.
func apiJoinRule(r state.JoinRule) api.JoinRule {
	out := api.JoinRule{Name: r.Name, Preset: r.Preset, Issuer: r.Issuer, JWKS: string(r.JWKS), IssuerCA: string(r.IssuerCA),
		Audience: r.Audience, SPIFFEIDTemplate: r.SPIFFEIDTemplate, RunTemplate: r.RunTemplate,
		TTL: api.Seconds(r.TTL), MaxTokenAge: api.Seconds(r.MaxTokenAge), AuditClaims: r.AuditClaims,
		CreatedBy: r.CreatedBy, CreatedAt: r.CreatedAt, Revision: r.Revision}
	for _, c := range r.Conditions {
		out.Conditions = append(out.Conditions, api.ClaimCondition{Claim: c.Claim, Pattern: c.Pattern})
	}
	return out
}

// apiJobRun is a job agent's run as the API serves it (nil: not a job).
func apiJobRun(j *state.JobRun) *api.JobRun {
	if j == nil {
		return nil
	}
	return &api.JobRun{Rule: j.Rule, Run: j.Run, SPIFFEID: j.SPIFFEID, UID: j.UID, TTL: api.Seconds(j.TTL)}
}
