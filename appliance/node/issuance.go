package node

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Defaults from the SPIFFE profiles Sigil follows.
const (
	defaultX509TTL = time.Hour
	defaultJWTTTL  = 5 * time.Minute
	maxBatch       = 1000
	quorumWait     = 5 * time.Second
)

// What agents are told when this node fails them for a reason of its own
// (HSM, raft, state): the kind of failure, one fixed message each. The
// detail (PKCS#11 return values, key and token labels, raft errors) is
// logged with the request and the agent, never returned: it helps an
// attacker map the appliance and helps no agent, which can only retry,
// here or on another node. The failures of this node's own making are
// Unavailable, which agents fail over on. Refusals of the agent's own
// request (a malformed CSR, an entry not its own) stay specific.
const (
	// msgUnavailable: this node cannot sign (HSM or CA failing, no JWT
	// key to sign with).
	msgUnavailable = "signing is unavailable on this node, try another"
	// msgNoLeader: this node knows no raft leader (an election, a
	// partition), so it cannot tell whether the agent may be served.
	msgNoLeader = "this node has no cluster leader now, try another"
	// msgNotCurrent: a read barrier (making this replica current before
	// a refusal or a lookup it cannot answer yet) failed or timed out: no
	// quorum, or the cluster is too loaded to answer within quorumWait.
	msgNotCurrent = "this node cannot catch up with the cluster now (no quorum, or overloaded), try another"
	// msgNoCommit: a record (audit, agent, token use) that must commit
	// before the answer did not: no quorum, or overloaded.
	msgNoCommit = "the cluster cannot commit now (no quorum, or overloaded), try another"
	msgInternal = "internal error"
)

// errUnavailable is the agent's answer when this node cannot sign now
// (HSM failing, no JWT key): another node may.
func errUnavailable() error { return status.Error(codes.Unavailable, msgUnavailable) }

// errNoLeader is the answer when this node knows no leader.
func errNoLeader() error { return status.Error(codes.Unavailable, msgNoLeader) }

// errNotCurrent is the answer when a read barrier failed.
func errNotCurrent() error { return status.Error(codes.Unavailable, msgNotCurrent) }

// errNoCommit is the answer when a record the answer waits for did not
// commit.
func errNoCommit() error { return status.Error(codes.Unavailable, msgNoCommit) }

// errInternal is the agent's answer when this node's own state is wrong.
func errInternal() error { return status.Error(codes.Internal, msgInternal) }

// The dependencies of issuance, each as small as its use here.
type (
	// issuanceState is the replica: the calling agent and its entries.
	issuanceState interface {
		Agent(id string) (state.Agent, bool)
		Entry(id string) (state.Entry, bool)
		JobRuleStands(a state.Agent) bool
	}
	// applier proposes a raft command and returns the state machine's
	// response.
	applier interface {
		apply(ctx context.Context, actor, typ string, payload any) ([]byte, error)
	}
	// quorum says whether a leader is known and makes this replica
	// current (a linearizable read).
	quorum interface {
		leaderKnown() bool
		readIndex(ctx context.Context) error
	}
	// auditRecorder commits audit events; it returns only once they are
	// committed, or fails. expect announces a record that a request is
	// preparing (the batcher waits for it rather than commit without it).
	auditRecorder interface {
		record(ctx context.Context, events ...state.AuditEvent) error
		expect() expectation
	}
	// expectation is an announced record: record it, or settle it when
	// the request ends without one (settle after record does nothing).
	expectation interface {
		record(ctx context.Context, events ...state.AuditEvent) error
		settle()
	}
	// svidSigner is the node's issuing CA (ca.Authority).
	svidSigner interface {
		Prepare(ca.Leaf) (*ca.Prepared, error)
		SignAgent(ca.Leaf) ([]*x509.Certificate, error)
	}
	// jwtSigner hands out the JWT key to sign with now (ca.JWTKeys,
	// through jwtKeys).
	jwtSigner interface {
		Current(ctx context.Context) (jwtKey, error)
	}
	// jwtKey signs JWT-SVIDs (ca.JWTKey).
	jwtKey interface {
		KID() string
		Sign(ca.JWTClaims) (string, error)
	}
)

// jwtKeys is ca.JWTKeys as a jwtSigner.
type jwtKeys struct{ *ca.JWTKeys }

