package agent_test

import (
	"os"
	"testing"

	"github.com/sigil-appliance/sigil/agent"
)

// FuzzParseConfig: the agent's config is parsed and validated whole or
// refused, never a panic.
func FuzzParseConfig(f *testing.F) {
	b, err := os.ReadFile("../packaging/agent.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte("workload-api: {socket-mode: \"9\"}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if c, err := agent.ParseConfig(b); err == nil {
			_ = c.Validate() // refusing is fine: the property is no panic
		}
	})
}
