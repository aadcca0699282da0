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
	"slices"
	"strconv"
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
	// node-1 proposes nothing any more (checkOriginCA): the rest comes
	// through node-3.
	if _, err := a.apply(CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/x", "unix:uid:1")); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "that the root's CRL revokes") {
		t.Fatalf("a command proposed by the revoked node: %v", err)
	}
	a3 := via{a, "node-3"}
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
		if _, err := a3.apply(CmdRootCRLAdd, t0, RootCRLAdd{DER: tc.der}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused CRLs changed the state")
	}
	// A stale stored CRL still revokes: past its next update nothing is
	// un-revoked, a newer one replaces it.
	archiveBefore := archiveOf(t, a)
	a3.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 7, t0, t0.Add(day), "node-1", "node-2")})
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
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	h, err := Open(td, Options{Path: g.opts.Path})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = h.Close() }() // the test's last use of it
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
	a3.must(CmdStateRestore, rp)
	if got := a.fsm.RootCRLs(); len(got) != 1 || got[0].Number != "7" || !a.fsm.CARevoked(p.nodes["node-2"]) {
		t.Fatalf("restore rolled the CRL back: %+v", got)
	}
	rp, _, _, err = a.fsm.ReadArchive(bytes.NewReader(archiveOf(t, a)), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	rp.RootCRLs = append(rp.RootCRLs[:0], RootCRL{Version: RootCRLVersion, DER: p.crl(t, 8, t0, t0.Add(day), "node-1", "node-2")},
		RootCRL{Version: RootCRLVersion, DER: p.crlWith(t, fakeKey, 9, t0, t0.Add(day), nil)})
	a3.must(CmdStateRestore, rp)
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
	defer func() { _ = g.Close() }() // the test's last use of it
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

// via proposes commands through another member (the applier's commands
// come from node-1).
type via struct {
	a      *applier
	origin string
}

func (v via) apply(typ string, at time.Time, payload any) ([]byte, error) {
	v.a.t.Helper()
	actor := actorFor(typ)
	if actor == nodeActor {
		actor = "spiffe://example.org/sigil/node/" + v.origin
	}
	return atkApplyAs(v.a, v.origin, actor, typ, at, payload)
}

func (v via) must(typ string, payload any) []byte {
	v.a.t.Helper()
	out, err := v.apply(typ, t0, payload)
	if err != nil {
		v.a.t.Fatalf("%s via %s: %v", typ, v.origin, err)
	}
	return out
}

// atkNodeCADER is a node issuing CA (CN = node) under ca's root, as JWT
// keys of version 3 commands must carry.
func atkNodeCADER(t testing.TB, ca *atkCA, node string) []byte {
	t.Helper()
	_, _, der := atkIssuing(t, ca, node, nil)
	return der
}

// nodeCA makes another issuing CA for node under the root (a rotated CA).
func (p *crlPKI) nodeCA(t *testing.T, node string, serial int64) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	ct := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: node}, NotBefore: t0.Add(-time.Hour),
		NotAfter: t0.Add(300 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
	d, err := x509.CreateCertificate(rand.Reader, ct, p.root, &k.PublicKey, p.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(d)
	return c
}

// commandOfVersion encodes a command with an explicit envelope version
// (NewCommand writes the current one).
func commandOfVersion(t *testing.T, version int, typ, actor string, at time.Time, payload any) []byte {
	t.Helper()
	pl, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(Command{Version: version, Type: typ, Actor: actor, Time: at.UTC(), Payload: pl})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAttackJWTKeyWithoutCA: a node publishes JWT keys that a CRL revoking
// its CA could not withdraw: without a CA, valid longer than its CA, with
// a CA that is not a valid chain to the root or is another node's, or, once
// it has shown its CA, with a version 2 command that needs none. Each is
// refused and changes nothing; a key with the node's CA is withdrawn by the
// CRL, and the revoked node can publish no other key in any form. Version 2
// commands without a CA from a node that never showed one (raft logs from
// before) still apply.
func TestAttackJWTKeyWithoutCA(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	ca1 := p.nodes["node-1"]
	long := p.jwtKey(t, "node-1-longlong1", "node-1", ca1.Raw)
	long.NotAfter = ca1.NotAfter.Add(time.Hour)
	expiredAt := ca1.NotAfter.Add(time.Hour)
	lateKey := p.jwtKey(t, "node-1-latelate", "node-1", ca1.Raw)
	lateKey.NotAfter = expiredAt.Add(time.Hour)
	before, _ := a.fsm.Export()
	for _, tc := range []struct {
		name, want string
		at         time.Time
		k          *JWTKey
	}{
		{"no CA", "carries no issuing CA certificate", t0, p.jwtKey(t, "node-1-nocanoca", "node-1", nil)},
		{"outliving its CA", "may not outlive its CA", t0, long},
		{"CA of another root", "not a valid chain to a root of the trust bundle", t0, p.jwtKey(t, "node-1-otherroot", "node-1", newCRLPKI(t).nodes["node-1"].Raw)},
		{"another node's CA", "is not node node-1's issuing CA", t0, p.jwtKey(t, "node-1-othernode", "node-1", p.nodes["node-2"].Raw)},
		{"expired CA", "not a valid chain to a root of the trust bundle", expiredAt, lateKey},
	} {
		_, err := a.apply(CmdJWTKeyAdd, tc.at, tc.k)
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: JWT key with %s published", tc.name)
		} else if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Error("refused JWT keys changed the state")
	}

	// node-1 publishes a key the right way, then tries to step back to a
	// version 2 command without a CA.
	a.must(CmdJWTKeyAdd, p.jwtKey(t, "node-1-goodgood", "node-1", ca1.Raw))
	a.index++
	_, err := a.fsm.Apply(a.index, "node-1", commandOfVersion(t, 2, CmdJWTKeyAdd, nodeActor, t0, p.jwtKey(t, "node-1-version2", "node-1", nil)))
	if err == nil {
		t.Error("ATTACK SUCCEEDED: a version 2 command published a key without a CA for a node that has shown its CA")
	} else if !strings.Contains(err.Error(), "carries no issuing CA certificate") && !strings.Contains(err.Error(), "older than version "+strconv.Itoa(CommandVersion)) {
		t.Errorf("version 2 key without a CA: %v", err)
	}
	// A version 2 key without a CA from a node that never showed one: a
	// raft log from before version 3 replays as it was applied.
	old := newApplier(t)
	for _, c := range []struct {
		origin, actor, typ string
		p                  any
	}{
		{origin, nodeActor, CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}}},
		{"node-2", "spiffe://example.org/sigil/node/node-2", CmdJWTKeyAdd, p.jwtKey(t, "node-2-oldoldol", "node-2", nil)},
	} {
		old.index++
		if _, err := old.fsm.Apply(old.index, c.origin, commandOfVersion(t, 2, c.typ, c.actor, t0, c.p)); err != nil {
			t.Fatalf("version 2 %s of a log from before: %v", c.typ, err)
		}
	}

	// The CRL withdraws every node-1 key; node-1 can publish none after.
	a3 := via{a, "node-3"}
	var res RootCRLResult
	if err := json.Unmarshal(a3.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 1, t0.Add(-time.Minute), t0.Add(30*24*time.Hour), "node-1")}), &res); err != nil {
		t.Fatal(err)
	}
	for _, k := range a.fsm.Bundle().JWTKeys {
		if k.Node == "node-1" {
			t.Errorf("ATTACK SUCCEEDED: node-1's key %s survived the CRL revoking its CA", k.KID)
		}
	}
	if !slices.Contains(res.WithdrawnJWTKeys, "node-1-goodgood") {
		t.Errorf("the CRL's result names %v as withdrawn, want node-1-goodgood", res.WithdrawnJWTKeys)
	}
	before, _ = a.fsm.Export()
	if _, err := a.apply(CmdJWTKeyAdd, t0, p.jwtKey(t, "node-1-revoked1", "node-1", ca1.Raw)); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("revoked node's key with its CA: %v", err)
	}
	a.index++
	if _, err := a.fsm.Apply(a.index, "node-1", commandOfVersion(t, 2, CmdJWTKeyAdd, nodeActor, t0, p.jwtKey(t, "node-1-revoked2", "node-1", nil))); err == nil {
		t.Error("ATTACK SUCCEEDED: the revoked node published a key without a CA in a version 2 command")
	}
	if _, err := a.apply(CmdJWTKeyAdd, t0, p.jwtKey(t, "node-1-revoked3", "node-1", p.nodes["node-2"].Raw)); err == nil {
		t.Error("ATTACK SUCCEEDED: the revoked node published a key with another node's CA")
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Error("the revoked node's refused keys changed the state")
	}
}

