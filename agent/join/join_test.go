package join_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/keystore/tpm"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

type env struct {
	c  *clustertest.Cluster
	tr *clustertest.Trust
}

func newEnv(t *testing.T) *env { return newEnvB(t) }

func newEnvB(t testing.TB) *env {
	tr := clustertest.NewTrust(t, "jn", []string{"node-1", "node-2", "node-3"}, nil)
	// Anonymous refusals reach the audit log as periodic summaries: keep
	// the period short so the tests see them.
	return &env{c: clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Audit.RefusalSummaryInterval = node.Duration{Duration: 200 * time.Millisecond}
	}, "node-1", "node-2", "node-3"), tr: tr}
}

// trustTPMVendor adds an swtpm's local CA (root and issuer) as EK CAs.
func (e *env) trustTPMVendorB(t testing.TB, h *host) { e.trustTPMVendor(t, h.sw) }

func (e *env) trustTPMVendor(t testing.TB, sw *testenv.TPM) {
	for _, p := range []string{sw.EKCARoot, sw.EKCAIssuer} {
		certs, err := api.ReadCerts(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.c.Admin("node-1").EKCAAdd(context.Background(), &api.EKCARequest{DER: certs[0].Raw}); err != nil && !strings.Contains(err.Error(), "already trusted") {
			t.Fatal(err)
		}
	}
}

func (e *env) joinClientB(t testing.TB, node string, cert func() (*tls.Certificate, error)) *api.JoinClient {
	return e.joinClient(t, node, cert)
}

func (e *env) joinClient(t testing.TB, node string, cert func() (*tls.Certificate, error)) *api.JoinClient {
	cfg := api.DialConfig{Addr: e.c.ConfigOf(node).API.Listen, RootFile: e.tr.RootPath, Anonymous: cert == nil, Certificate: cert}
	conn, err := api.Dial(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() }) // the test is over: nothing more goes through it
	return api.NewJoinClient(conn)
}

type host struct {
	sw  *testenv.TPM
	tpm *tpm.TPM
	key string
}

func newHost(t *testing.T) *host { return newHostB(t) }

func newHostB(t testing.TB) *host {
	sw := testenv.NewTPM(t)
	h := &host{sw: sw, key: "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key")}
	h.open(t)
	if err := join.EnsureKey(context.Background(), h.tpm, h.key); err != nil {
		t.Fatal(err)
	}
	return h
}

func (h *host) open(t testing.TB) {
	k, err := tpm.Open(context.Background(), tpm.Config{Path: h.sw.Socket})
	if err != nil {
		t.Fatal(err)
	}
	h.tpm = k
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
}

