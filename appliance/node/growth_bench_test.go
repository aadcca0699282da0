package node_test

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// State growth: the bbolt-backed state machine must keep heap flat as the
// audit log grows (records live on disk), and a raft snapshot of a large
// state (a bbolt read transaction streamed by Persist while commands go on
// applying) must not stall issuance.
const (
	growthSmall    = 10_000
	growthLarge    = 1_000_000
	growthAppliers = 4
	// stallCallers issue one X.509-SVID per request, as in
	// BenchmarkX509Issuance's agent-api-batch-1.
	stallCallers = 4
	// stallWindow is how long issuance is timed with no snapshot running
	// (longer if it has fewer than stallSamples requests: a loaded
	// machine); the during-snapshot window adds snapshots until it has at
	// least as much snapshot time (at most stallMaxSnaps snapshots).
	stallWindow   = 4 * time.Second
	stallSamples  = 600
	stallMaxSnaps = 4
	mib           = 1 << 20
)

// growth is one cluster filled once and shared by the sub-benchmarks (a
// sub-benchmark body may be run more than once: the heavy parts are not).
type growth struct {
	ic      *issuer
	web     api.Entry
	td      string
	issueAt string // node whose agent API the callers use (the first leader)
	clients []*api.AgentClient
	csrs    [][]byte

	filled  bool
	fillErr error
	heap    map[string]float64 // metrics of the fill, by unit

	stalled bool
	stall   map[string]float64
}

// BenchmarkStateGrowth: heap per node after 10,000 and after 1,000,000
// audit records (x-heap-growth: the ratio, target <= 1.5), and p99
// X.509-SVID issuance latency while a raft snapshot of that state is being
// written, against p99 right before with no snapshot
// (x-snapshot-stall-ratio, target <= 2).
func BenchmarkStateGrowth(b *testing.B) {
	// Retention would start pruning (and exporting segments) at 1,000,000
	// records, in whichever window it falls: off here, so the windows
	// differ only by the snapshot.
	ic := newIssuerWith(b, "bg", func(cfg *node.Config) { cfg.Audit.Retain.Records = 100_000_000 })
	web := ic.entry(b, "spiffe://example.org/web", agentID)
	leader := ic.c.WaitLeader(30 * time.Second)
	g := &growth{ic: ic, web: web, td: ic.tr.TrustDomain.Name(), issueAt: leader}
	// The callers' connections exist for both heap measurements, so they
	// are not counted as growth.
	for i := 0; i < stallCallers; i++ {
		g.clients = append(g.clients, ic.agent(b, leader))
	}
	for i := 0; i < 256; i++ {
		g.csrs = append(g.csrs, csrFor(b, ""))
	}
	b.Run("1M-records", func(b *testing.B) {
		g.fill(b)
		for u, v := range g.heap {
			b.ReportMetric(v, u)
		}
	})
	b.Run("snapshot-1M", func(b *testing.B) {
		g.fill(b)
		if !g.stalled {
			g.stalled = true
			g.stall = g.measureStall(b)
		}
		for u, v := range g.stall {
			b.ReportMetric(v, u)
		}
	})
}

