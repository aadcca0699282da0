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
	c.put(k, 0, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, 0, now.Add(9*time.Minute)); !ok {
		t.Fatal("a chain valid now was not cached")
	}
	if _, ok := c.get(k, 0, now.Add(11*time.Minute)); ok {
		t.Fatal("a cached chain was used after its issuing CA expired")
	}
	if _, ok := c.get(k, 0, now.Add(9*time.Minute)); ok {
		t.Fatal("an expired entry stayed in the cache")
	}
	c.put(k, 0, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, 0, now.Add(-2*time.Minute)); ok {
		t.Fatal("a cached chain was used before its leaf's NotBefore")
	}
	if k2 := chainKey([][]byte{[]byte("lea"), []byte("fca")}); k2 == k {
		t.Fatal("chains that concatenate alike share a key")
	}
	for i := 0; i < 1000; i++ {
		l := &x509.Certificate{Raw: []byte{byte(i), byte(i >> 8)}, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}
		c.put(chainKey([][]byte{l.Raw, ca.Raw}), 0, id, [][]*x509.Certificate{{l, ca}}, now)
		if n := c.len(); n > 64 {
			t.Fatalf("cache holds %d chains, bound 64", n)
		}
	}
	if len(c.cas) != 1 {
		t.Fatalf("the issuing CA is held %d times, want once", len(c.cas))
	}
}

// The cache holds verifications against one set of roots: a reset (a
// SetRoots) empties it, a verification made against the old set and
// stored after the reset is dropped, and a lookup for the old set finds
// nothing, not even what was verified against the new one.
func TestVerifiedChainsGeneration(t *testing.T) {
	now := time.Now()
	id := spiffeid.RequireFromString("spiffe://example.org/sigil/agent/x")
	leaf := &x509.Certificate{Raw: []byte("leaf"), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour)}
	ca := &x509.Certificate{Raw: []byte("ca"), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}
	k := chainKey([][]byte{leaf.Raw, ca.Raw})
	c := &verifiedChains{}
	c.put(k, 0, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, 0, now); !ok {
		t.Fatal("not cached")
	}
	c.reset(1)
	if _, ok := c.get(k, 1, now); ok || c.len() != 0 || len(c.cas) != 0 {
		t.Fatal("a verification against the old roots survived the reset")
	}
	// Started before the swap, finished after it.
	c.put(k, 0, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, 1, now); ok || c.len() != 0 {
		t.Fatal("a verification against the old roots was stored after the reset")
	}
	c.put(k, 1, id, [][]*x509.Certificate{{leaf, ca}}, now)
	if _, ok := c.get(k, 0, now); ok {
		t.Fatal("a lookup for the old roots used a verification against the new")
	}
	if _, ok := c.get(k, 1, now); !ok {
		t.Fatal("a verification against the current roots was not cached")
	}
}
