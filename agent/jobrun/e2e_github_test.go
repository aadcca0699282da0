package jobrun_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/jobrun"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// --github-actions end to end: exec asks a stand-in for GitHub's token
// service (https, bearer request token) for an ID token with the trust
// domain's ID as audience, the default that the rule's preset expects
// too, and the run joins with it, runs its command and ends.
func TestExecGitHubActions(t *testing.T) {
	jc := newJobCluster(t, "jg", 600)
	var mu sync.Mutex
	var requests []string
	n := 0
	gh := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		requests = append(requests, r.Header.Get("Authorization")+" "+r.URL.Query().Get("audience")+" "+r.URL.Query().Get("api-version"))
		if r.Header.Get("Authorization") != "bearer gh-request-token" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		n++
		cl := jobruletest.GitHubClaims(jc.iss.URL(), r.URL.Query().Get("audience"), time.Now())
		cl["jti"] = fmt.Sprintf("gh-token-%d", n)
		_, _ = fmt.Fprintf(w, `{"count":1,"value":%q}`, jc.iss.Sign(t, cl))
	}))
	defer gh.Close()
	t.Setenv(jobrun.GitHubRequestURLEnv, gh.URL+"/idtoken?api-version=2.0")
	t.Setenv(jobrun.GitHubRequestTokenEnv, "gh-request-token")
	aud, err := jobrun.TrustDomainAudience(jc.c.Trust.RootPath)
	if err != nil || aud != jc.aud {
		t.Fatalf("default audience %q (%v), the rule's %q", aud, err, jc.aud)
	}
	roots := x509.NewCertPool()
	roots.AddCert(gh.Certificate())
	src, err := jobrun.NewGitHubActions(aud, roots)
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	code, err := jobrun.Run(context.Background(), jobrun.Options{Servers: jc.servers, RootCert: jc.c.Trust.RootPath, Rule: "gh", Token: src,
		Command: []string{"sh", "-c", `test -S "${SPIFFE_ENDPOINT_SOCKET#unix://}" && echo socket ok; exit 0`}, Stdout: &out,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil || code != 0 || out.String() != "socket ok\n" {
		t.Fatalf("exit %d, %v, output %q", code, err, out.String())
	}
	if len(requests) != 1 || requests[0] != "bearer gh-request-token "+jc.aud+" 2.0" {
		t.Fatalf("token requests %q", requests)
	}
	agents, err := jc.admin.AgentList(context.Background(), &api.Empty{})
	if err != nil || len(agents.Agents) != 0 {
		t.Fatalf("agents after the run: %+v %v", agents, err)
	}
}
