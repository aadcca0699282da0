package strictyaml

import (
	"strings"
	"testing"
)

// FuzzParseDuration: a duration is parsed or refused, never a panic, and a
// count of days or years is never negative after parsing (no wrap-around).
func FuzzParseDuration(f *testing.F) {
	for _, s := range []string{"90d", "1y", "36h", "1.5y", "292y", "293y", "-1d", "1h30m"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDuration(s)
		if err == nil && d < 0 && (strings.HasSuffix(s, "d") || strings.HasSuffix(s, "y")) {
			t.Fatalf("%q parsed as %v", s, d)
		}
	})
}
