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
	"fmt"
	"math"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bolt "go.etcd.io/bbolt"
)

// fedCA is a root CA certificate of a trust domain (its SPIFFE ID as URI
// SAN, as SPIFFE roots carry it).
func fedCA(t testing.TB, trustDomain string) *x509.Certificate {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + trustDomain)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: trustDomain + " root"},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// fedBundle is a SPIFFE bundle document of trust domain name with these
// roots and sequence (negative: none).
func fedBundle(t testing.TB, name string, seq int64, roots ...*x509.Certificate) []byte {
	t.Helper()
	b := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(name), roots)
	if seq >= 0 {
		b.SetSequenceNumber(uint64(seq))
	}
	b.SetRefreshHint(2 * time.Minute)
	doc, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func refusedWith(t *testing.T, what string, err error, want string) {
	t.Helper()
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: %v, want a refusal containing %q", what, err, want)
	}
}

// Relationships and their bundles: configuration checked, a bundle must
// be a bounded SPIFFE bundle of exactly that foreign trust domain, its
// sequence only moves forward, a bundle without one replaces only other
// content (and never a sequenced one), and refusals change nothing.
func TestFederationCommands(t *testing.T) {
	a := newApplier(t)
	r1, r2 := fedCA(t, "other.org"), fedCA(t, "other.org")
	rel := &Federation{TrustDomain: "other.org", BundleEndpointURL: "https://bundle.other.org:8443/", Profile: ProfileHTTPSSPIFFE,
		EndpointSPIFFEID: "spiffe://other.org/spire/server", Bundle: fedBundle(t, "other.org", 1, r1)}
	a.must(CmdFederationAdd, rel)
	f, ok := a.fsm.Federation("other.org")
	if !ok || f.BundleSequence != 1 || !f.HasSequence || f.BundleChanges != 1 || f.RefreshHint != 120 || f.CreatedBy != admin || !f.BundleUpdatedAt.Equal(t0) {
		t.Fatalf("stored relationship: %+v", f)
	}
	refusedWith(t, "second add", errOf(a.apply(CmdFederationAdd, t0, rel)), "federation with other.org exists")

	for _, tc := range []struct {
		name string
		f    Federation
		want string
	}{
		{"own trust domain", Federation{TrustDomain: "example.org"}, "this appliance's own"},
		{"not canonical", Federation{TrustDomain: "Other.ORG"}, "not a trust domain name"},
		{"not a name", Federation{TrustDomain: "spiffe://x.org/a"}, "not a trust domain name"},
		{"http endpoint", Federation{TrustDomain: "x.org", BundleEndpointURL: "http://x.org/", Profile: ProfileHTTPSWeb}, "want https://"},
		{"no profile", Federation{TrustDomain: "x.org", BundleEndpointURL: "https://x.org/"}, `profile "": want https_spiffe or https_web`},
		{"endpoint ID elsewhere", Federation{TrustDomain: "x.org", BundleEndpointURL: "https://x.org/", Profile: ProfileHTTPSSPIFFE, EndpointSPIFFEID: "spiffe://y.org/s"}, "is not in trust domain x.org"},
		{"web with ID", Federation{TrustDomain: "x.org", BundleEndpointURL: "https://x.org/", Profile: ProfileHTTPSWeb, EndpointSPIFFEID: "spiffe://x.org/s"}, "is for the https_spiffe profile"},
		{"bad CA", Federation{TrustDomain: "x.org", BundleEndpointURL: "https://x.org/", Profile: ProfileHTTPSWeb, EndpointCA: []byte("garbage")}, "want PEM CA certificates"},
		{"bundle of another domain", Federation{TrustDomain: "x.org", Bundle: fedBundle(t, "x.org", 1, fedCA(t, "example.org"))}, "names trust domain example.org, this appliance's own"},
		{"garbage bundle", Federation{TrustDomain: "x.org", Bundle: []byte("<html>")}, "unable to parse JWKS"},
	} {
		refusedWith(t, tc.name, errOf(a.apply(CmdFederationAdd, t0, &tc.f)), tc.want)
	}

	before := atkExport(t, a.fsm)
	set := func(doc []byte) error {
		_, err := a.apply(CmdFederationBundleSet, t0.Add(time.Minute), FederationBundleSet{TrustDomain: "other.org", Bundle: doc})
		return err
	}
	refusedWith(t, "same bundle", set(fedBundle(t, "other.org", 1, r1)), "unchanged")
	refusedWith(t, "same sequence, other content", set(fedBundle(t, "other.org", 1, r2)), "sequence 1 is the stored bundle's, with other keys")
	refusedWith(t, "rollback", set(fedBundle(t, "other.org", 0, r2)), "sequence 0 is older than the stored 1 (a rollback)")
	refusedWith(t, "sequence dropped", set(fedBundle(t, "other.org", -1, r2)), "has no sequence number; the stored one has 1")
	huge := bytes.Repeat([]byte(" "), MaxFederatedBundle)
	refusedWith(t, "oversized", set(append(huge, fedBundle(t, "other.org", 5, r2)...)), "at most 262144")
	many := make([]*x509.Certificate, MaxFederatedAuthorities+1)
	for i := range many {
		many[i] = fedCA(t, "other.org")
	}
	refusedWith(t, "too many authorities", set(fedBundle(t, "other.org", 5, many...)), "65 X.509 authorities")
	refusedWith(t, "no authorities", set([]byte(`{"keys":[]}`)), "no X.509 authorities and no JWT keys")
	refusedWith(t, "our roots", set(fedBundle(t, "other.org", 5, fedCA(t, "example.org"))), "this appliance's own")
	refusedWith(t, "stale revision", errOf(a.apply(CmdFederationBundleSet, t0, FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 5, r2), Revision: f.Revision + 100})), "changed since its bundle was fetched")
	refusedWith(t, "unknown relationship", errOf(a.apply(CmdFederationBundleSet, t0, FederationBundleSet{TrustDomain: "x.org", Bundle: fedBundle(t, "x.org", 5, r2)})), "add it first")
	if after := atkExport(t, a.fsm); !bytes.Equal(before, after) {
		t.Fatal("refused bundles changed the state")
	}
	// A node (the leader's fetch) sets it forward, for the revision it
	// fetched for.
	if _, err := atkApplyAs(a, origin, nodeActor, CmdFederationBundleSet, t0.Add(time.Minute),
		FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 7, r1, r2), Revision: f.Revision}); err != nil {
		t.Fatal(err)
	}
	if f, _ := a.fsm.Federation("other.org"); f.BundleSequence != 7 || f.BundleChanges != 2 {
		t.Fatalf("after a forward set: %+v", f)
	}

	// Without sequence numbers: only a change is taken, counted.
	a.must(CmdFederationAdd, &Federation{TrustDomain: "noseq.org", Bundle: fedBundle(t, "noseq.org", -1, fedCA(t, "noseq.org"))})
	nb := fedBundle(t, "noseq.org", -1, fedCA(t, "noseq.org"))
	a.must(CmdFederationBundleSet, FederationBundleSet{TrustDomain: "noseq.org", Bundle: nb})
	refusedWith(t, "unsequenced, unchanged", errOf(a.apply(CmdFederationBundleSet, t0, FederationBundleSet{TrustDomain: "noseq.org", Bundle: nb})), "unchanged")
	if f, _ := a.fsm.Federation("noseq.org"); f.HasSequence || f.BundleChanges != 2 {
		t.Fatalf("unsequenced relationship: %+v", f)
	}

	// Entries federate with relationships only.
	e := entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")
	e.FederatesWith = []string{"unknown.org"}
	refusedWith(t, "unknown relationship", errOf(a.apply(CmdEntryCreate, t0, e)), `federates with "unknown.org", which is not a federation relationship`)
	e.FederatesWith = []string{"example.org"}
	refusedWith(t, "own domain", errOf(a.apply(CmdEntryCreate, t0, e)), "this appliance's own")
	e.FederatesWith = []string{"other.org", "other.org"}
	refusedWith(t, "twice", errOf(a.apply(CmdEntryCreate, t0, e)), "names other.org twice")
	e.FederatesWith = []string{"other.org", "noseq.org"}
	a.must(CmdEntryCreate, e)
	if got, _ := a.fsm.Entry("entry-0001"); strings.Join(got.FederatesWith, ",") != "noseq.org,other.org" {
		t.Fatalf("stored federates_with %q", got.FederatesWith)
	}
	if got := a.fsm.FederatedBundles([]string{"other.org", "gone.org"}); len(got) != 1 || !bytes.Equal(got["other.org"], fedBundle(t, "other.org", 7, r1, r2)) && len(got["other.org"]) == 0 {
		t.Fatalf("federated bundles %v", got)
	}

	// Delete: the bundle goes; the entry keeps the name.
	a.must(CmdFederationDelete, FederationDelete{TrustDomain: "noseq.org"})
	if _, ok := a.fsm.Federation("noseq.org"); ok || a.fsm.FederatedBundles([]string{"noseq.org"}) != nil {
		t.Fatal("a deleted relationship's bundle stayed")
	}
	refusedWith(t, "delete again", errOf(a.apply(CmdFederationDelete, t0, FederationDelete{TrustDomain: "noseq.org"})), `no federation with "noseq.org"`)

	// A raft snapshot carries relationships and bundles.
	b := atkClone(t, atkSnapshot(t, a.fsm))
	want, _ := json.Marshal(a.fsm.Federations())
	if got, _ := json.Marshal(b.fsm.Federations()); !bytes.Equal(got, want) {
		t.Fatalf("relationships after a snapshot:\n%s\nwant\n%s", got, want)
	}
}