// TestAttackRevokedOriginCommands: once a root CRL revokes the issuing CA
// a node has shown, every command that node proposes is refused on every
// replica, in log order, whatever connections it kept: as itself, for an
// admin it vouches for, or for its local admin. Other nodes go on; a node
// whose old CA was revoked after it rotated to a new one gets back in by
// showing the new CA; raft snapshots keep the record.
func TestAttackRevokedOriginCommands(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	a.must(CmdJWTKeyAdd, p.jwtKey(t, "node-1-aaaaaaaa", "node-1", p.nodes["node-1"].Raw))
	a2 := via{a, "node-2"}
	a3 := via{a, "node-3"}
	a2.must(CmdJWTKeyAdd, p.jwtKey(t, "node-2-aaaaaaaa", "node-2", p.nodes["node-2"].Raw))
	a3.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 1, t0.Add(-time.Minute), t0.Add(30*24*time.Hour), "node-1")})

	before, _ := a.fsm.Export()
	issue := AuditAppend{Events: []AuditEvent{{Action: "svid.x509.issue", Target: "spiffe://example.org/web",
		Detail: map[string]string{"agent": "spiffe://example.org/sigil/agent/tpm/aaaa", "serial": "abcd", "expires": t0.Add(time.Hour).Format(time.RFC3339), "node": "node-1"}}}}
	for _, tc := range []struct {
		name, actor, typ string
		payload          any
	}{
		{"admin via node-1", admin, CmdEntryCreate, entry("entry-evil", "spiffe://example.org/evil", "unix:uid:0")},
		{"node-1's local admin", "local:uid=0@node-1", CmdEntryCreate, entry("entry-evil", "spiffe://example.org/evil", "unix:uid:0")},
		{"node-1 itself", nodeActor, CmdIssue, issue},
		{"admin CRL via node-1", admin, CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 2, t0.Add(-time.Minute), t0.Add(30*24*time.Hour), "node-1")}},
	} {
		_, err := atkApplyAs(a, "node-1", tc.actor, tc.typ, t0, tc.payload)
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s: the revoked node's command committed", tc.name)
		} else if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "that the root's CRL revokes") {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Error("the revoked node's commands changed the state")
	}
	a2.must(CmdEntryCreate, entry("entry-good", "spiffe://example.org/good", "unix:uid:1"))

	// A raft snapshot carries the record: a replica that installs it
	// refuses node-1 too.
	snap, err := a.fsm.Export()
	if err != nil {
		t.Fatal(err)
	}
	g := &applier{t: t, fsm: newFSM(t), index: a.index}
	if err := g.fsm.Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}
	if _, err := atkApplyAs(g, "node-1", admin, CmdEntryCreate, t0, entry("entry-evil", "spiffe://example.org/evil", "unix:uid:0")); err == nil {
		t.Error("ATTACK SUCCEEDED: a replica restored from a snapshot applied the revoked node's command")
	}

	// node-2 rotates to a new CA; the old one is revoked after. node-2 is
	// refused until it shows the new CA with a JWT key, then accepted.
	ca2b := p.nodeCA(t, "node-2", 2001)
	a3.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 2, t0.Add(-time.Minute), t0.Add(30*24*time.Hour), "node-1", "node-2")})
	if _, err := a2.apply(CmdEntryCreate, t0, entry("entry-0003", "spiffe://example.org/three", "unix:uid:3")); err == nil {
		t.Fatal("node-2's command accepted while its recorded CA is revoked")
	}
	a2.must(CmdJWTKeyAdd, p.jwtKey(t, "node-2-bbbbbbbb", "node-2", ca2b.Raw))
	a2.must(CmdEntryCreate, entry("entry-0003", "spiffe://example.org/three", "unix:uid:3"))
}