func (k jwtKeys) Current(ctx context.Context) (jwtKey, error) {
	key, err := k.JWTKeys.Current(ctx)
	if err != nil {
		return nil, err
	}
	return key, nil
}

// issuer issues agents their identities: workload X.509-SVIDs and
// JWT-SVIDs for the entries an agent is parent of, and the agents' own
// SVIDs when they join or renew. These are the only ways identities
// leave the appliance, and every one is recorded through raft (audited,
// or the agent recorded) before it is returned: nothing unrecorded is
// sent. The gRPC services (agentSvc, joinSvc) authenticate and authorize
// callers and call it. Its dependencies are interfaces so that what
// issuance touches is visible here: the replica it reads, the cluster it
// commits to, the audit, and the CA. It stays in package node, without a
// *Node, because it shares the refusal forms its callers also use (the
// caller identity of auth.go, auditReason and shownID, the batcher's
// errRefusedAtCommit) and the node's tests exercise its checks
// (checkCSR, validAudience) directly.
type issuer struct {
	nodeID   string
	actor    string // this node in audit records and commands
	agentTTL time.Duration
	log      *slog.Logger
	// jwtIssuer is the iss claim of JWT-SVIDs (jwt.issuer; empty: none).
	jwtIssuer string

	state  issuanceState
	apply  applier
	quorum quorum
	audit  auditRecorder
	x509   svidSigner
	jwt    jwtSigner

	m    *opsMetrics  // nil: nothing counted
	bans *bannedAudit // nil: every refusal of a banned agent audited
}

// callingAgent returns the calling agent from this node's state. That may
// lag a just-committed ban by a moment; the authority is the FSM, which
// refuses to record an issuance for a banned agent, and nothing
// unrecorded is sent.
// leaderWait bounds how long an agent's request waits for a leader before
// it is refused. An election after a node dies takes about a second (two
// election timeouts at most); refusing at once sent every agent of the
// fleet hunting from node to node through it, each refusal doubling its
// backoff (BenchmarkFleet: the last of 500 agents resynced 15 s after the
// leader was killed).
const leaderWait = 3 * time.Second

// awaitLeader reports whether a leader is known, waiting up to leaderWait
// (or ctx) for one.
func awaitLeader(ctx context.Context, q quorum) bool {
	if q.leaderKnown() {
		return true
	}
	ctx, cancel := context.WithTimeout(ctx, leaderWait)
	defer cancel()
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return q.leaderKnown()
		case <-tick.C:
			if q.leaderKnown() {
				return true
			}
		}
	}
}

func (s *issuer) callingAgent(ctx context.Context, actor, what string) (state.Agent, error) {
	if !awaitLeader(ctx, s.quorum) {
		s.log.Error("agent request refused: no leader", "request", what, "agent", actor)
		s.countRefusal(what, refuseUnavailable)
		return state.Agent{}, errNoLeader()
	}
	a, ok := s.state.Agent(actor)
	if !ok || a.Banned {
		// A negative answer may be this node lagging (a join or unban not
		// applied yet): confirm it against the leader before refusing.
		if err := catchUp(ctx, s.quorum, s.log, "request", what, "agent", actor); err != nil {
			s.countRefusal(what, refuseUnavailable)
			return state.Agent{}, err
		}
		a, ok = s.state.Agent(actor)
	}
	switch {
	case !ok:
		// An agent removed with `agent remove` keeps a valid certificate
		// until it expires and may retry for as long: it is audited like a
		// banned one, at most once per agent per period, and counted.
		reason := "unknown agent: it has not joined or was removed"
		s.countRefusal(what, refuseUnknown)
		s.m.banned(what)
		s.refuseBanned(ctx, what, actor, reason)
		return state.Agent{}, status.Errorf(codes.PermissionDenied, "%s: %s", actor, reason)
	case a.Banned:
		reason := "agent is banned"
		s.countRefusal(what, refuseBanned)
		s.m.banned(what)
		s.refuseBanned(ctx, what, actor, reason)
		return state.Agent{}, status.Errorf(codes.PermissionDenied, "%s: %s", actor, reason)
	case what != "run.end" && !s.state.JobRuleStands(a):
		// The rule that admitted this run was deleted or replaced (a
		// restore re-stamps every rule): what it admitted ends with it.
		// The run may still end itself.
		reason := "the join rule that admitted this run was deleted or changed"
		s.countRefusal(what, refuseBanned)
		s.refuseBanned(ctx, what, actor, reason)
		return state.Agent{}, status.Errorf(codes.PermissionDenied, "%s: %s", actor, reason)
	}
	return a, nil
}

