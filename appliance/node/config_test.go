package node

import (
	"strings"
	"testing"
)

func TestConfigParsing(t *testing.T) {
	// The shipped example decodes strictly; only the files it names (which
	// exist on a configured node) are missing here.
	_, err := LoadConfig("../../packaging/sigild/sigild.yaml")
	if err == nil || !strings.Contains(err.Error(), "invalid sigild config") {
		t.Fatalf("example config: %v", err)
	}
	for _, line := range strings.Split(err.Error(), "\n")[1:] {
		if !strings.Contains(line, "no such file") {
			t.Errorf("example config problem beyond missing files: %s", line)
		}
	}
	for _, tc := range []struct{ yaml, want string }{
		{"node-id: n1\ncolour: blue\n", "field colour not found"},
		{"node-id: Node_1\n", "node-id must match"},
		{"node-id: n1\ntrust-domain: example.org\n---\nnode-id: n2\n", "more than one YAML document"},
		{"node-id: n1\nissuing-key: \"pkcs11:token=t;object=k?module-path=/x.so&pin-value=1234\"\n", "pin-value is not allowed"},
		{"node-id: n1\ncluster:\n  bootstrap: true\n  join: [\"a:1\"]\n", "sets both bootstrap and join"},
		{"node-id: n1\nlog:\n  level: loud\n", "log.level"},
		{"node-id: n1\naudit:\n  refusal-summary-interval: 10ms\n", "audit.refusal-summary-interval must be between"},
		{"node-id: n1\naudit:\n  refusal-summary-interval: 2h\n", "audit.refusal-summary-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoint-every: -5\n", "audit.checkpoint-every must be between"},
		{"node-id: n1\naudit:\n  checkpoint-every: 20000000\n", "audit.checkpoint-every must be between"},
		{"node-id: n1\naudit:\n  checkpoint-interval: 500ms\n", "audit.checkpoint-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoint-interval: 48h\n", "audit.checkpoint-interval must be between"},
		{"node-id: n1\naudit:\n  checkpoints: 5\n", "field checkpoints not found"},
	} {
		_, err := ParseConfig([]byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.yaml, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "1234") {
			t.Errorf("error echoes a PIN: %v", err)
		}
	}
}