// TestStoredCRLDataUnreadable: stored values checked when they were written
// that no longer decode (a corrupted file, a parser grown stricter) make
// the commands that need them refused, the same on every replica, and
// never stop the process (a non-refusal error in Apply panics). A JWT key
// whose record or CA no longer reads is withdrawn by a CRL (nothing shows
// its CA is not the revoked one).
func TestStoredCRLDataUnreadable(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	a.must(CmdJWTKeyAdd, p.jwtKey(t, "node-1-aaaaaaaa", "node-1", p.nodes["node-1"].Raw))
	a2 := via{a, "node-2"}
	a2.must(CmdJWTKeyAdd, p.jwtKey(t, "node-2-aaaaaaaa", "node-2", p.nodes["node-2"].Raw))
	a2.must(CmdJWTKeyAdd, p.jwtKey(t, "node-2-bbbbbbbb", "node-2", p.nodes["node-2"].Raw))
	corrupt := func(bucket []byte, key string, mod func([]byte) []byte) {
		t.Helper()
		err := a.fsm.db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucket)
			return b.Put([]byte(key), mod(bytes.Clone(b.Get([]byte(key)))))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// node-2's first key: its CA bytes no longer parse; its second: the
	// record no longer decodes.
	corrupt(bJWTKeys, "node-2-aaaaaaaa", func(v []byte) []byte {
		var k JWTKey
		if err := json.Unmarshal(v, &k); err != nil {
			t.Fatal(err)
		}
		k.CA = []byte("not a certificate")
		out, _ := json.Marshal(k)
		return out
	})
	corrupt(bJWTKeys, "node-2-bbbbbbbb", func([]byte) []byte { return []byte("{not json") })
	var res RootCRLResult
	if err := json.Unmarshal(via{a, "node-3"}.must(CmdRootCRLAdd, RootCRLAdd{DER: p.crl(t, 1, t0.Add(-time.Minute), t0.Add(24*time.Hour))}), &res); err != nil {
		t.Fatal(err)
	}
	slices.Sort(res.WithdrawnJWTKeys)
	if !slices.Equal(res.WithdrawnJWTKeys, []string{"node-2-aaaaaaaa", "node-2-bbbbbbbb"}) {
		t.Fatalf("withdrawn %v, want the two unreadable keys only", res.WithdrawnJWTKeys)
	}
	// The stored CRLs no longer decode: a CRL and a JWT key are refused,
	// node-1's commands (its CA is recorded) too; nothing panics.
	corrupt(bMeta, string(keyRootCRLs), func([]byte) []byte { return []byte("[{") })
	before, _ := a.fsm.Export()
	for name, do := range map[string]func() error{
		"root CRL": func() error {
			_, err := via{a, "node-3"}.apply(CmdRootCRLAdd, t0, RootCRLAdd{DER: p.crl(t, 2, t0.Add(-time.Minute), t0.Add(24*time.Hour), "node-2")})
			return err
		},
		"JWT key": func() error {
			_, err := a.apply(CmdJWTKeyAdd, t0, p.jwtKey(t, "node-1-cccccccc", "node-1", p.nodes["node-1"].Raw))
			return err
		},
		"node-1's entry": func() error {
			_, err := a.apply(CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/x", "unix:uid:1"))
			return err
		},
	} {
		if err := do(); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "unreadable") {
			t.Errorf("%s with unreadable stored CRLs: %v, want a refusal", name, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Error("refused commands changed the state")
	}
}

// TestAttackRevokedCheckpointCA: a node that showed its CA by signing an
// audit checkpoint (which proves it holds the CA's key) is cut off when the
// CA is revoked, and can sign no checkpoint with the revoked CA; a
// checkpoint with a new CA of its own lets it back in.
func TestAttackRevokedCheckpointCA(t *testing.T) {
	ca := atkNewCA(t, "cp")
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{ca.rootDER}})
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/one", "unix:uid:1"))
	key1, cert1, der1 := atkIssuing(t, ca, "node-1", nil)
	checkpoint := func(key *ecdsa.PrivateKey, der []byte) AuditCheckpoint {
		seq, hash := a.fsm.AuditHead()
		sig, err := ecdsa.SignASN1(rand.Reader, key, CheckpointDigest(td.Name(), seq, hash))
		if err != nil {
			t.Fatal(err)
		}
		return AuditCheckpoint{Seq: seq, Hash: hash, Node: "node-1", Cert: der, Signature: sig}
	}
	a.must(CmdAuditCheckpoint, checkpoint(key1, der1))
	crl, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: t0.Add(-time.Minute), NextUpdate: t0.Add(24 * time.Hour),
		RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: cert1.SerialNumber, RevocationTime: t0}}}, ca.root, ca.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	via{a, "node-3"}.must(CmdRootCRLAdd, RootCRLAdd{DER: crl})
	before, _ := a.fsm.Export()
	if _, err := a.apply(CmdEntryCreate, t0, entry("entry-0002", "spiffe://example.org/two", "unix:uid:2")); err == nil {
		t.Error("ATTACK SUCCEEDED: a node whose checkpoint CA is revoked committed a command")
	}
	if _, err := a.apply(CmdAuditCheckpoint, t0, checkpoint(key1, der1)); err == nil || !strings.Contains(err.Error(), "revokes") {
		t.Errorf("ATTACK SUCCEEDED: checkpoint signed by a revoked CA: %v", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Error("the revoked node's commands changed the state")
	}
	key2, _, der2 := atkIssuing(t, ca, "node-1", nil)
	a.must(CmdAuditCheckpoint, checkpoint(key2, der2))
	a.must(CmdEntryCreate, entry("entry-0002", "spiffe://example.org/two", "unix:uid:2"))
}