func TestTPMJoinRenewRestart(t *testing.T) {
	e := newEnv(t)
	h := newHost(t)
	e.trustTPMVendor(t, h.sw)
	ctx := context.Background()

	svid, err := join.TPM(ctx, e.joinClient(t, "node-2", nil), h.tpm, h.key)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(svid.ID, "spiffe://example.org/sigil/agent/tpm/") {
		t.Fatalf("agent ID %s", svid.ID)
	}
	roots := x509bundle.FromX509Authorities(e.tr.TrustDomain, []*x509.Certificate{e.tr.Root})
	if id, _, err := x509svid.Verify(svid.Chain, roots); err != nil || id.String() != svid.ID {
		t.Fatalf("agent SVID: %v %v", id, err)
	}
	a, err := e.c.Admin("node-3").AgentShow(ctx, &api.IDRequest{ID: svid.ID})
	if err != nil || a.AttestationType != "tpm" || a.Facts["ek_method"] != "ek-cert" || a.SerialNumber != svid.Chain[0].SerialNumber.Text(16) {
		t.Fatalf("recorded agent: %+v %v", a, err)
	}

	// Renew over mutual TLS signed by the TPM key; same key, new serial.
	renewed, err := join.Renew(ctx, e.joinClient(t, "node-1", func() (*tls.Certificate, error) { return svid.TLSCertificate(), nil }), svid.Signer)
	if err != nil {
		t.Fatal(err)
	}
	if renewed.ID != svid.ID || renewed.Chain[0].SerialNumber.Cmp(svid.Chain[0].SerialNumber) == 0 {
		t.Fatal("renewal returned the same certificate or another ID")
	}

	// The host reboots: TPM restarts, the agent reloads its blob and
	// renews with the SVID it kept, without joining again.
	if err := h.tpm.Close(); err != nil {
		t.Fatal(err)
	}
	h.sw.Stop(t)
	h.sw.Start(t)
	h.open(t)
	signer, err := h.tpm.Signer(ctx, h.key)
	if err != nil {
		t.Fatal(err)
	}
	kept := &join.SVID{ID: renewed.ID, Chain: renewed.Chain, Signer: signer}
	again, err := join.Renew(ctx, e.joinClient(t, "node-3", func() (*tls.Certificate, error) { return kept.TLSCertificate(), nil }), signer)
	if err != nil {
		t.Fatalf("renew after restart: %v", err)
	}
	if b, _ := e.c.Admin("node-1").AgentShow(ctx, &api.IDRequest{ID: svid.ID}); !b.JoinedAt.Equal(a.JoinedAt) {
		t.Fatal("renewal after restart counted as a new join")
	}

	// The agent's TPM-held identity gets workload SVIDs.
	ent, err := e.c.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/web", ParentID: svid.ID,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := api.Dial(api.DialConfig{Addr: e.c.ConfigOf("node-2").API.Listen, RootFile: e.tr.RootPath,
		Certificate: func() (*tls.Certificate, error) {
			return (&join.SVID{Chain: again.Chain, Signer: signer}).TLSCertificate(), nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }() // the test is over: nothing more goes through it
	wk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, wk)
	clustertest.Eventually(t, 10*time.Second, "node-2 to know the entry", func() bool { return e.c.Node("node-2").State().Entries() != nil })
	res, err := api.NewAgentClient(conn).SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: ent.ID, CSR: csr}}})
	if err != nil || res.Results[0].Error != "" {
		t.Fatalf("workload SVID through the TPM-joined agent: %v %+v", err, res)
	}

	// A banned agent cannot renew.
	if _, err := e.c.Admin("node-1").AgentBan(ctx, &api.IDRequest{ID: svid.ID}); err != nil {
		t.Fatal(err)
	}
	_, err = join.Renew(ctx, e.joinClient(t, "node-2", func() (*tls.Certificate, error) { return kept.TLSCertificate(), nil }), signer)
	if status.Code(errorsUnwrap(err)) != codes.PermissionDenied {
		t.Fatalf("banned agent renewing: %v", err)
	}
	if !strings.Contains(e.c.Log.String(), "join refused") {
		t.Fatal("refusal not logged")
	}
	if !hasAudit(t, e, "join.renew.refuse") {
		t.Fatal("refused renewal not audited")
	}
}

