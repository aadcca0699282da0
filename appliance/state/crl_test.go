package state

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// crlPKI is a software root with two node issuing CAs, enough to sign and
// check root CRLs in the state machine alone.
type crlPKI struct {
	rootKey *ecdsa.PrivateKey
	root    *x509.Certificate
	nodes   map[string]*x509.Certificate
}

func newCRLPKI(t *testing.T) *crlPKI {
	t.Helper()
	p := &crlPKI{nodes: map[string]*x509.Certificate{}}
	p.rootKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "crl test root"}, NotBefore: t0.Add(-time.Hour),
		NotAfter: t0.Add(365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{1, 2, 3, 4}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.rootKey.PublicKey, p.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	p.root, _ = x509.ParseCertificate(der)
	for i, n := range []string{"node-1", "node-2"} {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		ct := &x509.Certificate{SerialNumber: big.NewInt(int64(1000 + i)), Subject: pkix.Name{CommonName: n}, NotBefore: t0.Add(-time.Hour),
			NotAfter: t0.Add(300 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
		d, err := x509.CreateCertificate(rand.Reader, ct, p.root, &k.PublicKey, p.rootKey)
		if err != nil {
			t.Fatal(err)
		}
		p.nodes[n], _ = x509.ParseCertificate(d)
	}
	return p
}

// crl signs a CRL with the root (or, with signer set, with another key
// under the root's name) listing the given nodes' CAs.
func (p *crlPKI) crl(t *testing.T, number int64, thisUpdate, nextUpdate time.Time, nodes ...string) []byte {
	t.Helper()
	return p.crlWith(t, p.rootKey, number, thisUpdate, nextUpdate, nil, nodes...)
}

func (p *crlPKI) crlWith(t *testing.T, key *ecdsa.PrivateKey, number int64, thisUpdate, nextUpdate time.Time, ext []pkix.Extension, nodes ...string) []byte {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: thisUpdate, NextUpdate: nextUpdate, ExtraExtensions: ext}
	for _, n := range nodes {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: p.nodes[n].SerialNumber, RevocationTime: thisUpdate})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, p.root, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func (p *crlPKI) jwtKey(t *testing.T, kid, node string, ca []byte) *JWTKey {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
	return &JWTKey{KID: kid, Node: node, PublicKey: pub, NotAfter: t0.Add(48 * time.Hour), CA: ca}
}

func TestRootCRLs(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	// node-1 (the applier's origin) publishes a JWT key bound to its CA.
	a.must(CmdJWTKeyAdd, p.jwtKey(t, "node-1-aaaaaaaa", "node-1", p.nodes["node-1"].Raw))
	// The CA a key carries must be the node's and the root's.
	for name, k := range map[string]*JWTKey{
		"another node's CA":  p.jwtKey(t, "node-1-bbbbbbbb", "node-1", p.nodes["node-2"].Raw),
		"not a certificate":  p.jwtKey(t, "node-1-cccccccc", "node-1", []byte("junk")),
		"CA of another root": p.jwtKey(t, "node-1-dddddddd", "node-1", newCRLPKI(t).nodes["node-1"].Raw),
	} {
		if _, err := a.apply(CmdJWTKeyAdd, t0, k); !errors.Is(err, ErrRefused) {
			t.Errorf("JWT key with %s: %v", name, err)
		}
	}

	day := 24 * time.Hour
	fakeKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other := newCRLPKI(t)
	before, _ := a.fsm.Export()
	for _, tc := range []struct {
		name, want string
		der        []byte
	}{
		{"key posing as the root", "not signed by a root of the trust bundle", p.crlWith(t, fakeKey, 1, t0, t0.Add(day), nil, "node-2")},
		{"another root", "not signed by a root of the trust bundle", other.crl(t, 1, t0, t0.Add(day))},
		{"expired", "expired at", p.crl(t, 1, t0.Add(-2*day), t0.Add(-day), "node-2")},
		{"dated in the future", "in the future", p.crl(t, 1, t0.Add(time.Hour), t0.Add(day), "node-2")},
		{"delta CRL", "delta CRLs are not supported", p.crlWith(t, p.rootKey, 1, t0, t0.Add(day),
			[]pkix.Extension{{Id: oidDeltaCRLIndicator, Critical: true, Value: []byte{2, 1, 1}}}, "node-2")},
		{"garbage", "not an X.509 CRL", []byte("not a crl")},
		{"empty", "no CRL given", nil},
	} {
		_, err := a.apply(CmdRootCRLAdd, t0, RootCRLAdd{DER: tc.der})
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused CRLs changed the state")
	}
	if a.fsm.CARevoked(p.nodes["node-2"]) || len(a.fsm.RootCRLs()) != 0 {
		t.Fatal("a refused CRL revoked something")
	}

	// The root's CRL number 5 revokes node-1's CA: its JWT key leaves the
	// bundle and it can publish no other.
	seq := a.fsm.Bundle().Sequence
	out := a.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 5, t0.Add(-time.Minute), t0.Add(30*day), "node-1")})
	var res RootCRLResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatal(err)
	}
	if res.CRL.Number != "5" || len(res.CRL.Revoked) != 1 || res.CRL.Revoked[0] != p.nodes["node-1"].SerialNumber.Text(16) ||
		len(res.WithdrawnJWTKeys) != 1 || res.WithdrawnJWTKeys[0] != "node-1-aaaaaaaa" || res.CRL.DER != nil {
		t.Fatalf("result %+v", res)
	}
	if !a.fsm.CARevoked(p.nodes["node-1"]) || a.fsm.CARevoked(p.nodes["node-2"]) {
		t.Fatal("revoked set wrong")
	}
	if b := a.fsm.Bundle(); len(b.JWTKeys) != 0 || b.Sequence != seq+1 {
		t.Fatalf("bundle after the CRL: %d JWT keys, sequence %d (was %d)", len(b.JWTKeys), b.Sequence, seq)
	}
	if _, err := a.apply(CmdJWTKeyAdd, t0, p.jwtKey(t, "node-1-eeeeeeee", "node-1", p.nodes["node-1"].Raw)); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("JWT key of a revoked CA: %v", err)
	}
	recs := a.fsm.Audit(0, 0)
	if last := recs[len(recs)-1]; last.Action != CmdRootCRLAdd || last.Detail["number"] != "5" || last.Detail["jwt_keys_withdrawn"] != "node-1-aaaaaaaa" {
		t.Fatalf("audit %+v", last)
	}

	// No rollback, no undoing a revocation.
	before, _ = a.fsm.Export()
	for _, tc := range []struct {
		name, want string
		der        []byte
	}{
		{"older number", "is not newer than the stored CRL number 5", p.crl(t, 4, t0, t0.Add(day), "node-1", "node-2")},
		{"same number", "is not newer", p.crl(t, 5, t0, t0.Add(day), "node-1")},
		{"revocation left out", "a revocation cannot be undone", p.crl(t, 6, t0, t0.Add(day), "node-2")},
	} {
		if _, err := a.apply(CmdRootCRLAdd, t0, RootCRLAdd{DER: tc.der}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused CRLs changed the state")
	}
	// A stale stored CRL still revokes: past its next update nothing is
	// un-revoked, a newer one replaces it.
	archiveBefore := archiveOf(t, a)
	a.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 7, t0, t0.Add(day), "node-1", "node-2")})
	if !a.fsm.CARevoked(p.nodes["node-2"]) || len(a.fsm.RootCRLs()) != 1 || a.fsm.RootCRLs()[0].Number != "7" {
		t.Fatalf("CRL 7: %+v", a.fsm.RootCRLs())
	}

	// Raft snapshots carry the CRLs, checked again on load.
	snap, err := a.fsm.Export()
	if err != nil {
		t.Fatal(err)
	}
	g := newFSM(t)
	if err := g.Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}
	if !g.CARevoked(p.nodes["node-1"]) || !g.CARevoked(p.nodes["node-2"]) || len(g.Bundle().RootCRLs) != 1 {
		t.Fatal("snapshot lost the root CRLs")
	}
	// The CRLs are kept beside the state file, which a restart rebuilds:
	// the next run of the node finds them before raft replays anything.
	g.Close()
	h, err := Open(td, Options{Path: g.opts.Path})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if carried := h.CarriedRootCRLs(); len(carried) != 1 || !bytes.Equal(carried[0], a.fsm.RootCRLs()[0].DER) || h.CARevoked(p.nodes["node-1"]) {
		t.Fatalf("carried CRLs after a restart: %d (and the fresh state must not claim them itself)", len(carried))
	}

	// A restore of an archive from before CRL 7 never drops it; one
	// carrying a newer CRL (8) adopts it.
	rp, _, _, err := a.fsm.ReadArchive(bytes.NewReader(archiveBefore), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(rp.RootCRLs) != 1 || rp.RootCRLs[0].Number != "5" {
		t.Fatalf("archive CRLs %+v", rp.RootCRLs)
	}
	a.must(CmdStateRestore, rp)
	if got := a.fsm.RootCRLs(); len(got) != 1 || got[0].Number != "7" || !a.fsm.CARevoked(p.nodes["node-2"]) {
		t.Fatalf("restore rolled the CRL back: %+v", got)
	}
	rp, _, _, err = a.fsm.ReadArchive(bytes.NewReader(archiveOf(t, a)), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rp.RootCRLs = append(rp.RootCRLs[:0], RootCRL{Version: RootCRLVersion, DER: p.crl(t, 8, t0, t0.Add(day), "node-1", "node-2")},
		RootCRL{Version: RootCRLVersion, DER: p.crlWith(t, fakeKey, 9, t0, t0.Add(day), nil)})
	a.must(CmdStateRestore, rp)
	if got := a.fsm.RootCRLs(); len(got) != 1 || got[0].Number != "8" {
		t.Fatalf("restore did not adopt the newer CRL (or adopted the forged one): %+v", got)
	}
	recs = a.fsm.Audit(0, 0)
	if last := recs[len(recs)-1]; last.Detail["root_crls_adopted"] != "1" {
		t.Fatalf("restore audit %+v", last.Detail)
	}
}

func archiveOf(t *testing.T, a *applier) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := a.fsm.WriteArchive(&b, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// A snapshot whose root CRL the roots did not sign is refused on load,
// before it replaces anything.
func TestRootCRLSnapshotForged(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	a.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 1, t0, t0.Add(time.Hour), "node-2")})
	fakeKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	forged := p.crlWith(t, fakeKey, 2, t0, t0.Add(time.Hour), nil, "node-1", "node-2")
	// Rewrite the stored record in a copy of the state file, then stream it.
	g, err := Open(td, Options{Path: filepath.Join(t.TempDir(), "g.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	snap, _ := a.fsm.Export()
	if err := g.Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}
	crls := g.RootCRLs()
	crls[0].DER, crls[0].Number, crls[0].Revoked = forged, "2", []string{p.nodes["node-1"].SerialNumber.Text(16), p.nodes["node-2"].SerialNumber.Text(16)}
	if err := g.db.Update(func(tx *bolt.Tx) error { return putJSON(tx.Bucket(bMeta), keyRootCRLs, crls) }); err != nil {
		t.Fatal(err)
	}
	bad, _ := g.Export()
	h := newFSM(t)
	if err := h.Restore(bytes.NewReader(bad)); !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), "not signed by a root") {
		t.Fatalf("forged CRL in a snapshot: %v", err)
	}
	if h.CARevoked(p.nodes["node-1"]) {
		t.Fatal("the refused snapshot revoked node-1")
	}
}
