package cache

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
)

func leafFor(t *testing.T, id string, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	u, _ := url.Parse(id)
	signer, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
	}, &x509.Certificate{SerialNumber: big.NewInt(1)}, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// What the appliance returns is checked before it is served: the leaf
// must be for the entry's ID and certify the key the agent generated.
func TestNewSVIDChecksWhatWasSigned(t *testing.T) {
	e := api.Entry{ID: "e1", SPIFFEID: "spiffe://example.org/a"}
	mine, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, c := range []struct {
		name  string
		chain [][]byte
		want  string
	}{
		{"empty chain", nil, "empty chain"},
		{"garbage", [][]byte{[]byte("not DER")}, "malformed"},
		{"another ID", [][]byte{leafFor(t, "spiffe://example.org/b", mine)}, "entry for spiffe://example.org/a"},
		{"another key", [][]byte{leafFor(t, e.SPIFFEID, other)}, "another key"},
	} {
		_, err := newSVID(e, mine, api.X509SVIDResult{EntryID: e.ID, Chain: c.chain})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	v, err := newSVID(e, mine, api.X509SVIDResult{EntryID: e.ID, Chain: [][]byte{leafFor(t, e.SPIFFEID, mine)}})
	if err != nil {
		t.Fatal(err)
	}
	life := v.NotAfter.Sub(v.Chain[0].NotBefore)
	if at := v.rotateAt.Sub(v.Chain[0].NotBefore); at > life/2 || at < life*4/10 {
		t.Fatalf("rotation at %v of a %v lifetime", at, life)
	}
}

// An update the agent cannot use leaves the cache as it was.
func TestBadUpdateChangesNothing(t *testing.T) {
	c := New(nil, Options{})
	before, _ := c.Current()
	for _, u := range []*api.SyncUpdate{
		{Revision: 5, Bundle: api.Bundle{TrustDomain: "not a domain!"}},
		{Revision: 5, Bundle: api.Bundle{TrustDomain: "example.org"}, SPIFFE: []byte("{")},
		{Revision: 5, Bundle: api.Bundle{TrustDomain: "example.org"}, SPIFFE: []byte(`{"keys":[]}`)},
	} {
		if err := c.apply(u); err == nil {
			t.Fatalf("update %+v applied", u)
		}
	}
	if after, _ := c.Current(); after != before {
		t.Fatal("a refused update changed the snapshot")
	}
}

// A job agent's SVIDs end at the agent's own expiry (Options.CutAt): one
// that ends there is kept until it expires, not re-signed at half of what
// is left again and again; one that ends earlier rotates at half its life
// as usual, as does every SVID of an agent without CutAt.
func TestHoldIfCut(t *testing.T) {
	now := time.Now()
	agentExp := now.Add(20 * time.Second)
	c := New(nil, Options{CutAt: func() time.Time { return agentExp }})
	cut := &SVID{NotAfter: agentExp.Truncate(time.Second), rotateAt: now.Add(-5 * time.Second)}
	c.holdIfCut(cut)
	if !cut.rotateAt.Equal(cut.NotAfter) {
		t.Fatalf("cut SVID rotates at %v, want at its expiry %v", cut.rotateAt, cut.NotAfter)
	}
	shorter := &SVID{NotAfter: now.Add(10 * time.Second), rotateAt: now.Add(5 * time.Second)}
	c.holdIfCut(shorter)
	if !shorter.rotateAt.Equal(now.Add(5 * time.Second)) {
		t.Fatal("an SVID ending before the agent lost its half-life rotation")
	}
	host := New(nil, Options{})
	v := &SVID{NotAfter: agentExp, rotateAt: now}
	host.holdIfCut(v)
	if !v.rotateAt.Equal(now) {
		t.Fatal("an SVID of an agent without CutAt was held")
	}
}
