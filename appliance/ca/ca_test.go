package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

func TestNodeIdentityAndPeerChecks(t *testing.T) {
	tr := clustertest.NewTrust(t, "ca", []string{"node-1", "node-2"}, []string{"node-9"})
	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			t.Errorf("close key store: %v", err)
		}
	}()
	a1 := tr.Authority(t, ks, "node-1")
	a2 := tr.Authority(t, ks, "node-2")

	// A leaf SVID from the HSM-held issuing CA verifies with go-spiffe.
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id := spiffeid.RequireFromPath(tr.TrustDomain, "/web")
	chain, err := a1.Sign(ca.Leaf{ID: id, PublicKey: &key.PublicKey, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	gotID, _, err := x509svid.Verify(chain, a1.Bundle())
	if err != nil || gotID != id {
		t.Fatalf("x509svid.Verify: %v %v", gotID, err)
	}
	leaf := chain[0]
	if leaf.IsCA || len(leaf.URIs) != 1 || leaf.KeyUsage != x509.KeyUsageDigitalSignature || len(leaf.ExtKeyUsage) != 2 {
		t.Fatalf("leaf: %+v", leaf)
	}
	if _, err := a1.Sign(ca.Leaf{ID: spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.org"), "/x"), PublicKey: &key.PublicKey, TTL: time.Hour}); err == nil {
		t.Fatal("signed an ID of another trust domain")
	}
	// Never past the issuing CA.
	long, _ := a1.Sign(ca.Leaf{ID: id, PublicKey: &key.PublicKey, TTL: 5 * 365 * 24 * time.Hour})
	if long[0].NotAfter.After(tr.Nodes["node-1"].Issuing.NotAfter) {
		t.Fatal("leaf outlives its issuing CA")
	}

	// node-1 cannot pass off a certificate for node-2: its authority
	// refuses to sign one, and one made with its key directly (a
	// compromised node) is refused by Classify.
	if _, err := a1.SignNode(ca.Leaf{ID: ca.NodeSPIFFEID(tr.TrustDomain, "node-2"), PublicKey: &key.PublicKey, TTL: time.Hour}); err == nil {
		t.Fatal("node-1's CA signed node-2's identity")
	}
	s1, err := ks.Signer(context.Background(), tr.Nodes["node-1"].KeyURI)
	if err != nil {
		t.Fatal(err)
	}
	forgedDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(7),
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true,
		URIs: []*url.URL{ca.NodeSPIFFEID(tr.TrustDomain, "node-2").URL()}}, tr.Nodes["node-1"].Issuing, &key.PublicKey, s1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a1.Classify([][]byte{forgedDER, tr.Nodes["node-1"].Issuing.Raw}); err == nil || !strings.Contains(err.Error(), "own issuing CA") {
		t.Fatalf("forged node identity: %v", err)
	}
	for path, role := range map[string]ca.Role{"/sigil/node/node-2": ca.RoleNode, "/sigil/admin/alice": ca.RoleAdmin, "/sigil/agent/tpm/x": ca.RoleAgent} {
		auth := a1
		if role == ca.RoleNode {
			auth = a2
		}
		c := clustertest.ClientCert(t, auth, path)
		p, err := a1.Classify(c.Certificate)
		if err != nil || p.Role != role {
			t.Errorf("%s: %v %v", path, p, err)
		}
	}
	if _, err := a1.Classify(clustertest.ClientCert(t, a1, "/web").Certificate); err == nil {
		t.Fatal("a workload SVID was accepted as a Sigil peer")
	}

	// A node whose issuing CA the root did not sign cannot even build an
	// authority, and its certificates are refused by real nodes.
	s9, _ := ks.Signer(context.Background(), tr.Nodes["node-9"].KeyURI)
	if _, err := ca.New(tr.TrustDomain, "node-9", s9, tr.Nodes["node-9"].Issuing, []*x509.Certificate{tr.Root}, nil); err == nil {
		t.Fatal("rogue issuing CA accepted")
	}

	// mTLS between two node identities works; an admin may not connect
	// where only nodes are allowed.
	n1, err := ca.NewNodeIdentity(a1, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	n2, err := ca.NewNodeIdentity(a2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", n1.TLSConfig(ca.RoleNode))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }() // also ends the accept loop
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			// The server side only answers: a refused client's handshake
			// fails here and the dialer sees that as its error.
			go func() {
				defer func() { _ = c.Close() }()
				if c.(*tls.Conn).Handshake() == nil {
					_, _ = c.Write([]byte("ok"))
				}
			}()
		}
	}()
	dial := func(cfg *tls.Config) error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }() // the result is the Read's
		buf := make([]byte, 2)
		_, err = c.Read(buf)
		return err
	}
	if err := dial(n2.TLSConfig(ca.RoleNode)); err != nil {
		t.Fatalf("node-2 to node-1: %v", err)
	}
	adminCert := clustertest.ClientCert(t, a2, "/sigil/admin/alice")
	adminCfg := n2.TLSConfig(ca.RoleNode)
	adminCfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &adminCert, nil }
	if err := dial(adminCfg); err == nil {
		t.Fatal("an admin certificate was accepted on a node-only listener")
	}
	noCert := n2.TLSConfig(ca.RoleNode)
	noCert.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	if err := dial(noCert); err == nil {
		t.Fatal("a client without a certificate was accepted")
	}
}

