package node

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
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

// agentSvc implements api.AgentServer: the only way identities leave the
// appliance. Every answer is audited through raft before it is sent.
type agentSvc struct{ n *Node }

var _ api.AgentServer = (*agentSvc)(nil)

// agent returns the calling agent from this node's state. That may lag a
// just-committed ban by a moment; the authority is the FSM, which refuses
// to record an issuance for a banned agent, and nothing unrecorded is sent.
func (s *agentSvc) agent(ctx context.Context, what string) (state.Agent, error) {
	c := callerFrom(ctx)
	if !s.n.raftReady() {
		s.n.log.Error("agent request refused: no leader", "request", what, "agent", c.Actor)
		return state.Agent{}, status.Errorf(codes.Unavailable, "this node knows no raft leader, so it issues nothing")
	}
	a, ok := s.n.fsm.Agent(c.Actor)
	if !ok || a.Banned {
		// A negative answer may be this node lagging (a join or unban not
		// applied yet): confirm it against the leader before refusing.
		if err := s.catchUp(ctx); err != nil {
			return state.Agent{}, err
		}
		a, ok = s.n.fsm.Agent(c.Actor)
	}
	reason := ""
	switch {
	case !ok:
		reason = "unknown agent: it has not joined"
	case a.Banned:
		reason = "agent is banned"
	}
	if reason != "" {
		s.refuse(ctx, what, c.Actor, "", reason)
		return state.Agent{}, status.Errorf(codes.PermissionDenied, "%s: %s", c.Actor, reason)
	}
	return a, nil
}

// refuse logs and audits a refusal (best effort: refusals must not be
// blocked by the audit, but they are recorded when the cluster can).
func (s *agentSvc) refuse(ctx context.Context, what, agent, target, reason string) {
	reason = auditReason(reason)
	s.n.log.Warn("issuance refused", "request", what, "agent", agent, "target", target, "reason", reason)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.n.batch.record(actx, state.AuditEvent{Action: what + ".refuse", Target: target,
		Detail: map[string]string{"agent": agent, "reason": reason}}); err != nil {
		s.n.log.Error("audit of refusal failed", "request", what, "agent", agent, "err", err)
	}
}

func (s *agentSvc) SignX509SVIDs(ctx context.Context, b *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	if len(b.Requests) == 0 || len(b.Requests) > maxBatch {
		return nil, status.Errorf(codes.InvalidArgument, "a batch holds 1 to %d requests, not %d", maxBatch, len(b.Requests))
	}
	a, err := s.agent(ctx, "svid.x509")
	if err != nil {
		return nil, err
	}
	for _, r := range b.Requests {
		if _, ok := s.n.fsm.Entry(r.EntryID); !ok {
			if err := s.catchUp(ctx); err != nil {
				return nil, err
			}
			break
		}
	}
	out := &api.X509SVIDBatchResult{Results: make([]api.X509SVIDResult, len(b.Requests))}
	// Sign in parallel: the HSM has a session pool and the CSR checks are
	// CPU work; one goroutine per batch would leave cores idle.
	events := make([]state.AuditEvent, len(b.Requests))
	var wg sync.WaitGroup
	work := make(chan int)
	for w := 0; w < min(len(b.Requests), 2*runtime.GOMAXPROCS(0)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				events[i] = s.signInto(a, b.Requests[i], &out.Results[i])
			}
		}()
	}
	for i := range b.Requests {
		work <- i
	}
	close(work)
	wg.Wait()
	// No record, no certificate: if the batch cannot commit, nothing that
	// was signed leaves this node.
	if err := s.n.batch.record(ctx, events...); err != nil {
		return nil, s.withheld(a.ID, err)
	}
	return out, nil
}

// catchUp waits (bounded) until this node has applied everything committed
// before the call.
func (s *agentSvc) catchUp(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, quorumWait)
	defer cancel()
	if err := s.n.raft.ReadIndex(rctx); err != nil {
		return status.Errorf(codes.Unavailable, "this node cannot reach a quorum, so it issues nothing: %v", err)
	}
	return nil
}

// withheld explains why signed SVIDs were not returned.
func (s *agentSvc) withheld(agent string, err error) error {
	s.n.log.Error("issuance withheld: not recorded", "agent", agent, "err", err)
	if errors.Is(err, errRefusedAtCommit) {
		return status.Errorf(codes.PermissionDenied, "%s: agent is banned", agent)
	}
	return status.Errorf(codes.Unavailable, "the audit record could not be committed (no quorum?), so nothing is issued: %v", err)
}

// signInto fills one result and returns its audit event.
func (s *agentSvc) signInto(a state.Agent, r api.X509SVIDRequest, res *api.X509SVIDResult) state.AuditEvent {
	res.EntryID = r.EntryID
	e, chain, reason := s.signOne(a, r)
	if reason != "" {
		res.Error = reason
		reason = auditReason(reason)
		s.n.log.Warn("issuance refused", "request", "svid.x509", "agent", a.ID, "entry", shownID(r.EntryID), "reason", reason)
		return state.AuditEvent{Action: "svid.x509.refuse", Target: e.SPIFFEID,
			Detail: map[string]string{"agent": a.ID, "entry": shownID(r.EntryID), "reason": reason}}
	}
	leaf := chain[0]
	res.SPIFFEID, res.ExpiresAt = e.SPIFFEID, leaf.NotAfter
	for _, c := range chain {
		res.Chain = append(res.Chain, c.Raw)
	}
	return state.AuditEvent{Action: "svid.x509.issue", Target: e.SPIFFEID, Detail: map[string]string{
		"serial": leaf.SerialNumber.Text(16), "agent": a.ID, "entry": e.ID, "node": s.n.cfg.NodeID,
		"expires": leaf.NotAfter.UTC().Format(time.RFC3339)}}
}

