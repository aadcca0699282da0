package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/sigil-appliance/sigil/keystore"
)

// TestJWTKeySign: tokens validate with go-spiffe's JWT-SVID parser, carry
// exactly alg, kid and typ in their header, and hold aud as an array; iss
// only when an issuer is configured.
func TestJWTKeySign(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for _, tc := range []struct {
		newKey func() (crypto.Signer, error)
		alg    string
		issuer string
	}{
		{func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P256(), rand.Reader) }, "ES256", ""},
		{func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P384(), rand.Reader) }, "ES384", ""},
		{func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, 2048) }, "RS256", "https://sigil.example.org"},
	} {
		t.Run(tc.alg, func(t *testing.T) {
			key, err := tc.newKey()
			if err != nil {
				t.Fatal(err)
			}
			k, err := newJWTKey("node-1-abc", key, time.Now().Add(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			now := time.Now().Truncate(time.Second)
			tok, err := k.Sign(JWTClaims{Issuer: tc.issuer, Subject: "spiffe://example.org/web", Audience: []string{"db"},
				IssuedAt: now, Expiry: now.Add(5 * time.Minute), ID: "j1"})
			if err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(tok, ".")
			if len(parts) != 3 {
				t.Fatalf("token has %d parts, want 3 (JWS compact)", len(parts))
			}
			hdr, _ := base64.RawURLEncoding.DecodeString(parts[0])
			if want := `{"alg":"` + tc.alg + `","kid":"node-1-abc","typ":"JWT"}`; string(hdr) != want {
				t.Errorf("header %s, want %s", hdr, want)
			}
			claims, _ := base64.RawURLEncoding.DecodeString(parts[1])
			if !strings.Contains(string(claims), `"aud":["db"]`) {
				t.Errorf("claims %s: want aud as an array", claims)
			}
			if hasIss := strings.Contains(string(claims), `"iss":`); hasIss != (tc.issuer != "") ||
				tc.issuer != "" && !strings.Contains(string(claims), `"iss":"`+tc.issuer+`"`) {
				t.Errorf("claims %s: want iss %q", claims, tc.issuer)
			}
			b := jwtbundle.New(td)
			if err := b.AddJWTAuthority("node-1-abc", key.Public()); err != nil {
				t.Fatal(err)
			}
			svid, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"})
			if err != nil {
				t.Fatal(err)
			}
			if svid.ID.String() != "spiffe://example.org/web" || !svid.Expiry.Equal(now.Add(5*time.Minute)) {
				t.Errorf("parsed %s expiring %v", svid.ID, svid.Expiry)
			}
			other, _ := tc.newKey()
			b.SetJWTAuthorities(map[string]crypto.PublicKey{"node-1-abc": other.Public()})
			if _, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"}); err == nil {
				t.Error("token validated with another key")
			}
		})
	}
}

// TestJWTKeyRefusesOtherKeys: only ECDSA P-256 and P-384 keys and RSA
// keys of 2048 to 4096 bits sign JWT-SVIDs.
func TestJWTKeyRefusesOtherKeys(t *testing.T) {
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p521, _ := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		key  crypto.Signer
		want string
	}{{small, "RSA key of 1024 bits: want 2048 to 4096"}, {p521, "curve P-521 is not P-256 or P-384"}, {ed, "ed25519.PublicKey is not ECDSA"}} {
		if _, err := newJWTKey("k", tc.key, time.Now().Add(time.Hour)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%T: %v, want a refusal saying %q", tc.key.Public(), err, tc.want)
		}
	}
}

// memKeys is a key store in memory.
type memKeys struct {
	mu      sync.Mutex
	keys    map[string]*ecdsa.PrivateKey
	created int
}

func (m *memKeys) CreateKey(_ context.Context, req keystore.CreateKeyRequest) (crypto.PublicKey, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.keys[req.URI] = k
	m.created++
	return k.Public(), nil
}

func (m *memKeys) Signer(_ context.Context, uri string) (crypto.Signer, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[uri]
	if !ok {
		return nil, errors.New("no key " + uri)
	}
	return k, nil
}

// memBundle is the replicated bundle in memory; published says when
// Publish returns, and applied when Published shows the key (later, as on
// a follower that applies a commit after the leader answered, until Sync).
type memBundle struct {
	mu        sync.Mutex
	published []PublishedJWTKey
	applied   int
}

func (b *memBundle) Published() []PublishedJWTKey {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]PublishedJWTKey(nil), b.published[:b.applied]...)
}

