package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"io"
	"math/big"
	"net"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The leaf encoder writes, byte for byte, the TBSCertificate that
// x509.CreateCertificate writes for the same template, for every shape
// this authority issues (workload, workload with DNS names and/or IP
// addresses, agent with a
// subject, RSA and Ed25519 workload keys) under P-256 and P-384 issuing
// keys and with dates on both sides of 2050; and what it signs verifies
// under the issuing certificate. Issuing keys are software keys here: the
// test is of the encoding (the HSM path is the cluster tests').
func TestLeafMatchesCreateCertificate(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	edPub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, curve := range []elliptic.Curve{elliptic.P256(), elliptic.P384()} {
		caKey, _ := ecdsa.GenerateKey(curve, rand.Reader)
		caTmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "node-1", Organization: []string{"Sigil"}},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(100 * 365 * 24 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
		caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		issuer, _ := x509.ParseCertificate(caDER)
		for _, c := range []struct {
			name    string
			pub     crypto.PublicKey
			ku      x509.KeyUsage
			subject pkix.Name
			dns     []string
			after   time.Time
			ips     []net.IP
		}{
			{"workload", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Now().Add(time.Hour), nil},
			{"dns-names", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, []string{"web.example.org", "*.web.example.org"}, time.Now().Add(time.Hour), nil},
			{"agent", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{CommonName: "sigil-agent"}, nil, time.Now().Add(time.Hour), nil},
			{"rsa-key", &rsaKey.PublicKey, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, pkix.Name{}, nil, time.Now().Add(time.Hour), nil},
			{"ed25519-key", edPub, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Now().Add(time.Hour), nil},
			{"after-2050", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Date(2051, 3, 4, 5, 6, 7, 0, time.UTC), nil},
			{"issuer-subject", &p256.PublicKey, x509.KeyUsageDigitalSignature, caTmpl.Subject, nil, time.Now().Add(time.Hour), nil},
			// net.ParseIP gives IPv4 in 16 bytes: it must be written in 4.
			{"ip-addresses", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Now().Add(time.Hour),
				[]net.IP{net.ParseIP("10.0.0.5"), net.ParseIP("fd00::1"), net.IPv4(192, 0, 2, 1).To4()}},
			{"dns-and-ip", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, []string{"web.example.org"}, time.Now().Add(time.Hour),
				[]net.IP{net.ParseIP("2001:db8::7")}},
		} {
			t.Run(curve.Params().Name+"/"+c.name, func(t *testing.T) {
				uri, _ := url.Parse("spiffe://example.org/ns/web")
				serial, _ := new(big.Int).SetString("5a3c0ffee15900d1ce5a3c0ffee15900", 16)
				before := time.Now().Add(-30 * time.Second).Truncate(time.Second)
				want, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
					SerialNumber: serial, Subject: c.subject, NotBefore: before, NotAfter: c.after, KeyUsage: c.ku,
					ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
					BasicConstraintsValid: true, URIs: []*url.URL{uri}, DNSNames: c.dns, IPAddresses: c.ips,
				}, issuer, c.pub, caKey)
				if err != nil {
					t.Fatal(err)
				}
				wantCert, _ := x509.ParseCertificate(want)
				subject, _ := asn1.Marshal(c.subject.ToRDNSequence())
				tmpl := &leafTemplate{serial: serial, notBefore: before, notAfter: c.after, subject: subject,
					publicKey: c.pub, keyUsage: c.ku, uris: []*url.URL{uri}, dnsNames: c.dns, ipAddresses: c.ips}
				alg, _, err := ecdsaAlgorithm(&caKey.PublicKey)
				if err != nil {
					t.Fatal(err)
				}
				got, err := leafTBS(tmpl, issuer, alg)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, wantCert.RawTBSCertificate) {
					t.Fatalf("TBS differs from x509.CreateCertificate's:\n got %x\nwant %x", got, wantCert.RawTBSCertificate)
				}
				der, err := signLeaf(tmpl, issuer, caKey, true)
				if err != nil {
					t.Fatal(err)
				}
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					t.Fatal(err)
				}
				if err := cert.CheckSignatureFrom(issuer); err != nil {
					t.Fatalf("signed leaf does not verify under its issuer: %v", err)
				}
				if cert.SignatureAlgorithm != wantCert.SignatureAlgorithm {
					t.Fatalf("signature algorithm %v, x509 uses %v", cert.SignatureAlgorithm, wantCert.SignatureAlgorithm)
				}
			})
		}
	}
}

