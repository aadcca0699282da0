package cache

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"testing"
	"time"
)

// TestAttackInjectedRootRevokesHonestNodes: the overlap rule keeps one
// update from swapping every trusted root, so that a node (compromised,
// or a stolen node key and the network position) cannot lock an agent out
// of the honest nodes at once. But an update may add a root beside ours,
// and its root CRLs are checked against the roots that same update brings;
// the agent keys revocations by issuer name and serial. A root the node
// made with our root's subject name signs a CRL listing the honest nodes'
// issuing CA serials (public: in every node's TLS chain): in one update,
// every honest node's chain is refused by the agent (persisted in
// root-crls.pem), and only the attacker's node is left to talk to.
// Before agents kept the bundle's roots, CRLs were checked against
// root-cert alone and a node could forge none.
func TestAttackInjectedRootRevokesHonestNodes(t *testing.T) {
	p := newCRLTestPKI(t)
	c := New(nil, Options{Roots: []*x509.Certificate{p.root}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := c.apply(rootsUpdate(t, 1, 8, []*x509.Certificate{p.root})); err != nil {
		t.Fatal(err)
	}
	// The node's own root, with the honest root's name.
	evilKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(666), Subject: p.root.Subject, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{6, 6, 6}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &evilKey.PublicKey, evilKey)
	if err != nil {
		t.Fatal(err)
	}
	evil, _ := x509.ParseCertificate(der)
	if err := c.apply(rootsUpdate(t, 2, 9, []*x509.Certificate{p.root, evil}, p.crl(t, evil, evilKey, 1, "node-1", "node-2"))); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"node-1", "node-2"} {
		if err := c.CheckChain([][]*x509.Certificate{{p.ca[n], p.root}}); err != nil {
			t.Errorf("an honest node's chain under the honest root is refused after one update of another node: %v", err)
		}
	}
}
