package logconfig

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestProblems(t *testing.T) {
	for _, tc := range []struct {
		c    Config
		want []string
	}{
		{Config{}, nil},
		{Config{Level: "DEBUG", Format: "text"}, nil},
		{Config{Level: "loud"}, []string{"log.level"}},
		{Config{Format: "xml"}, []string{"log.format"}},
		{Config{Level: "loud", Format: "xml"}, []string{"log.level", "log.format"}},
	} {
		got := tc.c.Problems()
		if len(got) != len(tc.want) {
			t.Fatalf("%+v: problems %q, want %q", tc.c, got, tc.want)
		}
		for i := range got {
			if !strings.HasPrefix(got[i], tc.want[i]+" ") {
				t.Fatalf("%+v: problem %q does not name %s", tc.c, got[i], tc.want[i])
			}
		}
	}
}

func TestNew(t *testing.T) {
	var b bytes.Buffer
	log := Config{Level: "warn"}.New(&b)
	log.Info("dropped")
	log.Warn("kept", "k", 1)
	var rec map[string]any
	if err := json.Unmarshal(b.Bytes(), &rec); err != nil || rec["msg"] != "kept" {
		t.Fatalf("json at warn: %v %q", err, b.String())
	}
	b.Reset()
	Config{Level: "debug", Format: "text"}.New(&b).Debug("hello", "k", "v")
	if !strings.Contains(b.String(), "level=DEBUG msg=hello k=v") {
		t.Fatalf("text at debug: %q", b.String())
	}
}
