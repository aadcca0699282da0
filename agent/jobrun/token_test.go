package jobrun

import (
	"context"
	"crypto/x509"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/api"
)

const fakeJWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXBvOngifQ.c2ln"

func tlsPool(srv *httptest.Server) *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(srv.Certificate())
	return p
}

// The GitHub Actions token request: bearer header, the audience appended
// to the URL's own query, the answer's value returned; every failure is
// an error that carries neither token.
func TestGitHubActionsToken(t *testing.T) {
	var gotAuth, gotQuery string
	body := `{"count":1,"value":"` + fakeJWT + `"}`
	status := http.StatusOK
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth, gotQuery = r.Header.Get("Authorization"), r.URL.RawQuery
		switch r.URL.Path {
		case "/redirect":
			http.Redirect(w, r, "/token", http.StatusFound)
			return
		case "/big":
			_, _ = w.Write([]byte(`{"value":"` + strings.Repeat("a", maxGitHubResponse) + `"}`))
			return
		}
		w.WriteHeader(status)
		_, _ = w.Write([]byte(body))
	}))
	defer srv.Close()
	t.Setenv(GitHubRequestURLEnv, srv.URL+"/token?api-version=2.0")
	t.Setenv(GitHubRequestTokenEnv, "request-secret")
	g, err := NewGitHubActions("spiffe://example.org/ci x", tlsPool(srv))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tok, err := g.Token(ctx)
	if err != nil || tok != fakeJWT {
		t.Fatalf("token %q, %v", tok, err)
	}
	if gotAuth != "bearer request-secret" || gotQuery != "api-version=2.0&audience=spiffe%3A%2F%2Fexample.org%2Fci+x" {
		t.Fatalf("request: auth %q query %q", gotAuth, gotQuery)
	}
	if !g.Refreshable() {
		t.Fatal("GitHub tokens are refreshable")
	}
	g.Used(tok)
	if again, err := g.Token(ctx); err != nil || again != fakeJWT {
		t.Fatalf("second request: %q %v", again, err)
	}

	check := func(name string, wantErr string) {
		t.Helper()
		_, err := g.Token(ctx)
		if err == nil || !strings.Contains(err.Error(), wantErr) || strings.Contains(err.Error(), "request-secret") || strings.Contains(err.Error(), fakeJWT) {
			t.Errorf("%s: error %v, want one mentioning %q and no token", name, err, wantErr)
		}
	}
	status = http.StatusForbidden
	check("non-200", "403")
	status = http.StatusOK
	body = `{"value":""}`
	check("empty value", "empty platform token")
	body = `not json`
	check("not JSON", "not the expected JSON")
	body = `{"value":"opaque"}`
	check("not a JWT", "not a JWT")

	g.URL = srv.URL + "/big"
	check("answer too long", "longer than")
	g.URL = srv.URL + "/redirect?x=1"
	check("redirect", "redirect refused")
	g.URL = strings.Replace(srv.URL, "https:", "http:", 1) + "/token"
	check("plain http", "want an https URL")

	// The system roots do not know the test server.
	g2, err := NewGitHubActions("aud", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g2.Token(ctx); err == nil {
		t.Error("an unknown server certificate was accepted")
	}
}

func TestGitHubActionsMissingEnv(t *testing.T) {
	for _, env := range [][2]string{{"", "x"}, {"https://h/t", ""}, {"", ""}} {
		t.Setenv(GitHubRequestURLEnv, env[0])
		t.Setenv(GitHubRequestTokenEnv, env[1])
		if _, err := NewGitHubActions("aud", nil); err == nil || !strings.Contains(err.Error(), "id-token: write") {
			t.Errorf("env %q: %v", env, err)
		}
	}
	t.Setenv(GitHubRequestURLEnv, "http://h/t")
	t.Setenv(GitHubRequestTokenEnv, "x")
	if _, err := NewGitHubActions("aud", nil); err == nil || !strings.Contains(err.Error(), "https") {
		t.Errorf("http URL: %v", err)
	}
}

// A token file renews only once it holds a token not used before.
func TestFileTokenRefreshOnlyWhenChanged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "token")
	f := &FileToken{Path: p}
	ctx := context.Background()
	if _, err := f.Token(ctx); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
	if err := os.WriteFile(p, []byte(fakeJWT+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tok, err := f.Token(ctx)
	if err != nil || tok != fakeJWT {
		t.Fatalf("%q %v", tok, err)
	}
	// Not yet used (a join that failed): offered again.
	if again, err := f.Token(ctx); err != nil || again != tok {
		t.Fatalf("unused token not offered again: %v", err)
	}
	f.Used(tok)
	if _, err := f.Token(ctx); !errors.Is(err, ErrNoFreshToken) {
		t.Fatalf("unchanged file: %v", err)
	}
	second := fakeJWT + "2"
	if err := os.WriteFile(p, []byte(second), 0o600); err != nil {
		t.Fatal(err)
	}
	if tok, err := f.Token(ctx); err != nil || tok != second {
		t.Fatalf("changed file: %q %v", tok, err)
	}
	f.Used(second)
	// Back to a used token: still not fresh.
	if err := os.WriteFile(p, []byte(fakeJWT), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Token(ctx); !errors.Is(err, ErrNoFreshToken) {
		t.Fatalf("old token again: %v", err)
	}
	if err := os.WriteFile(p, []byte(strings.Repeat("a.b.", api.MaxJobTokenBytes)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Token(ctx); err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("huge file: %v", err)
	}
	if !f.Refreshable() {
		t.Fatal("a file is refreshable")
	}
}

func TestEnvTokenOnce(t *testing.T) {
	t.Setenv("JOB_TOKEN", fakeJWT)
	e, err := NewEnvToken("JOB_TOKEN")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tok, err := e.Token(ctx)
	if err != nil || tok != fakeJWT {
		t.Fatalf("%q %v", tok, err)
	}
	e.Used(tok)
	if _, err := e.Token(ctx); !errors.Is(err, ErrNoFreshToken) || e.Refreshable() {
		t.Fatalf("env token renewed: %v", err)
	}
	t.Setenv("EMPTY_TOKEN", "")
	if _, err := NewEnvToken("EMPTY_TOKEN"); err == nil {
		t.Fatal("empty variable accepted")
	}
}

// The platform token a run joined with from an environment variable does
// not reach the command's environment; the rest of it does.
func TestEnvTokenNotPassedToCommand(t *testing.T) {
	t.Setenv("JOB_TOKEN", fakeJWT)
	t.Setenv("JOB_OTHER", "kept")
	e, err := NewEnvToken("JOB_TOKEN")
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Servers: []string{"h:1"}, RootCert: "/x", Token: e, Command: []string{"true"}}
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(o.Env, func(kv string) bool { return strings.HasPrefix(kv, "JOB_TOKEN=") }) || !slices.Contains(o.Env, "JOB_OTHER=kept") {
		t.Fatalf("command environment: %v", o.Env)
	}
}