// fill commits audit records up to growthSmall, measures the heap, goes on
// to growthLarge and measures again. It runs once.
func (g *growth) fill(b *testing.B) {
	if g.filled {
		if g.fillErr != nil {
			b.Fatal(g.fillErr)
		}
		return
	}
	g.filled = true
	g.fillErr = errors.New("the fill failed in an earlier sub-benchmark")
	c := g.ic.c

	// Warm up the issuance path (connections, HSM sessions, batcher) so
	// the first heap figure is of a node that has served.
	lat, err := g.issue(200, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("warm-up: %d SVIDs through %s's agent API", len(lat), g.issueAt)

	fill1, n1 := g.commitTo(b, growthSmall)
	g.waitAllApplied(b)
	heapSmall := heapPerNode(b, "after ~10k records")
	profileWrite(b, "heap", "heap-10k")

	stopCPU := profileCPU(b, "cpu-fill")
	fillCPU := readCPU()
	fill2, n2 := g.commitTo(b, growthLarge)
	catchUp := g.waitAllApplied(b)
	b.Logf("CPU while committing 10k -> 1M: %s", fillCPU.since())
	stopCPU()
	heapLarge := heapPerNode(b, "after ~1M records")
	profileWrite(b, "heap", "heap-1M")

	var size float64
	for _, id := range c.Running() {
		dir := c.ConfigOf(id).DataDir
		st, err := os.Stat(filepath.Join(dir, "state", "state.db"))
		if err != nil {
			b.Fatal(err)
		}
		size += float64(st.Size())
		seq, _ := c.Node(id).State().AuditHead()
		b.Logf("%s: state.db %.0f MiB, raft dir %.0f MiB, audit head %d, applied index %d",
			id, float64(st.Size())/mib, float64(dirSize(filepath.Join(dir, "raft")))/mib, seq, c.Node(id).State().AppliedIndex())
	}
	size /= float64(len(c.Running()))
	commit := fill1 + fill2
	b.Logf("committed %d records in %v (%.0f records/s); followers caught up %v after the last commit",
		n1+n2, commit.Round(time.Millisecond), float64(n1+n2)/commit.Seconds(), catchUp.Round(time.Millisecond))
	g.heap = map[string]float64{
		"heap-10k-MiB":  heapSmall,
		"heap-1M-MiB":   heapLarge,
		"x-heap-growth": heapLarge / heapSmall,
		"commit-1M-s":   commit.Seconds(),
		"state-MiB":     size / mib,
	}
	g.fillErr = nil
}

// commitTo commits "bench.record" audit events through the leader's own
// raft (as the leader's node actor) until the audit head reaches target;
// it returns the time the commits took and how many records it added.
func (g *growth) commitTo(b *testing.B, target uint64) (time.Duration, int) {
	c := g.ic.c
	leader := c.WaitLeader(30 * time.Second)
	n := c.Node(leader)
	seq, _ := n.State().AuditHead()
	if seq >= target {
		return 0, 0
	}
	term := n.Raft().Status(context.Background()).Term
	logFrom := len(c.Log.String())
	defer func() {
		// Each command adds exactly its events; checkpoints add about one
		// record per 10,000. More means commands were applied twice.
		after, _ := n.State().AuditHead()
		if extra := int64(after-seq) - int64(target-seq); extra > int64(target-seq)/5000+16 {
			b.Logf("warning: the audit head moved by %d for %d records committed (%d extra): commands applied more than once?", after-seq, target-seq, extra)
		}
		now := c.WaitLeader(30 * time.Second)
		if t := c.Node(now).Raft().Status(context.Background()).Term; now != leader || t != term {
			b.Logf("warning: leadership changed while committing records: %s in term %d, now %s in term %d; raft said: %s",
				leader, term, now, t, raftWarnings(c.Log.String(), logFrom))
		}
	}()
	need := int(target - seq)
	actor := "spiffe://" + g.td + "/sigil/node/" + leader
	var next atomic.Int64 // records handed out
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < growthAppliers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := mrand.New(mrand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			for {
				k := int(next.Add(state.MaxEventsPerCommand))
				count := min(state.MaxEventsPerCommand, need-(k-state.MaxEventsPerCommand))
				if count <= 0 {
					return
				}
				events := make([]state.AuditEvent, count)
				now := time.Now()
				for i := range events {
					events[i] = benchRecord(rng, g.td, leader, now)
				}
				cmd, err := state.NewCommand(state.CmdAudit, actor, now, state.AuditAppend{Events: events})
				if err == nil {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					_, err = n.Raft().Apply(ctx, cmd)
					cancel()
				}
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
			}
		}(w)
	}
	wg.Wait()
	took := time.Since(start)
	if firstErr != nil {
		b.Fatalf("committing audit records: %v", firstErr)
	}
	return took, need
}