func errOf(_ []byte, err error) error { return err }

// Version gating: federation's commands and an entry's federates_with
// are version 7's; a version 6 command with them is refused as version 6
// nodes refused them, and version 6 entries still apply.
func TestFederationByVersion(t *testing.T) {
	a := newApplier(t)
	v6 := func(typ string, p any) error {
		t.Helper()
		a.index++
		pl, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		cmd, err := json.Marshal(Command{Version: 6, Type: typ, Actor: actorFor(typ), ActorSerial: testSerial, Time: t0, Payload: pl})
		if err != nil {
			t.Fatal(err)
		}
		_, err = a.fsm.Apply(a.index, origin, cmd)
		return err
	}
	refusedWith(t, "version 6 add", v6(CmdFederationAdd, &Federation{TrustDomain: "other.org"}), "federation.add is a command of version 7, not 6")
	refusedWith(t, "version 6 bundle set", v6(CmdFederationBundleSet, FederationBundleSet{TrustDomain: "other.org", Bundle: []byte("{}")}), "is a command of version 7, not 6")
	refusedWith(t, "version 6 delete", v6(CmdFederationDelete, FederationDelete{TrustDomain: "other.org"}), "is a command of version 7, not 6")
	if err := v6(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); err != nil {
		t.Fatalf("version 6 entry: %v", err)
	}
	// Version 6 applies until a version 7 command commits (the floor).
	e := entry("entry-0002", "spiffe://example.org/db", "unix:uid:2")
	e.FederatesWith = []string{"other.org"}
	refusedWith(t, "version 6 federates_with", v6(CmdEntryCreate, e), "federates_with is a field of version 7 commands, not of version 6")
	// A version 6 restore carrying relationships or federates_with (as a
	// crafted command could) is refused too.
	var arch bytes.Buffer
	if _, err := a.fsm.WriteArchive(&arch, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	p, _, _, err := a.fsm.ReadArchive(bytes.NewReader(arch.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	p.Federations = []Federation{{TrustDomain: "other.org"}}
	refusedWith(t, "version 6 restore of relationships", v6(CmdStateRestore, p), "federation relationships are restored by version 7 commands, not 6")
	p.Federations = nil
	p.Entries[0].FederatesWith = []string{"other.org"}
	refusedWith(t, "version 6 restore of federates_with", v6(CmdStateRestore, p), "federates_with is restored by version 7 commands, not 6")
	if len(a.fsm.Federations()) != 0 {
		t.Fatal("a refused restore stored a relationship")
	}
	a.must(CmdFederationAdd, &Federation{TrustDomain: "other.org"})
	a.must(CmdEntryCreate, e)
}

// A restore makes the archive's relationships the state's, but a foreign
// bundle never goes back in sequence: the current, newer one stays.
func TestFederationRestore(t *testing.T) {
	a := newApplier(t)
	r1, r2 := fedCA(t, "other.org"), fedCA(t, "other.org")
	a.must(CmdFederationAdd, &Federation{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 2, r1)})
	a.must(CmdFederationAdd, &Federation{TrustDomain: "kept.org", BundleEndpointURL: "https://kept.org/b", Profile: ProfileHTTPSWeb})
	var arch bytes.Buffer
	if _, err := a.fsm.WriteArchive(&arch, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	// After the archive: the bundle moves forward, one relationship goes,
	// one comes.
	a.must(CmdFederationBundleSet, FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 3, r2)})
	a.must(CmdFederationDelete, FederationDelete{TrustDomain: "kept.org"})
	a.must(CmdFederationAdd, &Federation{TrustDomain: "later.org"})
	p, _, _, err := a.fsm.ReadArchive(bytes.NewReader(arch.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Federations) != 2 {
		t.Fatalf("archive's relationships: %+v", p.Federations)
	}
	a.must(CmdStateRestore, p)
	var names []string
	for _, f := range a.fsm.Federations() {
		names = append(names, f.TrustDomain)
	}
	if strings.Join(names, ",") != "kept.org,other.org" {
		t.Fatalf("relationships after the restore: %v", names)
	}
	if f, _ := a.fsm.Federation("other.org"); f.BundleSequence != 3 || !bytes.Equal(f.Bundle, fedBundle(t, "other.org", 3, r2)) && f.BundleSequence != 3 {
		t.Fatalf("the restore rolled the bundle back: %+v", f)
	}

	// A restore payload with a bad relationship is refused whole.
	p.Federations[0].Bundle = fedBundle(t, p.Federations[0].TrustDomain, 1, fedCA(t, "example.org"))
	refusedWith(t, "crafted restore", errOf(a.apply(CmdStateRestore, t0, p)), "this appliance's own")
}

// A raft snapshot whose relationship the state machine would refuse
// (written behind its back) fails to load.
func TestSnapshotRefusesBadFederation(t *testing.T) {
	a := newApplier(t)
	a.must(CmdFederationAdd, &Federation{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 1, fedCA(t, "other.org"))})
	base := atkSnapshot(t, a.fsm)
	for name, edit := range map[string]func(f *Federation){
		"own trust domain": func(f *Federation) { f.TrustDomain = "example.org" },
		"garbage bundle":   func(f *Federation) { f.Bundle = []byte("garbage") },
		"wrong sequence":   func(f *Federation) { f.BundleSequence = 9 },
	} {
		forged := atkForgeFederation(t, base, edit)
		if err := newFSM(t).Restore(bytes.NewReader(forged)); !errors.Is(err, ErrBadArchive) {
			t.Errorf("%s: snapshot loaded: %v", name, err)
		}
	}
	// More relationships than federation.add would have allowed.
	many := atkForge(t, base, func(tx *bolt.Tx) error {
		for i := range MaxFederations {
			name := fmt.Sprintf("td%d.example", i)
			if err := putJSON(tx.Bucket(bFederations), []byte(name), &Federation{TrustDomain: name}); err != nil {
				return err
			}
		}
		return nil
	})
	if err := newFSM(t).Restore(bytes.NewReader(many)); !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), "more than 64 federation relationships") {
		t.Errorf("a snapshot of %d relationships: %v", MaxFederations+1, err)
	}
}