// signOne checks one request and signs it; reason says why not.
func (s *agentSvc) signOne(a state.Agent, r api.X509SVIDRequest) (state.Entry, []*x509.Certificate, string) {
	e, ok := s.n.fsm.Entry(r.EntryID)
	if !ok {
		return e, nil, fmt.Sprintf("no entry %q", shownID(r.EntryID))
	}
	if e.ParentID != a.ID {
		return e, nil, fmt.Sprintf("entry %s (%s) belongs to parent %s, not this agent", e.ID, e.SPIFFEID, e.ParentID)
	}
	csr, err := checkCSR(e, r.CSR)
	if err != nil {
		return e, nil, err.Error()
	}
	id, err := spiffeid.FromString(e.SPIFFEID)
	if err != nil {
		return e, nil, err.Error()
	}
	ttl := e.X509TTL.Duration()
	if ttl == 0 {
		ttl = defaultX509TTL
	}
	chain, err := s.n.auth.Sign(ca.Leaf{ID: id, PublicKey: csr.PublicKey, TTL: ttl, DNSNames: e.DNSNames})
	if err != nil {
		return e, nil, fmt.Sprintf("signing failed: %v", err)
	}
	return e, chain, ""
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

func (s *agentSvc) SignJWTSVID(ctx context.Context, r *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	a, err := s.agent(ctx, "svid.jwt")
	if err != nil {
		return nil, err
	}
	// The audiences are bounded first (they go into the token and its
	// audit record); then the entry must be this agent's.
	audErr := validAudience(r.Audience)
	e, ok := s.n.fsm.Entry(r.EntryID)
	if !ok && audErr == nil {
		if err := s.catchUp(ctx); err != nil {
			return nil, err
		}
		e, ok = s.n.fsm.Entry(r.EntryID)
	}
	reason := ""
	switch {
	case audErr != nil:
		reason = audErr.Error()
	case !ok:
		reason = fmt.Sprintf("no entry %q", shownID(r.EntryID))
	case e.ParentID != a.ID:
		reason = fmt.Sprintf("entry %s belongs to parent %s, not this agent", e.ID, e.ParentID)
	}
	if reason != "" {
		s.refuse(ctx, "svid.jwt", a.ID, e.SPIFFEID, reason)
		return nil, status.Error(codes.InvalidArgument, reason)
	}
	key, err := s.n.jwt.signer(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "no publishable JWT key: %v", err)
	}
	ttl := e.JWTTTL.Duration()
	if ttl == 0 {
		ttl = defaultJWTTTL
	}
	now := time.Now().Truncate(time.Second)
	jti := make([]byte, 16)
	rand.Read(jti)
	tok, err := signJWT(key, e.SPIFFEID, r.Audience, now, now.Add(ttl), hex.EncodeToString(jti))
	if err != nil {
		return nil, status.Errorf(codes.Internal, "sign JWT: %v", err)
	}
	if err := s.n.batch.record(ctx, state.AuditEvent{Action: "svid.jwt.issue", Target: e.SPIFFEID, Detail: map[string]string{
		"jti": hex.EncodeToString(jti), "agent": a.ID, "entry": e.ID, "kid": key.kid, "node": s.n.cfg.NodeID,
		"audience": strings.Join(r.Audience, ","), "expires": now.Add(ttl).UTC().Format(time.RFC3339)}}); err != nil {
		return nil, s.withheld(a.ID, err)
	}
	return &api.JWTSVIDResult{Token: tok, SPIFFEID: e.SPIFFEID, ExpiresAt: now.Add(ttl)}, nil
}

// Sync streams the agent's entries and the bundle: at once, then on every
// change that concerns this agent. A client resuming at the current
// revision waits for the next change.
func (s *agentSvc) Sync(r *api.SyncRequest, stream grpc.ServerStreamingServer[api.SyncUpdate]) error {
	ctx := stream.Context()
	a, err := s.agent(ctx, "sync")
	if err != nil {
		return err
	}
	var last []byte
	sent := r.Revision
	for {
		changed := s.n.fsm.ConfigChanged()
		ag, ok := s.n.fsm.Agent(a.ID)
		if !ok || ag.Banned {
			return status.Errorf(codes.PermissionDenied, "%s is banned or gone", a.ID)
		}
		b := s.n.fsm.Bundle()
		u := &api.SyncUpdate{Revision: s.n.fsm.Index(), Entries: apiEntries(s.n.fsm.EntriesByParent(a.ID)), Bundle: apiBundle(b)}
		view, _ := json.Marshal([]any{u.Entries, u.Bundle})
		if u.Revision > sent && !bytes.Equal(view, last) {
			if u.SPIFFE, err = SPIFFEBundle(s.n.td, b); err != nil {
				return status.Errorf(codes.Internal, "bundle: %v", err)
			}
			if err := stream.Send(u); err != nil {
				return err
			}
			last, sent = view, u.Revision
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}