// countRefusal counts a refused SVID request (sync is not one).
func (s *issuer) countRefusal(what, class string) {
	if t := svidType(what); t == svidX509 || t == svidJWT {
		s.m.refuse(t, class)
	}
}

// refuseBanned logs and audits a banned agent's call, at most once per
// agent per period (s.bans): it retries for as long as it runs, and the
// audit must not grow with it. The counter sigil_banned_agent_calls_total
// has every call; the audit record says how many went unrecorded.
func (s *issuer) refuseBanned(ctx context.Context, what, agent, reason string) {
	audit, suppressed := s.bans.take(agent)
	if !audit {
		s.log.Debug("issuance refused", "request", what, "agent", agent, "reason", reason)
		return
	}
	s.log.Warn("issuance refused", "request", what, "agent", agent, "reason", reason, "refused_since_last_record", suppressed)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	every := bannedAuditEvery
	if s.bans != nil {
		every = s.bans.every
	}
	if err := s.audit.record(actx, state.AuditEvent{Action: what + ".refuse",
		Detail: bannedDetail(map[string]string{"agent": agent, "reason": reason}, suppressed, every)}); err != nil {
		s.log.Error("audit of refusal failed", "request", what, "agent", agent, "err", err)
	}
}

// refuse logs and audits a refusal (best effort: refusals must not be
// blocked by the audit, but they are recorded when the cluster can).
func (s *issuer) refuse(ctx context.Context, what, agent, target, reason string) {
	reason = auditReason(reason)
	s.log.Warn("issuance refused", "request", what, "agent", agent, "target", target, "reason", reason)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.audit.record(actx, state.AuditEvent{Action: what + ".refuse", Target: target,
		Detail: map[string]string{"agent": agent, "reason": reason}}); err != nil {
		s.log.Error("audit of refusal failed", "request", what, "agent", agent, "err", err)
	}
}

// x509SVIDs signs a batch of workload X.509-SVIDs for the calling agent.
func (s *issuer) x509SVIDs(ctx context.Context, actor string, b *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	if len(b.Requests) == 0 || len(b.Requests) > maxBatch {
		s.m.refuse(svidX509, refuseBadRequest)
		return nil, status.Errorf(codes.InvalidArgument, "a batch holds 1 to %d requests, not %d", maxBatch, len(b.Requests))
	}
	a, err := s.callingAgent(ctx, actor, "svid.x509")
	if err != nil {
		return nil, err
	}
	// Each entry is read once per batch (a read decodes it from the
	// replica's store); a missing one may be this node lagging a create,
	// so one read barrier is taken before any is refused.
	entries := make(map[string]state.Entry, 1)
	lookup := func() (missing bool) {
		for _, r := range b.Requests {
			if _, seen := entries[r.EntryID]; seen {
				continue
			}
			if je, ok := a.JobEntry(); ok && je.ID == r.EntryID {
				entries[r.EntryID] = je
				continue
			}
			if e, ok := s.state.Entry(r.EntryID); ok {
				entries[r.EntryID] = e
			} else {
				missing = true
			}
		}
		return missing
	}
	if lookup() {
		if err := catchUp(ctx, s.quorum, s.log, "request", "svid.x509", "agent", a.ID); err != nil {
			s.m.refuse(svidX509, refuseUnavailable)
			return nil, err
		}
		lookup()
	}
	// From here on a record is coming: announced, so that the batcher
	// waits for it rather than commit without it (not before: a read
	// barrier above may take seconds, and the batcher would wait on it).
	rec := s.audit.expect()
	defer rec.settle()
	out := &api.X509SVIDBatchResult{Results: make([]api.X509SVIDResult, len(b.Requests))}
	// Check every request and fix each certificate's serial and expiry:
	// the audit records are then known, and commit while the HSM signs.
	events := make([]state.AuditEvent, len(b.Requests))
	prepared := make([]*ca.Prepared, len(b.Requests))
	each(len(b.Requests), func(i int) {
		events[i], prepared[i] = s.prepareOne(a, entries, b.Requests[i], &out.Results[i])
	})
	committed := make(chan error, 1)
	go func() { committed <- rec.record(ctx, events...) }()
	chains := make([][]*x509.Certificate, len(b.Requests))
	signErrs := make([]error, len(b.Requests))
	each(len(b.Requests), func(i int) {
		if prepared[i] != nil {
			chains[i], signErrs[i] = prepared[i].Sign()
		}
	})
	// No record, no certificate: if the batch cannot commit, nothing that
	// was signed leaves this node.
	if err := <-committed; err != nil {
		return nil, s.withheld("svid.x509", a.ID, "", err)
	}
	var unsigned []state.AuditEvent
	issued := 0
	for i, r := range b.Requests {
		res := &out.Results[i]
		switch {
		case prepared[i] == nil:
		case signErrs[i] != nil:
			// Recorded as issued, then the HSM failed: the agent is told
			// to retry, the log has the detail, and the audit says that
			// the recorded serial was never signed.
			s.log.Error("issuance failed: signing", "request", "svid.x509", "agent", a.ID, "entry", r.EntryID, "serial", prepared[i].Serial(), "err", signErrs[i])
			s.m.refuse(svidX509, refuseUnavailable)
			res.Error = msgUnavailable
			unsigned = append(unsigned, state.AuditEvent{Action: "svid.x509.unsigned", Target: events[i].Target, Detail: map[string]string{
				"serial": prepared[i].Serial(), "agent": a.ID, "entry": r.EntryID, "node": s.nodeID, "reason": "signing failed on this node"}})
		default:
			leaf := chains[i][0]
			res.SPIFFEID, res.ExpiresAt = events[i].Target, leaf.NotAfter
			for _, c := range chains[i] {
				res.Chain = append(res.Chain, c.Raw)
			}
			issued++
		}
	}
	if len(unsigned) > 0 {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), quorumWait)
		if err := s.audit.record(actx, unsigned...); err != nil {
			s.log.Error("audit of unsigned SVIDs failed", "request", "svid.x509", "agent", a.ID, "unsigned", len(unsigned), "err", err)
		}
		cancel()
	}
	s.m.issue(svidX509, issued)
	return out, nil
}

