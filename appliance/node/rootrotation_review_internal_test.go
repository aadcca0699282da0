package node

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"net/url"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
)

func reviewRoot(t *testing.T, cn string, from, to time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn}, NotBefore: from, NotAfter: to,
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c, k
}

// TestFollowWithExpiredConfiguredRoot: after an earlier rotation the old
// root, now expired, is still listed in root-certs (the README's last
// step not done). The node was down while a new rotation's add committed.
// At start it trusts root-certs and its kept roots; follow() widens that
// set with the bundle's before narrowing, and SetRoots refuses a set
// holding an expired root: follow failed on every retry, the node never
// trusted the new root, and after the switch it could not verify a peer.
func TestFollowWithExpiredConfiguredRoot(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	now := time.Now()
	r0, _ := reviewRoot(t, "root 0", now.Add(-3*365*24*time.Hour), now.Add(-24*time.Hour)) // retired long ago, expired
	r1, k1 := reviewRoot(t, "root 1", now.Add(-time.Hour), now.Add(365*24*time.Hour))
	r2, _ := reviewRoot(t, "root 2", now.Add(-time.Hour), now.Add(2*365*24*time.Hour))
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "node-1"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(300 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}, r1, &key.PublicKey, k1)
	if err != nil {
		t.Fatal(err)
	}
	issuing, _ := x509.ParseCertificate(der)
	auth, err := ca.New(td, "node-1", key, issuing, []*x509.Certificate{r0, r1}, nil) // root-certs, as at start
	if err != nil {
		t.Fatal(err)
	}
	ident, err := ca.NewNodeIdentity(auth, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	fsm, err := state.Open(td, state.Options{Path: filepath.Join(t.TempDir(), "state.db"), NodeID: "node-1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fsm.Close() })
	apply := func(i uint64, cmd []byte, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fsm.Apply(i, "node-1", cmd); err != nil {
			t.Fatal(err)
		}
	}
	cmd, err := state.NewCommand(state.CmdBundleSetRoots, "spiffe://example.org/sigil/node/node-1", now, state.BundleRoots{Roots: [][]byte{r1.Raw}})
	apply(1, cmd, err)
	cmd, err = state.NewAdminCommand(state.CmdRootAdd, "spiffe://example.org/sigil/admin/alice", "7e57", now, state.RootAdd{Root: r2.Raw})
	apply(2, cmd, err)

	r := &issuingRenewal{dir: t.TempDir(), auth: auth, ident: ident, state: fsm, log: slog.New(slog.DiscardHandler)}
	if err := r.followCurrent(context.Background()); err != nil {
		t.Fatalf("follow: %v", err)
	}
	if roots := auth.Roots(); len(roots) != 2 || !slices.ContainsFunc(roots, r2.Equal) || !slices.ContainsFunc(roots, r1.Equal) {
		t.Fatalf("trusted roots after follow: %d, want the bundle's two", len(roots))
	}
}