// Each refusal the issue names, on its own: the caller gets the reason,
// the appliance logs it, and the audit log counts it under its reason
// class (anonymous refusals are summarized, not recorded one by one).
func TestTPMJoinRefused(t *testing.T) {
	e := newEnv(t)
	h, other := newHost(t), newHost(t)
	ctx := context.Background()
	jc := e.joinClient(t, "node-1", nil)
	seen := map[string]uint64{}
	refused := func(t *testing.T, err error, reason, class string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), reason) {
			t.Fatalf("got %v, want a refusal saying %q", err, reason)
		}
		if !strings.Contains(e.c.Log.String(), reason) {
			t.Fatalf("appliance log does not say %q", reason)
		}
		seen[class]++
		clustertest.Eventually(t, 10*time.Second, "a join.refuse.summary counting "+class, func() bool {
			return summarized(t, e, class) >= seen[class]
		})
	}
	// hello+certify+activate for h's TPM, returning the pieces to tamper.
	evidence := func(t *testing.T) (*tpm.AK, *api.JoinTPMChallenge, *api.JoinTPMProof) {
		t.Helper()
		ek, _ := h.tpm.EndorsementKey(ctx)
		ak, err := h.tpm.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := ak.Close(); err != nil {
				t.Error(err)
			}
		})
		ch, err := jc.TPMHello(ctx, &api.JoinTPMHello{EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: ak.Public})
		if err != nil {
			t.Fatal(err)
		}
		cert, _ := ak.Certify(ctx, h.key, ch.Nonce)
		secret, _ := ak.ActivateCredential(ctx, ch.IDObject, ch.EncSecret)
		signer, _ := h.tpm.Signer(ctx, h.key)
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
		return ak, ch, &api.JoinTPMProof{Nonce: ch.Nonce, CertifyAttest: cert.Attest, CertifySignature: cert.Signature,
			AgentKeyPublic: cert.Public, Secret: secret, CSR: csr}
	}

	t.Run("EK not chained and not allowlisted", func(t *testing.T) {
		e.trustTPMVendor(t, other.sw) // another vendor's CA only
		_, err := join.TPM(ctx, jc, h.tpm, h.key)
		refused(t, err, "does not chain to a trusted EK CA", "ek-untrusted")
		e.trustTPMVendor(t, h.sw)
	})
	t.Run("AK without the required attributes", func(t *testing.T) {
		ek, _ := h.tpm.EndorsementKey(ctx)
		_, _, proof := evidence(t)
		// The agent key (unrestricted) offered as the attestation key.
		_, err := jc.TPMHello(ctx, &api.JoinTPMHello{EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: proof.AgentKeyPublic})
		refused(t, err, "AK is not a restricted signing key", "ak-invalid")
	})
	t.Run("wrong activation secret", func(t *testing.T) {
		_, _, proof := evidence(t)
		proof.Secret = make([]byte, 32)
		_, err := jc.TPMProve(ctx, proof)
		refused(t, err, "wrong secret", "bad-secret")
	})
	t.Run("replayed nonce", func(t *testing.T) {
		_, _, proof := evidence(t)
		if _, err := jc.TPMProve(ctx, proof); err != nil {
			t.Fatal(err)
		}
		_, err := jc.TPMProve(ctx, proof)
		refused(t, err, "already used nonce", "nonce-unknown")
	})
	t.Run("certify of a key that is not the agent key", func(t *testing.T) {
		ak, _, proof := evidence(t)
		second := "tpmkey:file=" + filepath.Join(t.TempDir(), "second.key")
		if err := join.EnsureKey(ctx, h.tpm, second); err != nil {
			t.Fatal(err)
		}
		c2, err := ak.Certify(ctx, second, []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		proof.AgentKeyPublic = c2.Public // presents another key than the certified one
		_, err = jc.TPMProve(ctx, proof)
		refused(t, err, "the AK certified another key", "certify-mismatch")
	})
	t.Run("agent key blob copied to another TPM", func(t *testing.T) {
		stolen := filepath.Join(t.TempDir(), "stolen.key")
		data, err := os.ReadFile(strings.TrimPrefix(h.key, "tpmkey:file="))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(stolen, data, 0o600); err != nil {
			t.Fatal(err)
		}
		// The other TPM cannot load it at all...
		if _, err := join.TPM(ctx, jc, other.tpm, "tpmkey:file="+stolen); err == nil {
			t.Fatal("joined with a copied key blob")
		}
		// ...and presenting the stolen key's public area with a
		// certification of one of its own keys is refused.
		ek, _ := other.tpm.EndorsementKey(ctx)
		own := "tpmkey:file=" + filepath.Join(t.TempDir(), "own.key")
		if err := join.EnsureKey(ctx, other.tpm, own); err != nil {
			t.Fatal(err)
		}
		ak, err := other.tpm.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ak.Close() }() // a flush at the end of the subtest
		e.trustTPMVendor(t, other.sw)
		ch, err := jc.TPMHello(ctx, &api.JoinTPMHello{EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: ak.Public})
		if err != nil {
			t.Fatal(err)
		}
		cert, _ := ak.Certify(ctx, own, ch.Nonce)
		secret, _ := ak.ActivateCredential(ctx, ch.IDObject, ch.EncSecret)
		_, _, hp := evidence(t)
		_, err = jc.TPMProve(ctx, &api.JoinTPMProof{Nonce: ch.Nonce, CertifyAttest: cert.Attest, CertifySignature: cert.Signature,
			AgentKeyPublic: hp.AgentKeyPublic, Secret: secret, CSR: hp.CSR})
		refused(t, err, "the AK certified another key", "certify-mismatch")
	})
	t.Run("quote not matching the PCR policy", func(t *testing.T) {
		zero := strings.Repeat("00", 32)
		if _, err := e.c.Admin("node-1").PCRPolicySet(ctx, &api.PCRPolicyRequest{Policy: &api.PCRPolicy{Bank: "sha256", PCRs: map[string]string{"23": zero}}}); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if _, err := e.c.Admin("node-1").PCRPolicySet(ctx, &api.PCRPolicyRequest{}); err != nil {
				t.Errorf("clear the PCR policy: %v", err)
			}
		}()
		// PCR 23 is still zero: the quote matches and the join succeeds.
		clustertest.Eventually(t, 10*time.Second, "policy on node-1", func() bool { return e.c.Node("node-1").State().Policy().PCRPolicy != nil })
		if _, err := join.TPM(ctx, jc, h.tpm, h.key); err != nil {
			t.Fatalf("join with matching PCRs: %v", err)
		}
		if _, err := h.sw.Tool(ctx, "tpm2_pcrextend", "23:sha256="+strings.Repeat("ab", 32)); err != nil {
			t.Fatal(err)
		}
		_, err := join.TPM(ctx, jc, h.tpm, h.key)
		refused(t, err, "PCR values do not match the policy", "quote-policy")
	})
	t.Run("used or expired join token", func(t *testing.T) {
		k1, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tok, err := e.c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 60})
		if err != nil {
			t.Fatal(err)
		}
		s, err := join.Token(ctx, e.joinClient(t, "node-2", nil), tok.Token, k1)
		if err != nil || !strings.Contains(s.ID, "/sigil/agent/join_token/") {
			t.Fatalf("token join: %v", err)
		}
		_, err = join.Token(ctx, e.joinClient(t, "node-3", nil), tok.Token, k1)
		refused(t, err, "was already used", "token-used")
		short, _ := e.c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 1})
		time.Sleep(2 * time.Second)
		_, err = join.Token(ctx, e.joinClient(t, "node-2", nil), short.Token, k1)
		refused(t, err, "expired", "token-expired")
	})
}