// each runs f for 0..n-1: in the caller for one, else on a few
// goroutines (CSR checks are CPU work and the HSM has a session pool;
// one goroutine per batch would leave cores idle).
func each(n int, f func(i int)) {
	if n == 1 {
		f(0)
		return
	}
	var wg sync.WaitGroup
	work := make(chan int)
	for w := 0; w < min(n, 2*runtime.GOMAXPROCS(0)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				f(i)
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
}

// readBarrier waits (bounded) until this node has applied everything
// committed before the call, and returns raft's error as it is.
func readBarrier(ctx context.Context, q quorum) error {
	rctx, cancel := context.WithTimeout(ctx, quorumWait)
	defer cancel()
	return q.readIndex(rctx)
}

// catchUp is readBarrier for a caller outside the appliance: the raft
// error is logged with ctxAttrs (request, agent, entry), and the caller
// is told only that this node cannot catch up now (msgNotCurrent).
func catchUp(ctx context.Context, q quorum, log *slog.Logger, ctxAttrs ...any) error {
	if err := readBarrier(ctx, q); err != nil {
		log.Error("request failed: no quorum for a read barrier", append(ctxAttrs, "err", err)...)
		return errNotCurrent()
	}
	return nil
}

// withheld explains why signed SVIDs were not returned: the agent banned
// at commit is the agent's own business; any other failure to commit is
// the cluster's, logged and not returned (msgNoCommit).
func (s *issuer) withheld(what, agent, entry string, err error) error {
	s.log.Error("issuance withheld: not recorded", "request", what, "agent", agent, "entry", entry, "err", err)
	if errors.Is(err, errRefusedAtCommit) {
		s.countRefusal(what, refuseAtCommit)
		s.m.banned(what)
		return status.Errorf(codes.PermissionDenied, "%s: agent is banned", agent)
	}
	s.countRefusal(what, refuseUnavailable)
	return errNoCommit()
}

// prepareOne checks one request and fixes its certificate's serial and
// expiry; it returns the request's audit event, and the certificate to
// sign (nil when refused: res says why). entries holds the batch's
// entries that exist, by ID.
func (s *issuer) prepareOne(a state.Agent, entries map[string]state.Entry, r api.X509SVIDRequest, res *api.X509SVIDResult) (state.AuditEvent, *ca.Prepared) {
	res.EntryID = r.EntryID
	e, ok := entries[r.EntryID]
	p, reason, detail := s.checkOne(a, e, ok, r)
	if reason != "" {
		res.Error = reason
		s.m.refuse(svidX509, x509RefusalClass(reason))
		reason = auditReason(detail)
		s.log.Warn("issuance refused", "request", "svid.x509", "agent", a.ID, "entry", shownID(r.EntryID), "reason", reason)
		return state.AuditEvent{Action: "svid.x509.refuse", Target: e.SPIFFEID,
			Detail: map[string]string{"agent": a.ID, "entry": shownID(r.EntryID), "reason": reason}}, nil
	}
	return state.AuditEvent{Action: "svid.x509.issue", Target: e.SPIFFEID, Detail: map[string]string{
		"serial": p.Serial(), "agent": a.ID, "entry": e.ID, "node": s.nodeID,
		"expires": p.NotAfter().UTC().Format(time.RFC3339)}}, p
}

// x509RefusalClass is the metric class of signOne's reason.
func x509RefusalClass(reason string) string {
	switch {
	case reason == msgUnavailable || reason == msgInternal:
		return refuseUnavailable
	case strings.HasPrefix(reason, "no entry"):
		return refuseNoEntry
	case strings.Contains(reason, "belongs to another parent"):
		return refuseNotParent
	}
	return refuseBadRequest
}

// checkOne checks one request and prepares its certificate; reason says
// why not, to the agent, and detail (the same unless the failure is this
// node's or names another agent's entry) says it to the log and the audit.
func (s *issuer) checkOne(a state.Agent, e state.Entry, exists bool, r api.X509SVIDRequest) (p *ca.Prepared, reason, detail string) {
	if !exists {
		reason = fmt.Sprintf("no entry %q", shownID(r.EntryID))
		return nil, reason, reason
	}
	if e.ParentID != a.ID {
		// The entry's SPIFFE ID and parent are another agent's business.
		return nil, fmt.Sprintf("entry %s belongs to another parent, not this agent", e.ID),
			fmt.Sprintf("entry %s (%s) belongs to parent %s, not this agent", e.ID, e.SPIFFEID, e.ParentID)
	}
	csr, err := checkCSR(e, r.CSR)
	if err != nil {
		return nil, err.Error(), err.Error()
	}
	id, err := spiffeid.FromString(e.SPIFFEID)
	if err != nil {
		// The state holds an entry it should have refused: this node's
		// fault, not the agent's.
		s.log.Error("issuance failed: stored entry has an invalid SPIFFE ID", "request", "svid.x509", "agent", a.ID, "entry", e.ID, "err", err)
		return nil, msgInternal, "internal error: stored entry has an invalid SPIFFE ID"
	}
	ttl := e.X509TTL.Duration()
	if ttl == 0 {
		ttl = defaultX509TTL
	}
	if ttl = capToAgent(a, ttl, time.Now()); ttl < time.Second {
		return nil, "the job agent's run has ended: join again", fmt.Sprintf("job agent %s expired at %s", a.ID, a.ExpiresAt.Format(time.RFC3339))
	}
	ips := make([]net.IP, len(e.IPAddresses))
	for i, ip := range e.IPAddresses {
		if ips[i] = net.ParseIP(ip); ips[i] == nil {
			// The state machine refuses these (state.CheckIPSAN): this
			// node's fault, not the agent's.
			s.log.Error("issuance failed: stored entry has an invalid IP address", "request", "svid.x509", "agent", a.ID, "entry", e.ID, "ip", ip)
			return nil, msgInternal, "internal error: stored entry has an invalid IP address"
		}
	}
	p, err = s.x509.Prepare(ca.Leaf{ID: id, PublicKey: csr.PublicKey, TTL: ttl, DNSNames: e.DNSNames, IPAddresses: ips})
	if err != nil {
		// CA errors (revoked, expired) are this node's: logged, and the
		// audit says only that signing failed.
		s.log.Error("issuance failed: signing", "request", "svid.x509", "agent", a.ID, "entry", e.ID, "err", err)
		return nil, msgUnavailable, "signing failed on this node"
	}
	return p, "", ""
}

// checkCSR parses a workload CSR from an agent: well-formed, signed by the
// key it carries, asking for no ID or exactly the entry's.
func checkCSR(e state.Entry, der []byte) (*x509.CertificateRequest, error) {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("malformed CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature does not verify: %v", err)
	}
	if len(csr.URIs) > 1 || len(csr.URIs) == 1 && csr.URIs[0].String() != e.SPIFFEID {
		return nil, fmt.Errorf("CSR asks for %v, entry %s is for %s", csr.URIs, e.ID, e.SPIFFEID)
	}
	switch csr.PublicKey.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey, ed25519.PublicKey:
	default:
		return nil, fmt.Errorf("CSR key type %T is not supported", csr.PublicKey)
	}
	return csr, nil
}

