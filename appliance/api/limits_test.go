package api

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"slices"
	"strings"
	"testing"
)

// The largest legitimate requests fit under MaxRequestSize with room to
// spare: a restore chunk, and a batch of 1000 workload CSRs (the node's
// batch bound; sigil-agent sends 64).
func TestLargestRequestsFit(t *testing.T) {
	chunk := make([]byte, SnapshotChunkSize)
	rand.Read(chunk)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://a-rather-long-trust-domain.example.org/ns/production/sa/a-long-service-account-name")
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	batch := func(n int) *X509SVIDBatch {
		b := &X509SVIDBatch{}
		for range n {
			b.Requests = append(b.Requests, X509SVIDRequest{EntryID: "0123abcd-0123-4567-89ab-0123456789ab", CSR: csr})
		}
		return b
	}
	for name, msg := range map[string]any{
		"restore chunk":          &SnapshotChunk{Data: chunk},
		"64-CSR batch":           batch(64),
		"1000-CSR batch":         batch(1000),
		"admin certificate":      &AdminCertRequest{Name: "alice", CSR: csr, TTL: 3600},
		"token join":             &JoinTokenRequest{Token: "t", CSR: csr},
		"8 JWT audiences of 256": &JWTSVIDRequest{EntryID: "x", Audience: slices.Repeat([]string{strings.Repeat("a", 256)}, 8)},
	} {
		b, err := Codec{}.Marshal(msg)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: %d bytes", name, len(b))
		if len(b) > MaxRequestSize*7/8 {
			t.Errorf("%s is %d bytes: too close to MaxRequestSize (%d)", name, len(b), MaxRequestSize)
		}
	}
}
