package raft

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The library's lines arrive as slog records at their own level, their
// key/values as attributes, no key twice, and a repeated line is logged
// once per window with the count of those left out.
func TestHCLogAdapter(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", "node-1", "component", "raft")
	hl := newHCLogger(log)
	now := time.Unix(1000, 0)
	// newHCLogger's own sink, and one built the same way on a clock the
	// test moves, for the repeats.
	il := hclog.NewInterceptLogger(&hclog.LoggerOptions{Name: "raft", Level: hclog.Info, Output: &bytes.Buffer{}})
	s := &hclogSink{log: log, now: func() time.Time { return now }, seen: map[repeatKey]*repeatTally{}}
	il.RegisterSink(s)

	hl.Info("entering follower state", "follower", "node-1", "leader-id", "node-2", "node", "x")
	hl.Debug("debug line", "n", 1)
	for i := 0; i < 50; i++ {
		il.Error("failed to heartbeat to", "peer", "10.0.0.2:7000", "backoff time", 20*time.Millisecond, "error", errors.New("dial tcp: connection refused"))
	}
	il.Error("failed to heartbeat to", "peer", "10.0.0.3:7000", "error", errors.New("dial tcp: connection refused"))
	now = now.Add(repeatWindow)
	il.Error("failed to heartbeat to", "peer", "10.0.0.2:7000", "error", errors.New("dial tcp: connection refused"))

	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		// A duplicate key shows as a line whose key count differs from
		// its decoded map's.
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("%s: %v", l, err)
		}
		dec := json.NewDecoder(strings.NewReader(l))
		keys := map[string]int{}
		depth := 0
		for {
			tok, err := dec.Token()
			if err != nil {
				break
			}
			switch v := tok.(type) {
			case json.Delim:
				if v == '{' {
					depth++
				} else if v == '}' {
					depth--
				}
			case string:
				if depth == 1 && dec.More() {
					keys[v]++
					if _, err := dec.Token(); err != nil {
						t.Fatal(err)
					}
				}
			}
		}
		for k, n := range keys {
			if n > 1 {
				t.Fatalf("key %q %d times in %s", k, n, l)
			}
		}
		lines = append(lines, m)
	}
	if len(lines) != 5 {
		t.Fatalf("%d lines, want 5 (info, debug, two first heartbeat failures, one summary):\n%s", len(lines), buf.String())
	}
	if l := lines[0]; l["level"] != "INFO" || l["leader-id"] != "node-2" || l["raft_node"] != "x" || l["node"] != "node-1" {
		t.Fatalf("info line: %v", l)
	}
	if l := lines[1]; l["level"] != "DEBUG" || l["n"] != float64(1) {
		t.Fatalf("debug line: %v", l)
	}
	if l := lines[2]; l["level"] != "ERROR" || l["msg"] != "failed to heartbeat to" || l["error"] != "dial tcp: connection refused" || l["backoff time"] != "20ms" || l["repeated"] != nil {
		t.Fatalf("first failure: %v", l)
	}
	if l := lines[3]; l["peer"] != "10.0.0.3:7000" {
		t.Fatalf("another peer's failure is its own: %v", l)
	}
	if l := lines[4]; l["peer"] != "10.0.0.2:7000" || l["repeated"] != float64(49) {
		t.Fatalf("summary after the window: %v", l)
	}
}
