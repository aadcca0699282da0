package fleettest

import (
	"math"
	"os"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Process is one reading of what the whole process holds: the nodes and
// the simulated agents share it.
type Process struct {
	HeapInuse  uint64 // after two GCs: spans in use
	HeapAlloc  uint64 // live objects within them
	Goroutines int
	FDs        int
	// ServerHeap and ClientHeap split the live heap by the stacks that
	// allocated it (heap profile, see HeapSplit); OtherHeap is what
	// neither side's frames claim (or stacks cut at 32 frames).
	ServerHeap, ClientHeap, OtherHeap float64
	CPU                               time.Duration // user+system so far
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
	p.ServerHeap, p.ClientHeap, p.OtherHeap = HeapSplit()
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
// holds a client and a server descriptor in this one process. Beyond the
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
	t.Logf("open-file limit: wanted %d, the hard limit %d could not be raised (%v): room for about %d agents at 2 descriptors each",
		n, l.Max, err, (l.Max-256)/2)
}

// HeapSplit attributes the in-use heap to the appliance or the agents by
// the stacks in the heap profile, scaled for sampling as pprof does. Set
// runtime.MemProfileRate low (e.g. 4096) before anything is allocated for
// a split that adds up to the heap; at the default rate it is coarse.
func HeapSplit() (server, client, other float64) {
	n, _ := runtime.MemProfile(nil, false)
	recs := make([]runtime.MemProfileRecord, n+64)
	n, ok := runtime.MemProfile(recs, false)
	if !ok {
		return 0, 0, 0
	}
	rate := float64(runtime.MemProfileRate)
	for _, r := range recs[:n] {
		count, bytes := float64(r.InUseObjects()), float64(r.InUseBytes())
		if count == 0 || bytes == 0 {
			continue
		}
		if rate > 1 {
			bytes /= 1 - math.Exp(-bytes/count/rate)
		}
		switch side(r.Stack()) {
		case 1:
			server += bytes
		case 2:
			client += bytes
		default:
			other += bytes
		}
	}
	return server, client, other
}

// side is 1 for an allocation by the appliance (node, state, raft, the
// gRPC server transport), 2 by the simulated agents (this package, the
// gRPC client transport), 0 for neither. The node's own outgoing clients
// (forwarding to the leader) are the appliance's, so its frames are
// looked for first.
func side(stack []uintptr) int {
	marks := [][]string{1: {
		"github.com/sigil-appliance/sigil/appliance/node.",
		"github.com/sigil-appliance/sigil/appliance/state.",
		"github.com/sigil-appliance/sigil/raft",
		"github.com/hashicorp/raft",
		"google.golang.org/grpc.(*Server)",
		"google.golang.org/grpc/internal/transport.(*http2Server)",
		"google.golang.org/grpc/internal/transport.NewServerTransport",
		"google.golang.org/grpc.(*serverStream)",
	}, 2: {
		"github.com/sigil-appliance/sigil/appliance/fleettest.",
		"google.golang.org/grpc/internal/transport.(*http2Client)",
		"google.golang.org/grpc/internal/transport.NewHTTP2Client",
		"google.golang.org/grpc.(*ClientConn)",
		"google.golang.org/grpc.(*addrConn)",
		"google.golang.org/grpc.(*clientStream)",
		"google.golang.org/grpc.newClientStream",
		"google.golang.org/grpc.NewClient",
		"google.golang.org/grpc.(*ccBalancerWrapper)",
		"google.golang.org/grpc.(*ccResolverWrapper)",
	}}
	var fns []string
	frames := runtime.CallersFrames(stack)
	for {
		f, more := frames.Next()
		fns = append(fns, f.Function)
		if !more {
			break
		}
	}
	for s := 1; s <= 2; s++ {
		for _, fn := range fns {
			for _, m := range marks[s] {
				if strings.HasPrefix(fn, m) {
					return s
				}
			}
		}
	}
	return 0
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
