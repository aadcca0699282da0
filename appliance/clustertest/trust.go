// Package clustertest builds real trust material for appliance tests: a
// root and node issuing CAs made by running the key ceremony on SoftHSM
// tokens, exactly as an operator would. Only tests import it.
package clustertest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/ceremony"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

var trustSeq atomic.Int64

// Trust is a trust domain's ceremony output.
type Trust struct {
	Dir         string
	TrustDomain spiffeid.TrustDomain
	RootPath    string
	Root        *x509.Certificate
	Nodes       map[string]*Node
	Module      string
	// RogueRootPath is the other root (same trust domain name) that signed
	// the rogue nodes: what a rogue node would be configured to trust.
	RogueRootPath string
	// RootToken holds the root key (label "root"), for CRL ceremonies.
	RootToken *testenv.Token
}

// Node is one node's HSM token and issuing CA.
type Node struct {
	ID          string
	Token       *testenv.Token
	KeyURI      string // issuing CA key, with pin-source
	IssuingPath string
	Issuing     *x509.Certificate
	// Rogue nodes' issuing CAs were signed by a different root.
	Rogue bool
}

// NewTrust runs the ceremonies for nodes (signed by the root) and rogue
// nodes (signed by another root of the same trust domain name) of trust
// domain example.org. All tokens are made first: SoftHSM shows a process
// only tokens that existed when the module was initialized.
func NewTrust(t testing.TB, prefix string, nodes []string, rogue []string) *Trust {
	t.Helper()
	return NewTrustIn(t, "example.org", prefix, nodes, rogue)
}

// NewTrustIn is NewTrust for another trust domain (federation tests run
// two appliances of different trust domains). A test that needs two makes
// both before it starts a node: SoftHSM shows a process only the tokens
// that existed when the module was initialized.
func NewTrustIn(t testing.TB, trustDomain, prefix string, nodes []string, rogue []string) *Trust {
	t.Helper()
	// Token labels are unique per process, so tests can run with -count.
	prefix = fmt.Sprintf("%s%d", prefix, trustSeq.Add(1))
	hsm := testenv.ProcessHSM(t)
	tr := &Trust{Dir: t.TempDir(), TrustDomain: spiffeid.RequireTrustDomainFromString(trustDomain), Nodes: map[string]*Node{}, Module: hsm.Module}
	rootTok := hsm.NewToken(t, prefix+"-root")
	for _, id := range append(append([]string{}, nodes...), rogue...) {
		tr.Nodes[id] = &Node{ID: id, Token: hsm.NewToken(t, prefix+"-"+id)}
	}
	for _, id := range rogue {
		tr.Nodes[id].Rogue = true
	}
	run := func(kind, script string) {
		t.Helper()
		cfg, err := ceremony.Parse([]byte(script), kind)
		if err != nil {
			t.Fatalf("%s script: %v", kind, err)
		}
		plan, err := cfg.Validate(time.Now())
		if err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		if err := ceremony.Run(context.Background(), plan, ceremony.Options{}); err != nil {
			t.Fatalf("%s ceremony: %v", kind, err)
		}
	}
	hsmSection := func(tok *testenv.Token) string {
		return fmt.Sprintf("hsm:\n  module: %s\n  token: %s\n  pin-file: %s\n", hsm.Module, tok.Label, tok.PINFile)
	}
	transcript := filepath.Join(tr.Dir, "transcript.jsonl")
	rootScript := func(label, out string) string {
		return fmt.Sprintf("kind: root\ntrust-domain: %s\ntranscript: %s\n%skey:\n  label: %s\nroot:\n  subject:\n    common-name: Test Root %s\n  validity: 2y\n  output: %s\n",
			trustDomain, transcript, hsmSection(rootTok), label, label, out)
	}
	tr.RootPath = filepath.Join(tr.Dir, "root.pem")
	run(ceremony.KindRoot, rootScript("root", tr.RootPath))
	rogueRoot := filepath.Join(tr.Dir, "rogue-root.pem")
	tr.RogueRootPath = rogueRoot
	if len(rogue) > 0 {
		run(ceremony.KindRoot, rootScript("rogue-root", rogueRoot))
	}
	for _, id := range append(append([]string{}, nodes...), rogue...) {
		n := tr.Nodes[id]
		csr := filepath.Join(tr.Dir, id+".csr")
		run(ceremony.KindIssuingCSR, fmt.Sprintf("kind: issuing-csr\ntrust-domain: %s\ntranscript: %s\n%skey:\n  label: issuing\nissuing-csr:\n  node-id: %s\n  output: %s\n",
			trustDomain, transcript, hsmSection(n.Token), id, csr))
		label, root := "root", tr.RootPath
		if n.Rogue {
			label, root = "rogue-root", rogueRoot
		}
		n.IssuingPath = filepath.Join(tr.Dir, id+"-issuing.pem")
		run(ceremony.KindSignIssuing, fmt.Sprintf("kind: sign-issuing\ntrust-domain: %s\ntranscript: %s\n%skey:\n  label: %s\nsign-issuing:\n  root-certificate: %s\n  csr: %s\n  node-id: %s\n  validity: 1y\n  output: %s\n",
			trustDomain, transcript, hsmSection(rootTok), label, root, csr, id, n.IssuingPath))
		n.Issuing = readCert(t, n.IssuingPath)
		n.KeyURI = n.Token.KeyURI("issuing")
	}
	tr.Root = readCert(t, tr.RootPath)
	tr.RootToken = rootTok
	return tr
}

