package cache

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// Each appliance view the agent applies is logged at debug, with its
// revision: an agent at the default level (info) writes no line per
// revision.
func TestViewAppliedLoggedAtDebug(t *testing.T) {
	p := newCRLTestPKI(t)
	update := &api.SyncUpdate{Revision: 42, SPIFFE: p.spiffe, Bundle: api.Bundle{TrustDomain: "example.org", Sequence: 3},
		Entries: []api.Entry{{ID: "e1", SPIFFEID: "spiffe://example.org/a", Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}}}
	for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo} {
		var logs bytes.Buffer
		c := New(nil, Options{Log: slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: level}))})
		if err := c.apply(update); err != nil {
			t.Fatal(err)
		}
		var applied []map[string]any
		for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(l), &rec) == nil && rec["msg"] == "appliance view applied" {
				applied = append(applied, rec)
			}
		}
		if level == slog.LevelInfo {
			if len(applied) != 0 {
				t.Fatalf("at info, the view was logged: %v", applied)
			}
			continue
		}
		if len(applied) != 1 {
			t.Fatalf("at debug, %d view lines:\n%s", len(applied), logs.String())
		}
		r := applied[0]
		if r["level"] != "DEBUG" || r["revision"] != float64(42) || r["entries"] != float64(1) || r["bundle_sequence"] != float64(3) {
			t.Fatalf("view line: %v", r)
		}
	}
}
