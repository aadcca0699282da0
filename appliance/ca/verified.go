package ca

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// verifiedChains remembers presented chains that verified against this
// authority's roots, so that a caller making many calls on one connection
// (an agent asking for SVIDs, an admin) pays the chain verification once
// per certificate rather than once per call: in profiles of the issuance
// benchmarks, re-verifying the caller's chain (a P-384 root signature and a
// P-256 one) on every call was 28% of all CPU.
//
// What a cached answer depends on does not change while it is kept: it
// holds verifications against one set of roots only (gen: SetRoots
// empties it and moves it to the new set's gen, and an answer of any other
// gen is neither stored nor returned, so a verification that started
// before a swap and ends after it is not kept), and the answer is used
// only between the latest NotBefore and the earliest NotAfter of the
// chains it verified. Revocation can change at any moment, so Classify
// checks the cached chains against the CRLs on every call. Refusals are
// not cached: the TLS handshake already refuses chains that do not
// verify, so a refused chain reaching Classify is rare and may as well pay
// again.
//
// One gen for the whole cache, not one per entry: a swap then frees the
// entries (and the CA copies) of the old roots at once, rather than
// leaving them to fill the bound until they expire, and the check is the
// same one comparison under the lock a lookup takes anyway.
type verifiedChains struct {
	mu  sync.Mutex
	gen uint64
	m   map[[32]byte]verifiedChain
	max int
	// cas holds one parsed copy of each CA certificate met in a verified
	// chain (node issuing CAs; roots are the bundle's own), so that
	// entries share them. Only certificates that chained to a root of gen
	// get here, so it holds what those roots signed: a few per node.
	cas map[string]*x509.Certificate
}

type verifiedChain struct {
	id                  spiffeid.ID
	chains              [][]*x509.Certificate
	notBefore, notAfter time.Time
}

// maxVerifiedChains bounds the cache: about 3 KiB an entry (the parsed
// leaf; issuing CAs and roots are shared), so at most about 100 MiB, and
// room for the certificates of 32,768 agents and admins live at once.
// Past it, expired entries go first, then arbitrary ones: a full cache
// costs verifications, never correctness.
const maxVerifiedChains = 1 << 15

// maxSharedCAs bounds verifiedChains.cas: past it (hundreds of issuing CAs
// in one trust domain), CA certificates are kept per entry again.
const maxSharedCAs = 256

func chainKey(raw [][]byte) [32]byte {
	h := sha256.New()
	var n [4]byte
	for _, r := range raw {
		binary.BigEndian.PutUint32(n[:], uint32(len(r)))
		h.Write(n[:])
		h.Write(r)
	}
	var k [32]byte
	h.Sum(k[:0])
	return k
}

// reset empties the cache for the roots of gen. Calls come with a growing
// gen (SetRoots is serialized).
func (c *verifiedChains) reset(gen uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen, c.m, c.cas = gen, nil, nil
}

// get returns the verified chains of raw if they are cached, were verified
// against the roots of gen, and are valid now.
func (c *verifiedChains) get(key [32]byte, gen uint64, now time.Time) (verifiedChain, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return verifiedChain{}, false
	}
	v, ok := c.m[key]
	if !ok {
		return verifiedChain{}, false
	}
	if now.Before(v.notBefore) || !now.Before(v.notAfter) {
		delete(c.m, key)
		return verifiedChain{}, false
	}
	return v, true
}

// put remembers chains that verified now against the roots of gen, valid
// while every certificate in them is, unless the roots have changed since.
func (c *verifiedChains) put(key [32]byte, gen uint64, id spiffeid.ID, chains [][]*x509.Certificate, now time.Time) {
	v := verifiedChain{id: id, chains: chains}
	for _, ch := range chains {
		for _, cert := range ch {
			if v.notBefore.IsZero() || cert.NotBefore.After(v.notBefore) {
				v.notBefore = cert.NotBefore
			}
			if v.notAfter.IsZero() || cert.NotAfter.Before(v.notAfter) {
				v.notAfter = cert.NotAfter
			}
		}
	}
	if len(chains) == 0 || !now.Before(v.notAfter) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if gen != c.gen {
		return
	}
	if c.cas == nil {
		c.cas = map[string]*x509.Certificate{}
	}
	for _, ch := range chains {
		for i := 1; i < len(ch); i++ {
			if shared, ok := c.cas[string(ch[i].Raw)]; ok {
				ch[i] = shared
			} else if len(c.cas) < maxSharedCAs {
				c.cas[string(ch[i].Raw)] = ch[i]
			}
		}
	}
	limit := c.max
	if limit == 0 {
		limit = maxVerifiedChains
	}
	if c.m == nil {
		c.m = map[[32]byte]verifiedChain{}
	}
	if len(c.m) >= limit {
		for k, e := range c.m {
			if !now.Before(e.notAfter) {
				delete(c.m, k)
			}
		}
		// Still full: drop an eighth, in map order (arbitrary).
		for k := range c.m {
			if len(c.m) < limit-limit/8 {
				break
			}
			delete(c.m, k)
		}
	}
	c.m[key] = v
}

// len is the number of cached chains (tests).
func (c *verifiedChains) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m)
}
