package ctl

import (
	"bufio"
	"bytes"
	"regexp"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// An entry stored before the appliance enforced the selector rules still
// loads; entry show says that no workload can match it.
func TestPrintEntryWarnsOfLegacySelectors(t *testing.T) {
	show := func(sel ...api.Selector) string {
		var b bytes.Buffer
		w := bufio.NewWriter(&b)
		printEntry(w, &api.Entry{ID: "e1", Selectors: sel, EffectiveX509TTL: 3600, EffectiveJWTTTL: 300})
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		return b.String()
	}
	if out := show(api.Selector{Type: "unix", Value: "uid:1000"}); strings.Contains(out, "warning") || !strings.Contains(out, "1h (default)") {
		t.Errorf("a valid entry:\n%s", out)
	}
	// The column is as wide as the longest field name.
	if out := show(api.Selector{Type: "unix", Value: "uid:abc"}); !regexp.MustCompile(`warning\s+no workload can match this entry: selector "unix:uid:abc": "abc" is not a decimal id`).MatchString(out) {
		t.Errorf("an entry with a selector no agent produces:\n%s", out)
	}
}
