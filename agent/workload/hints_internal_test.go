package workload

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// Of entries sharing a hint the first (the cache's order) stays, empty
// hints are never duplicates, a list without duplicates is returned as
// it is, and the drop is logged once per appliance view, not per call.
func TestUniqueHints(t *testing.T) {
	var logs bytes.Buffer
	s := New(nil, nil, Options{Log: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	es := []api.Entry{{ID: "a", Hint: "db"}, {ID: "b"}, {ID: "c", Hint: "db"}, {ID: "d"}, {ID: "e", Hint: "web"}, {ID: "f", Hint: "web"}}
	ids := func(es []api.Entry) string {
		var out []string
		for _, e := range es {
			out = append(out, e.ID)
		}
		return strings.Join(out, ",")
	}
	snap := &cache.Snapshot{Revision: 7}
	for range 3 {
		if got := ids(s.uniqueHints(snap, es)); got != "a,b,d,e" {
			t.Fatalf("kept %s, want a,b,d,e", got)
		}
	}
	if n := strings.Count(logs.String(), "entry left out"); n != 2 {
		t.Fatalf("%d log lines for 2 dropped entries over 3 calls:\n%s", n, logs.String())
	}
	s.uniqueHints(&cache.Snapshot{Revision: 8}, es)
	if n := strings.Count(logs.String(), "entry left out"); n != 4 {
		t.Fatalf("a new appliance view logs again: %d lines", n)
	}
	plain := es[:2]
	if got := s.uniqueHints(snap, plain); &got[0] != &plain[0] || len(got) != len(plain) {
		t.Fatal("a list without duplicates was copied or changed")
	}
	if got := ids(s.uniqueHints(snap, es)); got != "a,b,d,e" || ids(es) != "a,b,c,d,e,f" {
		t.Fatalf("the caller's list changed: %s", ids(es))
	}
}