// TestAttackCommandVersionDowngrade: once a version 3 command has
// committed, a member writing the version 2 envelope (which carries no
// admin certificate serial and needs no JWT key CA) is refused, and the
// floor survives a raft snapshot.
func TestAttackCommandVersionDowngrade(t *testing.T) {
	a := newApplier(t)
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"))
	before, _ := a.fsm.Export()
	a.index++
	_, err := a.fsm.Apply(a.index, origin, commandOfVersion(t, 2, CmdEntryDelete, actorFor(CmdEntryDelete), t0, EntryID{ID: "entry-0001"}))
	if err == nil {
		t.Fatal("ATTACK SUCCEEDED: a version 2 command committed after version 3")
	}
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "older than version "+strconv.Itoa(CommandVersion)) {
		t.Fatalf("version 2 after version 3: %v, want a refusal naming the committed version", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("the refused downgrade changed the state")
	}

	snap, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	c := newFSM(t)
	if err := c.Restore(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(a.index+1, origin, commandOfVersion(t, 2, CmdEntryDelete, actorFor(CmdEntryDelete), t0, EntryID{ID: "entry-0001"})); !errors.Is(err, ErrRefused) {
		t.Fatalf("version 2 after a snapshot of a version 3 state: %v, want a refusal", err)
	}
}
