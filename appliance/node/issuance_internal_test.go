package node

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"testing"

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
func (q failingQuorum) leaderKnown() bool                       { return true }
func (q failingQuorum) readIndex(context.Context) error         { return q.err }
func (a *keptAudit) record(_ context.Context, ev ...state.AuditEvent) error {
	a.events = append(a.events, ev...)
	return nil
}
func (s failingSigner) Sign(ca.Leaf) ([]*x509.Certificate, error)      { return nil, s.err }
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
	// An unknown entry needs a read barrier, which fails.
	_, err = s.jwtSVID(ctx, agent, &api.JWTSVIDRequest{EntryID: "unknown", Audience: []string{"db"}})
	if status.Code(err) != codes.Unavailable || status.Convert(err).Message() != msgUnavailable {
		t.Errorf("JWT-SVID without a read barrier: %v", err)
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
