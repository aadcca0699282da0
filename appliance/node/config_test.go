package node

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/keystore"
)

func TestConfigParsing(t *testing.T) {
	// The shipped example decodes strictly; only the files it names (which
	// exist on a configured node) are missing here.
	_, err := LoadConfig("../../packaging/sigild/sigild.yaml")
	if err == nil || !strings.Contains(err.Error(), "invalid sigild config") {
		t.Fatalf("example config: %v", err)
	}
	for _, line := range strings.Split(err.Error(), "\n")[1:] {
		if !strings.Contains(line, "no such file") {
			t.Errorf("example config problem beyond missing files: %s", line)
		}
	}
	for _, tc := range []struct{ yaml, want string }{
		{"node-id: n1\ncolour: blue\n", "field colour not found"},
		{"node-id: Node_1\n", "node-id must match"},
		{"node-id: n1\ntrust-domain: example.org\n---\nnode-id: n2\n", "more than one YAML document"},
		{"node-id: n1\nissuing-key: \"pkcs11:token=t;object=k?module-path=/x.so&pin-value=1234\"\n", "pin-value is not allowed"},
		{"node-id: n1\ncluster:\n  bootstrap: true\n  join: [\"a:1\"]\n", "sets both bootstrap and join"},
		{"node-id: n1\nlog:\n  level: loud\n", "log.level"},
		{"node-id: n1\naudit:\n  refusal-summary-interval: 10ms\n", "audit.refusal-summary-interval must be between"},
		{"node-id: n1\naudit:\n  refusal-summary-interval: 2h\n", "audit.refusal-summary-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoint-every: -5\n", "audit.checkpoint-every must be between"},
		{"node-id: n1\naudit:\n  checkpoint-every: 20000000\n", "audit.checkpoint-every must be between"},
		{"node-id: n1\naudit:\n  checkpoint-interval: 500ms\n", "audit.checkpoint-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoint-interval: 48h\n", "audit.checkpoint-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoints: 5\n", "field checkpoints not found"},
		{"node-id: n1\napi:\n  max-connections: 5\n", "api.max-connections must be between 16 and"},
		{"node-id: n1\napi:\n  max-connections: 100\n  max-handshakes: 200\n", "api.max-handshakes must be between 1 and api.max-connections, 100 (got 200)"},
		{"node-id: n1\napi:\n  max-anonymous-connections: -1\n", "api.max-anonymous-connections must be between"},
		{"node-id: n1\napi:\n  max-anonymous-calls: 1000000\n", "api.max-anonymous-calls must be between"},
		{"node-id: n1\napi:\n  max-streams: -3\n", "api.max-streams must be between"},
		{"node-id: n1\napi:\n  handshake-timeout: 10ms\n", "api.handshake-timeout must be between"},
		{"node-id: n1\napi:\n  idle-timeout: 48h\n", "api.idle-timeout must be between"},
		{"node-id: n1\napi:\n  max-message-size: 64MiB\n", "field max-message-size not found"},
		{"node-id: n1\napi:\n  max-anonymous-connections: 8\n  max-anonymous-connections-per-source: 9\n", "api.max-anonymous-connections-per-source must be between 1 and api.max-anonymous-connections, 8 (got 9)"},
		{"node-id: n1\napi:\n  max-anonymous-calls-per-source: 65\n", "api.max-anonymous-calls-per-source must be between 1 and api.max-anonymous-calls, 64 (got 65)"},
		{"node-id: n1\napi:\n  max-anonymous-calls-per-connection: 9\n", "api.max-anonymous-calls-per-connection must be between 1 and api.max-anonymous-calls-per-source, 8 (got 9)"},
		{"node-id: n1\napi:\n  anonymous-call-timeout: 1h\n", "api.anonymous-call-timeout must be between"},
		{"node-id: n1\nbundle:\n  refresh-hint: 500ms\n", "bundle.refresh-hint must be between 1s and 24h"},
		{"node-id: n1\nbundle:\n  min-fetch-interval: 2h\n", "bundle.min-fetch-interval must be between 1s and 1h0m0s"},
		{"node-id: n1\napi:\n  anonymous-call-timeout: 30s\n  anonymous-connection-max-age: 20s\n", "api.anonymous-connection-max-age must be between api.anonymous-call-timeout, 30s, and 24h (got 20s)"},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "1234") {
			t.Errorf("error echoes a PIN: %v", err)
		}
	}
}

