package ca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestInstallRenewal: a renewed certificate for the same key replaces the
// issuing CA; a signing prepared before the swap finishes with the old
// certificate, later ones use the new; a certificate that expires sooner,
// for another key or revoked is refused and changes nothing. Lifetimes
// cut at the issuing CA's expiry are logged once per certificate.
func TestInstallRenewal(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	rootKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rootTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(48 * time.Hour), KeyUsage: x509.KeyUsageCertSign}
	rootDER, _ := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, &rootKey.PublicKey, rootKey)
	root, _ := x509.ParseCertificate(rootDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial := int64(10)
	issuing := func(life time.Duration, pub *ecdsa.PublicKey) *x509.Certificate {
		serial++
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "node-1"}, IsCA: true, BasicConstraintsValid: true,
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(life), KeyUsage: x509.KeyUsageCertSign}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, root, pub, rootKey)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return c
	}
	first := issuing(time.Hour, &key.PublicKey)
	a, err := New(td, "node-1", key, first, []*x509.Certificate{root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	a.SetLogger(slog.New(slog.NewTextHandler(&logs, nil)))
	var revoked *x509.Certificate
	a.SetRevocationCheck(func(c *x509.Certificate) bool { return revoked != nil && c.Equal(revoked) }, nil)
	wkey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leaf := Leaf{ID: spiffeid.RequireFromPath(td, "/web"), PublicKey: &wkey.PublicKey, TTL: 2 * time.Hour}

	// Two cut leaves: one warning.
	for range 2 {
		if _, err := a.Sign(leaf); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(logs.String(), "SVID lifetimes are being cut"); n != 1 {
		t.Fatalf("%d cut warnings for one certificate:\n%s", n, logs.String())
	}

	inFlight, err := a.Prepare(leaf)
	if err != nil {
		t.Fatal(err)
	}
	revoked = issuing(3*time.Hour, &key.PublicKey)
	for name, c := range map[string]*x509.Certificate{
		"expires sooner": issuing(30*time.Minute, &key.PublicKey),
		"another key":    issuing(2*time.Hour, &other.PublicKey),
		"revoked":        revoked,
		"the same":       first,
	} {
		if _, err := a.Install(c); err == nil {
			t.Errorf("%s: installed", name)
		}
		if !a.Issuing().Equal(first) {
			t.Fatalf("%s: the refusal changed the issuing certificate", name)
		}
	}
	renewed := issuing(90*time.Minute, &key.PublicKey)
	old, err := a.Install(renewed)
	if err != nil || !old.Equal(first) || !a.Issuing().Equal(renewed) {
		t.Fatalf("install: %v (replaced %v)", err, old)
	}
	chain, err := inFlight.Sign()
	if err != nil || !chain[1].Equal(first) || chain[0].CheckSignatureFrom(first) != nil || !chain[0].NotAfter.Equal(first.NotAfter) {
		t.Fatalf("a signing prepared before the install: %v", err)
	}
	chain, err = a.Sign(leaf)
	if err != nil || !chain[1].Equal(renewed) || !chain[0].NotAfter.Equal(renewed.NotAfter) {
		t.Fatalf("a signing after the install: %v", err)
	}
	if n := strings.Count(logs.String(), "SVID lifetimes are being cut"); n != 2 || !strings.Contains(logs.String(), "issuing_serial="+renewed.SerialNumber.Text(16)) {
		t.Fatalf("want one more cut warning, for the new certificate:\n%s", logs.String())
	}
}
