package agent_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// testReadmeAgentMetrics: every sigil-agent metric README's "Operations:
// what to watch" table names is in a scrape of the agent's /metrics (on
// its health listener).
func testReadmeAgentMetrics(t *testing.T, healthAddr string) {
	t.Helper()
	names := clustertest.ReadmeMetrics(t, "../README.md", "sigil-agent", func(n string) bool { return strings.HasPrefix(n, "sigil_agent_") })
	if len(names) < 15 {
		t.Fatalf("only %d agent metrics found in README's table: %v", len(names), names)
	}
	resp, err := http.Get("http://" + healthAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	scraped := map[string]bool{}
	for _, l := range strings.Split(string(body), "\n") {
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		name, _, _ := strings.Cut(l, " ")
		name, _, _ = strings.Cut(name, "{")
		scraped[name] = true
	}
	for _, n := range names {
		if !scraped[n] {
			t.Errorf("README names %s; the agent's /metrics has no such series", n)
		}
	}
}
