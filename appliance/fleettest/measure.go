package fleettest

import (
	"math"
	"os"
	"runtime"
	"sort"
	"syscall"
	"testing"
	"time"
)

// Process is one reading of what the test's process holds: the simulated
// agents' side (the nodes are processes of their own).
type Process struct {
	HeapInuse  uint64 // after two GCs: spans in use
	HeapAlloc  uint64 // live objects within them
	Goroutines int
	FDs        int
	CPU        time.Duration // user+system so far
}

// Read measures the process. Two GCs: the heap profile reports the state
// as of the last completed cycle, and finalizers freed by the first are
// collected by the second.
func Read(t testing.TB) Process {
	t.Helper()
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	p := Process{HeapInuse: ms.HeapInuse, HeapAlloc: ms.HeapAlloc, Goroutines: runtime.NumGoroutine(), FDs: OpenFDs(t)}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	p.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	return p
}

// OpenFDs counts the process's open file descriptors.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// RaiseFDLimit raises RLIMIT_NOFILE towards n: every simulated agent
// holds a descriptor in this process, and the nodes (which inherit the
// limit) one each for the agents they serve. Beyond the
// hard limit it needs CAP_SYS_RESOURCE (being root in a container is not
// enough); without it the soft limit goes up to the hard one and the run
// goes on, logging how many agents that leaves room for.
func RaiseFDLimit(t testing.TB, n uint64) {
	t.Helper()
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		t.Fatal(err)
	}
	if l.Cur >= n {
		return
	}
	err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: max(l.Max, n)})
	if err == nil {
		t.Logf("open-file limit raised from %d (hard %d) to %d", l.Cur, l.Max, n)
		return
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: l.Max, Max: l.Max}); err != nil {
		t.Fatalf("open-file limit %d (hard %d): %v", l.Cur, l.Max, err)
	}
	t.Logf("open-file limit: wanted %d, the hard limit %d could not be raised (%v): room for about %d agents",
		n, l.Max, err, l.Max*4/5-256)
}

// Quantile returns the q-quantile of sorted durations (nearest rank).
func Quantile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// Ms is a duration in milliseconds, for ReportMetric.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// MaxShare1s is the largest share of times that falls in any one-second
// window (sliding, not aligned to whole seconds).
func MaxShare1s(times []time.Time) float64 {
	if len(times) == 0 {
		return 0
	}
	ts := append([]time.Time(nil), times...)
	sort.Slice(ts, func(i, j int) bool { return ts[i].Before(ts[j]) })
	best, j := 0, 0
	for i := range ts {
		for ts[i].Sub(ts[j]) >= time.Second {
			j++
		}
		best = max(best, i-j+1)
	}
	return float64(best) / float64(len(ts))
}
