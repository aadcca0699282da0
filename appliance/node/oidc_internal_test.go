package node

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sigil-appliance/sigil/appliance/state"
)

func writePEM(t *testing.T, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// selfSigned writes a certificate for key valid from notBefore to notAfter.
func selfSigned(t *testing.T, path string, key crypto.Signer, cn string, notBefore, notAfter time.Time) {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn}, DNSNames: []string{cn},
		NotBefore: notBefore, NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "CERTIFICATE", der, 0o644)
}

// The OIDC listener's certificate at start and on renewal: a key that is
// not the certificate's, a key file others can read and a certificate
// not valid now are refused, naming the setting; the key file's PEM forms
// load; a renewed pair is picked up, and a broken one leaves the previous
// pair serving.
func TestOIDCCertLoad(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	certPath, keyPath := filepath.Join(dir, "oidc.pem"), filepath.Join(dir, "oidc-key.pem")
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalECPrivateKey(ec)
	writePEM(t, keyPath, "EC PRIVATE KEY", der, 0o600)
	selfSigned(t, certPath, ec, "a.example.org", now.Add(-time.Hour), now.Add(time.Hour))
	c := &oidcCert{certPath: certPath, keyRef: keyPath, log: slog.New(slog.DiscardHandler)}
	if err := c.start(context.Background()); err != nil {
		t.Fatal(err)
	}

	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherPath := filepath.Join(dir, "other-key.pem")
	p8, _ := x509.MarshalPKCS8PrivateKey(other)
	writePEM(t, otherPath, "PRIVATE KEY", p8, 0o600)
	openPath := filepath.Join(dir, "open-key.pem")
	writePEM(t, openPath, "PRIVATE KEY", p8, 0o644)
	certAsKey := filepath.Join(dir, "cert-as-key.pem")
	b, _ := os.ReadFile(certPath)
	if err := os.WriteFile(certAsKey, b, 0o600); err != nil {
		t.Fatal(err)
	}
	expired := filepath.Join(dir, "expired.pem")
	selfSigned(t, expired, ec, "a.example.org", now.Add(-48*time.Hour), now.Add(-24*time.Hour))
	for _, tc := range []struct{ cert, key, want string }{
		{certPath, otherPath, "http.oidc-key " + otherPath + " is not the key of the certificate in http.oidc-cert " + certPath},
		{certPath, openPath, "http.oidc-key: " + openPath + " has mode -rw-r--r--; a private key must be readable by its owner only (chmod 600)"},
		{expired, keyPath, "http.oidc-cert " + expired + ": the certificate for [a.example.org] is valid from"},
		{filepath.Join(dir, "none.pem"), keyPath, "http.oidc-cert: "},
		{certPath, certAsKey, "holds no PEM PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block"},
	} {
		bad := &oidcCert{certPath: tc.cert, keyRef: tc.key, log: c.log}
		if err := bad.start(context.Background()); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("cert %s, key %s: %v, want %q", tc.cert, tc.key, err, tc.want)
		}
	}

	// A renewal in place (an RSA key in PKCS#1 form this time) is picked
	// up at the next handshake after the recheck interval.
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	writePEM(t, keyPath, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rk), 0o600)
	selfSigned(t, certPath, rk, "b.example.org", now.Add(-time.Hour), now.Add(2*time.Hour))
	c.checked = time.Time{}
	got, _ := c.get(&tls.ClientHelloInfo{})
	if got.Leaf.Subject.CommonName != "b.example.org" {
		t.Fatalf("after renewal serving %s", got.Leaf.Subject)
	}
	// A renewal that does not load (a key of another certificate) keeps
	// the pair that works.
	writePEM(t, keyPath, "PRIVATE KEY", p8, 0o600)
	c.checked = time.Time{}
	if got, _ := c.get(&tls.ClientHelloInfo{}); got.Leaf.Subject.CommonName != "b.example.org" {
		t.Fatalf("after a broken renewal serving %s", got.Leaf.Subject)
	}
}

// The documents: the discovery document names the issuer and its JWKS
// under the issuer's path; the JWKS holds every node's unexpired keys and
// none past their NotAfter; the algorithms follow the keys.
func TestOIDCDocuments(t *testing.T) {
	now := time.Now()
	pub := func(k crypto.Signer) []byte { der, _ := x509.MarshalPKIXPublicKey(k.Public()); return der }
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	b := state.Bundle{Sequence: 7, JWTKeys: []state.JWTKey{
		{KID: "node-1-aaaa", Node: "node-1", PublicKey: pub(ec), NotAfter: now.Add(time.Hour)},
		{KID: "node-2-bbbb", Node: "node-2", PublicKey: pub(rk), NotAfter: now.Add(time.Hour)},
		{KID: "node-3-old", Node: "node-3", PublicKey: pub(ec), NotAfter: now.Add(-time.Minute)},
	}}
	s, err := newOIDCServer("https://sigil.example.org/fed", "ES256", func() state.Bundle { return b }, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	get := func(path string) (int, map[string]any) {
		w := httptest.NewRecorder()
		s.handler().ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
		body, _ := io.ReadAll(w.Result().Body)
		var doc map[string]any
		_ = json.Unmarshal(body, &doc) // a 404's body is text
		return w.Code, doc
	}
	code, doc := get("/fed/.well-known/openid-configuration")
	if code != http.StatusOK || doc["issuer"] != "https://sigil.example.org/fed" || doc["jwks_uri"] != "https://sigil.example.org/fed/keys" {
		t.Fatalf("discovery: %d %v", code, doc)
	}
	if algs, _ := json.Marshal(doc["id_token_signing_alg_values_supported"]); string(algs) != `["ES256","RS256"]` {
		t.Fatalf("algorithms %s", algs)
	}
	code, doc = get("/fed/keys")
	keys, _ := json.Marshal(doc["keys"])
	if code != http.StatusOK || !strings.Contains(string(keys), `"kid":"node-1-aaaa"`) || !strings.Contains(string(keys), `"kid":"node-2-bbbb"`) ||
		strings.Contains(string(keys), "node-3-old") || !strings.Contains(string(keys), `"alg":"RS256"`) {
		t.Fatalf("JWKS: %d %s", code, keys)
	}
	if code, _ := get("/.well-known/openid-configuration"); code != http.StatusNotFound {
		t.Fatalf("discovery outside the issuer's path: %d", code)
	}
	// An empty bundle (a new cluster) still names the configured algorithm.
	b = state.Bundle{Sequence: 8}
	if _, doc := get("/fed/.well-known/openid-configuration"); doc["id_token_signing_alg_values_supported"].([]any)[0] != "ES256" {
		t.Fatalf("empty bundle: %v", doc)
	}
	if _, doc := get("/fed/keys"); doc["keys"] == nil {
		t.Fatalf("empty JWKS is not an empty list: %v", doc)
	}
}
