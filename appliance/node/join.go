package node

import (
	"container/list"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/appliance/tpmverify"
	"github.com/sigil-appliance/sigil/raft"
)

// joinSvc admits agents: by TPM evidence (appliance/tpmverify decides) or by
// a one-time join token, and renews their SVIDs. Every decision is logged;
// admissions and refusals of a proven identity (renewal, a banned agent)
// are audited one by one, anonymous refusals are counted and summarized
// (refusals.go) so that no anonymous caller can grow the audit log. The
// agent is recorded before its SVID is returned. Pending TPM challenges
// and the hellos that make them are bounded per EK and source, per source
// and in all (joinlimit.go).
type joinSvc struct {
	joinDeps

	pending *challengeTable // single use, by nonce
	limit   *sourceLimiter  // hellos that would get a challenge, per source
	refused *sourceLimiter  // hellos refused on their evidence, per source
	reads   readGroup       // read barriers confirming refusals, shared
	jobKeys *jobKeys        // join rules' issuer keys (jobjoin.go)
}

// joinDeps are what admitting agents needs from the node.
type joinDeps struct {
	td            spiffeid.TrustDomain
	disableTokens bool   // join.disable-tokens
	actor         string // this node, in whose name tokens are redeemed
	log           *slog.Logger
	state         joinState
	apply         applier
	quorum        quorum
	audit         auditRecorder
	anon          *refusals // anonymous refusals, summarized
	issuer        *issuer   // signs and records the agents' SVIDs

	m    *opsMetrics  // nil: nothing counted (metrics.go)
	bans *bannedAudit // nil: every refusal of a banned agent audited
}

// joinState is the replica as joining reads it.
type joinState interface {
	Policy() state.JoinPolicy
	Token(id string) (state.JoinToken, bool)
	Agent(id string) (state.Agent, bool)
	JoinRule(name string) (state.JoinRule, bool)
	JoinRules() []state.JoinRule
	JobTokenUsed(key string) bool
}

type challenge struct {
	ek   *tpmverify.EK
	ak   *tpmverify.AK
	cred *tpmverify.Credential
	pcrs map[uint][]byte

	nonce, ekHash, source string // the table's keys
	expires               time.Time
	elem                  *list.Element // in challengeTable.order
}

// newJoinSvc registers the service's metrics in reg (nil: none).
func newJoinSvc(d joinDeps, reg prometheus.Registerer) *joinSvc {
	replaced := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sigil_join_challenges_replaced_total",
		Help: "Pending TPM join challenges dropped for a newer hello: for the same EK from the same source (same-ek), from a source at its bound (source-full).",
	}, []string{"reason"})
	// Both reasons at zero from the start (joinlimit.go names them): the
	// metric is on /metrics before the first replacement, and a rate over
	// it sees that first one.
	for _, r := range []string{"same-ek", "source-full"} {
		replaced.WithLabelValues(r)
	}
	j := &joinSvc{joinDeps: d,
		pending: newChallengeTable(challengeTTL, maxPending, maxPendingPerSource, func(r string) { replaced.WithLabelValues(r).Inc() }),
		limit:   newSourceLimiter(helloRate, helloBurst, maxHelloSources),
		refused: newSourceLimiter(refusedRate, refusedBurst, maxHelloSources),
		jobKeys: newJobKeys(d.log, reg)}
	if reg != nil {
		reg.MustRegister(replaced,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_join_challenges_pending",
				Help: "TPM join challenges this node holds (bounded per EK and source, per source and in all)."},
				func() float64 { return float64(j.pending.len()) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_join_hello_sources",
				Help: "Sources the TPM hello rate limiter tracks (bounded)."},
				func() float64 { return float64(j.limit.len()) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sigil_join_read_barriers_total",
				Help: "Read barriers the join service took to confirm a refusal (unknown token, untrusted EK) against the latest committed state; concurrent refusals share one."},
				func() float64 { return float64(j.reads.reads.Load()) }))
	}
	return j
}

var _ api.JoinServer = (*joinSvc)(nil)

