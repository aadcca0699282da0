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
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// foreignBundle makes a real CA whose certificate names spiffe://named
// and returns a SPIFFE bundle document for td holding it and a JWT key.
func foreignBundle(t testing.TB, td, named string) ([]byte, *x509.Certificate) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + named)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: named + " root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	b := spiffebundle.New(spiffeid.RequireTrustDomainFromString(td))
	b.AddX509Authority(ca)
	if err := b.AddJWTAuthority("k-"+td, &k.PublicKey); err != nil {
		t.Fatal(err)
	}
	doc, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return doc, ca
}

// Foreign bundles of a sync update are kept in the snapshot with the
// entries of the same view; one that does not parse, names another trust
// domain or claims ours is dropped and logged (once), and the update is
// applied all the same; a dropped bundle does not erase the one the agent
// had for that trust domain, and a trust domain the view no longer names
// is gone.
func TestFederatedBundles(t *testing.T) {
	p := newCRLTestPKI(t)
	var logs bytes.Buffer
	c := New(nil, Options{Log: slog.New(slog.NewTextHandler(&logs, nil))})
	partner := spiffeid.RequireTrustDomainFromString("partner.test")
	other := spiffeid.RequireTrustDomainFromString("other.test")
	partnerDoc, partnerCA := foreignBundle(t, "partner.test", "partner.test")
	otherDoc, _ := foreignBundle(t, "other.test", "other.test")
	posing, _ := foreignBundle(t, "partner.test", "evil.test")
	ours, _ := foreignBundle(t, "example.org", "example.org")
	fed := api.Entry{ID: "e1", SPIFFEID: "spiffe://example.org/a", FederatesWith: []string{"partner.test", "missing.test"},
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}
	plain := api.Entry{ID: "e2", SPIFFEID: "spiffe://example.org/b", Selectors: []api.Selector{{Type: "unix", Value: "uid:2"}}}
	update := func(rev uint64, f map[string][]byte, es ...api.Entry) *Snapshot {
		t.Helper()
		if err := c.apply(&api.SyncUpdate{Revision: rev, Entries: es, SPIFFE: p.spiffe,
			Bundle: api.Bundle{TrustDomain: "example.org"}, Federated: f}); err != nil {
			t.Fatalf("revision %d refused: %v", rev, err)
		}
		s, _ := c.Current()
		return s
	}

	s := update(1, map[string][]byte{"partner.test": partnerDoc, "other.test": otherDoc}, fed, plain)
	if len(s.Federated) != 2 || !s.Federated[partner].HasX509Authority(partnerCA) {
		t.Fatalf("federated bundles %v", s.Federated)
	}
	got := s.FederatedFor(s.Match(func(sel ...string) bool { return sel[0] == "unix:uid:1" }))
	if len(got) != 1 || got[partner] == nil {
		t.Fatalf("entry federating with partner.test (and missing.test, which has no bundle) gets %v", got)
	}
	if got := s.FederatedFor([]api.Entry{plain}); got != nil {
		t.Fatalf("an entry that federates with nothing gets %v", got)
	}

	// Bad documents: each dropped; the one under partner.test keeps the
	// bundle the agent had; the entries of the update are applied.
	for range 3 {
		s = update(2, map[string][]byte{
			"partner.test":  posing,
			"other.test":    []byte("{"),
			"example.org":   ours,
			"Not A Domain!": otherDoc,
		}, fed)
	}
	if len(s.Entries) != 1 || s.Revision != 2 {
		t.Fatalf("the update with bad bundles was not applied: revision %d, %d entries", s.Revision, len(s.Entries))
	}
	if len(s.Federated) != 2 || !s.Federated[partner].HasX509Authority(partnerCA) || s.Federated[other] == nil {
		t.Fatalf("after bad documents: %v", s.Federated)
	}
	if n := strings.Count(logs.String(), "federated bundle dropped"); n != 4 {
		t.Errorf("%d drops logged for 4 bad documents over 3 updates:\n%s", n, logs.String())
	}
	for _, want := range []string{"names trust domain evil.test", "own trust domain", "trust domain name"} {
		if n := strings.Count(logs.String(), want); n != 1 {
			t.Errorf("%q logged %d times over 3 updates, want once:\n%s", want, n, logs.String())
		}
	}

	// Gone from the view: gone from the snapshot.
	s = update(3, nil, fed)
	if s.Federated != nil || s.FederatedFor(s.Entries) != nil {
		t.Fatalf("federated bundles after a view without any: %v", s.Federated)
	}
}

// FuzzParseFederated: any trust domain name and document from the sync
// stream. Whatever is accepted is a parsed bundle of that trust domain,
// not ours, whose CAs name no other trust domain.
func FuzzParseFederated(f *testing.F) {
	own := spiffeid.RequireTrustDomainFromString("example.org")
	good, _ := foreignBundle(f, "partner.test", "partner.test")
	posing, _ := foreignBundle(f, "partner.test", "evil.test")
	for _, s := range []struct {
		name string
		doc  []byte
	}{{"partner.test", good}, {"partner.test", posing}, {"example.org", good}, {"", good}, {"partner.test", []byte(`{"keys":[]}`)}, {"x", []byte("{")}} {
		f.Add(s.name, s.doc)
	}
	f.Fuzz(func(t *testing.T, name string, doc []byte) {
		td, b, err := parseFederated(own, name, doc)
		if err != nil {
			return
		}
		if td == own || td.Name() != strings.ToLower(td.Name()) || b.TrustDomain() != td {
			t.Fatalf("accepted %q as %s", name, td)
		}
		if want, _ := spiffeid.TrustDomainFromString(name); want != td {
			t.Fatalf("%q accepted as %s", name, td)
		}
		for _, ca := range b.X509Authorities() {
			for _, u := range ca.URIs {
				if id, err := spiffeid.FromURI(u); err == nil && id.TrustDomain() != td {
					t.Fatalf("a CA of %s names %s", td, id)
				}
			}
		}
	})
}
