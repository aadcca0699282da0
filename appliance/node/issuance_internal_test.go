package node

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Fakes of issuance's dependencies that fail the way an HSM and raft do.
type (
	fakeIssuanceState struct {
		agents  map[string]state.Agent
		entries map[string]state.Entry
	}
	failingQuorum struct{ err error }
	keptAudit     struct{ events []state.AuditEvent }
	failingSigner struct{ err error }
)

func (f fakeIssuanceState) Agent(id string) (state.Agent, bool) { a, ok := f.agents[id]; return a, ok }
func (f fakeIssuanceState) Entry(id string) (state.Entry, bool) { e, ok := f.entries[id]; return e, ok }
func (f fakeIssuanceState) JobRuleStands(state.Agent) bool      { return true }
func (q failingQuorum) leaderKnown() bool                       { return true }
func (q failingQuorum) readIndex(context.Context) error         { return q.err }
func (a *keptAudit) record(_ context.Context, ev ...state.AuditEvent) error {
	a.events = append(a.events, ev...)
	return nil
}
func (a *keptAudit) expect() expectation { return keptExpected{a} }

type keptExpected struct{ *keptAudit }

func (keptExpected) settle()                                           {}
func (s failingSigner) Prepare(ca.Leaf) (*ca.Prepared, error)          { return nil, s.err }
func (s failingSigner) SignAgent(ca.Leaf) ([]*x509.Certificate, error) { return nil, s.err }