// refuse logs and audits a refused join of a proven identity (an agent
// renewing with its certificate, a banned agent whose evidence checked
// out) and returns the caller's error.
func (j *joinSvc) refuse(ctx context.Context, method, subject string, code codes.Code, err error) error {
	c := callerFrom(ctx)
	reason := auditReason(err.Error())
	class := provenClass(reason)
	j.anon.countOnly(class)
	j.m.refuse(svidAgent, class)
	detail := map[string]string{"caller": c.Actor, "reason": reason}
	if class == classBanned {
		// A banned agent retries for as long as it runs: audited at most
		// once per agent per period (metrics.go), counted every time.
		j.m.banned("join." + method)
		audit, suppressed := j.bans.take(subject)
		if !audit {
			j.log.Debug("join refused", "method", method, "caller", c.Actor, "subject", subject, "reason", reason)
			return status.Error(code, err.Error())
		}
		every := bannedAuditEvery
		if j.bans != nil {
			every = j.bans.every
		}
		detail = bannedDetail(detail, suppressed, every)
	}
	j.log.Warn("join refused", "method", method, "caller", c.Actor, "subject", subject, "reason", reason)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if aerr := j.audit.record(actx, state.AuditEvent{Action: "join." + method + ".refuse", Target: subject,
		Detail: detail}); aerr != nil {
		j.log.Error("audit of refused join failed", "err", aerr)
	}
	return status.Error(code, err.Error())
}

// refuseAnon refuses a caller that has proven no identity: logged
// (rate-limited) and counted by source and class, not audited one by one.
func (j *joinSvc) refuseAnon(ctx context.Context, method, class, subject string, code codes.Code, err error) error {
	j.anon.note(ctx, method, class, subject, err)
	return status.Error(code, err.Error())
}

// catchUp makes this node's replica current before a refusal that a
// just-committed change could turn around (a new token, an EK allowed);
// concurrent callers share the read barrier. Its error is logged (within
// a budget: the callers are anonymous) and not returned: raft's errors are
// this node's business.
func (j *joinSvc) catchUp(ctx context.Context, method string) error {
	if err := j.reads.do(ctx, func(ctx context.Context) error { return readBarrier(ctx, j.quorum) }); err != nil {
		addr, _ := peerSource(ctx)
		j.anon.logFailure(classNoQuorum, "join failed: no quorum for a read barrier", "method", method, "remote", addr, "err", err)
		return errNotCurrent()
	}
	return nil
}

func (j *joinSvc) TPMHello(ctx context.Context, r *api.JoinTPMHello) (*api.JoinTPMChallenge, error) {
	j.m.join("tpm-hello")
	src := helloSource(ctx)
	// Both buckets before any evidence is checked: a source that has used
	// either up costs the node nothing more. Every hello takes a token
	// for refused hellos here and gives it back once its evidence checks
	// out, so concurrent calls cannot overdraw the bucket.
	now := time.Now()
	if ok, retry := j.limit.peek(src, now); !ok {
		return nil, j.refuseAnon(ctx, "tpm", classRateLimited, "", codes.ResourceExhausted, rateLimited(src, retry))
	}
	if ok, retry := j.refused.allow(src, now); !ok {
		return nil, j.refuseAnon(ctx, "tpm", classRateLimited, "", codes.ResourceExhausted, refusedLimited(src, retry))
	}
	verify := func() (*tpmverify.EK, state.JoinPolicy, error) {
		pol := j.state.Policy()
		var cas []*x509.Certificate
		for _, c := range pol.EKCAs {
			if cert, err := x509.ParseCertificate(c.DER); err == nil {
				cas = append(cas, cert)
			}
		}
		ek, err := tpmverify.VerifyEK(r.EKPublic, r.EKCert, cas, pol.EKAllow)
		return ek, pol, err
	}
	ek, pol, err := verify()
	if err != nil {
		// The policy may have just changed on the leader: confirm the
		// refusal against the latest committed policy.
		if cerr := j.catchUp(ctx, "tpm"); cerr != nil {
			j.refused.refund(src) // no quorum: not a refusal of the evidence
			return nil, cerr
		}
		ek, pol, err = verify()
	}
	if err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classEKUntrusted, "", codes.PermissionDenied, err)
	}
	ak, err := tpmverify.CheckAK(r.AKPublic)
	if err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classAKInvalid, ek.Hash, codes.PermissionDenied, err)
	}
	j.refused.refund(src)
	// Charged only for hellos that would get a challenge: refused ones
	// hold nothing and are counted in bounded form (refusals.go).
	if ok, retry := j.limit.allow(src, time.Now()); !ok {
		return nil, j.refuseAnon(ctx, "tpm", classRateLimited, ek.Hash, codes.ResourceExhausted, rateLimited(src, retry))
	}
	cred, err := tpmverify.MakeCredential(ek, ak)
	if err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classMalformed, ek.Hash, codes.InvalidArgument, err)
	}
	ch := &challenge{ek: ek, ak: ak, cred: cred, ekHash: ek.Hash, source: src}
	out := &api.JoinTPMChallenge{IDObject: cred.IDObject, EncSecret: cred.EncSecret}
	if p := pol.PCRPolicy; p != nil {
		ch.pcrs = map[uint][]byte{}
		for k, v := range p.PCRs {
			i, _ := strconv.Atoi(k)
			b, _ := hex.DecodeString(v)
			ch.pcrs[uint(i)] = b
			out.PCRs = append(out.PCRs, uint(i))
		}
	}
	out.Nonce = make([]byte, 32)
	rand.Read(out.Nonce)
	ch.nonce = string(out.Nonce)
	if err := j.pending.add(time.Now(), ch); err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classBusy, ek.Hash, codes.ResourceExhausted, err)
	}
	return out, nil
}

