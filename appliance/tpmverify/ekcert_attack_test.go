package tpmverify

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/keystore/tpm"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// The trusted EK CA (swtpm_localca's issuer, the stand-in for a TPM
// vendor's EK CA) signs leaves for the TPM's own EKs that are not EK
// certificates: no EKU, a TLS or code-signing EKU, extra purposes, or a
// key usage the TCG EK Credential Profile does not give an EK. Each is
// refused, naming what is wrong; the genuine swtpm EK certificates (RSA
// and P-384) and a correctly profiled leaf from the same CA still pass.
func TestAttackEKCertWithoutEKU(t *testing.T) {
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	cas := readCerts(t, sw.EKCARoot, sw.EKCAIssuer)
	issuer := cas[1]
	issuerKey := readLocalCAKey(t, filepath.Join(sw.Dir, "localca", "signkey.pem"))

	rsaTPM, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket, EK: "rsa"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := rsaTPM.Close(); err != nil {
			t.Error(err)
		}
	})
	rsaEK, err := rsaTPM.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	eccTPM, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket, EK: "ecc-p384"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := eccTPM.Close(); err != nil {
			t.Error(err)
		}
	})
	eccEK, err := eccTPM.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// The genuine certificates pass.
	for _, ek := range []*tpm.EK{rsaEK, eccEK} {
		if got, err := VerifyEK(ek.Public, ek.Cert, cas, nil); err != nil || got.Method != "ek-cert" {
			t.Fatalf("genuine %s EK certificate: %v", ek.Kind, err)
		}
	}
	genuine, err := x509.ParseCertificate(rsaEK.Cert)
	if err != nil {
		t.Fatal(err)
	}
	// Keep the vendor's critical directoryName SAN, as a real EK
	// certificate has: only the purpose differs from a genuine one.
	var san pkix.Extension
	for _, e := range genuine.Extensions {
		if e.Id.Equal(oidSAN) {
			san = e
		}
	}
	if !san.Critical {
		t.Fatal("the genuine swtpm EK certificate has no critical SAN")
	}
	pubOf := func(ek *tpm.EK) crypto.PublicKey {
		_, k, err := parsePublic(ek.Public)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	rsaPub, eccPub := pubOf(rsaEK), pubOf(eccEK)
	serial := int64(1000)
	forge := func(pub crypto.PublicKey, ku x509.KeyUsage, eku []x509.ExtKeyUsage, unknown ...asn1.ObjectIdentifier) []byte {
		serial++
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			NotBefore:    time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: ku, ExtKeyUsage: eku, UnknownExtKeyUsage: unknown,
			BasicConstraintsValid: true,
			ExtraExtensions:       []pkix.Extension{san},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, pub, issuerKey)
		if err != nil {
			t.Fatal(err)
		}
		return der
	}
	ekEKU := oidEKCertU
	otherEKU := asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}

	for _, c := range []struct {
		name string
		ek   *tpm.EK
		cert []byte
		want string
	}{
		{"no EKU", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, nil), "no extended key usage"},
		{"no EKU, no key usage", rsaEK, forge(rsaPub, 0, nil), "no extended key usage"},
		{"serverAuth", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}), "not an EK certificate"},
		{"codeSigning", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}), "not an EK certificate"},
		{"clientAuth, ECC", eccEK, forge(eccPub, x509.KeyUsageKeyAgreement, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}), "not an EK certificate"},
		{"EK and serverAuth", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, ekEKU), "other purposes"},
		{"EK and anyExtendedKeyUsage", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, ekEKU), "other purposes"},
		{"EK and an unknown purpose", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, nil, ekEKU, otherEKU), "other purposes"},
		{"RSA, digitalSignature", rsaEK, forge(rsaPub, x509.KeyUsageDigitalSignature, nil, ekEKU), "key usage"},
		{"RSA, keyEncipherment and digitalSignature", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment|x509.KeyUsageDigitalSignature, nil, ekEKU), "key usage"},
		{"RSA, keyCertSign", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment|x509.KeyUsageCertSign, nil, ekEKU), "key usage"},
		{"RSA, keyAgreement", rsaEK, forge(rsaPub, x509.KeyUsageKeyAgreement, nil, ekEKU), "keyEncipherment"},
		{"ECC, keyEncipherment", eccEK, forge(eccPub, x509.KeyUsageKeyEncipherment, nil, ekEKU), "keyAgreement"},
		{"ECC, digitalSignature", eccEK, forge(eccPub, x509.KeyUsageKeyAgreement|x509.KeyUsageDigitalSignature, nil, ekEKU), "key usage"},
	} {
		_, err := VerifyEK(c.ek.Public, c.cert, cas, nil)
		mustRefuse(t, err, c.want)
		t.Logf("%s: %v", c.name, err)
	}

	// Leaves from the same CA that follow the profile pass: the refusals
	// above are for the purpose, not for how the test made them. A leaf
	// with the EK EKU and no keyUsage extension is tolerated (see
	// VerifyEK).
	for _, c := range []struct {
		name string
		ek   *tpm.EK
		cert []byte
	}{
		{"RSA, EK profile", rsaEK, forge(rsaPub, x509.KeyUsageKeyEncipherment, nil, ekEKU)},
		{"ECC, EK profile", eccEK, forge(eccPub, x509.KeyUsageKeyAgreement, nil, ekEKU)},
		{"RSA, EK EKU, no key usage", rsaEK, forge(rsaPub, 0, nil, ekEKU)},
	} {
		if _, err := VerifyEK(c.ek.Public, c.cert, cas, nil); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
}

// readLocalCAKey reads swtpm_localca's signing key (certtool writes a text
// dump before the PEM block).
func readLocalCAKey(t *testing.T, path string) crypto.Signer {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM block", path)
	}
	if k, err := x509.ParsePKCS1PrivateKey(blk.Bytes); err == nil {
		return k
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return k.(crypto.Signer)
}
