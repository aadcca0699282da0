package pemfile

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func selfSigned(t *testing.T, cn string) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: Certificate, Bytes: der})
}

func write(t *testing.T, dir, name string, parts ...[]byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	var b []byte
	for _, x := range parts {
		b = append(b, x...)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadCerts(t *testing.T) {
	dir := t.TempDir()
	a, b := selfSigned(t, "a"), selfSigned(t, "b")
	csr := pem.EncodeToMemory(&pem.Block{Type: CertificateRequest, Bytes: []byte{1}})
	key := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}})
	truncated := a[:len(a)-30]

	one := write(t, dir, "one.pem", a)
	if c, err := ReadCert(one); err != nil || c.Subject.CommonName != "a" {
		t.Fatalf("one certificate: %v %v", c, err)
	}
	// A readable dump before a block is PEM's preamble (certtool writes
	// one); between blocks likewise.
	dumped := write(t, dir, "dumped.pem", []byte("Certificate:\n  Subject: CN=a\n"), a, []byte("\nSubject: CN=b\n"), b, []byte("\n\n"))
	if cs, err := ReadCerts(dumped); err != nil || len(cs) != 2 || cs[0].Subject.CommonName != "a" || cs[1].Subject.CommonName != "b" {
		t.Fatalf("two certificates with dumps: %v %v", cs, err)
	}

	for name, tc := range map[string]struct {
		parts [][]byte
		many  bool
		want  string
	}{
		"empty":             {nil, true, "holds no PEM CERTIFICATE"},
		"not PEM":           {[][]byte{[]byte("hello")}, true, "holds no PEM CERTIFICATE"},
		"a CSR":             {[][]byte{csr}, true, `holds no PEM CERTIFICATE (its first block is a "CERTIFICATE REQUEST")`},
		"cert then key":     {[][]byte{a, key}, true, `PEM block 2 is a "PRIVATE KEY", want CERTIFICATE`},
		"trailing bytes":    {[][]byte{a, []byte("junk")}, true, "4 bytes after the last PEM block"},
		"truncated":         {[][]byte{truncated}, true, "holds no PEM CERTIFICATE (a block is not valid PEM)"},
		"truncated second":  {[][]byte{a, truncated}, true, "PEM block 2 is not valid PEM"},
		"bad DER":           {[][]byte{pem.EncodeToMemory(&pem.Block{Type: Certificate, Bytes: []byte{1}})}, true, "certificate 1: x509"},
		"two where one is":  {[][]byte{a, b}, false, "holds 2 PEM blocks, want one CERTIFICATE"},
		"trailing for one":  {[][]byte{a, []byte("x")}, false, "1 bytes after the last PEM block"},
		"bad DER for one":   {[][]byte{pem.EncodeToMemory(&pem.Block{Type: Certificate, Bytes: []byte{1}})}, false, "x509"},
		"key for one":       {[][]byte{key}, false, `its first block is a "PRIVATE KEY"`},
		"truncated for one": {[][]byte{truncated}, false, "not valid PEM"},
	} {
		p := write(t, dir, strings.ReplaceAll(name, " ", "-")+".pem", tc.parts...)
		var err error
		if tc.many {
			_, err = ReadCerts(p)
		} else {
			_, err = ReadCert(p)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), p) {
			t.Errorf("%s: %v, want %q naming the file", name, err, tc.want)
		}
	}

	if _, err := ReadCert(filepath.Join(dir, "missing.pem")); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "missing.pem") {
		t.Errorf("missing file: %v", err)
	}
	if _, err := ReadCerts(""); err == nil {
		t.Error("empty path accepted")
	}
}

func TestReadCSR(t *testing.T) {
	dir := t.TempDir()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "n1"}}, k)
	if err != nil {
		t.Fatal(err)
	}
	p := write(t, dir, "n1.csr", pem.EncodeToMemory(&pem.Block{Type: CertificateRequest, Bytes: der}))
	if csr, err := ReadCSR(p); err != nil || csr.Subject.CommonName != "n1" {
		t.Fatalf("CSR: %v %v", csr, err)
	}
	cert := write(t, dir, "cert.pem", selfSigned(t, "a"))
	if _, err := ReadCSR(cert); err == nil || !strings.Contains(err.Error(), "holds no PEM CERTIFICATE REQUEST") {
		t.Fatalf("certificate as CSR: %v", err)
	}
}
