package node_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// oidcTLS is an operator's https_web certificate for 127.0.0.1 from a CA
// of its own (a public CA in production), with its key in a 0600 file
// and a second leaf whose key is in node-1's HSM.
type oidcTLS struct {
	pool               *x509.CertPool
	certFile, keyFile  string // the file-key leaf
	hsmCert, hsmKeyURI string // the HSM-key leaf
}

func newOIDCTLS(t *testing.T, dir string, tr *clustertest.Trust) *oidcTLS {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test web CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	o := &oidcTLS{pool: x509.NewCertPool()}
	o.pool.AddCert(caCert)
	leaf := func(name string, serial int64, pub crypto.PublicKey) string {
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			NotBefore:   time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, pub, caKey)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		// The chain: the leaf, then the CA that signed it.
		pemBytes := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})...)
		if err := os.WriteFile(path, pemBytes, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(key)
	o.keyFile = filepath.Join(dir, "oidc-key.pem")
	if err := os.WriteFile(o.keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}), 0o600); err != nil {
		t.Fatal(err)
	}
	o.certFile = leaf("oidc.pem", 2, key.Public())

	// The HSM leaf: an RSA key (TLS signs with it by PSS) made in node-1's
	// token, where the node's own key store opens it by URI.
	o.hsmKeyURI = tr.Nodes["node-1"].Token.KeyURI("sigil-oidc-tls")
	ks := pkcs11.New(pkcs11.Options{})
	pub, err := ks.CreateKey(context.Background(), keystore.CreateKeyRequest{URI: o.hsmKeyURI, Algorithm: keystore.RSA2048})
	if cerr := ks.Close(); cerr != nil {
		t.Fatal(cerr)
	}
	if err != nil {
		t.Fatal(err)
	}
	o.hsmCert = leaf("oidc-hsm.pem", 3, pub)
	return o
}

func (o *oidcTLS) client() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: o.pool}}}
}

// jwtHeader is a token's JOSE header.
func jwtHeader(t *testing.T, tok string) (alg, kid string) {
	t.Helper()
	b, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	if err != nil {
		t.Fatal(err)
	}
	var hdr struct{ Alg, Kid string }
	if err := json.Unmarshal(b, &hdr); err != nil {
		t.Fatalf("JWT header %s: %v", b, err)
	}
	return hdr.Alg, hdr.Kid
}

