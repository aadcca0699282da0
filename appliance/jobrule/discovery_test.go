package jobrule_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/jobrule"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// clock is a settable clock for Discovery's refresh limits.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestDiscoveryKidMissRefetchesOnce(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	clk := &clock{t: now}
	var fetchErrs atomic.Int32
	keys := discovery(t, iss, jobrule.DiscoveryOptions{Now: clk.Now, OnFetch: func(err error) {
		if err != nil {
			fetchErrs.Add(1)
		}
	}})
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	mustVerify(t, s, keys, iss.Sign(t, c))
	mustVerify(t, s, keys, iss.Sign(t, c))
	if n := iss.Fetches(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}

	// The issuer rotates: the new kid is a miss, which refetches once.
	clk.Add(11 * time.Second)
	iss.RotateKey(t)
	mustVerify(t, s, keys, iss.Sign(t, c))
	if n := iss.Fetches(); n != 2 {
		t.Fatalf("%d fetches after a rotation, want 2", n)
	}

	// Unknown kids within MinRefresh of that fetch: no fetch at all.
	for i := range 5 {
		forger := jobruletest.NewKey(t, "ES256", fmt.Sprintf("ghost-%d", i))
		refused(t, s, keys, jobruletest.SignWithKey(t, forger, c), jobrule.ReasonUnknownKey, "ghost")
	}
	if n := iss.Fetches(); n != 2 {
		t.Fatalf("%d fetches after unknown kids within MinRefresh, want 2", n)
	}
	// Past MinRefresh: one more.
	clk.Add(10 * time.Second)
	forger := jobruletest.NewKey(t, "ES256", "ghost")
	refused(t, s, keys, jobruletest.SignWithKey(t, forger, c), jobrule.ReasonUnknownKey, "ghost")
	if n := iss.Fetches(); n != 3 {
		t.Fatalf("%d fetches, want 3", n)
	}
	// Known kids never fetch while the keys are younger than MaxAge...
	clk.Add(30 * time.Minute)
	mustVerify(t, s, keys, iss.Sign(t, c))
	if n := iss.Fetches(); n != 3 {
		t.Fatalf("%d fetches, want 3", n)
	}
	// ...and always once after.
	clk.Add(time.Hour)
	mustVerify(t, s, keys, iss.Sign(t, c))
	if n := iss.Fetches(); n != 4 {
		t.Fatalf("%d fetches after MaxAge, want 4", n)
	}
	if fetchErrs.Load() != 0 {
		t.Errorf("%d failed fetches", fetchErrs.Load())
	}
}

func TestDiscoveryConcurrentCallersShareAFetch(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	keys := discovery(t, iss, jobrule.DiscoveryOptions{})
	kid := iss.Current("RS256").KID
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for range 16 {
		wg.Go(func() {
			if _, err := keys.Key(context.Background(), kid); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := iss.Fetches(); n != 1 {
		t.Errorf("%d fetches for 16 concurrent callers, want 1", n)
	}
}

// TestDiscoveryRefused: a broken or hostile issuer is the appliance's
// problem (keys-unavailable), reported with the URL and what is wrong.
func TestDiscoveryRefused(t *testing.T) {
	for _, tc := range []struct {
		name       string
		conf, jwks func(iss *jobruletest.Issuer) []byte
		msg        string
	}{
		{name: "wrong issuer in the document", conf: func(iss *jobruletest.Issuer) []byte {
			return doc("https://token.actions.githubusercontent.com", iss.JWKSURL())
		}, msg: `names issuer "https://token.actions.githubusercontent.com"`},
		{name: "issuer with a trailing slash", conf: func(iss *jobruletest.Issuer) []byte {
			return doc(iss.URL()+"/", iss.JWKSURL())
		}, msg: "names issuer"},
		{name: "http jwks_uri", conf: func(iss *jobruletest.Issuer) []byte {
			return doc(iss.URL(), strings.Replace(iss.JWKSURL(), "https:", "http:", 1))
		}, msg: "is not an https URL"},
		{name: "no jwks_uri", conf: func(iss *jobruletest.Issuer) []byte {
			return doc(iss.URL(), "")
		}, msg: "is not an https URL"},
		{name: "garbage document", conf: func(*jobruletest.Issuer) []byte { return []byte("<html>oops") }, msg: "not an OpenID configuration"},
		{name: "oversized document", conf: func(*jobruletest.Issuer) []byte {
			return []byte(`{"x":"` + strings.Repeat("a", jobrule.MaxDiscoveryBytes) + `"}`)
		}, msg: "larger than 256 KiB"},
		{name: "oversized JWKS", jwks: func(iss *jobruletest.Issuer) []byte {
			return []byte(`{"keys":[],"pad":"` + strings.Repeat("a", jobrule.MaxDiscoveryBytes) + `"}`)
		}, msg: "/keys: response larger than 256 KiB"},
		{name: "garbage JWKS", jwks: func(*jobruletest.Issuer) []byte { return []byte(`{"keys": 7`) }, msg: "/keys: not a JSON key set"},
		{name: "empty JWKS", jwks: func(*jobruletest.Issuer) []byte { return []byte(`{"keys": []}`) }, msg: "/keys: no keys"},
		{name: "JWKS without usable keys", jwks: func(*jobruletest.Issuer) []byte {
			return []byte(`{"keys": [{"kty":"oct","kid":"x"}, {"kty":"RSA","kid":"y","n":"AQAB","e":"AQAB"}, {"kty":"OKP","kid":"z","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}`)
		}, msg: "no RSA or EC P-256 signing key"},
		{name: "secret key in the JWKS", jwks: func(*jobruletest.Issuer) []byte {
			return []byte(`{"keys": [{"kty":"oct","kid":"x","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}`)
		}, msg: "private or secret key"},
		{name: "private key in the JWKS", jwks: func(iss *jobruletest.Issuer) []byte { return privateJWKS(t, iss) }, msg: "private"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			iss := jobruletest.NewIssuer(t)
			if tc.conf != nil {
				iss.ServeConfig(tc.conf(iss))
			}
			if tc.jwks != nil {
				iss.ServeJWKS(tc.jwks(iss))
			}
			s := rule(t, iss, jobrule.PresetGitHubActions)
			var fetched []error
			keys := discovery(t, iss, jobrule.DiscoveryOptions{OnFetch: func(err error) { fetched = append(fetched, err) }})
			msg := refused(t, s, keys, iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now)), jobrule.ReasonKeysUnavailable, tc.msg)
			if !strings.Contains(msg, iss.URL()) {
				t.Errorf("message %q does not name the URL", msg)
			}
			if len(fetched) != 1 || fetched[0] == nil {
				t.Errorf("OnFetch saw %v", fetched)
			}
			// A failure is remembered for MinRefresh, not retried per token.
			refused(t, s, keys, iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now)), jobrule.ReasonKeysUnavailable, tc.msg)
			if len(fetched) != 1 {
				t.Errorf("%d fetches for two tokens within MinRefresh", len(fetched))
			}
		})
	}
}