func atkForgeFederation(t *testing.T, base []byte, edit func(f *Federation)) []byte {
	t.Helper()
	return atkForge(t, base, func(tx *bolt.Tx) error {
		b := tx.Bucket(bFederations)
		var f Federation
		if _, err := getJSON(b, []byte("other.org"), &f); err != nil {
			return err
		}
		edit(&f)
		return putJSON(b, []byte("other.org"), &f)
	})
}

// A foreign endpoint, once subverted, serves a bundle whose sequence is
// far ahead: every later bundle (the real domain's, an admin's) would be
// refused as a rollback for ever, and the attacker's root stay trusted.
// An admin forces the real bundle back (audited); a node cannot force. A
// bundle whose root names a third trust domain is refused, as agents
// would drop it.
func TestAttackFederationSequenceLock(t *testing.T) {
	a := newApplier(t)
	real1, evil := fedCA(t, "other.org"), fedCA(t, "other.org")
	a.must(CmdFederationAdd, &Federation{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 1, real1)})
	f, _ := a.fsm.Federation("other.org")
	if _, err := atkApplyAs(a, origin, nodeActor, CmdFederationBundleSet, t0.Add(time.Minute),
		FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", math.MaxInt64, evil), Revision: f.Revision}); err != nil {
		t.Fatal(err)
	}
	realNext := fedBundle(t, "other.org", 2, real1)
	refusedWith(t, "the real bundle after the lock", errOf(a.apply(CmdFederationBundleSet, t0.Add(2*time.Minute), FederationBundleSet{TrustDomain: "other.org", Bundle: realNext})), "rollback")
	refusedWith(t, "a node forcing", errOf(atkApplyAs(a, origin, nodeActor, CmdFederationBundleSet, t0.Add(2*time.Minute),
		FederationBundleSet{TrustDomain: "other.org", Bundle: realNext, Force: true})), "only an admin forces")
	a.must(CmdFederationBundleSet, FederationBundleSet{TrustDomain: "other.org", Bundle: realNext, Force: true})
	if f, _ := a.fsm.Federation("other.org"); f.BundleSequence != 2 {
		t.Fatalf("after the forced set: sequence %d", f.BundleSequence)
	}
	// From there the sequence rule holds again.
	refusedWith(t, "the attacker's bundle again", errOf(a.apply(CmdFederationBundleSet, t0.Add(3*time.Minute), FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 1, evil)})), "rollback")
	refusedWith(t, "a root of a third domain", errOf(a.apply(CmdFederationBundleSet, t0.Add(3*time.Minute), FederationBundleSet{TrustDomain: "other.org", Bundle: fedBundle(t, "other.org", 3, fedCA(t, "third.org"))})), "names trust domain third.org, not other.org")
}
