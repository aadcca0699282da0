package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// rotationPKI makes roots and issuing certificates of trust domain
// example.org with software keys: these tests are of which roots a chain
// is verified against, which the HSM does not change (the cluster tests
// run the ceremony's own certificates).
type rotationPKI struct {
	t      *testing.T
	td     spiffeid.TrustDomain
	serial atomic.Int64
}

func newRotationPKI(t *testing.T) *rotationPKI {
	return &rotationPKI{t: t, td: spiffeid.RequireTrustDomainFromString("example.org")}
}

func (p *rotationPKI) key() *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	return k
}

// root is a self-signed root naming td, as the ceremony makes them, valid
// from an hour ago for life.
func (p *rotationPKI) root(name, td string, life time.Duration) (*x509.Certificate, *ecdsa.PrivateKey) {
	k := p.key()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(p.serial.Add(1)), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(life), KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{{Scheme: "spiffe", Host: td}}}
	return p.create(tmpl, tmpl, &k.PublicKey, k), k
}

// issuing is a node issuing CA certificate for node under root.
func (p *rotationPKI) issuing(root *x509.Certificate, rootKey *ecdsa.PrivateKey, node string, pub *ecdsa.PublicKey, life time.Duration) *x509.Certificate {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(p.serial.Add(1)), Subject: pkix.Name{CommonName: node}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(life), KeyUsage: x509.KeyUsageCertSign,
		URIs: []*url.URL{p.td.ID().URL()}, PermittedURIDomains: []string{p.td.Name()}}
	return p.create(tmpl, root, pub, rootKey)
}

func (p *rotationPKI) create(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) *x509.Certificate {
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		p.t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		p.t.Fatal(err)
	}
	return c
}

// authority is node's authority with its issuing certificate under root.
func (p *rotationPKI) authority(node string, key *ecdsa.PrivateKey, issuing *x509.Certificate, roots ...*x509.Certificate) *Authority {
	a, err := New(p.td, node, key, issuing, roots, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	return a
}

// agentChain is an agent SVID chain (leaf, issuing) signed by a.
func (p *rotationPKI) agentChain(a *Authority, name string) []*x509.Certificate {
	k := p.key()
	chain, err := a.SignAgent(Leaf{ID: spiffeid.RequireFromPath(p.td, "/sigil/agent/"+name), PublicKey: &k.PublicKey, TTL: time.Hour})
	if err != nil {
		p.t.Fatal(err)
	}
	return chain
}

func rawChain(chain []*x509.Certificate) [][]byte {
	raw := make([][]byte, len(chain))
	for i, c := range chain {
		raw[i] = c.Raw
	}
	return raw
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// Classify runs in many goroutines while the roots swap between {A, B}
// and {A}: a chain under A always verifies, and a chain under B never
// verifies in a call that ran wholly while B was out of the set, cached
// or not (the swaps make the cache drop and refill it again and again).
// Run with -race.
func TestSetRootsConcurrentClassify(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	k1, k2 := p.key(), p.key()
	a1 := p.authority("node-1", k1, p.issuing(rootA, keyA, "node-1", &k1.PublicKey, 24*time.Hour), rootA, rootB)
	a2 := p.authority("node-2", k2, p.issuing(rootB, keyB, "node-2", &k2.PublicKey, 24*time.Hour), rootA, rootB)
	underA, underB := p.agentChain(a1, "a"), p.agentChain(a2, "b")

	// seq is odd while a SetRoots runs; withB is what the set holds
	// while it is even.
	var seq atomic.Uint64
	var withB atomic.Bool
	withB.Store(true)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var failures atomic.Int64
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s1, had := seq.Load(), withB.Load()
				classify := a1.Classify
				if (g+i)%2 == 0 {
					// The parsed path, as TLS handshakes take it.
					classify = func([][]byte) (Peer, error) { return a1.ClassifyCerts(underB) }
				}
				_, errB := classify(rawChain(underB))
				s2 := seq.Load()
				if s1 == s2 && s1%2 == 0 && !had && errB == nil {
					failures.Add(1)
				}
				if _, err := a1.ClassifyCerts(underA); err != nil {
					t.Errorf("a chain under root A, always in the set: %v", err)
					return
				}
				if n := len(a1.Bundle().X509Authorities()); n != 1 && n != 2 {
					t.Errorf("bundle of %d roots", n)
					return
				}
				_ = a1.Roots()
			}
		}()
	}
	for i := range 200 {
		with := i%2 == 0 // the last swap, i = 199, leaves {A}
		set := []*x509.Certificate{rootA}
		if with {
			set = append(set, rootB)
		}
		seq.Add(1)
		if err := a1.SetRoots(set); err != nil {
			t.Fatal(err)
		}
		withB.Store(with)
		seq.Add(1)
		time.Sleep(200 * time.Microsecond)
	}
	close(stop)
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d classifications accepted a chain under root B while the set was {A}", n)
	}
	if _, err := a1.Classify(rawChain(underB)); err == nil {
		t.Fatal("a chain under root B verified after the last SetRoots({A})")
	}
	if got := a1.roots.Load().gen; got != 200 {
		t.Fatalf("gen %d after 200 swaps", got)
	}
}

