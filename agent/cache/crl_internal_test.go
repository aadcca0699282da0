package cache

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
)

type crlTestPKI struct {
	rootKey *ecdsa.PrivateKey
	root    *x509.Certificate
	ca      map[string]*x509.Certificate
	caKey   map[string]*ecdsa.PrivateKey
	spiffe  []byte
}

func newCRLTestPKI(t *testing.T) *crlTestPKI {
	t.Helper()
	p := &crlTestPKI{ca: map[string]*x509.Certificate{}, caKey: map[string]*ecdsa.PrivateKey{}}
	p.rootKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{9}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.rootKey.PublicKey, p.rootKey)
	p.root, _ = x509.ParseCertificate(der)
	for i, n := range []string{"node-1", "node-2"} {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		d, _ := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(int64(100 + i)), Subject: pkix.Name{CommonName: n},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{byte(i)}}, p.root, &k.PublicKey, p.rootKey)
		p.ca[n], _ = x509.ParseCertificate(d)
		p.caKey[n] = k
	}
	sb := spiffebundle.New(spiffeid.RequireTrustDomainFromString("example.org"))
	sb.AddX509Authority(p.root)
	p.spiffe, _ = sb.Marshal()
	return p
}

func (p *crlTestPKI) crl(t *testing.T, issuer *x509.Certificate, key *ecdsa.PrivateKey, number int64, nodes ...string) []byte {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(time.Hour)}
	for _, n := range nodes {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: p.ca[n].SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, issuer, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// svid makes a workload SVID for entry signed by a node's CA.
func (p *crlTestPKI) svid(t *testing.T, e api.Entry, node string) *SVID {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(e.SPIFFEID)
	d, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}, p.ca[node], &k.PublicKey, p.caKey[node])
	if err != nil {
		t.Fatal(err)
	}
	v, err := newSVID(e, k, api.X509SVIDResult{EntryID: e.ID, Chain: [][]byte{d, p.ca[node].Raw}})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// Root CRLs in sync updates are checked against the configured roots (a
