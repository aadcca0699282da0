package api

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// testCA is a root or leaf made here, with its key.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCert(t *testing.T, parent *testCA, id string, serial int64, isCA bool) *testCA {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(id)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "test " + id}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true, IsCA: isCA}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	signer, signKey := tmpl, k
	if parent != nil {
		signer, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &k.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: c, key: k}
}

type ackOnly struct{ AgentServer }

func (ackOnly) BundleAck(context.Context, *BundleAckRequest) (*Empty, error) { return &Empty{}, nil }

// DialConfig.Roots is asked at every handshake, in place of RootFile: a
// server whose chain goes to root B is refused while the roots are A's,
// and reached on the same connection once they include B, with no new
// Dial (the agent's roots follow the trust bundle through a rotation
// while its connections live on).
func TestDialRootsAtHandshake(t *testing.T) {
	rootA := newTestCert(t, nil, "spiffe://example.org", 1, true)
	rootB := newTestCert(t, nil, "spiffe://example.org", 2, true)
	nodeB := newTestCert(t, rootB, "spiffe://example.org/sigil/node/node-b", 3, false)

	srv := grpc.NewServer(append(ServerOptions(), grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{nodeB.cert.Raw}, PrivateKey: nodeB.key, Leaf: nodeB.cert}}})))...)
	RegisterAgent(srv, ackOnly{})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})

	// RootFile holds A: with Roots set it is not what is trusted.
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: rootA.cert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	var trusted atomic.Pointer[[]*x509.Certificate]
	set := func(roots ...*testCA) {
		var certs []*x509.Certificate
		for _, r := range roots {
			certs = append(certs, r.cert)
		}
		trusted.Store(&certs)
	}
	set(rootA)
	conn, err := Dial(DialConfig{Addr: l.Addr().String(), RootFile: rootFile, Anonymous: true,
		Roots: func() []*x509.Certificate { return *trusted.Load() }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx := context.Background()
	ack := func() error {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := NewAgentClient(conn).BundleAck(cctx, &BundleAckRequest{Sequence: 1})
		return err
	}
	if err := ack(); err == nil || !strings.Contains(err.Error(), "not a node of example.org") {
		t.Fatalf("a node under root B reached with root A trusted: %v", err)
	}

	set(rootA, rootB)
	deadline := time.Now().Add(10 * time.Second)
	for err = ack(); err != nil && time.Now().Before(deadline); err = ack() {
		conn.ResetConnectBackoff() // the failed handshake's backoff is not what is tested
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("the same connection did not reach the node under root B once B was trusted: %v", err)
	}

	// No roots at all: a new connection fails at its handshake, saying so.
	set()
	conn2, err := Dial(DialConfig{Addr: l.Addr().String(), Anonymous: true, Roots: func() []*x509.Certificate { return *trusted.Load() }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn2.Close() }()
	_, err = NewAgentClient(conn2).BundleAck(ctx, &BundleAckRequest{Sequence: 1})
	if err == nil || !strings.Contains(err.Error(), "no root certificate") {
		t.Fatalf("dial with no roots: %v", err)
	}
	if _, err := Dial(DialConfig{Addr: l.Addr().String(), Anonymous: true}); err == nil {
		t.Fatal("a TLS dial with neither RootFile nor Roots was accepted")
	}
}