// jwtSVID signs a JWT-SVID for the calling agent.
func (s *issuer) jwtSVID(ctx context.Context, actor string, r *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	a, err := s.callingAgent(ctx, actor, "svid.jwt")
	if err != nil {
		return nil, err
	}
	// The audiences are bounded first (they go into the token and its
	// audit record); then the entry must be this agent's.
	audErr := validAudience(r.Audience)
	e, ok := s.state.Entry(r.EntryID)
	if je, isJob := a.JobEntry(); isJob && je.ID == r.EntryID {
		e, ok = je, true
	}
	if !ok && audErr == nil {
		if err := catchUp(ctx, s.quorum, s.log, "request", "svid.jwt", "agent", a.ID, "entry", shownID(r.EntryID)); err != nil {
			s.m.refuse(svidJWT, refuseUnavailable)
			return nil, err
		}
		e, ok = s.state.Entry(r.EntryID)
	}
	reason := ""
	switch {
	case audErr != nil:
		reason = audErr.Error()
		s.m.refuse(svidJWT, refuseBadRequest)
	case !ok:
		reason = fmt.Sprintf("no entry %q", shownID(r.EntryID))
		s.m.refuse(svidJWT, refuseNoEntry)
	case e.ParentID != a.ID:
		s.m.refuse(svidJWT, refuseNotParent)
		// The parent is another agent's business: the audit has it, the
		// caller does not.
		s.refuse(ctx, "svid.jwt", a.ID, e.SPIFFEID, fmt.Sprintf("entry %s belongs to parent %s, not this agent", e.ID, e.ParentID))
		return nil, status.Errorf(codes.InvalidArgument, "entry %s belongs to another parent, not this agent", e.ID)
	}
	if reason != "" {
		s.refuse(ctx, "svid.jwt", a.ID, e.SPIFFEID, reason)
		return nil, status.Error(codes.InvalidArgument, reason)
	}
	key, err := s.jwt.Current(ctx)
	if err != nil {
		s.log.Error("issuance failed: no publishable JWT key", "request", "svid.jwt", "agent", a.ID, "entry", e.ID, "err", err)
		s.m.refuse(svidJWT, refuseUnavailable)
		return nil, errUnavailable()
	}
	rec := s.audit.expect()
	defer rec.settle()
	ttl := e.JWTTTL.Duration()
	if ttl == 0 {
		ttl = defaultJWTTTL
	}
	if ttl = capToAgent(a, ttl, time.Now()); ttl < time.Second {
		s.refuse(ctx, "svid.jwt", a.ID, e.SPIFFEID, "job agent's run has ended")
		return nil, status.Error(codes.FailedPrecondition, "the job agent's run has ended: join again")
	}
	now := time.Now().Truncate(time.Second)
	jti := make([]byte, 16)
	rand.Read(jti)
	claims := ca.JWTClaims{Issuer: s.jwtIssuer, Subject: e.SPIFFEID, Audience: r.Audience, IssuedAt: now, Expiry: now.Add(ttl), ID: hex.EncodeToString(jti)}
	// The record commits while the HSM signs (what it says is fixed by
	// now); the token is returned only once both are done.
	committed := make(chan error, 1)
	go func() {
		committed <- rec.record(ctx, state.AuditEvent{Action: "svid.jwt.issue", Target: e.SPIFFEID, Detail: map[string]string{
			"jti": claims.ID, "agent": a.ID, "entry": e.ID, "kid": key.KID(), "node": s.nodeID,
			"audience": strings.Join(r.Audience, ","), "expires": claims.Expiry.UTC().Format(time.RFC3339)}})
	}()
	tok, signErr := key.Sign(claims)
	if err := <-committed; err != nil {
		return nil, s.withheld("svid.jwt", a.ID, e.ID, err)
	}
	if signErr != nil {
		s.log.Error("issuance failed: signing", "request", "svid.jwt", "agent", a.ID, "entry", e.ID, "kid", key.KID(), "jti", claims.ID, "err", signErr)
		s.m.refuse(svidJWT, refuseUnavailable)
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), quorumWait)
		defer cancel()
		if err := s.audit.record(actx, state.AuditEvent{Action: "svid.jwt.unsigned", Target: e.SPIFFEID, Detail: map[string]string{
			"jti": claims.ID, "agent": a.ID, "entry": e.ID, "kid": key.KID(), "node": s.nodeID, "reason": "signing failed on this node"}}); err != nil {
			s.log.Error("audit of an unsigned JWT-SVID failed", "request", "svid.jwt", "agent", a.ID, "jti", claims.ID, "err", err)
		}
		return nil, errUnavailable()
	}
	s.m.issue(svidJWT, 1)
	return &api.JWTSVIDResult{Token: tok, SPIFFEID: e.SPIFFEID, ExpiresAt: now.Add(ttl)}, nil
}