// The issuing CA refuses to sign the appliance's reserved paths as
// workloads, and each role's method signs only its own prefix: an entry or
// a bug on one signing path cannot mint an admin, a node or an agent.
func TestAttackReservedPathSigning(t *testing.T) {
	tr := clustertest.NewTrust(t, "rp", []string{"node-1"}, nil)
	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			t.Errorf("close key store: %v", err)
		}
	}()
	a := tr.Authority(t, ks, "node-1")
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := func(path string) ca.Leaf {
		return ca.Leaf{ID: spiffeid.RequireFromPath(tr.TrustDomain, path), PublicKey: &key.PublicKey, TTL: time.Hour}
	}
	type method struct {
		name string
		sign func(ca.Leaf) ([]*x509.Certificate, error)
	}
	workload, agent := method{"Sign", a.Sign}, method{"SignAgent", a.SignAgent}
	admin, node := method{"SignAdmin", a.SignAdmin}, method{"SignNode", a.SignNode}
	for _, tc := range []struct {
		path string
		ok   []method // every other method must refuse it
	}{
		{"/web", []method{workload}},
		{"/sigilx", []method{workload}},    // only /sigil itself and under it are reserved
		{"/app/sigil", []method{workload}}, // ...not the word elsewhere
		{"/sigil", nil},
		{"/sigil/x", nil},
		{"/sigil/admin", nil},
		{"/sigil/agent", nil},
		{"/sigil/node", nil},
		{"/sigil/admin/x", []method{admin}},
		{"/sigil/admin/x/y", nil}, // an admin name is one segment
		{"/sigil/agent/x", []method{agent}},
		{"/sigil/agent/tpm/abc", []method{agent}},
		{"/sigil/agent/join_token/abc", []method{agent}},
		{"/sigil/node/node-1", []method{node}},
		{"/sigil/node/node-2", nil}, // another node's identity: never
		{"/sigil/node/node-1/x", nil},
	} {
		for _, m := range []method{workload, agent, admin, node} {
			want := false
			for _, o := range tc.ok {
				want = want || o.name == m.name
			}
			chain, err := m.sign(leaf(tc.path))
			switch {
			case want && err != nil:
				t.Errorf("%s(%s) refused: %v", m.name, tc.path, err)
			case !want && err == nil:
				t.Errorf("%s(%s) signed %s", m.name, tc.path, chain[0].URIs)
			case want:
				if got := chain[0].URIs[0].String(); got != "spiffe://example.org"+tc.path {
					t.Errorf("%s(%s) signed %s", m.name, tc.path, got)
				}
			}
		}
	}
	// Another trust domain is refused by every method.
	other := ca.Leaf{ID: spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.org"), "/sigil/admin/x"), PublicKey: &key.PublicKey, TTL: time.Hour}
	for _, m := range []method{workload, agent, admin, node} {
		if _, err := m.sign(other); err == nil {
			t.Errorf("%s signed an ID of another trust domain", m.name)
		}
	}

	// Audit checkpoints: signed by the HSM key, verified with the issuing
	// certificate; anything but a SHA-256 digest is refused.
	digest := make([]byte, 32)
	rand.Read(digest)
	sig, err := a.SignCheckpoint(digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := ca.VerifyCheckpoint(tr.Nodes["node-1"].Issuing, digest, sig); err != nil {
		t.Fatalf("checkpoint signature: %v", err)
	}
	digest[0] ^= 1
	if ca.VerifyCheckpoint(tr.Nodes["node-1"].Issuing, digest, sig) == nil {
		t.Fatal("checkpoint signature verifies over another digest")
	}
	if _, err := a.SignCheckpoint(make([]byte, 48)); err == nil {
		t.Fatal("signed a 48-byte digest as a checkpoint")
	}
}

// A revocation check (the node's stored root CRLs) makes Classify refuse
// every chain through a revoked issuing CA, whatever role it claims, and
// makes the revoked authority sign nothing; other CAs are unaffected.
func TestRevokedIssuingCA(t *testing.T) {
	tr := clustertest.NewTrust(t, "rca", []string{"node-1", "node-2"}, nil)
	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			t.Errorf("close key store: %v", err)
		}
	}()
	a1 := tr.Authority(t, ks, "node-1")
	a2 := tr.Authority(t, ks, "node-2")
	raw := func(c tls.Certificate) [][]byte { return c.Certificate }
	admin2 := raw(clustertest.ClientCert(t, a2, "/sigil/admin/mallory"))
	agent2 := raw(clustertest.ClientCert(t, a2, "/sigil/agent/tpm/h1"))
	node2 := raw(clustertest.ClientCert(t, a2, "/sigil/node/node-2"))
	admin1 := raw(clustertest.ClientCert(t, a1, "/sigil/admin/alice"))

	revoked := tr.Nodes["node-2"].Issuing
	check := func(c *x509.Certificate) bool {
		return string(c.RawIssuer) == string(revoked.RawIssuer) && c.SerialNumber.Cmp(revoked.SerialNumber) == 0
	}
	for _, a := range []*ca.Authority{a1, a2} {
		a.SetRevocationCheck(check, nil)
	}
	for name, chain := range map[string][][]byte{"admin": admin2, "agent": agent2, "node": node2} {
		if _, err := a1.Classify(chain); err == nil || !errors.Is(err, ca.ErrRevoked) {
			t.Errorf("%s certificate from the revoked CA: %v", name, err)
		}
	}
	if p, err := a1.Classify(admin1); err != nil || p.Role != ca.RoleAdmin {
		t.Errorf("an admin of a CA that is not revoked: %+v %v", p, err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, sign := range map[string]func(ca.Leaf) ([]*x509.Certificate, error){"workload": a2.Sign, "admin": a2.SignAdmin, "agent": a2.SignAgent} {
		path := map[string]string{"workload": "/web", "admin": "/sigil/admin/x", "agent": "/sigil/agent/tpm/x"}[name]
		if _, err := sign(ca.Leaf{ID: spiffeid.RequireFromPath(tr.TrustDomain, path), PublicKey: &key.PublicKey, TTL: time.Hour}); !errors.Is(err, ca.ErrRevoked) {
			t.Errorf("the revoked CA signed a %s certificate: %v", name, err)
		}
	}
	if _, err := a2.SignCheckpoint(make([]byte, 32)); !errors.Is(err, ca.ErrRevoked) {
		t.Errorf("the revoked CA signed a checkpoint: %v", err)
	}
	if !a2.Revoked() || a1.Revoked() {
		t.Error("Revoked() reports the wrong authority")
	}
	if _, err := a1.Sign(ca.Leaf{ID: spiffeid.RequireFromPath(tr.TrustDomain, "/web"), PublicKey: &key.PublicKey, TTL: time.Hour}); err != nil {
		t.Errorf("a CA that is not revoked: %v", err)
	}
	// Without a check nothing is revoked.
	a1.SetRevocationCheck(nil, nil)
	if _, err := a1.Classify(admin2); err != nil {
		t.Errorf("no revocation source: %v", err)
	}
}
