package cache

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// twoRootsPKI is a trust domain in a root rotation: two roots with the
// same subject (a re-keyed root keeps its name), each with a node CA.
type twoRootsPKI struct {
	roots  [2]*x509.Certificate
	keys   [2]*ecdsa.PrivateKey
	cas    [2]*x509.Certificate // cas[i] is signed by roots[i]
	spiffe []byte
}

func newTwoRootsPKI(t *testing.T) *twoRootsPKI {
	t.Helper()
	p := &twoRootsPKI{}
	u, _ := url.Parse("spiffe://example.org")
	now := time.Now()
	sb := spiffebundle.New(spiffeid.RequireTrustDomainFromString("example.org"))
	for i := range 2 {
		p.keys[i], _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(1 + i)), Subject: pkix.Name{CommonName: "Example Root"},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{byte(10 + i)}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.keys[i].PublicKey, p.keys[i])
		if err != nil {
			t.Fatal(err)
		}
		p.roots[i], _ = x509.ParseCertificate(der)
		sb.AddX509Authority(p.roots[i])
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		d, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(int64(100 + i)), Subject: pkix.Name{CommonName: "node-" + string(rune('a'+i))},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{byte(20 + i)}}, p.roots[i], &k.PublicKey, p.keys[i])
		if err != nil {
			t.Fatal(err)
		}
		p.cas[i], _ = x509.ParseCertificate(d)
	}
	p.spiffe, _ = sb.Marshal()
	return p
}

// crl is root i's CRL number n revoking the given node CAs.
func (p *twoRootsPKI) crl(t *testing.T, i int, n int64, revoke ...*x509.Certificate) []byte {
	t.Helper()
	tmpl := &x509.RevocationList{Number: big.NewInt(n), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(time.Hour)}
	for _, c := range revoke {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, p.roots[i], p.keys[i])
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func (p *twoRootsPKI) update(rev uint64, crls ...[]byte) *api.SyncUpdate {
	return &api.SyncUpdate{Revision: rev, SPIFFE: p.spiffe, Entries: []api.Entry{{ID: "e1", SPIFFEID: "spiffe://example.org/a",
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}}, Bundle: api.Bundle{TrustDomain: "example.org", RootCRLs: crls}}
}

// Two roots of the bundle share a subject (a re-keyed root). Each keeps
// its own CRL, whatever order they arrive in, in one update or in two:
// root A's CRL (number 2) revokes A's node CA, root B's (number 3, a
// higher number of another root) revokes nothing. Keyed by the issuer's
// name, A then B was refused as "undoing" A's revocation, and B then A
// silently dropped it.
func TestRootCRLsTwoRootsSameSubject(t *testing.T) {
	p := newTwoRootsPKI(t)
	crlA, crlB := p.crl(t, 0, 2, p.cas[0]), p.crl(t, 1, 3)
	for name, updates := range map[string][][][]byte{
		"A,B in one update":  {{crlA, crlB}},
		"B,A in one update":  {{crlB, crlA}},
		"A then B":           {{crlA}, {crlB}},
		"B then A":           {{crlB}, {crlA}},
		"B then A then both": {{crlB}, {crlA}, {crlA, crlB}},
	} {
		t.Run(name, func(t *testing.T) {
			for _, roots := range [][]*x509.Certificate{{p.roots[0], p.roots[1]}, {p.roots[1], p.roots[0]}} {
				c := New(nil, Options{Roots: roots})
				for i, crls := range updates {
					if err := c.apply(p.update(uint64(i+1), crls...)); err != nil {
						t.Fatalf("update %d refused: %v", i+1, err)
					}
				}
				if s, _ := c.Current(); s.Revision != uint64(len(updates)) {
					t.Fatalf("revision %d applied, want %d", s.Revision, len(updates))
				}
				if !c.Revoked([]*x509.Certificate{p.cas[0]}) {
					t.Fatal("root A's revocation of its node CA was lost")
				}
				if got := len(c.RootCRLs()); got != 2 {
					t.Fatalf("%d root CRLs kept, want 2 (one per root)", got)
				}
			}
		})
	}
}