// benchRecord is an audit event the size of an X.509 issuance record: a
// workload SPIFFE ID and six detail fields of the lengths issuance writes
// (a 128-bit serial, the agent, the entry, the node, the expiry, a trace).
func benchRecord(rng *mrand.Rand, td, node string, now time.Time) state.AuditEvent {
	var serial [16]byte
	var trace [16]byte
	for i := 0; i < 16; i += 8 {
		v := rng.Uint64()
		for j := 0; j < 8; j++ {
			serial[i+j] = byte(v >> (8 * j))
		}
		v = rng.Uint64()
		for j := 0; j < 8; j++ {
			trace[i+j] = byte(v >> (8 * j))
		}
	}
	w := rng.IntN(5000)
	return state.AuditEvent{Action: "bench.record", Target: fmt.Sprintf("spiffe://%s/ns/prod/sa/svc-%04d", td, w),
		Detail: map[string]string{
			"serial":  hex.EncodeToString(serial[:]),
			"agent":   agentID,
			"entry":   fmt.Sprintf("5f0c%04x-9a1e-4b7c-8d2e-%012x", w, rng.Uint64()&0xffffffffffff),
			"node":    node,
			"expires": now.Add(time.Hour).UTC().Format(time.RFC3339),
			"trace":   hex.EncodeToString(trace[:]),
		}}
}

// waitAllApplied waits until every node has applied what the leader has
// and returns how long that took.
func (g *growth) waitAllApplied(b *testing.B) time.Duration {
	c := g.ic.c
	leader := c.WaitLeader(30 * time.Second)
	want := c.Node(leader).State().AppliedIndex()
	start := time.Now()
	for {
		behind := false
		for _, id := range c.Running() {
			if c.Node(id).State().AppliedIndex() < want {
				behind = true
			}
		}
		if !behind {
			return time.Since(start)
		}
		if time.Since(start) > 5*time.Minute {
			b.Fatalf("followers did not apply index %d within 5 minutes", want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// heapPerNode is the process's in-use heap after two collections, divided
// by the three in-process nodes, in MiB: the least of three readings 200 ms
// apart, so a transient buffer (a raft batch in flight, a handshake) is not
// counted as growth.
func heapPerNode(b *testing.B, when string) float64 {
	var best runtime.MemStats
	for i := 0; i < 3; i++ {
		if i > 0 {
			time.Sleep(200 * time.Millisecond)
		}
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		if i == 0 || ms.HeapInuse < best.HeapInuse {
			best = ms
		}
	}
	b.Logf("heap %s: HeapInuse %.1f MiB, HeapAlloc %.1f MiB, HeapObjects %d, Sys %.1f MiB, %s (process, 3 nodes)",
		when, float64(best.HeapInuse)/mib, float64(best.HeapAlloc)/mib, best.HeapObjects, float64(best.Sys)/mib, rss())
	return float64(best.HeapInuse) / 3 / mib
}

func rss() string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "VmRSS ?"
	}
	for _, line := range strings.Split(string(b), "\n") {
		var kb int
		if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &kb); err == nil {
			return fmt.Sprintf("VmRSS %.0f MiB (with the state files' mapped pages)", float64(kb)/1024)
		}
	}
	return "VmRSS ?"
}

func dirSize(dir string) int64 {
	var n int64
	// Best effort: a file removed while the walk counts (a compacted
	// segment, say) is left out, and the walk itself never fails.
	_ = filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			n += info.Size()
		}
		return nil
	})
	return n
}

// issued counts requests done, for untilEnough.
var issued atomic.Int64

// untilEnough returns a channel closed once at least d has passed and at
// least stallSamples requests were done since the call (at most a minute).
func untilEnough(d time.Duration) chan struct{} {
	stop := make(chan struct{})
	from, start := issued.Load(), time.Now()
	go func() {
		defer close(stop)
		for time.Since(start) < d || issued.Load()-from < stallSamples && time.Since(start) < time.Minute {
			time.Sleep(10 * time.Millisecond)
		}
	}()
	return stop
}