// The API limits have defaults when unset.
func TestConfigAPILimitDefaults(t *testing.T) {
	c, _ := ParseConfig([]byte("node-id: n1\n")) // other fields missing: only the defaults matter here
	a := c.API
	if a.MaxConnections != 4096 || a.MaxHandshakes != 256 || a.MaxAnonymousConnections != 256 || a.MaxAnonymousCalls != 64 ||
		a.MaxStreams != 64 || a.HandshakeTimeout.Duration != 10*time.Second || a.IdleTimeout.Duration != 2*time.Minute {
		t.Fatalf("API limit defaults: %+v", a)
	}
	if a.MaxAnonymousConnectionsPerSource != 16 || a.MaxAnonymousCallsPerSource != 8 || a.MaxAnonymousCallsPerConnection != 4 ||
		a.AnonymousCallTimeout.Duration != 15*time.Second || a.AnonymousConnectionMaxAge.Duration != time.Minute {
		t.Fatalf("anonymous limit defaults: %+v", a)
	}
	// Per-source and per-connection defaults never exceed the caps they
	// divide, and the age never undercuts the call timeout.
	c, _ = ParseConfig([]byte("node-id: n1\napi:\n  max-anonymous-connections: 4\n  max-anonymous-calls: 2\n  anonymous-call-timeout: 2m\n"))
	if a := c.API; a.MaxAnonymousConnectionsPerSource != 4 || a.MaxAnonymousCallsPerSource != 2 || a.MaxAnonymousCallsPerConnection != 2 ||
		a.AnonymousConnectionMaxAge.Duration != 2*time.Minute {
		t.Fatalf("anonymous limit defaults under small caps: %+v", a)
	}
}

