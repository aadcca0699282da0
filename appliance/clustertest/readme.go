package clustertest

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

var metricName = regexp.MustCompile("`([a-z_]+)`")

// ReadmeMetrics returns the metric names that README's "Operations: what
// to watch" section lists in the first column of the table under the
// heading "### <table>" (sigild or sigil-agent) and that keep accepts;
// readme is the README's path from the calling test's package.
func ReadmeMetrics(t testing.TB, readme, table string, keep func(name string) bool) []string {
	t.Helper()
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	_, ops, ok := strings.Cut(string(b), "## Operations: what to watch")
	_, rows, ok2 := strings.Cut(ops, "### "+table)
	if !ok || !ok2 {
		t.Fatalf(`README has no "Operations: what to watch" section with a %s table`, table)
	}
	rows, _, _ = strings.Cut(rows, "\n#")
	var names []string
	for _, l := range strings.Split(rows, "\n") {
		cells := strings.Split(l, "|")
		if len(cells) < 3 {
			continue
		}
		for _, n := range metricName.FindAllStringSubmatch(cells[1], -1) {
			if keep(n[1]) {
				names = append(names, n[1])
			}
		}
	}
	return names
}