// agentSVID signs an agent's own SVID and records the agent (audited)
// before returning it; the state machine refuses a banned agent at that
// point, and refuses a renewal whose presented certificate (serial
// replaces) is no longer the agent's current one ("": a join, which
// replaces any). A refusal by the state machine is returned as it is
// (refused(err) is true) for the caller to audit; other errors are gRPC
// statuses.
func (s *issuer) agentSVID(ctx context.Context, id spiffeid.ID, pub crypto.PublicKey, method string, facts map[string]string, replaces string) (*api.AgentSVID, error) {
	chain, err := s.x509.SignAgent(ca.Leaf{ID: id, PublicKey: pub, TTL: s.agentTTL, Subject: pkix.Name{CommonName: "sigil-agent"}})
	if err != nil {
		s.log.Error("agent SVID not issued: signing", "agent", id.String(), "method", method, "err", err)
		s.m.refuse(svidAgent, refuseUnavailable)
		return nil, errUnavailable()
	}
	leaf := chain[0]
	if _, err := s.apply.apply(ctx, s.actor, state.CmdAgentUpsert, &state.AgentUpsert{Agent: state.Agent{
		ID: id.String(), AttestationType: method, Facts: facts,
		SerialNumber: leaf.SerialNumber.Text(16), ExpiresAt: leaf.NotAfter.UTC(),
	}, ExpectSerial: replaces}); err != nil {
		if refused(err) {
			return nil, err
		}
		s.log.Error("agent SVID withheld: agent not recorded", "agent", id.String(), "method", method, "err", err)
		s.m.refuse(svidAgent, refuseUnavailable)
		return nil, errNoCommit()
	}
	s.m.issue(svidAgent, 1)
	s.log.Info("agent admitted", "agent", id.String(), "method", method, "serial", leaf.SerialNumber.Text(16), "expires", leaf.NotAfter)
	out := &api.AgentSVID{AgentID: id.String(), ExpiresAt: leaf.NotAfter}
	for _, c := range chain {
		out.Chain = append(out.Chain, c.Raw)
	}
	return out, nil
}