// jwt.issuer, jwt.key-type and the OIDC listener: bad values are refused
// naming the setting and what is wrong with it.
func TestConfigOIDC(t *testing.T) {
	dir := t.TempDir()
	cert := filepath.Join(dir, "oidc.pem")
	key := filepath.Join(dir, "oidc-key.pem")
	open := filepath.Join(dir, "oidc-key-644.pem")
	for path, mode := range map[string]os.FileMode{cert: 0o644, key: 0o600, open: 0o644} {
		if err := os.WriteFile(path, []byte("x"), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil { // past the umask
			t.Fatal(err)
		}
	}
	listener := func(issuer, cert, key string) string {
		return fmt.Sprintf("node-id: n1\njwt:\n  issuer: %q\nhttp:\n  oidc-listen: 127.0.0.1:8445\n  oidc-cert: %q\n  oidc-key: %q\n", issuer, cert, key)
	}
	const good = "https://sigil.example.org"
	for _, tc := range []struct{ yaml, want string }{
		{"node-id: n1\njwt:\n  issuer: http://sigil.example.org\n", `jwt.issuer must be an https URL (cloud token services fetch its keys over TLS only) (got "http://sigil.example.org")`},
		{"node-id: n1\njwt:\n  issuer: sigil.example.org\n", "jwt.issuer must be an https URL"},
		{"node-id: n1\njwt:\n  issuer: https://sigil.example.org/\n", "jwt.issuer must not end in a slash"},
		{"node-id: n1\njwt:\n  issuer: https://sigil.example.org/x?a=b\n", "jwt.issuer must not have a query or fragment"},
		{"node-id: n1\njwt:\n  issuer: https://sigil.example.org#f\n", "jwt.issuer must not have a query or fragment"},
		{"node-id: n1\njwt:\n  issuer: https://u:p@sigil.example.org\n", "jwt.issuer must not carry user information"},
		{"node-id: n1\njwt:\n  issuer: https:///path\n", "jwt.issuer must name a host"},
		{"node-id: n1\njwt:\n  key-type: rsa-4096\n", `jwt.key-type must be ec-p256 or rsa-2048 (got "rsa-4096")`},
		{"node-id: n1\nhttp:\n  oidc-listen: 127.0.0.1:8445\n", "http.oidc-listen needs jwt.issuer"},
		{"node-id: n1\nhttp:\n  oidc-listen: 127.0.0.1:8445\n", "http.oidc-cert is required with http.oidc-listen"},
		{"node-id: n1\nhttp:\n  oidc-listen: 127.0.0.1:8445\n", "http.oidc-key is required with http.oidc-listen"},
		{listener(good, filepath.Join(dir, "missing.pem"), key), "http.oidc-cert stat " + dir + "/missing.pem: no such file or directory"},
		{listener(good, cert, open), "http.oidc-key " + open + " has mode -rw-r--r--; a private key must be readable by its owner only (chmod 600)"},
		{listener(good, cert, filepath.Join(dir, "nokey.pem")), "http.oidc-key stat " + dir + "/nokey.pem: no such file"},
		{listener(good, cert, "pkcs11:token=t;object=k?module-path=/x.so"), "http.oidc-key needs pin-source"},
		{listener(good, cert, "pkcs11:token=t;object=k?module-path=/x.so&pin-value=1234"), "pin-value is not allowed"},
		{"node-id: n1\nhttp:\n  oidc-cert: /etc/x.pem\n", "http.oidc-cert is set but http.oidc-listen is not"},
		{"issuing-key: \"pkcs11:token=t;object=ca?module-path=/x.so&pin-source=file:/p\"\n" + listener(good, cert, "pkcs11:token=t;object=ca?module-path=/x.so&pin-source=file:/p"),
			"http.oidc-key names the issuing CA's key"},
		{listener(good, cert, "pkcs11:token=t;object=sigil-jwt-abc?module-path=/x.so&pin-source=file:/p"), "http.oidc-key names a JWT signing key"},
		{"node-id: n1\nhttp:\n  oidc-listen: nowhere\n", `http.oidc-listen must be host:port (got "nowhere")`},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "1234") {
			t.Errorf("error echoes a PIN: %v", err)
		}
	}
	// A complete setting (key file 0600, or an HSM key) raises none.
	for _, k := range []string{key, "pkcs11:token=t;object=k?module-path=/x.so&pin-source=file:/etc/sigil/hsm.pin"} {
		c, _ := ParseConfig([]byte(listener(good, cert, k)))
		for _, p := range c.Problems() {
			if strings.HasPrefix(p, "jwt.") || strings.HasPrefix(p, "http.") {
				t.Errorf("complete OIDC settings with key %s: %s", k, p)
			}
		}
	}
	c, _ := ParseConfig([]byte("node-id: n1\n"))
	if c.JWT.KeyType != JWTKeyEC256 || c.JWTKeyAlgorithm() != keystore.ECDSAP256 || c.JWT.Issuer != "" {
		t.Fatalf("jwt defaults: %+v", c.JWT)
	}
	c, _ = ParseConfig([]byte("node-id: n1\njwt:\n  key-type: rsa-2048\n  issuer: https://sigil.example.org/federation\n"))
	if c.JWTKeyAlgorithm() != keystore.RSA2048 {
		t.Fatalf("jwt.key-type rsa-2048: %v", c.JWTKeyAlgorithm())
	}
	for _, p := range c.Problems() {
		if strings.HasPrefix(p, "jwt.") {
			t.Errorf("issuer with a path: %s", p)
		}
	}
}
