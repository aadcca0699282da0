package jobrun

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// ErrNoFreshToken means the source has no platform token other than those
// already used for a join (each joins once).
var ErrNoFreshToken = errors.New("no fresh platform token")

// TokenSource gives the platform ID tokens (JWTs) a run joins with: the
// first join's, then a fresh one for each renewal.
type TokenSource interface {
	// Token returns a token not yet used for a join, or ErrNoFreshToken.
	Token(ctx context.Context) (string, error)
	// Used records that tok joined: it is not offered again.
	Used(tok string)
	// Refreshable reports whether a later Token may give a fresh token
	// once this one said ErrNoFreshToken (a file may change; an
	// environment variable cannot).
	Refreshable() bool
	// String names the source for logs (never the token).
	String() string
}

// usedSet remembers used tokens by their SHA-256, not the tokens.
type usedSet struct {
	mu   sync.Mutex
	seen map[[32]byte]bool
}

func (u *usedSet) add(tok string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.seen == nil {
		u.seen = map[[32]byte]bool{}
	}
	u.seen[sha256.Sum256([]byte(tok))] = true
}

func (u *usedSet) has(tok string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.seen[sha256.Sum256([]byte(tok))]
}

// checkToken refuses what cannot be a platform token before it is sent.
func checkToken(tok, from string) (string, error) {
	tok = strings.TrimSpace(tok)
	switch {
	case tok == "":
		return "", fmt.Errorf("%s: empty platform token", from)
	case len(tok) > api.MaxJobTokenBytes:
		return "", fmt.Errorf("%s: platform token of %d bytes, more than the %d allowed", from, len(tok), api.MaxJobTokenBytes)
	case strings.Count(tok, ".") != 2:
		return "", fmt.Errorf("%s: not a JWT (want header.payload.signature)", from)
	}
	return tok, nil
}

// FileToken reads the token from a file each time one is wanted: a
// renewal happens only once the file holds a token not used before (a
// pipeline that rewrites it, such as a projected Kubernetes service
// account token, refreshes the run's identity).
type FileToken struct {
	Path string
	used usedSet
}

// Token implements TokenSource.
func (f *FileToken) Token(context.Context) (string, error) {
	fh, err := os.Open(f.Path)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	defer func() { _ = fh.Close() }() // read only
	b, err := io.ReadAll(io.LimitReader(fh, api.MaxJobTokenBytes+1024))
	if err != nil {
		return "", fmt.Errorf("token file %s: %w", f.Path, err)
	}
	tok, err := checkToken(string(b), "token file "+f.Path)
	if err != nil {
		return "", err
	}
	if f.used.has(tok) {
		return "", ErrNoFreshToken
	}
	return tok, nil
}

// Used implements TokenSource.
func (f *FileToken) Used(tok string) { f.used.add(tok) }

// Refreshable implements TokenSource: the file may change.
func (f *FileToken) Refreshable() bool { return true }

func (f *FileToken) String() string { return "token file " + f.Path }

// EnvToken is a token from an environment variable, read once: it cannot
// be refreshed, so the run's identity ends with the rule's TTL.
type EnvToken struct {
	Var  string
	tok  string
	used usedSet
}

// NewEnvToken reads the variable now.
func NewEnvToken(name string) (*EnvToken, error) {
	tok, err := checkToken(os.Getenv(name), "environment variable "+name)
	if err != nil {
		return nil, err
	}
	return &EnvToken{Var: name, tok: tok}, nil
}

// Token implements TokenSource.
func (e *EnvToken) Token(context.Context) (string, error) {
	if e.used.has(e.tok) {
		return "", ErrNoFreshToken
	}
	return e.tok, nil
}

// Used implements TokenSource.
func (e *EnvToken) Used(tok string) { e.used.add(tok) }

// Refreshable implements TokenSource: an environment cannot change.
func (e *EnvToken) Refreshable() bool { return false }

func (e *EnvToken) String() string { return "environment variable " + e.Var }