func doc(issuer, jwksURI string) []byte {
	b, _ := json.Marshal(map[string]string{"issuer": issuer, "jwks_uri": jwksURI})
	return b
}

// privateJWKS is the issuer's set with its RSA key's private half.
func privateJWKS(t *testing.T, iss *jobruletest.Issuer) []byte {
	t.Helper()
	var set map[string][]map[string]any
	if err := json.Unmarshal(iss.JWKS(), &set); err != nil {
		t.Fatal(err)
	}
	set["keys"][0]["d"] = "AQAB"
	b, _ := json.Marshal(set)
	return b
}

func TestDiscoveryTLS(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	tok := iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now))
	// The system's roots do not know the test server.
	refused(t, s, jobrule.NewDiscovery(iss.URL(), nil, jobrule.DiscoveryOptions{}), tok, jobrule.ReasonKeysUnavailable, "certificate")
	// KeysFor takes the rule's IssuerCA.
	keys, err := jobrule.KeysFor(s, jobrule.DiscoveryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	mustVerify(t, s, keys, tok)
}

// TestAttackRedirectToHTTP: the JWKS is never fetched over plain HTTP,
// even by a redirect from the issuer's https URL.
func TestAttackRedirectToHTTP(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write(iss.JWKS())
	}))
	t.Cleanup(plain.Close)
	iss.Handle("/redirect", http.RedirectHandler(plain.URL+"/keys", http.StatusFound))
	iss.ServeConfig(doc(iss.URL(), iss.URL()+"/redirect"))
	s := rule(t, iss, jobrule.PresetGitHubActions)
	keys := discovery(t, iss, jobrule.DiscoveryOptions{})
	refused(t, s, keys, iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now)), jobrule.ReasonKeysUnavailable, "is not https")

	// An https redirect within the issuer is followed.
	iss.Handle("/moved", http.RedirectHandler(iss.JWKSURL(), http.StatusMovedPermanently))
	iss.ServeConfig(doc(iss.URL(), iss.URL()+"/moved"))
	keys = discovery(t, iss, jobrule.DiscoveryOptions{})
	mustVerify(t, s, keys, iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now)))
}

func TestDiscoveryCallerGivesUp(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	keys := discovery(t, iss, jobrule.DiscoveryOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := keys.Key(ctx, iss.Current("RS256").KID)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want canceled", err)
	}
	// The fetch went on for the next caller.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := keys.Key(context.Background(), iss.Current("RS256").KID); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := iss.Fetches(); n != 1 {
		t.Errorf("%d fetches, want 1", n)
	}
}
