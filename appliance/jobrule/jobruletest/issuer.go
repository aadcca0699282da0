// Package jobruletest runs a real OIDC issuer for tests of job joins: an
// httptest TLS server serving discovery and a JWKS, with RSA-2048 (RS256)
// and P-256 (ES256) keys, and helpers that shape claims like GitHub
// Actions', GitLab CI's and Kubernetes' ID tokens. It also makes the bad
// tokens attack tests need: signed by a foreign key, alg none, HS256.
//
// It is for tests only.
package jobruletest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Key is a signing key with its kid.
type Key struct {
	KID    string
	Alg    string // "RS256" or "ES256"
	Signer crypto.Signer
}

// Issuer is a running OIDC issuer.
type Issuer struct {
	srv *httptest.Server
	mux *http.ServeMux

	mu        sync.Mutex
	keys      []*Key // published, in order
	rsa, ec   *Key   // the keys Sign and SignWith use
	fetches   int
	confBody  []byte // if set, served instead of the discovery document
	jwksBody  []byte // if set, served instead of the key set
	nextKeyID int
}

// NewIssuer starts an issuer, closed when the test ends.
func NewIssuer(t testing.TB) *Issuer {
	t.Helper()
	iss := &Issuer{}
	iss.rsa = iss.addKey(t, "RS256")
	iss.ec = iss.addKey(t, "ES256")
	iss.mux = http.NewServeMux()
	iss.mux.HandleFunc("/.well-known/openid-configuration", iss.serveConfig)
	iss.mux.HandleFunc("/keys", iss.serveJWKS)
	iss.srv = httptest.NewUnstartedServer(iss.mux)
	// Tests that refuse the server's certificate are expected to.
	iss.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	iss.srv.StartTLS()
	t.Cleanup(iss.srv.Close)
	return iss
}

// NewKey makes a key for alg ("RS256": RSA-2048, "ES256": P-256) that no
// issuer publishes, for forged-signature tests.
func NewKey(t testing.TB, alg, kid string) *Key {
	t.Helper()
	var s crypto.Signer
	var err error
	switch alg {
	case "RS256":
		s, err = rsa.GenerateKey(rand.Reader, 2048)
	case "ES256":
		s, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		t.Fatalf("jobruletest: no keys for alg %q", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	return &Key{KID: kid, Alg: alg, Signer: s}
}

func (iss *Issuer) addKey(t testing.TB, alg string) *Key {
	iss.mu.Lock()
	iss.nextKeyID++
	kid := fmt.Sprintf("key-%d-%s", iss.nextKeyID, alg)
	iss.mu.Unlock()
	k := NewKey(t, alg, kid)
	iss.mu.Lock()
	iss.keys = append(iss.keys, k)
	iss.mu.Unlock()
	return k
}

// URL is the issuer (the tokens' iss), https://127.0.0.1:port.
func (iss *Issuer) URL() string { return iss.srv.URL }

// JWKSURL is where the key set is served.
func (iss *Issuer) JWKSURL() string { return iss.srv.URL + "/keys" }

// CAPEM is the TLS server's certificate, PEM, for a rule's IssuerCA.
func (iss *Issuer) CAPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: iss.srv.Certificate().Raw})
}

// JWKS is the public key set, for rules with static keys.
func (iss *Issuer) JWKS() []byte {
	iss.mu.Lock()
	defer iss.mu.Unlock()
	var set jose.JSONWebKeySet
	for _, k := range iss.keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.Signer.Public(), KeyID: k.KID, Algorithm: k.Alg, Use: "sig"})
	}
	b, err := json.Marshal(set)
	if err != nil {
		panic(err) // public RSA and EC keys always marshal
	}
	return b
}

// Current is the key Sign (RS256) or SignWith(alg) signs with now.
func (iss *Issuer) Current(alg string) *Key {
	iss.mu.Lock()
	defer iss.mu.Unlock()
	if alg == "ES256" {
		return iss.ec
	}
	return iss.rsa
}

