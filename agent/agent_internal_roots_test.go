package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func testRoot(t *testing.T, serial int64) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "Example Root"}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true, IsCA: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// An agent that kept roots (B) trusts them, not root-cert (A), from its
// start, for every dial; and when the trusted roots change, a connection
// whose server's chain ends at a root no longer trusted is closed (the
// next call handshakes anew), one under a trusted root is kept.
func TestKeptRootsAtStartAndDropUntrusted(t *testing.T) {
	A, B := testRoot(t, 1), testRoot(t, 2)
	dir := t.TempDir()
	rootCert := filepath.Join(dir, "root.pem")
	data := filepath.Join(dir, "data")
	for file, c := range map[string]*x509.Certificate{rootCert: A, filepath.Join(data, "roots.pem"): B} {
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	a, err := New(context.Background(), Config{Servers: []string{"127.0.0.1:1"}, RootCert: rootCert, DataDir: data,
		JoinTokenFile: filepath.Join(dir, "token")}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if r := a.cache.Roots(); len(r) != 1 || !r[0].Equal(B) {
		t.Fatalf("trusted at start: %d roots, B: %v", len(r), len(r) == 1 && r[0].Equal(B))
	}
	connTo := func(root *x509.Certificate) *grpc.ClientConn {
		t.Helper()
		conn, err := grpc.NewClient("127.0.0.1:1", grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		peer := &atomic.Pointer[[]*x509.Certificate]{}
		peer.Store(&[]*x509.Certificate{{Raw: []byte("node leaf")}, root})
		a.app.mu.Lock()
		a.app.conn, a.app.connIdx, a.app.peer = conn, 0, peer
		a.app.mu.Unlock()
		return conn
	}
	conn := connTo(B)
	a.app.dropUntrusted()
	if a.app.replaced(conn) {
		t.Fatal("a connection to a node under a trusted root was closed")
	}
	conn = connTo(A)
	a.app.dropUntrusted()
	if !a.app.replaced(conn) {
		t.Fatal("a connection to a node under a root no longer trusted was kept")
	}
}