// Bounds of a JWT-SVID request's audiences: they go into the token and its
// audit record.
const (
	maxAudiences        = 8
	maxAudienceBytes    = 256
	maxAudienceTotalLen = 2048
)

// validAudience checks the audiences against the bounds. Errors say which
// limit was hit and never echo the audiences themselves.
func validAudience(aud []string) error {
	if len(aud) == 0 {
		return errors.New("audience is required")
	}
	if len(aud) > maxAudiences {
		return fmt.Errorf("%d audiences: at most %d are allowed", len(aud), maxAudiences)
	}
	total := 0
	for _, a := range aud {
		total += len(a)
	}
	if total > maxAudienceTotalLen {
		return fmt.Errorf("audiences are %d bytes in total: at most %d are allowed", total, maxAudienceTotalLen)
	}
	for i, a := range aud {
		switch {
		case strings.TrimSpace(a) == "":
			return fmt.Errorf("audience %d is empty", i+1)
		case len(a) > maxAudienceBytes:
			return fmt.Errorf("audience %d is %d bytes: at most %d are allowed", i+1, len(a), maxAudienceBytes)
		case !utf8.ValidString(a):
			return fmt.Errorf("audience %d is not valid UTF-8", i+1)
		case strings.ContainsFunc(a, unicode.IsControl):
			return fmt.Errorf("audience %d contains control characters", i+1)
		}
	}
	return nil
}