// A key usage outside a leaf's bits is refused, not encoded.
func TestLeafKeyUsageBounds(t *testing.T) {
	for _, ku := range []x509.KeyUsage{0, -1, 1 << 9} {
		if _, err := keyUsageBits(ku); err == nil {
			t.Errorf("key usage %d was encoded", ku)
		}
	}
}

// A DNS name x509 would refuse (not ASCII) is refused before anything is
// signed.
func TestLeafRefusesNonASCIIDNSName(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	issuer := &x509.Certificate{RawSubject: []byte{0x30, 0}}
	subject, _ := asn1.Marshal(pkix.Name{}.ToRDNSequence())
	_, err := leafTBS(&leafTemplate{serial: big.NewInt(1), notBefore: time.Now(), notAfter: time.Now().Add(time.Hour), subject: subject,
		publicKey: &key.PublicKey, keyUsage: x509.KeyUsageDigitalSignature, dnsNames: []string{"b\u00fc.example"}}, issuer, oidECDSAWithSHA256)
	if err == nil {
		t.Fatal("a non-ASCII DNS name was encoded")
	}
}

// swappedSigner reports the issuing key but, once told to, signs with
// another: an HSM whose key handle changed under a running node.
type swappedSigner struct {
	right, wrong *ecdsa.PrivateKey
	swapped      atomic.Bool
}

func (s *swappedSigner) Public() crypto.PublicKey { return &s.right.PublicKey }
func (s *swappedSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	if s.swapped.Load() {
		return s.wrong.Sign(r, d, o)
	}
	return s.right.Sign(r, d, o)
}

// Signatures that stop verifying are caught by the sampled check within
// verifyEvery leaves, never sent, and from then on every leaf is checked;
// a key that does not match the issuing certificate is refused by New.
func TestLeafSignaturesSampledAndCheckedAfterAFault(t *testing.T) {
	td, root, issuing, key := testCA("node-1")
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)

	swapped := &swappedSigner{right: key, wrong: other}
	swapped.swapped.Store(true)
	if _, err := New(td, "node-1", swapped, issuing, []*x509.Certificate{root}, nil); err == nil {
		t.Fatal("New accepted a signer whose signatures do not match the issuing certificate")
	}

	s := &swappedSigner{right: key, wrong: other}
	a, err := New(td, "node-1", s, issuing, []*x509.Certificate{root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	leaf := Leaf{ID: spiffeid.RequireFromString("spiffe://example.org/web"), PublicKey: &other.PublicKey, TTL: time.Minute}
	for i := 0; i < 3; i++ {
		if _, err := a.Sign(leaf); err != nil {
			t.Fatal(err)
		}
	}
	s.swapped.Store(true)
	caught := -1
	for i := 0; i < verifyEvery; i++ {
		chain, err := a.Sign(leaf)
		if err == nil {
			if chain[0].CheckSignatureFrom(issuing) == nil {
				t.Fatalf("leaf %d after the swap verifies", i)
			}
			continue
		}
		if !errors.Is(err, errBadSignature) {
			t.Fatalf("leaf %d: %v", i, err)
		}
		caught = i
		break
	}
	if caught < 0 {
		t.Fatalf("no wrong signature caught within %d leaves", verifyEvery)
	}
	for i := 0; i < 3; i++ {
		if _, err := a.Sign(leaf); !errors.Is(err, errBadSignature) {
			t.Fatalf("after a wrong signature was caught, leaf %d: %v (every signature must be checked)", i, err)
		}
	}
}
