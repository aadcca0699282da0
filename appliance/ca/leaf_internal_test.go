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
	"math/big"
	"net/url"
	"testing"
	"time"
)

// The leaf encoder writes, byte for byte, the TBSCertificate that
// x509.CreateCertificate writes for the same template, for every shape
// this authority issues (workload, workload with DNS names, agent with a
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
		}{
			{"workload", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Now().Add(time.Hour)},
			{"dns-names", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, []string{"web.example.org", "*.web.example.org"}, time.Now().Add(time.Hour)},
			{"agent", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{CommonName: "sigil-agent"}, nil, time.Now().Add(time.Hour)},
			{"rsa-key", &rsaKey.PublicKey, x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, pkix.Name{}, nil, time.Now().Add(time.Hour)},
			{"ed25519-key", edPub, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Now().Add(time.Hour)},
			{"after-2050", &p256.PublicKey, x509.KeyUsageDigitalSignature, pkix.Name{}, nil, time.Date(2051, 3, 4, 5, 6, 7, 0, time.UTC)},
		} {
			t.Run(curve.Params().Name+"/"+c.name, func(t *testing.T) {
				uri, _ := url.Parse("spiffe://example.org/ns/web")
				serial, _ := new(big.Int).SetString("5a3c0ffee15900d1ce5a3c0ffee15900", 16)
				before := time.Now().Add(-30 * time.Second).Truncate(time.Second)
				want, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
					SerialNumber: serial, Subject: c.subject, NotBefore: before, NotAfter: c.after, KeyUsage: c.ku,
					ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
					BasicConstraintsValid: true, URIs: []*url.URL{uri}, DNSNames: c.dns,
				}, issuer, c.pub, caKey)
				if err != nil {
					t.Fatal(err)
				}
				wantCert, _ := x509.ParseCertificate(want)
				subject, _ := asn1.Marshal(c.subject.ToRDNSequence())
				tmpl := &leafTemplate{serial: serial, notBefore: before, notAfter: c.after, subject: subject,
					publicKey: c.pub, keyUsage: c.ku, uris: []*url.URL{uri}, dnsNames: c.dns}
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
				der, err := signLeaf(tmpl, issuer, caKey)
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