// An HSM that fails to sign and a raft that cannot complete a read barrier
// are this node's business: the agent gets the fixed message, the log the
// detail with the agent and the entry, and the audit no PKCS#11 detail.
func TestIssuanceInternalDetailLoggedNotReturned(t *testing.T) {
	const agent = "spiffe://example.org/sigil/agent/tpm/host-a"
	hsmErr := errors.New(`pkcs11 sign with "sigil-issuing" on token "node-3-hsm": CKR_DEVICE_ERROR`)
	raftErr := errors.New("raft: no leader: context deadline exceeded")
	var logBuf syncBuffer
	audit := &keptAudit{}
	s := &issuer{
		nodeID: "node-3", actor: "spiffe://example.org/sigil/node/node-3",
		log: slog.New(slog.NewJSONHandler(&logBuf, nil)),
		state: fakeIssuanceState{
			agents: map[string]state.Agent{agent: {ID: agent}},
			entries: map[string]state.Entry{"e1": {ID: "e1", SPIFFEID: "spiffe://example.org/web", ParentID: agent},
				"e2": {ID: "e2", SPIFFEID: "spiffe://example.org/db", ParentID: "spiffe://example.org/sigil/agent/tpm/host-b"}},
		},
		quorum: failingQuorum{err: raftErr},
		audit:  audit,
		x509:   failingSigner{err: hsmErr},
	}
	ctx := context.Background()
	res, err := s.x509SVIDs(ctx, agent, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{
		{EntryID: "e1", CSR: testCSR(t)}, {EntryID: "e2", CSR: testCSR(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Results[0].Error; got != msgUnavailable {
		t.Errorf("HSM failure shown to the agent as %q, want %q", got, msgUnavailable)
	}
	// Another agent's entry: refused, without its SPIFFE ID or parent.
	if got := res.Results[1].Error; !strings.Contains(got, "not this agent") || strings.Contains(got, "host-b") || strings.Contains(got, "/db") {
		t.Errorf("refusal of another agent's entry: %q", got)
	}
	for _, ev := range audit.events {
		if strings.Contains(ev.Detail["reason"], "CKR_") || strings.Contains(ev.Detail["reason"], "node-3-hsm") {
			t.Errorf("audit holds HSM detail: %+v", ev)
		}
	}
	if _, err := s.agentSVID(ctx, spiffeid.RequireFromString(agent), nil, "tpm", nil, ""); status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgUnavailable {
		t.Errorf("agent SVID with a failing HSM: %v", err)
	}
	// An unknown entry needs a read barrier, which fails: the agent is
	// told that, not that signing failed.
	_, err = s.jwtSVID(ctx, agent, &api.JWTSVIDRequest{EntryID: "unknown", Audience: []string{"db"}})
	if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgNotCurrent {
		t.Errorf("JWT-SVID without a read barrier: %v, want Unavailable %q", err, msgNotCurrent)
	}
	log := logBuf.String()
	for _, want := range []string{
		`"msg":"issuance failed: signing","request":"svid.x509","agent":"` + agent + `","entry":"e1","err":"pkcs11 sign with \"sigil-issuing\" on token \"node-3-hsm\": CKR_DEVICE_ERROR"`,
		`"msg":"agent SVID not issued: signing","agent":"` + agent + `","method":"tpm","err":"pkcs11 sign`,
		`"request":"svid.jwt","agent":"` + agent + `","entry":"unknown","err":"raft: no leader: context deadline exceeded"`,
		`host-b`, // the other agent's parent, logged with its refusal
	} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %s:\n%s", want, log)
		}
	}
}

func testCSR(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// flakySigner is a software key that stops signing after ok signatures:
// an HSM failing between the moment an SVID's record commits and the
// moment it would have been signed.
type flakySigner struct {
	*ecdsa.PrivateKey
	ok *atomic.Int32
}

func (f flakySigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	if f.ok.Add(-1) < 0 {
		return nil, errors.New("CKR_DEVICE_REMOVED")
	}
	return f.PrivateKey.Sign(r, d, o)
}

// Records commit while the HSM signs: when the signature then fails, the
// agent gets no certificate (and the fixed message), and the audit holds
// the issuance record followed by one saying that its serial was never
// signed, so that no audit reader counts an SVID that does not exist.
func TestIssuanceSignFailureAfterRecord(t *testing.T) {
	const agent = "spiffe://example.org/sigil/agent/tpm/host-a"
	auth, _ := testAuthority(t, 1) // the key proof in ca.New, then nothing
	var logBuf syncBuffer
	audit := &keptAudit{}
	s := &issuer{
		nodeID: "node-3", log: slog.New(slog.NewJSONHandler(&logBuf, nil)),
		state: fakeIssuanceState{agents: map[string]state.Agent{agent: {ID: agent}},
			entries: map[string]state.Entry{"e1": {ID: "e1", SPIFFEID: "spiffe://example.org/web", ParentID: agent}}},
		quorum: failingQuorum{}, audit: audit, x509: auth,
	}
	res, err := s.x509SVIDs(context.Background(), agent, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: "e1", CSR: testCSR(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	if r := res.Results[0]; r.Error != msgUnavailable || len(r.Chain) != 0 {
		t.Fatalf("result after a failed signature: %+v", r)
	}
	if len(audit.events) != 2 || audit.events[0].Action != "svid.x509.issue" || audit.events[1].Action != "svid.x509.unsigned" {
		t.Fatalf("audit: %+v", audit.events)
	}
	if serial := audit.events[0].Detail["serial"]; serial == "" || audit.events[1].Detail["serial"] != serial {
		t.Fatalf("the unsigned record names serial %q, the issuance %q", audit.events[1].Detail["serial"], serial)
	}
	if !strings.Contains(logBuf.String(), "CKR_DEVICE_REMOVED") || strings.Contains(audit.events[1].Detail["reason"], "CKR_") {
		t.Fatalf("HSM detail belongs in the log, not the audit:\n%s\n%+v", logBuf.String(), audit.events[1])
	}
}

// failingAudit cannot commit: no quorum.
type failingAudit struct{ err error }

func (f failingAudit) record(context.Context, ...state.AuditEvent) error { return f.err }
func (f failingAudit) expect() expectation                               { return failingExpected(f) }

type failingExpected failingAudit

func (f failingExpected) record(context.Context, ...state.AuditEvent) error { return f.err }
func (failingExpected) settle()                                             {}

// fixedKeys hands out one JWT key; fixedKey signs with a fixed token or
// fails (control flow only: the JWT encoding is ca's, tested there).
type (
	fixedKeys struct{ key fixedKey }
	fixedKey  struct{ err error }
)

func (k fixedKeys) Current(context.Context) (jwtKey, error) { return k.key, nil }
func (fixedKey) KID() string                                { return "kid-1" }
func (k fixedKey) Sign(ca.JWTClaims) (string, error) {
	if k.err != nil {
		return "", k.err
	}
	return "header.payload.signature", nil
}

// Signatures made while the record fails to commit are never returned:
// X.509-SVIDs and JWT-SVIDs alike, the agent gets Unavailable.
func TestIssuanceNothingReturnedWithoutCommit(t *testing.T) {
	const agent = "spiffe://example.org/sigil/agent/tpm/host-a"
	auth, _ := testAuthority(t, 1000)
	noQuorum := errors.New("raft: no leader")
	s := &issuer{
		nodeID: "node-3", log: slog.New(slog.DiscardHandler),
		state: fakeIssuanceState{agents: map[string]state.Agent{agent: {ID: agent}},
			entries: map[string]state.Entry{"e1": {ID: "e1", SPIFFEID: "spiffe://example.org/web", ParentID: agent}}},
		quorum: failingQuorum{}, audit: failingAudit{err: noQuorum}, x509: auth, jwt: fixedKeys{},
	}
	ctx := context.Background()
	res, err := s.x509SVIDs(ctx, agent, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: "e1", CSR: testCSR(t)}}})
	if status.Code(err) != codes.Unavailable || res != nil {
		t.Fatalf("X.509-SVID without a commit: %+v, %v", res, err)
	}
	tok, err := s.jwtSVID(ctx, agent, &api.JWTSVIDRequest{EntryID: "e1", Audience: []string{"db"}})
	if status.Code(err) != codes.Unavailable || tok != nil {
		t.Fatalf("JWT-SVID without a commit: %+v, %v", tok, err)
	}
}

// A JWT whose record committed but whose signature then failed is not
// returned, and the audit says its jti was never signed.
func TestIssuanceJWTSignFailureAfterRecord(t *testing.T) {
	const agent = "spiffe://example.org/sigil/agent/tpm/host-a"
	audit := &keptAudit{}
	s := &issuer{
		nodeID: "node-3", log: slog.New(slog.DiscardHandler),
		state: fakeIssuanceState{agents: map[string]state.Agent{agent: {ID: agent}},
			entries: map[string]state.Entry{"e1": {ID: "e1", SPIFFEID: "spiffe://example.org/web", ParentID: agent}}},
		quorum: failingQuorum{}, audit: audit, jwt: fixedKeys{key: fixedKey{err: errors.New("CKR_DEVICE_ERROR")}},
	}
	tok, err := s.jwtSVID(context.Background(), agent, &api.JWTSVIDRequest{EntryID: "e1", Audience: []string{"db"}})
	if status.Code(err) != codes.Unavailable || tok != nil {
		t.Fatalf("JWT-SVID after a failed signature: %+v, %v", tok, err)
	}
	if len(audit.events) != 2 || audit.events[0].Action != "svid.jwt.issue" || audit.events[1].Action != "svid.jwt.unsigned" ||
		audit.events[0].Detail["jti"] == "" || audit.events[1].Detail["jti"] != audit.events[0].Detail["jti"] {
		t.Fatalf("audit: %+v", audit.events)
	}
	if strings.Contains(audit.events[1].Detail["reason"], "CKR_") {
		t.Fatalf("HSM detail in the audit: %+v", audit.events[1])
	}
}

// testAuthority is an issuing CA for node-3 under a fresh root, with a
// software key that signs ok times and then fails as a removed HSM does.
func testAuthority(t *testing.T, ok int32) (*ca.Authority, *ecdsa.PrivateKey) {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString("example.org")
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	root := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	rootDER, _ := x509.CreateCertificate(rand.Reader, root, root, &rootKey.PublicKey, rootKey)
	root, _ = x509.ParseCertificate(rootDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	issuing := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "node-3"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{{Scheme: "spiffe", Host: "example.org"}}}
	issDER, err := x509.CreateCertificate(rand.Reader, issuing, root, &key.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	issuing, _ = x509.ParseCertificate(issDER)
	left := new(atomic.Int32)
	left.Store(ok)
	auth, err := ca.New(td, "node-3", flakySigner{key, left}, issuing, []*x509.Certificate{root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return auth, key
}

// noLeader is a replica that knows no leader and cannot complete a read
// barrier.
type noLeader struct{ failingQuorum }

func (noLeader) leaderKnown() bool { return false }

// A refusal for a reason of the cluster's says which (issue #19: under
// load a Sync stream was refused with "signing is unavailable", which
// Sync does not do): no leader, no read barrier, no commit. The code
// stays Unavailable, which agents fail over on; raft's words stay in the
// log.
func TestClusterRefusalsSayWhy(t *testing.T) {
	const agent = "spiffe://example.org/sigil/agent/tpm/host-a"
	raftErr := errors.New("raft: read index: context deadline exceeded")
	var logBuf syncBuffer
	s := &issuer{nodeID: "node-3", log: slog.New(slog.NewJSONHandler(&logBuf, nil)),
		state:  fakeIssuanceState{agents: map[string]state.Agent{agent: {ID: agent}}},
		quorum: failingQuorum{err: raftErr}, audit: &keptAudit{}}
	ctx := context.Background()
	for _, tc := range []struct {
		what, agent string
		quorum      quorum
		want        string
	}{
		{"sync", agent, noLeader{}, msgNoLeader},
		{"svid.x509", agent, noLeader{}, msgNoLeader},
		// An agent this replica does not know (a join not applied here yet)
		// is confirmed by a read barrier, which fails under load.
		{"sync", "spiffe://example.org/sigil/agent/join_token/0123456789abcdef", failingQuorum{err: raftErr}, msgNotCurrent},
	} {
		s.quorum = tc.quorum
		_, err := s.callingAgent(ctx, tc.agent, tc.what)
		if st, _ := status.FromError(err); st.Code() != codes.Unavailable || st.Message() != tc.want {
			t.Errorf("%s by %s: %v, want Unavailable %q", tc.what, tc.agent, err, tc.want)
		}
	}
	// A record that does not commit.
	s.quorum = failingQuorum{}
	if err := s.withheld("svid.jwt", agent, "e1", raftErr); status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgNoCommit {
		t.Errorf("uncommitted record: %v, want Unavailable %q", err, msgNoCommit)
	}
	for _, msg := range []string{msgNoLeader, msgNotCurrent, msgNoCommit} {
		if strings.Contains(msg, "sign") {
			t.Errorf("%q speaks of signing", msg)
		}
	}
	if !strings.Contains(logBuf.String(), "context deadline exceeded") {
		t.Errorf("raft's error is not in the log:\n%s", logBuf.String())
	}
}
