package callerid_test

import (
	"net"
	"path/filepath"
	"testing"

	"github.com/sigil-appliance/sigil/agent/callerid"
)

// BenchmarkCallerVerify is what the Workload API adds to each request
// and each pushed stream message to catch a caller that exec'd or
// exited: a pidfd poll, a stat of /proc/PID/exe, another poll.
func BenchmarkCallerVerify(b *testing.B) {
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = l.Close() }() // the benchmark is over: closing only stops accepting
	got := serve(b, l)
	c, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = c.Close() }() // nothing was written on it
	caller := <-got
	if caller == nil {
		b.Fatal("no caller")
	}
	b.Run("Verify", func(b *testing.B) {
		for b.Loop() {
			if err := caller.Verify(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("VerifyOnce-same-key", func(b *testing.B) {
		for b.Loop() {
			if err := caller.VerifyOnce(b); err != nil {
				b.Fatal(err)
			}
		}
	})
	_ = callerid.ErrExecChanged
}