// RSAPublicPEM is the current RSA key's public half (PKIX, PEM): the
// bytes an algorithm-confusion attacker uses as an HMAC secret.
func (iss *Issuer) RSAPublicPEM(t testing.TB) []byte {
	der, err := x509.MarshalPKIXPublicKey(iss.Current("RS256").Signer.Public())
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// RotateKey publishes a new RSA key with a new kid and signs RS256 with
// it from then on.
func (iss *Issuer) RotateKey(t testing.TB) {
	t.Helper()
	k := iss.addKey(t, "RS256")
	iss.mu.Lock()
	iss.rsa = k
	iss.mu.Unlock()
}

// Fetches is how many key set GETs the issuer served.
func (iss *Issuer) Fetches() int {
	iss.mu.Lock()
	defer iss.mu.Unlock()
	return iss.fetches
}

// Handle serves more of the issuer's URL space (redirects, slow or
// broken endpoints).
func (iss *Issuer) Handle(pattern string, h http.Handler) { iss.mux.Handle(pattern, h) }

// ServeConfig replaces the discovery document with body (nil: the real
// one), for tests of bad issuers.
func (iss *Issuer) ServeConfig(body []byte) {
	iss.mu.Lock()
	iss.confBody = body
	iss.mu.Unlock()
}

// ServeJWKS replaces the key set with body (nil: the real one).
func (iss *Issuer) ServeJWKS(body []byte) {
	iss.mu.Lock()
	iss.jwksBody = body
	iss.mu.Unlock()
}

func (iss *Issuer) serveConfig(w http.ResponseWriter, _ *http.Request) {
	iss.mu.Lock()
	body := iss.confBody
	iss.mu.Unlock()
	if body == nil {
		body, _ = json.Marshal(map[string]any{
			"issuer":                                iss.URL(),
			"jwks_uri":                              iss.JWKSURL(),
			"subject_types_supported":               []string{"public"},
			"response_types_supported":              []string{"id_token"},
			"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
		})
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

func (iss *Issuer) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	iss.mu.Lock()
	iss.fetches++
	body := iss.jwksBody
	iss.mu.Unlock()
	if body == nil {
		body = iss.JWKS()
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

// Sign signs claims RS256 with the current RSA key.
func (iss *Issuer) Sign(t testing.TB, claims map[string]any) string {
	t.Helper()
	return SignWithKey(t, iss.Current("RS256"), claims)
}

// SignWith signs claims with the current key for alg (RS256 or ES256).
func (iss *Issuer) SignWith(t testing.TB, alg string, claims map[string]any) string {
	t.Helper()
	if alg != "RS256" && alg != "ES256" {
		t.Fatalf("jobruletest: SignWith(%q): only RS256 and ES256", alg)
	}
	return SignWithKey(t, iss.Current(alg), claims)
}

// SignWithKey signs claims with any key, under its kid: a key the issuer
// does not publish makes a forgery.
func SignWithKey(t testing.TB, k *Key, claims map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	return SignBytes(t, k, payload)
}

// SignBytes signs any payload with k, for claims a map cannot hold
// (duplicate names, odd JSON).
func SignBytes(t testing.TB, k *Key, payload []byte) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{
		Algorithm: jose.SignatureAlgorithm(k.Alg),
		Key:       jose.JSONWebKey{Key: k.Signer, KeyID: k.KID},
	}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// Raw assembles a compact JWS from any header and claims, signed by sign
// (nil: an empty signature), for tokens no JOSE library would make.
func Raw(t testing.TB, header, claims map[string]any, sign func(signingInput []byte) []byte) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	c, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	input := base64.RawURLEncoding.EncodeToString(h) + "." + base64.RawURLEncoding.EncodeToString(c)
	var sig []byte
	if sign != nil {
		sig = sign([]byte(input))
	}
	return input + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// None is an unsigned token (alg none) naming kid.
func None(t testing.TB, kid string, claims map[string]any) string {
	t.Helper()
	return Raw(t, map[string]any{"alg": "none", "typ": "JWT", "kid": kid}, claims, nil)
}

// HS256 is a token MACed with secret, naming kid.
func HS256(t testing.TB, secret []byte, kid string, claims map[string]any) string {
	t.Helper()
	return Raw(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": kid}, claims, func(in []byte) []byte {
		m := hmac.New(sha256.New, secret)
		m.Write(in)
		return m.Sum(nil)
	})
}

func times(c map[string]any, now time.Time) map[string]any {
	c["iat"] = now.Add(-5 * time.Second).Unix()
	c["nbf"] = now.Add(-5 * time.Second).Unix()
	c["exp"] = now.Add(5 * time.Minute).Unix()
	return c
}

// GitHubClaims are shaped like a GitHub Actions ID token's for
// octo-org/octo-repo, run 1234567 attempt 1, issued just before now.
func GitHubClaims(iss, aud string, now time.Time) map[string]any {
	return times(map[string]any{
		"iss":                   iss,
		"aud":                   aud,
		"jti":                   "8c1a6f0e-3b2d-4e5f-9a7b-1c2d3e4f5a6b",
		"sub":                   "repo:octo-org/octo-repo:environment:prod",
		"ref":                   "refs/heads/main",
		"ref_type":              "branch",
		"ref_protected":         "true",
		"sha":                   "9f4b1c0d6fe1a7b4c4d1e0c9b2a3f4e5d6c7a8b9",
		"repository":            "octo-org/octo-repo",
		"repository_id":         "74",
		"repository_owner":      "octo-org",
		"repository_owner_id":   "65",
		"repository_visibility": "private",
		"run_id":                "1234567",
		"run_number":            "42",
		"run_attempt":           "1",
		"runner_environment":    "github-hosted",
		"actor":                 "octocat",
		"actor_id":              "12",
		"workflow":              "CI",
		"workflow_ref":          "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main",
		"workflow_sha":          "9f4b1c0d6fe1a7b4c4d1e0c9b2a3f4e5d6c7a8b9",
		"job_workflow_ref":      "octo-org/octo-repo/.github/workflows/ci.yml@refs/heads/main",
		"event_name":            "push",
		"environment":           "prod",
		"head_ref":              "",
		"base_ref":              "",
	}, now)
}

// GitLabClaims are shaped like a GitLab CI ID token's for
// my-group/my-project, job 302 of pipeline 1212.
func GitLabClaims(iss, aud string, now time.Time) map[string]any {
	return times(map[string]any{
		"iss":                   iss,
		"aud":                   aud,
		"jti":                   "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b",
		"sub":                   "project_path:my-group/my-project:ref_type:branch:ref:main",
		"namespace_id":          "72",
		"namespace_path":        "my-group",
		"project_id":            "20",
		"project_path":          "my-group/my-project",
		"user_id":               "5",
		"user_login":            "jdoe",
		"user_email":            "jdoe@example.com",
		"pipeline_id":           "1212",
		"pipeline_source":       "push",
		"job_id":                "302",
		"ref":                   "main",
		"ref_type":              "branch",
		"ref_path":              "refs/heads/main",
		"ref_protected":         "true",
		"environment":           "production",
		"environment_protected": "true",
		"runner_id":             7,
		"runner_environment":    "self-hosted",
		"sha":                   "714a629c0b401fdce83e847fc9589983fc6f46bc",
	}, now)
}

// KubernetesClaims are shaped like a projected service account token's
// for service account builder in namespace ci, pod runner-7d9f.
func KubernetesClaims(iss, aud string, now time.Time) map[string]any {
	return times(map[string]any{
		"iss": iss,
		"aud": []string{aud},
		"jti": "0c7f2a9e-5b1d-4f3e-8a6c-2d4e6f8a0b1c",
		"sub": "system:serviceaccount:ci:builder",
		"kubernetes.io": map[string]any{
			"namespace": "ci",
			"node": map[string]any{
				"name": "worker-1",
				"uid":  "4f6e1c2a-7d3b-4e8f-9a0b-1c2d3e4f5a6b",
			},
			"pod": map[string]any{
				"name": "runner-7d9f",
				"uid":  "9d2c4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f",
			},
			"serviceaccount": map[string]any{
				"name": "builder",
				"uid":  "3a5b7c9d-2e4f-4a6b-8c0d-1e2f3a4b5c6d",
			},
			"warnafter": now.Add(time.Hour).Unix(),
		},
	}, now)
}