// A chain under a root that SetRoots removes is refused at once, though
// its verification was cached; put back, the root is trusted again; a
// chain under a root never in the set is refused throughout.
func TestSetRootsDropsCachedVerifications(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	k1, k2 := p.key(), p.key()
	a1 := p.authority("node-1", k1, p.issuing(rootA, keyA, "node-1", &k1.PublicKey, 24*time.Hour), rootA, rootB)
	a2 := p.authority("node-2", k2, p.issuing(rootB, keyB, "node-2", &k2.PublicKey, 24*time.Hour), rootA, rootB)
	underB := p.agentChain(a2, "b")

	for range 2 {
		if p, err := a1.Classify(rawChain(underB)); err != nil || p.Role != RoleAgent {
			t.Fatalf("a chain under root B while B is a root: %+v %v", p, err)
		}
	}
	if a1.verified.len() != 1 {
		t.Fatalf("%d cached verifications, want the one of the chain under B", a1.verified.len())
	}
	if err := a1.SetRoots([]*x509.Certificate{rootA}); err != nil {
		t.Fatal(err)
	}
	if _, err := a1.Classify(rawChain(underB)); err == nil {
		t.Fatal("a chain under a removed root verified from the cache")
	}
	if _, err := a1.ClassifyCerts(underB); err == nil {
		t.Fatal("a chain under a removed root verified (parsed path)")
	}
	if a1.verified.len() != 0 {
		t.Fatal("the cache kept a verification against the old roots")
	}
	if !sameCerts(a1.Roots(), []*x509.Certificate{rootA}) || len(a1.Bundle().X509Authorities()) != 1 {
		t.Fatal("Roots or Bundle still hold the removed root")
	}
	if err := a1.SetRoots([]*x509.Certificate{rootA, rootB}); err != nil {
		t.Fatal(err)
	}
	if _, err := a1.Classify(rawChain(underB)); err != nil {
		t.Fatalf("root B put back: %v", err)
	}

	// Roots returns a copy: changing it changes nothing.
	r := a1.Roots()
	r[0] = rootB
	if !a1.Roots()[0].Equal(rootA) {
		t.Fatal("Roots exposes the authority's own slice")
	}
}