// sample is one issuance request's span.
type sample struct{ start, end time.Time }

func (s sample) lat() time.Duration { return s.end.Sub(s.start) }

// issue runs the callers, one X.509-SVID per request, until count
// requests are done (count > 0) or stop is closed.
func (g *growth) issue(count int, stop <-chan struct{}) ([]sample, error) {
	var mu sync.Mutex
	var out []sample
	var firstErr error
	var next atomic.Int64
	var wg sync.WaitGroup
	for w, cl := range g.clients {
		wg.Add(1)
		go func(w int, cl *api.AgentClient) {
			defer wg.Done()
			var mine []sample
			defer func() { mu.Lock(); out = append(out, mine...); mu.Unlock() }()
			for i := w; ; i++ {
				if count > 0 && next.Add(1) > int64(count) {
					return
				}
				if stop != nil {
					select {
					case <-stop:
						return
					default:
					}
				}
				req := &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: g.web.ID, CSR: g.csrs[i%len(g.csrs)]}}}
				s := sample{start: time.Now()}
				res, err := cl.SignX509SVIDs(context.Background(), req)
				s.end = time.Now()
				if err == nil && (len(res.Results) != 1 || res.Results[0].Error != "") {
					err = fmt.Errorf("issuance refused: %+v", res.Results)
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
				mine = append(mine, s)
				issued.Add(1)
			}
		}(w, cl)
	}
	wg.Wait()
	return out, firstErr
}

type span struct{ start, end time.Time }