func TestJoinTokensDisabledByConfig(t *testing.T) {
	tr := clustertest.NewTrust(t, "nt", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) { cfg.Join.DisableTokens = true }, "node-1")
	e := &env{c: c, tr: tr}
	ctx := context.Background()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := join.Token(ctx, e.joinClient(t, "node-1", nil), tok.Token, k); err == nil || !strings.Contains(err.Error(), "join tokens are disabled") {
		t.Fatalf("token join with tokens disabled: %v", err)
	}
}

// summarized is how many anonymous refusals of a reason class the audit
// log's summaries count.
func summarized(t *testing.T, e *env, class string) uint64 {
	recs, err := e.c.Admin("node-1").AuditList(context.Background(), &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, r := range recs.Records {
		if r.Action == "join.refuse.summary" && r.Detail["class"] == class {
			c, _ := strconv.ParseUint(r.Detail["count"], 10, 64)
			n += c
		}
	}
	return n
}

func hasAudit(t *testing.T, e *env, action string) bool {
	recs, err := e.c.Admin("node-1").AuditList(context.Background(), &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs.Records {
		if r.Action == action && r.Detail["reason"] != "" {
			return true
		}
	}
	return false
}

// errorsUnwrap digs the gRPC status out of a wrapped error.
func errorsUnwrap(err error) error {
	for err != nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
	return nil
}