// node cannot forge one or roll one back), persisted, enforced on chains
// and on cached SVIDs, and reloaded by a new cache.
func TestRootCRLsInCache(t *testing.T) {
	p := newCRLTestPKI(t)
	file := filepath.Join(t.TempDir(), "root-crls.pem")
	revokedCalls := 0
	var logs bytes.Buffer
	c := New(nil, Options{Roots: []*x509.Certificate{p.root}, CRLFile: file, OnRevoked: func() { revokedCalls++ },
		Log: slog.New(slog.NewTextHandler(&logs, nil))})
	e1 := api.Entry{ID: "e1", SPIFFEID: "spiffe://example.org/a", Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}
	e2 := api.Entry{ID: "e2", SPIFFEID: "spiffe://example.org/b", Selectors: []api.Selector{{Type: "unix", Value: "uid:2"}}}
	update := func(rev uint64, crls ...[]byte) *api.SyncUpdate {
		return &api.SyncUpdate{Revision: rev, Entries: []api.Entry{e1, e2}, SPIFFE: p.spiffe,
			Bundle: api.Bundle{TrustDomain: "example.org", RootCRLs: crls}}
	}
	if err := c.apply(update(1)); err != nil {
		t.Fatal(err)
	}
	c.update(func(s *Snapshot) { s.SVIDs["e1"], s.SVIDs["e2"] = p.svid(t, e1, "node-1"), p.svid(t, e2, "node-2") })
	before, _ := c.Current()

	// Forged CRLs: a node's own CA, and a key posing under the root's
	// name. They are skipped and logged, once each however often they
	// come; the update itself is applied.
	fake, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for name, der := range map[string][]byte{
		"node CA":     p.crl(t, p.ca["node-2"], p.caKey["node-2"], 1, "node-1"),
		"posing root": p.crl(t, p.root, fake, 1, "node-1"),
	} {
		for range 3 {
			if err := c.apply(update(2, der)); err != nil {
				t.Fatalf("%s: the update was refused: %v", name, err)
			}
		}
		if s, _ := c.Current(); s.Revision != 2 {
			t.Fatalf("%s: revision %d", name, s.Revision)
		}
	}
	if n := strings.Count(logs.String(), "not signed by a trusted root"); n != 2 {
		t.Fatalf("%d log lines for two forged CRLs sent three times each, want 2:\n%s", n, logs.String())
	}
	if after, _ := c.Current(); len(after.RootCRLs) != 0 || len(c.RootCRLs()) != 0 || revokedCalls != 0 || after.SVIDs["e1"] != before.SVIDs["e1"] || after.SVIDs["e2"] != before.SVIDs["e2"] {
		t.Fatal("a forged CRL changed the cache's CRLs or SVIDs")
	}

	// The root revokes node-1: its SVID goes, node-2's stays.
	if err := c.apply(update(3, p.crl(t, p.root, p.rootKey, 2, "node-1"))); err != nil {
		t.Fatal(err)
	}
	s, _ := c.Current()
	if len(s.RootCRLs) != 1 {
		t.Fatalf("the snapshot carries %d root CRLs, want 1", len(s.RootCRLs))
	}
	if s.SVIDs["e1"] != nil || s.SVIDs["e2"] == nil || revokedCalls != 1 {
		t.Fatalf("after the CRL: e1 %v, e2 %v, OnRevoked %d", s.SVIDs["e1"] != nil, s.SVIDs["e2"] != nil, revokedCalls)
	}
	if err := c.CheckChain([][]*x509.Certificate{{p.ca["node-1"], p.root}}); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("chain through node-1: %v", err)
	}
	if err := c.CheckChain([][]*x509.Certificate{{p.ca["node-2"], p.root}}); err != nil {
		t.Fatalf("chain through node-2: %v", err)
	}
	// An older CRL (a lagging or lying node) does not roll it back, and
	// an update without CRLs keeps it.
	if err := c.apply(update(4, p.crl(t, p.root, p.rootKey, 1))); err != nil {
		t.Fatal(err)
	}
	if err := c.apply(update(5)); err != nil {
		t.Fatal(err)
	}
	if !c.Revoked([]*x509.Certificate{p.ca["node-1"]}) || len(c.RootCRLs()) != 1 {
		t.Fatal("an older CRL or a missing one un-revoked node-1")
	}
	// Nor does a newer one that leaves node-1 out (the appliance refuses
	// those; a node must not get one past the agent): it is skipped, the
	// update applied.
	if err := c.apply(update(6, p.crl(t, p.root, p.rootKey, 3, "node-2"))); err != nil {
		t.Fatalf("an update with a CRL undoing a revocation was refused: %v", err)
	}
	if s, _ := c.Current(); s.Revision != 6 || !strings.Contains(logs.String(), "cannot be undone") {
		t.Fatalf("revision %d; log:\n%s", s.Revision, logs.String())
	}
	if !c.Revoked([]*x509.Certificate{p.ca["node-1"]}) || c.Revoked([]*x509.Certificate{p.ca["node-2"]}) {
		t.Fatal("a refused CRL changed the revoked set")
	}
	// A restarted agent knows before any sync.
	d := New(nil, Options{Roots: []*x509.Certificate{p.root}, CRLFile: file})
	if !d.Revoked([]*x509.Certificate{p.ca["node-1"]}) || d.Revoked([]*x509.Certificate{p.ca["node-2"]}) {
		t.Fatal("persisted CRL not reloaded")
	}
	// A file holding a CRL the roots did not sign is not trusted.
	other := newCRLTestPKI(t)
	e := New(nil, Options{Roots: []*x509.Certificate{other.root}, CRLFile: file})
	if len(e.RootCRLs()) != 0 {
		t.Fatal("a stored CRL of another root was loaded")
	}
}
