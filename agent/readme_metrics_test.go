package agent_test

import (
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
)

// testReadmeAgentMetrics: every sigil-agent metric README's "Operations:
// what to watch" table names is in a scrape of the agent's /metrics (on
// its health listener).
func testReadmeAgentMetrics(t *testing.T, healthAddr string) {
	t.Helper()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, ops, ok := strings.Cut(string(readme), "## Operations: what to watch")
	_, table, ok2 := strings.Cut(ops, "### sigil-agent")
	if !ok || !ok2 {
		t.Fatal(`README has no "Operations: what to watch" section with a sigil-agent table`)
	}
	table, _, _ = strings.Cut(table, "\n#")
	var names []string
	for _, l := range strings.Split(table, "\n") {
		cells := strings.Split(l, "|")
		if len(cells) < 3 {
			continue
		}
		for _, n := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(cells[1], -1) {
			if strings.HasPrefix(n[1], "sigil_agent_") {
				names = append(names, n[1])
			}
		}
	}
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