// SetRoots refuses, and changes nothing for: an empty set, a root that is
// not a CA, one not self-signed, one expired, one not yet valid, one of
// another trust domain, and a set without the current issuing
// certificate's root (its error names that certificate's serial).
func TestSetRootsRefusals(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	k1 := p.key()
	iss := p.issuing(rootA, keyA, "node-1", &k1.PublicKey, 24*time.Hour)
	a := p.authority("node-1", k1, iss, rootA)

	notCAKey := p.key()
	notCATmpl := &x509.Certificate{SerialNumber: big.NewInt(900), Subject: pkix.Name{CommonName: "leaf"}, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	notCA := p.create(notCATmpl, notCATmpl, &notCAKey.PublicKey, notCAKey)
	// A CA certificate root B signed, with root A's subject: it claims to
	// be a root but is not self-signed.
	notSelfTmpl := &x509.Certificate{SerialNumber: big.NewInt(901), Subject: rootA.Subject, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	notSelf := p.create(notSelfTmpl, rootB, &keyA.PublicKey, keyB)
	expiredKey := p.key()
	expiredTmpl := &x509.Certificate{SerialNumber: big.NewInt(902), Subject: pkix.Name{CommonName: "old root"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-time.Hour), KeyUsage: x509.KeyUsageCertSign}
	expired := p.create(expiredTmpl, expiredTmpl, &expiredKey.PublicKey, expiredKey)
	futureTmpl := &x509.Certificate{SerialNumber: big.NewInt(903), Subject: pkix.Name{CommonName: "future root"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(time.Hour), NotAfter: time.Now().Add(48 * time.Hour), KeyUsage: x509.KeyUsageCertSign}
	future := p.create(futureTmpl, futureTmpl, &expiredKey.PublicKey, expiredKey)
	evil, _ := p.root("evil root", "evil.org", 48*time.Hour)

	for _, tc := range []struct {
		name  string
		roots []*x509.Certificate
		want  string
	}{
		{"empty", nil, "empty"},
		{"nil", []*x509.Certificate{rootA, nil}, "no certificate"},
		{"not a CA", []*x509.Certificate{rootA, notCA}, "not a CA"},
		{"not self-signed", []*x509.Certificate{rootA, notSelf}, "not self-signed"},
		{"expired", []*x509.Certificate{rootA, expired}, "not valid now"},
		{"not yet valid", []*x509.Certificate{rootA, future}, "not valid now"},
		{"another trust domain", []*x509.Certificate{rootA, evil}, "evil.org"},
		{"without the issuing certificate's root", []*x509.Certificate{rootB}, "serial " + iss.SerialNumber.Text(16)},
	} {
		err := a.SetRoots(tc.roots)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
		if !sameCerts(a.Roots(), []*x509.Certificate{rootA}) || a.roots.Load().gen != 0 {
			t.Fatalf("%s: the refusal changed the roots", tc.name)
		}
	}
	if err := a.SetRoots([]*x509.Certificate{rootB, rootA}); err != nil {
		t.Fatalf("a set holding the issuing certificate's root: %v", err)
	}
}

// Switch moves the authority to an issuing certificate under a second
// root (one that expires sooner than the current one, which Install would
// refuse): signings prepared before finish with the old certificate, later
// leaves chain to the second root only; the first root can then leave the
// set, and not before. Switching back needs the first root in the set
// again, and then leaves chain to it.
func TestSwitchToAnotherRootAndBack(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	key := p.key()
	first := p.issuing(rootA, keyA, "node-1", &key.PublicKey, 24*time.Hour)
	next := p.issuing(rootB, keyB, "node-1", &key.PublicKey, 12*time.Hour)
	a := p.authority("node-1", key, first, rootA)
	wkey := p.key()
	leaf := Leaf{ID: spiffeid.RequireFromPath(p.td, "/web"), PublicKey: &wkey.PublicKey, TTL: time.Hour}
	verifiesUnder := func(chain []*x509.Certificate, root *x509.Certificate) bool {
		roots, inter := x509.NewCertPool(), x509.NewCertPool()
		roots.AddCert(root)
		inter.AddCert(chain[1])
		_, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err == nil
	}

	if err := a.CheckNext(next); err == nil {
		t.Fatal("CheckNext accepted a certificate under a root not in the set")
	}
	if _, err := a.Switch(next); err == nil || !a.Issuing().Equal(first) {
		t.Fatalf("Switch to a certificate under a root not in the set: %v", err)
	}
	if err := a.SetRoots([]*x509.Certificate{rootA, rootB}); err != nil {
		t.Fatal(err)
	}
	if err := a.CheckNext(next); err != nil {
		t.Fatalf("CheckNext: %v", err)
	}
	if _, err := a.Install(next); err == nil {
		t.Fatal("Install accepted a certificate expiring before the current one")
	}
	if !a.ChainsTo(first, rootA) || a.ChainsTo(first, rootB) || !a.ChainsTo(next, rootB) || a.ChainsTo(next, rootA) {
		t.Fatal("ChainsTo names the wrong roots")
	}

	inFlight, err := a.Prepare(leaf)
	if err != nil {
		t.Fatal(err)
	}
	old, err := a.Switch(next)
	if err != nil || !old.Equal(first) || !a.Issuing().Equal(next) {
		t.Fatalf("switch: %v (replaced %v)", err, old)
	}
	chain, err := inFlight.Sign()
	if err != nil || !chain[1].Equal(first) || !verifiesUnder(chain, rootA) {
		t.Fatalf("a signing prepared before the switch: %v", err)
	}
	chain, err = a.Sign(leaf)
	if err != nil || !chain[1].Equal(next) || !verifiesUnder(chain, rootB) || verifiesUnder(chain, rootA) {
		t.Fatalf("a signing after the switch does not chain to root B alone: %v", err)
	}
	if !a.ChainsTo(a.Issuing(), rootB) {
		t.Fatal("ChainsTo: the node does not sign under root B")
	}

	// Under B now, the node may drop A (the rotation's retire) and may
	// not drop B.
	if err := a.SetRoots([]*x509.Certificate{rootA}); err == nil || !strings.Contains(err.Error(), next.SerialNumber.Text(16)) {
		t.Fatalf("a set without the root of the switched-to certificate: %v", err)
	}
	if err := a.SetRoots([]*x509.Certificate{rootB}); err != nil {
		t.Fatalf("retiring root A after the switch: %v", err)
	}
	// Back: refused while A is out of the set, done once it is in.
	if _, err := a.Switch(first); err == nil || !a.Issuing().Equal(next) {
		t.Fatalf("switch back to a certificate under a retired root: %v", err)
	}
	if err := a.SetRoots([]*x509.Certificate{rootA, rootB}); err != nil {
		t.Fatal(err)
	}
	if old, err := a.Switch(first); err != nil || !old.Equal(next) || !a.Issuing().Equal(first) {
		t.Fatalf("switch back: %v", err)
	}
	chain, err = a.Sign(leaf)
	if err != nil || !chain[1].Equal(first) || !verifiesUnder(chain, rootA) || verifiesUnder(chain, rootB) {
		t.Fatalf("a signing after switching back does not chain to root A alone: %v", err)
	}
}

// CheckNext, and so Switch, refuses an issuing certificate for another
// node, for another key, under a root not in the set, or revoked, and a
// refused Switch changes nothing.
func TestCheckNextRefusals(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	rootC, keyC := p.root("root C", "example.org", 48*time.Hour)
	key, other := p.key(), p.key()
	first := p.issuing(rootA, keyA, "node-1", &key.PublicKey, 24*time.Hour)
	a := p.authority("node-1", key, first, rootA, rootB)
	revoked := p.issuing(rootB, keyB, "node-1", &key.PublicKey, 24*time.Hour)
	a.SetRevocationCheck(func(c *x509.Certificate) bool { return c.Equal(revoked) }, nil)

	for _, tc := range []struct {
		name string
		c    *x509.Certificate
		want string
	}{
		{"another node", p.issuing(rootB, keyB, "node-2", &key.PublicKey, 24*time.Hour), "node-2"},
		{"another key", p.issuing(rootB, keyB, "node-1", &other.PublicKey, 24*time.Hour), "not the key"},
		{"a root not in the set", p.issuing(rootC, keyC, "node-1", &key.PublicKey, 24*time.Hour), "does not chain"},
		{"revoked", revoked, "revoked"},
	} {
		if err := a.CheckNext(tc.c); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CheckNext, %s: %v, want an error saying %q", tc.name, err, tc.want)
		}
		if _, err := a.Switch(tc.c); err == nil {
			t.Errorf("Switch, %s: switched", tc.name)
		}
		if !a.Issuing().Equal(first) {
			t.Fatalf("%s: the refusal changed the issuing certificate", tc.name)
		}
	}
	if err := a.CheckNext(revoked); !errors.Is(err, ErrRevoked) {
		t.Errorf("a revoked certificate: %v, want ErrRevoked", err)
	}
}

// A TLS listener made before SetRoots follows it: a peer whose chain is
// under a root the listener's authority did not trust is refused, then
// accepted on the same listener once SetRoots adds the root, then refused
// again once it is removed. The peer renews its certificate after its
// Switch and presents the new chain at the next handshake.
func TestTLSConfigFollowsRoots(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	k1, k2 := p.key(), p.key()
	a1 := p.authority("node-1", k1, p.issuing(rootA, keyA, "node-1", &k1.PublicKey, 24*time.Hour), rootA)
	a2 := p.authority("node-2", k2, p.issuing(rootA, keyA, "node-2", &k2.PublicKey, 24*time.Hour), rootA, rootB)
	n1, err := NewNodeIdentity(a1, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	n2, err := NewNodeIdentity(a2, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", n1.TLSConfig(RoleNode))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				if c.(*tls.Conn).Handshake() == nil {
					_, _ = c.Write([]byte("ok"))
				}
			}()
		}
	}()
	cfg := n2.TLSConfig(RoleNode)
	dial := func() error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", ln.Addr().String(), cfg)
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }()
		buf := make([]byte, 2)
		_, err = c.Read(buf)
		return err
	}
	if err := dial(); err != nil {
		t.Fatalf("both under root A: %v", err)
	}
	if _, err := a2.Switch(p.issuing(rootB, keyB, "node-2", &k2.PublicKey, 24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := n2.Renew(); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err == nil {
		t.Fatal("node-1, trusting root A only, accepted node-2 under root B")
	}
	if err := a1.SetRoots([]*x509.Certificate{rootA, rootB}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err != nil {
		t.Fatalf("the same listener after SetRoots added root B: %v", err)
	}
	if err := a1.SetRoots([]*x509.Certificate{rootA}); err != nil {
		t.Fatal(err)
	}
	if err := dial(); err == nil {
		t.Fatal("the same listener after SetRoots removed root B still accepted node-2")
	}
}

// Switch and SetRoots racing each other, with signings going on, never
// leave the issuing certificate outside the roots: each checks against
// what the other last stored, under one lock. The state is checked under
// that lock too, so a check sees what one of them left. Run with -race.
func TestSwitchAndSetRootsConcurrent(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, keyB := p.root("root B", "example.org", 48*time.Hour)
	key := p.key()
	underA := p.issuing(rootA, keyA, "node-1", &key.PublicKey, 24*time.Hour)
	underB := p.issuing(rootB, keyB, "node-1", &key.PublicKey, 24*time.Hour)
	a := p.authority("node-1", key, underA, rootA, rootB)
	sets := [][]*x509.Certificate{{rootA}, {rootB}, {rootA, rootB}}
	wkey := p.key()
	leaf := Leaf{ID: spiffeid.RequireFromPath(p.td, "/web"), PublicKey: &wkey.PublicKey, TTL: time.Hour}
	consistent := func() bool {
		a.swapMu.Lock()
		defer a.swapMu.Unlock()
		for _, r := range a.Roots() {
			if a.ChainsTo(a.Issuing(), r) {
				return true
			}
		}
		return false
	}
	var switches, swaps atomic.Int64
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 300 {
				switch g {
				case 0:
					if _, err := a.Switch([]*x509.Certificate{underA, underB}[i%2]); err == nil {
						switches.Add(1)
					}
				case 1:
					if a.SetRoots(sets[i%3]) == nil {
						swaps.Add(1)
					}
				case 2:
					if _, err := a.Sign(leaf); err != nil {
						t.Errorf("sign: %v", err)
						return
					}
				default:
					if !consistent() {
						t.Errorf("the issuing certificate chains to none of the roots")
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	if !consistent() {
		t.Fatalf("the issuing certificate (serial %x) chains to none of the roots", a.Issuing().SerialNumber)
	}
	if switches.Load() == 0 || swaps.Load() == 0 {
		t.Fatalf("%d switches and %d root swaps succeeded: the race was not run", switches.Load(), swaps.Load())
	}
}

// Once the issuing certificate has expired, SetRoots still takes a set
// holding its root (where its replacement may chain) and still refuses
// one without it: the check is of the root, not of today's validity.
func TestSetRootsWithExpiredIssuing(t *testing.T) {
	p := newRotationPKI(t)
	rootA, keyA := p.root("root A", "example.org", 48*time.Hour)
	rootB, _ := p.root("root B", "example.org", 48*time.Hour)
	key := p.key()
	iss := p.issuing(rootA, keyA, "node-1", &key.PublicKey, 24*time.Hour)
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	a, err := New(p.td, "node-1", key, iss, []*x509.Certificate{rootA}, func() time.Time { return time.Unix(0, clock.Load()) })
	if err != nil {
		t.Fatal(err)
	}
	clock.Store(time.Now().Add(30 * time.Hour).UnixNano())
	if err := a.SetRoots([]*x509.Certificate{rootA, rootB}); err != nil {
		t.Fatalf("a set holding the expired issuing certificate's root: %v", err)
	}
	if err := a.SetRoots([]*x509.Certificate{rootB}); err == nil || !strings.Contains(err.Error(), iss.SerialNumber.Text(16)) {
		t.Fatalf("a set without the expired issuing certificate's root: %v", err)
	}
}