func (j *joinSvc) TPMProve(ctx context.Context, r *api.JoinTPMProof) (*api.AgentSVID, error) {
	j.m.join("tpm-prove")
	ch := j.pending.take(string(r.Nonce))
	if ch == nil {
		return nil, j.refuseAnon(ctx, "tpm", classNonceUnknown, "", codes.PermissionDenied, errors.New("unknown or already used nonce (a replay, or the challenge came from another node)"))
	}
	if time.Now().After(ch.expires) {
		return nil, j.refuseAnon(ctx, "tpm", classNonceExpired, ch.ek.Hash, codes.PermissionDenied, errors.New("challenge expired"))
	}
	agentKey, err := tpmverify.VerifyCertify(ch.ak, tpmverify.Certification{Attest: r.CertifyAttest, Signature: r.CertifySignature, Public: r.AgentKeyPublic}, r.Nonce)
	if err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classCertifyMismatch, ch.ek.Hash, codes.PermissionDenied, err)
	}
	if err := ch.cred.Check(r.Secret); err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classBadSecret, ch.ek.Hash, codes.PermissionDenied, err)
	}
	if ch.pcrs != nil {
		if err := tpmverify.VerifyQuote(ch.ak, r.QuoteAttest, r.QuoteSignature, r.Nonce, ch.pcrs); err != nil {
			return nil, j.refuseAnon(ctx, "tpm", classQuotePolicy, ch.ek.Hash, codes.PermissionDenied, err)
		}
	}
	if err := checkCSRKey(r.CSR, agentKey); err != nil {
		return nil, j.refuseAnon(ctx, "tpm", classCSRMismatch, ch.ek.Hash, codes.PermissionDenied, err)
	}
	keyDER, _ := x509.MarshalPKIXPublicKey(agentKey)
	keySum := sha256.Sum256(keyDER)
	id := spiffeid.RequireFromPath(j.td, "/sigil/agent/tpm/"+ch.ek.Hash)
	svid, err := j.issue(ctx, "tpm", id, agentKey, "tpm", map[string]string{
		"ek_hash": ch.ek.Hash, "ek_method": ch.ek.Method, "ek_issuer": ch.ek.Issuer,
		"ak_name": hex.EncodeToString(ch.ak.Name), "agent_key_sha256": hex.EncodeToString(keySum[:]),
		"pcr_policy": strconv.FormatBool(ch.pcrs != nil),
	})
	if err == nil {
		// A TPM stood behind this hello: it does not count against its
		// source's rate.
		j.limit.refund(ch.source)
	}
	return svid, err
}

