package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"os"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// FuzzCheckCSR: any bytes an agent sends as a workload CSR give a parsed,
// self-signed request for the entry's ID, or an error; never a panic, and
// never acceptance of a CSR for another ID.
func FuzzCheckCSR(f *testing.F) {
	e := state.Entry{ID: "e1", SPIFFEID: "spiffe://example.org/w"}
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, id := range []string{e.SPIFFEID, "spiffe://example.org/other", ""} {
		tmpl := &x509.CertificateRequest{}
		if id != "" {
			u, _ := url.Parse(id)
			tmpl.URIs = []*url.URL{u}
		}
		der, _ := x509.CreateCertificateRequest(rand.Reader, tmpl, k)
		f.Add(der)
	}
	f.Add([]byte{0x30, 0x03, 0x02, 0x01, 0x00})
	f.Fuzz(func(t *testing.T, der []byte) {
		csr, err := checkCSR(e, der)
		if err != nil {
			return
		}
		if csr.CheckSignature() != nil || len(csr.URIs) > 1 || len(csr.URIs) == 1 && csr.URIs[0].String() != e.SPIFFEID {
			t.Fatalf("accepted a CSR that should be refused: %+v", csr.URIs)
		}
	})
}

// FuzzParseConfig: a config file is accepted whole or refused, without a
// panic.
func FuzzParseConfig(f *testing.F) {
	b, err := os.ReadFile("../../packaging/sigild/sigild.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte("node-id: a\n---\nnode-id: b\n"))
	f.Add([]byte("cluster: {bind: [1,2]}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Any input may be refused; what matters is that it returns.
		_, _ = ParseConfig(b)
	})
}