// GitHub Actions' OIDC token request environment (a job with
// `permissions: id-token: write`).
const (
	GitHubRequestURLEnv   = "ACTIONS_ID_TOKEN_REQUEST_URL"
	GitHubRequestTokenEnv = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
)

// maxGitHubResponse bounds the token endpoint's answer: the JWT and a
// little JSON around it.
const maxGitHubResponse = api.MaxJobTokenBytes + 4096

// GitHubActions requests a fresh ID token from GitHub Actions' token
// endpoint for each join: GET $ACTIONS_ID_TOKEN_REQUEST_URL with
// &audience=<Audience>, authorized by $ACTIONS_ID_TOKEN_REQUEST_TOKEN,
// answered with {"value": "<jwt>"}. Only https is spoken, redirects are
// refused (the bearer token goes nowhere else), the answer is bounded and
// the request times out.
type GitHubActions struct {
	URL, RequestToken, Audience string
	// RootCAs verify the endpoint (nil: the system's); tests add theirs.
	RootCAs *x509.CertPool
	// Timeout bounds one request (0: 30 s).
	Timeout time.Duration

	once   sync.Once
	client *http.Client
}

// NewGitHubActions reads the request URL and token from the environment.
func NewGitHubActions(audience string, rootCAs *x509.CertPool) (*GitHubActions, error) {
	u, t := os.Getenv(GitHubRequestURLEnv), os.Getenv(GitHubRequestTokenEnv)
	if u == "" || t == "" {
		return nil, fmt.Errorf("--github-actions: %s and %s must be set: give the job `permissions: id-token: write`", GitHubRequestURLEnv, GitHubRequestTokenEnv)
	}
	g := &GitHubActions{URL: u, RequestToken: t, Audience: audience, RootCAs: rootCAs}
	if _, err := g.requestURL(); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *GitHubActions) requestURL() (string, error) {
	u, err := url.Parse(g.URL)
	if err != nil {
		return "", fmt.Errorf("%s: %w", GitHubRequestURLEnv, err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("%s: want an https URL, got scheme %q", GitHubRequestURLEnv, u.Scheme)
	}
	sep := "&"
	if u.RawQuery == "" {
		sep = "?"
	}
	return g.URL + sep + "audience=" + url.QueryEscape(g.Audience), nil
}

func (g *GitHubActions) httpClient() *http.Client {
	g.once.Do(func() {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.TLSClientConfig = &tls.Config{RootCAs: g.RootCAs, MinVersion: tls.VersionTLS12}
		tr.Proxy = http.ProxyFromEnvironment
		timeout := g.Timeout
		if timeout <= 0 {
			timeout = 30 * time.Second
		}
		g.client = &http.Client{Transport: tr, Timeout: timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return errors.New("redirect refused")
			}}
	})
	return g.client
}

// Token implements TokenSource: each call asks for a new token.
func (g *GitHubActions) Token(ctx context.Context) (string, error) {
	u, err := g.requestURL()
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "bearer "+g.RequestToken)
	req.Header.Set("Accept", "application/json")
	resp, err := g.httpClient().Do(req)
	if err != nil {
		return "", fmt.Errorf("GitHub Actions ID token request: %w", err)
	}
	defer func() { _ = resp.Body.Close() }() // read or abandoned: nothing to report
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GitHub Actions ID token request: %s", resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxGitHubResponse+1))
	if err != nil {
		return "", fmt.Errorf("GitHub Actions ID token request: %w", err)
	}
	if len(b) > maxGitHubResponse {
		return "", fmt.Errorf("GitHub Actions ID token request: answer longer than %d bytes", maxGitHubResponse)
	}
	var v struct {
		Value string `json:"value"`
	}
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&v); err != nil {
		return "", fmt.Errorf("GitHub Actions ID token request: answer is not the expected JSON: %w", err)
	}
	return checkToken(v.Value, "GitHub Actions ID token")
}

// Used implements TokenSource (every Token is a new token).
func (g *GitHubActions) Used(string) {}

// Refreshable implements TokenSource.
func (g *GitHubActions) Refreshable() bool { return true }

func (g *GitHubActions) String() string { return "GitHub Actions ID token" }