func (j *joinSvc) Token(ctx context.Context, r *api.JoinTokenRequest) (*api.AgentSVID, error) {
	j.m.join("token")
	if j.disableTokens {
		return nil, j.refuseAnon(ctx, "token", classTokensDisabled, "", codes.PermissionDenied, errors.New("join tokens are disabled on this node (join.disable-tokens)"))
	}
	csr, err := x509.ParseCertificateRequest(r.CSR)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, j.refuseAnon(ctx, "token", classMalformed, "", codes.InvalidArgument, fmt.Errorf("CSR: %v", err))
	}
	tokID := TokenID(r.Token)
	// A token no one created is refused here, after a linearizable read,
	// without a raft command: guessing tokens costs the cluster no log
	// entries.
	tok, ok := j.state.Token(tokID)
	if !ok {
		if err := j.catchUp(ctx, "token"); err != nil {
			return nil, err
		}
		if tok, ok = j.state.Token(tokID); !ok {
			return nil, j.refuseAnon(ctx, "token", classTokenUnknown, tokID[:12], codes.PermissionDenied, errors.New("unknown join token"))
		}
	}
	// A used, revoked or expired token is refused here too, without a raft
	// command (whoever holds a leaked token could otherwise make each retry
	// a log entry); the state machine decides again at commit for the race.
	if reason := tokenUnusable(tok, time.Now()); reason != "" {
		return nil, j.refuseToken(ctx, tokID, fmt.Errorf("join token %.12s %s", tokID, reason))
	}
	id := spiffeid.RequireFromPath(j.td, "/sigil/agent/join_token/"+tokID[:16])
	if _, err := j.apply.apply(ctx, j.actor, state.CmdTokenUse, state.TokenUse{ID: tokID, Agent: id.String()}); err != nil {
		if !refused(err) {
			addr, _ := peerSource(ctx)
			j.anon.logFailure(classNoQuorum, "join failed: token not redeemed", "method", "token", "remote", addr, "token", tokID[:12], "err", err)
			return nil, errNoCommit()
		}
		return nil, j.refuseToken(ctx, tokID, err)
	}
	return j.issue(ctx, "token", id, csr.PublicKey, "join_token", map[string]string{"token": tokID[:12]})
}

// Renew re-issues the calling agent's SVID for the same key (the TPM key:
// the TLS handshake that got here was signed by it). A banned agent gets
// nothing, and only the agent's current certificate (the serial its
// record holds) renews: once the agent has renewed, a copy of an older
// certificate and key (stolen) cannot renew beside it. The check follows a
// linearizable read, so a renewal committed through another node counts,
// and the state machine repeats it at commit (the new serial is recorded
// only in place of the presented one), so of two renewals of the same
// certificate at the same moment only one is recorded and answered.
func (j *joinSvc) Renew(ctx context.Context, r *api.RenewRequest) (*api.AgentSVID, error) {
	j.m.join("renew")
	c := callerFrom(ctx)
	p, _ := peer.FromContext(ctx)
	ti, _ := p.AuthInfo.(credentials.TLSInfo)
	if len(ti.State.PeerCertificates) == 0 {
		return nil, status.Error(codes.Unauthenticated, "no certificate")
	}
	presented := ti.State.PeerCertificates[0]
	if err := checkCSRKey(r.CSR, presented.PublicKey); err != nil {
		return nil, j.refuse(ctx, "renew", c.Actor, codes.PermissionDenied, err)
	}
	if err := catchUp(ctx, j.quorum, j.log, "method", "renew", "caller", c.Actor); err != nil {
		return nil, err
	}
	a, ok := j.state.Agent(c.Actor)
	if !ok || a.Banned {
		return nil, j.refuse(ctx, "renew", c.Actor, codes.PermissionDenied, errors.New("agent is banned or unknown"))
	}
	if a.Job != nil {
		return nil, j.refuse(ctx, "renew", c.Actor, codes.FailedPrecondition, refuseJobRenew(a))
	}
	serial := presented.SerialNumber.Text(16)
	previous := serial == a.PreviousSerial && time.Now().Before(a.PreviousUntil)
	if a.SerialNumber == "" || (serial != a.SerialNumber && !previous) {
		return nil, j.refuse(ctx, "renew", c.Actor, codes.PermissionDenied, fmt.Errorf(
			"certificate serial %s is not the agent's current certificate (%s): only the latest SVID renews; attest again", serial, a.SerialNumber))
	}
	id := spiffeid.RequireFromString(c.Actor)
	return j.issueReplacing(ctx, "renew", id, presented.PublicKey, a.AttestationType, a.Facts, serial)
}