// TestOIDCFederation (issue #17): a three-node cluster with jwt.issuer and
// an OIDC listener on every node (node-1's TLS key in its HSM, the others'
// in a 0600 file). For each key type, a JWT-SVID that the agent API of
// each node signs for a joined agent verifies with go-oidc pointed at
// nothing but the issuer URL (discovery, JWKS, iss, aud, signature);
// every node's JWKS lists the keys of all three nodes with use, alg and
// kid; the tokens also validate as JWT-SVIDs against the SPIFFE bundle
// (what agents do). Responses are cacheable and counted.
func TestOIDCFederation(t *testing.T) {
	for _, tc := range []struct{ keyType, alg string }{{node.JWTKeyEC256, "ES256"}, {node.JWTKeyRSA2048, "RS256"}} {
		t.Run(tc.keyType, func(t *testing.T) {
			tr := clustertest.NewTrust(t, "oidc"+tc.alg, []string{"node-1", "node-2", "node-3"}, nil)
			web := newOIDCTLS(t, t.TempDir(), tr)
			issuerURL := "https://" + clustertest.FreePort(t)
			ic := newIssuerOn(t, tr, func(cfg *node.Config) {
				cfg.JWT.KeyType, cfg.JWT.Issuer = tc.keyType, issuerURL
				cfg.HTTP.OIDCListen, cfg.HTTP.OIDCCert, cfg.HTTP.OIDCKey = clustertest.FreePort(t), web.certFile, web.keyFile
				if cfg.NodeID == "node-1" {
					cfg.HTTP.OIDCListen = strings.TrimPrefix(issuerURL, "https://")
					cfg.HTTP.OIDCCert, cfg.HTTP.OIDCKey = web.hsmCert, web.hsmKeyURI
				}
				if err := cfg.Validate(); err != nil {
					t.Fatal(err)
				}
			})
			c := ic.c
			ctx := context.Background()
			const aud = "sts.amazonaws.com"
			wl := ic.entry(t, "spiffe://example.org/ci/deploy", agentID)
			tokens := map[string]string{}
			for _, id := range c.Running() {
				r, err := ic.agent(t, id).SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: wl.ID, Audience: []string{aud}})
				if err != nil {
					t.Fatal(err)
				}
				alg, kid := jwtHeader(t, r.Token)
				if alg != tc.alg || !strings.HasPrefix(kid, id+"-") {
					t.Fatalf("%s signed with alg %s, kid %s; want %s and a kid of %s", id, alg, kid, tc.alg, id)
				}
				tokens[id] = r.Token
			}

			octx := oidc.ClientContext(ctx, web.client())
			provider, err := oidc.NewProvider(octx, issuerURL)
			if err != nil {
				t.Fatal(err)
			}
			var meta struct {
				JWKSURI string   `json:"jwks_uri"`
				Algs    []string `json:"id_token_signing_alg_values_supported"`
				Resp    []string `json:"response_types_supported"`
				Subj    []string `json:"subject_types_supported"`
			}
			if err := provider.Claims(&meta); err != nil {
				t.Fatal(err)
			}
			if meta.JWKSURI != issuerURL+"/keys" || !slices.Equal(meta.Algs, []string{tc.alg}) ||
				!slices.Equal(meta.Resp, []string{"id_token"}) || !slices.Equal(meta.Subj, []string{"public"}) {
				t.Fatalf("discovery document: %+v", meta)
			}
			verifier := provider.Verifier(&oidc.Config{ClientID: aud})
			for id, tok := range tokens {
				idt, err := verifier.Verify(octx, tok)
				if err != nil {
					t.Fatalf("%s's token: %v", id, err)
				}
				if idt.Issuer != issuerURL || idt.Subject != wl.SPIFFEID || !slices.Equal(idt.Audience, []string{aud}) {
					t.Fatalf("%s's token: iss %s, sub %s, aud %v", id, idt.Issuer, idt.Subject, idt.Audience)
				}
				if _, err := provider.Verifier(&oidc.Config{ClientID: "api://AzureADTokenExchange"}).Verify(octx, tok); err == nil {
					t.Fatalf("%s's token verified for another audience", id)
				}
				if _, err := verifier.Verify(octx, tok[:len(tok)-6]+"AAAAAA"); err == nil {
					t.Fatalf("%s's token verified with a forged signature", id)
				}
			}

			// The tokens are JWT-SVIDs too: the SPIFFE bundle agents hold
			// validates them (go-spiffe, as agent/workload does).
			resp, err := c.Admin("node-2").BundleShow(ctx, &api.Empty{})
			if err != nil {
				t.Fatal(err)
			}
			sb, err := spiffebundle.Parse(tr.TrustDomain, resp.SPIFFE)
			if err != nil {
				t.Fatal(err)
			}
			for id, tok := range tokens {
				if s, err := jwtsvid.ParseAndValidate(tok, sb, []string{aud}); err != nil || s.ID.String() != wl.SPIFFEID {
					t.Fatalf("%s's token as a JWT-SVID: %v", id, err)
				}
			}

			// Every node's JWKS: the keys of all three, each with use, alg
			// and kid, cacheable for a few minutes.
			for _, id := range c.Running() {
				r, err := web.client().Get("https://" + c.Node(id).OIDCAddr() + "/keys")
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(r.Body)
				_ = r.Body.Close() // read
				if r.StatusCode != http.StatusOK || r.Header.Get("Cache-Control") != "public, max-age=300" || r.Header.Get("Content-Type") != "application/json" {
					t.Fatalf("%s /keys: %s, headers %v", id, r.Status, r.Header)
				}
				var set struct {
					Keys []struct{ Kid, Use, Alg, Kty string }
				}
				if err := json.Unmarshal(body, &set); err != nil {
					t.Fatal(err)
				}
				nodes := map[string]bool{}
				for _, k := range set.Keys {
					if k.Use != "sig" || k.Alg != tc.alg {
						t.Fatalf("%s /keys: key %+v, want use sig, alg %s", id, k, tc.alg)
					}
					for _, n := range c.Running() {
						if strings.HasPrefix(k.Kid, n+"-") {
							nodes[n] = true
						}
					}
				}
				if len(nodes) != 3 || len(set.Keys) != 3 {
					t.Fatalf("%s /keys lists %d keys of nodes %v, want one of each of 3", id, len(set.Keys), nodes)
				}
			}

			// Bounded surface: other paths and methods are refused, and
			// requests are counted by path and code.
			base := "https://" + c.Node("node-1").OIDCAddr()
			if r, err := web.client().Get(base + "/metrics"); err != nil || r.StatusCode != http.StatusNotFound {
				t.Fatalf("GET /metrics on the OIDC listener: %v %v", r, err)
			} else {
				_ = r.Body.Close() // status only
			}
			if r, err := web.client().Post(base+"/keys", "application/json", strings.NewReader("{}")); err != nil || r.StatusCode != http.StatusMethodNotAllowed {
				t.Fatalf("POST /keys: %v %v", r, err)
			} else {
				_ = r.Body.Close() // status only
			}
			m, err := http.Get("http://" + c.Node("node-1").HTTPAddr() + "/metrics")
			if err != nil {
				t.Fatal(err)
			}
			mb, _ := io.ReadAll(m.Body)
			_ = m.Body.Close() // read
			for _, want := range []string{`sigil_oidc_requests_total{code="200",path="discovery"}`, `sigil_oidc_requests_total{code="200",path="keys"}`,
				`sigil_oidc_requests_total{code="404",path="other"} 1`, `sigil_oidc_requests_total{code="405",path="keys"} 1`,
				`sigil_listener_connections{listener="oidc",state="open"}`} {
				if !strings.Contains(string(mb), want) {
					t.Errorf("metrics lack %s:\n%s", want, grepLines(string(mb), "listener"))
				}
			}
		})
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// jwt.key-type changed on a node takes effect at its next start: it makes
// a key of the new type instead of adopting its old one, signs with it,
// and its old key stays in the bundle (and the JWKS) so that the tokens
// it signed still verify. The discovery document then names both
// algorithms.
func TestJWTKeyTypeChangeAtRestart(t *testing.T) {
	tr := clustertest.NewTrust(t, "kt", []string{"node-1", "node-2", "node-3"}, nil)
	web := newOIDCTLS(t, t.TempDir(), tr)
	issuerURL := "https://" + clustertest.FreePort(t)
	ic := newIssuerOn(t, tr, func(cfg *node.Config) {
		cfg.JWT.Issuer = issuerURL
		if cfg.NodeID == "node-1" {
			cfg.HTTP.OIDCListen, cfg.HTTP.OIDCCert, cfg.HTTP.OIDCKey = strings.TrimPrefix(issuerURL, "https://"), web.certFile, web.keyFile
		}
	})
	c := ic.c
	ctx := context.Background()
	wl := ic.entry(t, "spiffe://example.org/ci/deploy", agentID)
	sign := func(id string) string {
		t.Helper()
		r, err := ic.agent(t, id).SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: wl.ID, Audience: []string{"sts.amazonaws.com"}})
		if err != nil {
			t.Fatal(err)
		}
		return r.Token
	}
	before := sign("node-2")
	if alg, _ := jwtHeader(t, before); alg != "ES256" {
		t.Fatalf("before the change: %s", alg)
	}
	c.Stop("node-2")
	c.ConfigOf("node-2").JWT.KeyType = node.JWTKeyRSA2048
	c.Start("node-2")
	c.WaitLeader(30 * time.Second)
	after := sign("node-2")
	alg, kid := jwtHeader(t, after)
	if _, oldKID := jwtHeader(t, before); alg != "RS256" || kid == oldKID {
		t.Fatalf("after the change: alg %s kid %s (old kid %s), want RS256 and a new key", alg, kid, oldKID)
	}
	octx := oidc.ClientContext(ctx, web.client())
	clustertest.Eventually(t, 10*time.Second, "node-1 to serve the new key", func() bool {
		provider, err := oidc.NewProvider(octx, issuerURL)
		if err != nil {
			t.Fatal(err)
		}
		var meta struct {
			Algs []string `json:"id_token_signing_alg_values_supported"`
		}
		if err := provider.Claims(&meta); err != nil || !slices.Equal(meta.Algs, []string{"ES256", "RS256"}) {
			return false
		}
		v := provider.Verifier(&oidc.Config{ClientID: "sts.amazonaws.com"})
		for _, tok := range []string{before, after} {
			if _, err := v.Verify(octx, tok); err != nil {
				t.Logf("verify: %v", err)
				return false
			}
		}
		return true
	})
}