// measureStall times issuance for stallWindow with no snapshot, then while
// the leader writes raft snapshots of the state, counting only requests
// that start and end inside one snapshot.
func (g *growth) measureStall(b *testing.B) map[string]float64 {
	c := g.ic.c
	leader := c.WaitLeader(30 * time.Second)
	if leader != g.issueAt {
		b.Logf("leader moved from %s to %s; callers stay on %s", g.issueAt, leader, g.issueAt)
	}
	snapsBefore := snapshotCounts(g)
	if growthProfileDir != "" {
		runtime.SetBlockProfileRate(int(10 * time.Microsecond))
		runtime.SetMutexProfileFraction(5)
		defer runtime.SetBlockProfileRate(0)
		defer runtime.SetMutexProfileFraction(0)
	}

	stop := untilEnough(stallWindow)
	stopCPU := profileCPU(b, "cpu-base")
	baseCPU := readCPU()
	baseStart := time.Now()
	base, err := g.issue(0, stop)
	if err != nil {
		b.Fatalf("issuance without a snapshot: %v", err)
	}
	baseDur := time.Since(baseStart)
	baseUse := baseCPU.since()
	stopCPU()
	profileWrite(b, "block", "block-base")
	profileWrite(b, "mutex", "mutex-base")
	if after := snapshotCounts(g); after != snapsBefore {
		b.Logf("warning: a raft snapshot ran during the no-snapshot window (snapshots per node %s -> %s)", snapsBefore, after)
	}

	// During: callers run while the snapshotter writes snapshots back to
	// back until it has spent at least as long as the no-snapshot window
	// writing them.
	var spans []span
	var snapErr error
	stop = make(chan struct{})
	stopCPU = profileCPU(b, "cpu-snapshot")
	snapCPU := readCPU()
	go func() {
		defer close(stop)
		time.Sleep(100 * time.Millisecond) // callers in their stride first
		var busy time.Duration
		for len(spans) < stallMaxSnaps && busy < baseDur {
			s := time.Now()
			d, err := c.Node(leader).Raft().Snapshot(context.Background())
			if err != nil {
				snapErr = err
				return
			}
			spans = append(spans, span{s, time.Now()})
			busy += d
			b.Logf("raft snapshot %d on %s took %v", len(spans), leader, d.Round(time.Millisecond))
		}
	}()
	all, err := g.issue(0, stop)
	if err != nil {
		b.Fatalf("issuance during a snapshot: %v", err)
	}
	snapUse := snapCPU.since()
	stopCPU()
	profileWrite(b, "block", "block-snapshot")
	profileWrite(b, "mutex", "mutex-snapshot")
	if snapErr != nil {
		b.Fatalf("raft snapshot: %v", snapErr)
	}
	var during []sample
	var busy time.Duration
	for _, sp := range spans {
		busy += sp.end.Sub(sp.start)
	}
	for _, s := range all {
		for _, sp := range spans {
			if !s.start.Before(sp.start) && !s.end.After(sp.end) {
				during = append(during, s)
				break
			}
		}
	}
	if len(base) < 300 || len(during) < 300 {
		b.Fatalf("too few samples for a p99: %d without a snapshot, %d during", len(base), len(during))
	}
	// Noise check, logged only: the same window again after the snapshot.
	stop = untilEnough(baseDur)
	afterCPU := readCPU()
	after, err := g.issue(0, stop)
	if err != nil {
		b.Fatalf("issuance after the snapshot: %v", err)
	}
	afterUse := afterCPU.since()
	pBase, pDuring := pct(base, 0.99), pct(during, 0.99)
	b.Logf("no snapshot: %d SVIDs in %v (%.0f/s), p50 %v p99 %v max %v",
		len(base), baseDur.Round(time.Millisecond), float64(len(base))/baseDur.Seconds(), pct(base, 0.5).Round(10*time.Microsecond), pBase.Round(10*time.Microsecond), pct(base, 1).Round(10*time.Microsecond))
	b.Logf("during %d snapshot(s): %d SVIDs in %v (%.0f/s), p50 %v p99 %v max %v",
		len(spans), len(during), busy.Round(time.Millisecond), float64(len(during))/busy.Seconds(), pct(during, 0.5).Round(10*time.Microsecond), pDuring.Round(10*time.Microsecond), pct(during, 1).Round(10*time.Microsecond))
	b.Logf("after the snapshot (noise check, not in the ratio): %d SVIDs, p50 %v p99 %v", len(after),
		pct(after, 0.5).Round(10*time.Microsecond), pct(after, 0.99).Round(10*time.Microsecond))
	b.Logf("CPU without a snapshot: %s", baseUse)
	b.Logf("CPU during the snapshot window: %s", snapUse)
	b.Logf("CPU after the snapshot: %s", afterUse)
	b.Logf("snapshots per node: %s (before the windows: %s)", snapshotCounts(g), snapsBefore)
	return map[string]float64{
		"p99-ms":                 float64(pBase.Microseconds()) / 1000,
		"p99-during-snapshot-ms": float64(pDuring.Microseconds()) / 1000,
		"snapshot-s":             spans[0].end.Sub(spans[0].start).Seconds(),
		"x-snapshot-stall-ratio": float64(pDuring) / float64(pBase),
	}
}

// pct is the q quantile of the samples' latencies.
func pct(s []sample, q float64) time.Duration {
	lat := make([]time.Duration, len(s))
	for i := range s {
		lat[i] = s[i].lat()
	}
	slices.Sort(lat)
	return lat[max(0, int(math.Ceil(q*float64(len(lat))))-1)]
}

// snapshotCounts lists each node's raft snapshots on disk.
func snapshotCounts(g *growth) string {
	c := g.ic.c
	ids := c.Running()
	slices.Sort(ids)
	s := ""
	for _, id := range ids {
		ents, _ := os.ReadDir(filepath.Join(c.ConfigOf(id).DataDir, "raft", "snapshots"))
		s += fmt.Sprintf("%s=%d ", id, len(ents))
	}
	return s
}

// SIGIL_GROWTH_PROFILE=dir writes profiles of the phases themselves (a
// whole-run -cpuprofile mixes the fill, the windows and the setup): CPU of
// the fill to 1M, of the no-snapshot and of the snapshot window; heap at
// both measurements; block and mutex profiles (cumulative, take the
// difference with -base) at the end of each window.
var growthProfileDir = os.Getenv("SIGIL_GROWTH_PROFILE")

