package ca

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// A cached verification is used only inside the validity of every
// certificate in its chains, and the cache stays within its bound however
// many distinct chains pass through it.
func TestVerifiedChainsValidityAndBound(t *testing.T) {
	now := time.Now()
	id := spiffeid.RequireFromString("spiffe://example.org/sigil/agent/x")
	leaf := &x509.Certificate{Raw: []byte("leaf"), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)}
	ca := &x509.Certificate{Raw: []byte("ca"), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * time.Minute)}
	c := &verifiedChains{max: 64}
	k := chainKey([][]byte{leaf.Raw, ca.Raw})
	c.put(k, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, now.Add(9*time.Minute)); !ok {
		t.Fatal("a chain valid now was not cached")
	}
	if _, ok := c.get(k, now.Add(11*time.Minute)); ok {
		t.Fatal("a cached chain was used after its issuing CA expired")
	}
	if _, ok := c.get(k, now.Add(9*time.Minute)); ok {
		t.Fatal("an expired entry stayed in the cache")
	}
	c.put(k, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, now.Add(-2*time.Minute)); ok {
		t.Fatal("a cached chain was used before its leaf's NotBefore")
	}
	if k2 := chainKey([][]byte{[]byte("lea"), []byte("fca")}); k2 == k {
		t.Fatal("chains that concatenate alike share a key")
	}
	for i := 0; i < 1000; i++ {
		l := &x509.Certificate{Raw: []byte{byte(i), byte(i >> 8)}, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}
		c.put(chainKey([][]byte{l.Raw, ca.Raw}), id, [][]*x509.Certificate{{l, ca}}, now)
		if n := c.len(); n > 64 {
			t.Fatalf("cache holds %d chains, bound 64", n)
		}
	}
	if len(c.cas) != 1 {
		t.Fatalf("the issuing CA is held %d times, want once", len(c.cas))
	}
}
