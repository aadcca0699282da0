package strictyaml

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Duration is a duration in a config file: a Go duration ("90s", "36h",
// "1h30m") or a whole number of days or years ("90d", "10y"; a year is
// 365 days).
type Duration struct{ time.Duration }

// UnmarshalYAML parses the node's value with ParseDuration.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	d.Duration = v
	return nil
}

// Units that Go durations lack.
var longUnits = []struct {
	suffix string
	unit   time.Duration
}{{"d", 24 * time.Hour}, {"y", 365 * 24 * time.Hour}}

// ParseDuration parses "8760h", "90d" or "10y". A count of days or years
// must be a positive whole number ("1.5y" is refused, not rounded), and a
// duration beyond what time.Duration holds (about 292 years) is refused
// rather than wrapped.
func ParseDuration(s string) (time.Duration, error) {
	for _, u := range longUnits {
		n, ok := strings.CutSuffix(s, u.suffix)
		if !ok {
			continue
		}
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v <= 0 {
			return 0, fmt.Errorf("duration %q: want a positive whole number before %q", s, u.suffix)
		}
		if v > math.MaxInt64/int64(u.unit) {
			return 0, fmt.Errorf("duration %q: longer than the longest duration, %v", s, time.Duration(math.MaxInt64))
		}
		return time.Duration(v) * u.unit, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("duration %q: %v (use e.g. 8760h, 90d, 1y)", s, err)
	}
	return d, nil
}
