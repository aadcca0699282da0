package agent_test

import (
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/agent"
)

// Validation lists every problem of a config at once, as sigild's does, so
// an operator fixes a file in one pass.
func TestConfigListsEveryProblem(t *testing.T) {
	const base = "root-cert: /etc/sigil/root.pem\ndata-dir: /var/lib/sigil-agent\n"
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"three distinct problems",
			"tpm: /dev/tpmrm0\n" + base + "workload-api:\n  socket: agent.sock\n  socket-mode: rwx\n",
			[]string{"servers is required", `workload-api.socket-mode "rwx"`, `workload-api.socket "agent.sock": must be an absolute path`}},
		{"missing fields and both join methods",
			"tpm: /dev/tpmrm0\njoin-token-file: /etc/sigil/token\n",
			[]string{"servers is required", "root-cert is required", "data-dir is required", "tpm, join-token-file: set exactly one"}},
		{"server order",
			"servers: [a:1]\nserver-order: round-robin\njoin-token-file: /t\n" + base,
			[]string{`server-order "round-robin": want random or listed`}},
		{"every output and the limits",
			"servers: [a:1]\njoin-token-file: /t\n" + base +
				"workload-api:\n  limits:\n    burst: -1\noutputs:\n  - dir: out\n    selectors: [unix:uid:1]\n  - dir: /o\n",
			[]string{"workload-api.limits", `output dir "out": must be an absolute path`, "output /o: needs selectors"}},
	} {
		c, err := agent.ParseConfig([]byte(tc.yaml))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		err = c.Validate()
		if err == nil {
			t.Fatalf("%s: accepted", tc.name)
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "invalid sigil-agent config:\n") {
			t.Errorf("%s: %q does not start with the config's name", tc.name, msg)
		}
		for _, w := range tc.want {
			if !strings.Contains(msg, w) {
				t.Errorf("%s: %q does not list %q", tc.name, msg, w)
			}
		}
		if n := strings.Count(msg, "\n  - "); n != len(tc.want) {
			t.Errorf("%s: %d problems listed, want %d:\n%s", tc.name, n, len(tc.want), msg)
		}
	}
	// Decoding problems come first and alone: a file that does not decode
	// is not validated.
	for in, want := range map[string]string{
		"servers: [a:1]\ncolour: blue\n":      "field colour not found",
		"servers: [a:1]\n---\ndata-dir: /x\n": "more than one YAML document",
		"":                                    "config is empty",
	} {
		if _, err := agent.ParseConfig([]byte(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}