// SignIssuing runs the sign-issuing ceremony again for node's CSR (the
// key already in its HSM), as an operator renewing the node's issuing CA
// does, with validity (ceremony syntax: "1y", "30d"). With rogue the other
// root signs it (NewTrust must have made rogue nodes). It returns the new
// certificate's file and the certificate.
func (tr *Trust) SignIssuing(t testing.TB, node, validity string, rogue bool) (string, *x509.Certificate) {
	t.Helper()
	label, root := "root", tr.RootPath
	if rogue {
		label, root = "rogue-root", tr.RogueRootPath
	}
	return tr.SignIssuingBy(t, node, validity, label, root)
}

// SignIssuingBy is SignIssuing by the root whose key has label (in the
// root token) and whose certificate is rootPath: a root NewRoot made.
func (tr *Trust) SignIssuingBy(t testing.TB, node, validity, label, rootPath string) (string, *x509.Certificate) {
	t.Helper()
	if tr.Nodes[node] == nil {
		t.Fatalf("SignIssuing: no node %q", node)
	}
	out := filepath.Join(tr.Dir, fmt.Sprintf("%s-issuing-%d.pem", node, time.Now().UnixNano()))
	script := fmt.Sprintf("kind: sign-issuing\ntrust-domain: %s\ntranscript: %s\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: %s\nsign-issuing:\n  root-certificate: %s\n  csr: %s\n  node-id: %s\n  validity: %s\n  output: %s\n",
		tr.TrustDomain.Name(), filepath.Join(tr.Dir, "transcript.jsonl"), tr.Module, tr.RootToken.Label, tr.RootToken.PINFile, label, rootPath,
		filepath.Join(tr.Dir, node+".csr"), node, validity, out)
	tr.runCeremony(t, ceremony.KindSignIssuing, script)
	return out, readCert(t, out)
}

// NewRoot runs the root ceremony again on the root token for a new root
// (a rotation's), its key labelled label, valid for validity. It returns
// the certificate's file and the certificate.
func (tr *Trust) NewRoot(t testing.TB, label, validity string) (string, *x509.Certificate) {
	t.Helper()
	out := filepath.Join(tr.Dir, label+".pem")
	script := fmt.Sprintf("kind: root\ntrust-domain: %s\ntranscript: %s\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: %s\nroot:\n  subject:\n    common-name: Test Root %s\n  validity: %s\n  output: %s\n",
		tr.TrustDomain.Name(), filepath.Join(tr.Dir, "transcript.jsonl"), tr.Module, tr.RootToken.Label, tr.RootToken.PINFile, label, label, validity, out)
	tr.runCeremony(t, ceremony.KindRoot, script)
	return out, readCert(t, out)
}

func (tr *Trust) runCeremony(t testing.TB, kind, script string) {
	t.Helper()
	cfg, err := ceremony.Parse([]byte(script), kind)
	if err != nil {
		t.Fatalf("%s script: %v", kind, err)
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		t.Fatalf("%s: %v", kind, err)
	}
	if err := ceremony.Run(context.Background(), plan, ceremony.Options{}); err != nil {
		t.Fatalf("%s ceremony: %v", kind, err)
	}
}

// AuthorityWith opens a node's issuing CA with another issuing
// certificate for its key (one a rotation's new root signed) and roots.
func (tr *Trust) AuthorityWith(t testing.TB, ks *pkcs11.KeyStore, node string, issuing *x509.Certificate, roots []*x509.Certificate) *ca.Authority {
	t.Helper()
	s, err := ks.Signer(context.Background(), tr.Nodes[node].KeyURI)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(tr.TrustDomain, node, s, issuing, roots, nil)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Authority opens a node's issuing CA through a key store the caller
// closes.
func (tr *Trust) Authority(t testing.TB, ks *pkcs11.KeyStore, node string) *ca.Authority {
	t.Helper()
	n := tr.Nodes[node]
	s, err := ks.Signer(context.Background(), n.KeyURI)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.New(tr.TrustDomain, node, s, n.Issuing, []*x509.Certificate{tr.Root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// ClientCert issues a certificate for a SPIFFE ID path (e.g.
// /sigil/admin/alice) from a node's authority, with a fresh key.
func ClientCert(t testing.TB, a *ca.Authority, path string) tls.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	// The authority signs the reserved paths only through each role's own
	// method.
	sign := a.Sign
	switch {
	case strings.HasPrefix(path, "/sigil/admin/"):
		sign = a.SignAdmin
	case strings.HasPrefix(path, "/sigil/agent/"):
		sign = a.SignAgent
	case strings.HasPrefix(path, "/sigil/node/"):
		sign = a.SignNode
	}
	chain, err := sign(ca.Leaf{ID: spiffeid.RequireFromPath(a.TrustDomain(), path), PublicKey: &key.PublicKey, TTL: time.Hour, Subject: pkix.Name{CommonName: path}})
	if err != nil {
		t.Fatal(err)
	}
	c := tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// WriteCredential writes a client certificate chain and key as PEM files
// (cert 0644, key 0600) for CLI tests.
func WriteCredential(t testing.TB, dir, name string, c tls.Certificate) (certPath, keyPath string) {
	t.Helper()
	certPath, keyPath = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	var certPEM []byte
	for _, der := range c.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certPath, keyPath
}

func readCert(t testing.TB, path string) *x509.Certificate {
	t.Helper()
	c, err := pemfile.ReadCert(path)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