// profileCPU starts a CPU profile named name and returns its stop.
func profileCPU(b *testing.B, name string) func() {
	if growthProfileDir == "" {
		return func() {}
	}
	f, err := os.Create(filepath.Join(growthProfileDir, name+".pprof"))
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Logf("cpu profile %s: %v", name, err)
		_ = f.Close() // nothing was written to it
		return func() {}
	}
	tf, err := os.Create(filepath.Join(growthProfileDir, name+".trace"))
	if err != nil {
		b.Fatal(err)
	}
	if name == "cpu-fill" || trace.Start(tf) != nil {
		_ = tf.Close() // not tracing: nothing was written to it
		tf = nil
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.Logf("cpu profile %s: %v", name, err)
		}
		if tf != nil {
			trace.Stop()
			if err := tf.Close(); err != nil {
				b.Logf("trace %s: %v", name, err)
			}
		}
	}
}

// profileWrite writes a named runtime profile (heap, block, mutex).
func profileWrite(b *testing.B, kind, name string) {
	if growthProfileDir == "" {
		return
	}
	f, err := os.Create(filepath.Join(growthProfileDir, name+".pprof"))
	if err != nil {
		b.Fatal(err)
	}
	err = pprof.Lookup(kind).WriteTo(f, 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		b.Fatal(err)
	}
}

// cpuMeter reads this process's CPU time (getrusage) and the machine's
// (/proc/stat): where the cores went during a window.
type cpuMeter struct {
	at        time.Time
	proc      time.Duration
	minflt    int64    // page faults (mapped state files, page cache)
	nivcsw    int64    // involuntary context switches: threads preempted
	stat      []uint64 // user nice system idle iowait irq softirq steal, in ticks
	statValid bool
}

func readCPU() cpuMeter {
	m := cpuMeter{at: time.Now()}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		m.proc = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		m.minflt, m.nivcsw = ru.Minflt, ru.Nivcsw
	}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		f := strings.Fields(strings.SplitN(string(b), "\n", 2)[0])
		for _, v := range f[1:min(len(f), 9)] {
			var n uint64
			if _, err := fmt.Sscan(v, &n); err != nil {
				break // statValid stays false
			}
			m.stat = append(m.stat, n)
		}
		m.statValid = len(m.stat) == 8
	}
	return m
}

// since describes the CPU use from m to now.
func (m cpuMeter) since() string {
	now := readCPU()
	wall := now.at.Sub(m.at).Seconds()
	out := fmt.Sprintf("process %.2f cores, %.0f page faults/s, %.0f preemptions/s", (now.proc-m.proc).Seconds()/wall,
		float64(now.minflt-m.minflt)/wall, float64(now.nivcsw-m.nivcsw)/wall)
	if m.statValid && now.statValid {
		var d [8]float64
		var total float64
		for i := range d {
			d[i] = float64(now.stat[i] - m.stat[i])
			total += d[i]
		}
		if total > 0 {
			pc := func(x float64) float64 { return 100 * x / total }
			out += fmt.Sprintf("; machine: user %.0f%% system %.0f%% softirq %.0f%% iowait %.0f%% steal %.0f%% idle %.0f%%",
				pc(d[0]+d[1]), pc(d[2]+d[5]), pc(d[6]), pc(d[4]), pc(d[7]), pc(d[3]))
		}
	}
	return out
}

var raftMessageRE = regexp.MustCompile(`\\"@message\\":\\"([^\\]*)`)

// raftWarnings counts the raft library's warnings in the cluster log
// after offset from, by message.
func raftWarnings(log string, from int) string {
	counts := map[string]int{}
	for _, line := range strings.Split(log[min(from, len(log)):], "\n") {
		if m := raftMessageRE.FindStringSubmatch(line); m != nil {
			counts[m[1]]++
		}
	}
	var out []string
	for m, n := range counts {
		out = append(out, fmt.Sprintf("%dx %q", n, m))
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}
