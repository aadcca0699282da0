package agent

import (
	"testing"
	"time"
)

// Failed renewals back off (1 s doubling to 30 s, jittered down to half)
// and never wait past a quarter of the SVID's remaining life, nor less
// than a second.
func TestRetryWait(t *testing.T) {
	for _, c := range []struct {
		failures int
		left     time.Duration
		lo, hi   time.Duration
	}{
		{1, time.Hour, time.Second, time.Second},
		{2, time.Hour, time.Second, 2 * time.Second},
		{4, time.Hour, 4 * time.Second, 8 * time.Second},
		{20, time.Hour, 15 * time.Second, 30 * time.Second},
		{20, 40 * time.Second, time.Second, 10 * time.Second},
		{20, 0, time.Second, time.Second},
	} {
		for i := 0; i < 200; i++ {
			if d := retryWait(c.failures, c.left); d < c.lo || d > c.hi {
				t.Fatalf("retryWait(%d, %v) = %v, want %v..%v", c.failures, c.left, d, c.lo, c.hi)
			}
		}
	}
}