// issue signs the agent's SVID and records the agent (audited) before
// returning it; the state machine refuses a banned agent at that point.
func (j *joinSvc) issue(ctx context.Context, op string, id spiffeid.ID, pub crypto.PublicKey, method string, facts map[string]string) (*api.AgentSVID, error) {
	return j.issueReplacing(ctx, op, id, pub, method, facts, "")
}

// issueReplacing is issue for a renewal of the certificate with serial
// replaces: the state machine records the new certificate only while the
// agent's record still holds that one ("": a join, which replaces any).
func (j *joinSvc) issueReplacing(ctx context.Context, op string, id spiffeid.ID, pub crypto.PublicKey, method string, facts map[string]string, replaces string) (*api.AgentSVID, error) {
	out, err := j.issuer.agentSVID(ctx, id, pub, method, facts, replaces)
	if err != nil && refused(err) {
		return nil, j.refuse(ctx, op, id.String(), codes.PermissionDenied, err)
	}
	return out, err
}

// tokenClass classifies the state machine's refusal of a token redemption.
// tokenUnusable says why a stored token no longer joins ("" if it does).
func tokenUnusable(t state.JoinToken, now time.Time) string {
	switch {
	case !t.RevokedAt.IsZero():
		return "was revoked"
	case t.UsedBy != "":
		return "was already used"
	case !t.ExpiresAt.After(now):
		return "expired"
	}
	return ""
}

// refuseToken refuses a token redemption. The caller is anonymous: it
// learns which of used, expired or revoked applies, not by whom or when
// (the state machine's refusal names the agent that used it or the admin
// that revoked it); the refusal summary in the log keeps the detail.
func (j *joinSvc) refuseToken(ctx context.Context, tokID string, err error) error {
	class := tokenClass(err)
	j.anon.note(ctx, "token", class, tokID[:12], err)
	msg := "join token " + tokID[:12] + " cannot be used"
	switch {
	case strings.Contains(err.Error(), "revoked"):
		msg = "join token " + tokID[:12] + " was revoked"
	case class == classTokenUsed:
		msg = "join token " + tokID[:12] + " was already used"
	case class == classTokenExpired:
		msg = "join token " + tokID[:12] + " expired"
	case class == classTokensDisabled:
		msg = "join tokens are disabled on this appliance"
	}
	return status.Error(codes.PermissionDenied, msg)
}

func tokenClass(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "disabled"):
		return classTokensDisabled
	case strings.Contains(msg, "unknown"):
		return classTokenUnknown
	case strings.Contains(msg, "already used"):
		return classTokenUsed
	case strings.Contains(msg, "expired"):
		return classTokenExpired
	}
	return classTokenRefused
}

// refused tells a command the state machine refused from a failure to
// commit it.
func refused(err error) bool {
	var ae *raft.ApplyError
	return errors.Is(err, state.ErrRefused) || errors.As(err, &ae)
}

func checkCSRKey(der []byte, want crypto.PublicKey) error {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("CSR signature does not verify: %v", err)
	}
	k, ok := csr.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !k.Equal(want) {
		return errors.New("CSR is for another key than the attested (or presented) one")
	}
	return nil
}

func rateLimited(src string, retry time.Duration) error {
	return fmt.Errorf("too many unproven TPM join hellos from %s (at most %g a second, bursts of %d); retry in %v",
		src, helloRate, helloBurst, retry.Round(time.Millisecond))
}

func refusedLimited(src string, retry time.Duration) error {
	return fmt.Errorf("too many refused TPM join hellos from %s (at most %g a second, bursts of %d); retry in %v",
		src, refusedRate, refusedBurst, retry.Round(time.Millisecond))
}