func (b *memBundle) Publish(_ context.Context, k PublishedJWTKey) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.published = append(b.published, k)
	return nil
}

func (b *memBundle) Withdraw(context.Context, string) error { return errors.New("not here") }

func (b *memBundle) sync(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.applied = len(b.published)
	return nil
}

func testAuthority(t *testing.T, nodeID string) *Authority {
	t.Helper()
	td, root, issuing, key := testCA(nodeID)
	a, err := New(td, nodeID, key, issuing, []*x509.Certificate{root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// testCA makes a root and nodeID's issuing CA under it, in memory, valid
// for the hour around now.
func testCA(nodeID string) (td spiffeid.TrustDomain, root, issuing *x509.Certificate, key *ecdsa.PrivateKey) {
	td = spiffeid.RequireTrustDomainFromString("example.org")
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	rootDER, _ := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	root, _ = x509.ParseCertificate(rootDER)
	key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	issTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: nodeID}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageCertSign}
	issDER, _ := x509.CreateCertificate(rand.Reader, issTmpl, root, &key.PublicKey, rootKey)
	issuing, _ = x509.ParseCertificate(issDER)
	return td, root, issuing, key
}

// TestRotateOnDemandBound: concurrent requests make exactly the keys that
// fit under the bound, counting this node's keys only and counting them
// after Sync (a key another request published is counted even before
// Published shows it unsynced); each kid is recorded before its key is
// made, and a failed record makes nothing; past the bound, nothing is
// made or recorded and the refusal wraps ErrTooManyJWTKeys.
func TestRotateOnDemandBound(t *testing.T) {
	ks := &memKeys{keys: map[string]*ecdsa.PrivateKey{}}
	bundle := &memBundle{}
	// Another node's keys do not count against this node's bound.
	for i := range 5 {
		bundle.published = append(bundle.published, PublishedJWTKey{KID: "node-2-" + string(rune('a'+i)), Node: "node-2", NotAfter: time.Now().Add(time.Hour)})
	}
	bundle.applied = len(bundle.published)
	j := testAuthority(t, "node-1").JWTKeys(JWTConfig{Keys: ks, Publisher: bundle, KeyURI: func(kid string) (string, error) { return "mem:" + kid, nil },
		Rotate: time.Hour, MaxTokenLife: 24 * time.Hour, Ready: func() bool { return true }})
	ctx := context.Background()
	const max = 4
	var mu sync.Mutex
	var recorded []string
	o := OnDemand{MaxKeys: max, Sync: bundle.sync, Record: func(_ context.Context, kid string) error {
		mu.Lock()
		defer mu.Unlock()
		if _, err := ks.Signer(ctx, "mem:"+kid); err == nil {
			t.Errorf("key %s made before it was recorded", kid)
		}
		recorded = append(recorded, kid)
		return nil
	}}

	// A record that fails: nothing made.
	failing := o
	failing.Record = func(context.Context, string) error { return errors.New("no quorum") }
	if _, err := j.RotateOnDemand(ctx, failing); err == nil || !strings.Contains(err.Error(), "no quorum") {
		t.Fatalf("rotation whose record failed: %v", err)
	}
	if ks.created != 0 || len(bundle.Published()) != 5 {
		t.Fatalf("a rotation whose record failed made %d keys", ks.created)
	}

	var wg sync.WaitGroup
	var made, refused []string
	for range max + 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kid, err := j.RotateOnDemand(ctx, o)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				made = append(made, kid)
			case errors.Is(err, ErrTooManyJWTKeys):
				refused = append(refused, err.Error())
			default:
				t.Errorf("rotation: %v", err)
			}
		}()
	}
	wg.Wait()
	if len(made) != max || len(refused) != 5 || ks.created != max || len(recorded) != max {
		t.Fatalf("%d concurrent requests, bound %d: %d made, %d refused, %d keys created, %d recorded", max+5, max, len(made), len(refused), ks.created, len(recorded))
	}
	if !strings.Contains(refused[0], "node node-1 has 4 in the trust bundle") {
		t.Fatalf("refusal: %s", refused[0])
	}
	cur, err := j.Current(ctx)
	if err != nil || cur.KID() != bundle.published[len(bundle.published)-1].KID {
		t.Fatalf("signing with %v (%v), want the last key made", cur, err)
	}
	for _, k := range bundle.published[5:] {
		if k.Node != "node-1" || !strings.HasPrefix(k.KID, "node-1-") {
			t.Fatalf("published %+v", k)
		}
	}
}
