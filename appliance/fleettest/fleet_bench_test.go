package fleettest_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/fleettest"
)

// envInt reads a positive integer from the environment, or def.
func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// nodeFigures is what a node's /metrics says it holds.
type nodeFigures struct{ heap, alloc, rss, goroutines, fds float64 }

func figures(m fleettest.Metrics) nodeFigures {
	return nodeFigures{heap: m["go_gc_heap_live_bytes"], alloc: m["go_memstats_heap_alloc_bytes"],
		rss: m["process_resident_memory_bytes"], goroutines: m["go_goroutines"], fds: m["process_open_fds"]}
}

const handshakes = `sigil_listener_handshakes_total{listener="api"}`

// BenchmarkFleet (issue #19): SIGIL_FLEET_AGENTS simulated agents
// (default 500; `make fleet` runs 10,000) joined by token to a real
// appliance of three sigild processes, each agent with its own
// mutual-TLS connection, Sync stream and renewals. It reports:
//
//   - what each connected agent costs a node, from the node's /metrics
//     (the heap live at its last GC, resident memory, goroutines,
//     descriptors), the largest of the three nodes;
//   - how long one entry change takes to reach its agent, and one bundle
//     change (a JWT key rotation) every agent;
//   - renewals in a steady window of SIGIL_FLEET_WINDOW seconds (default
//     20) with agent SVIDs of SIGIL_FLEET_TTL seconds (default 60; SVIDs
//     are backdated 30 s and renewed at half their backdated life less a
//     random tenth), and the busiest one-second share of them;
//   - a node killed with SIGKILL (SIGIL_FLEET_KILL: leader, the default,
//     or follower) with a third of the fleet on it: how long until every
//     one of its agents has an update from another node, the handshake
//     rate the other two saw, and renewals that failed meanwhile.
func BenchmarkFleet(b *testing.B) {
	// Each figure is also logged as it is measured: a run that fails
	// later (the node kill) still shows what it measured before.
	metric := func(v float64, unit string) {
		b.ReportMetric(v, unit)
		b.Logf("fleet: %s = %.4g", unit, v)
	}
	n := envInt(b, "SIGIL_FLEET_AGENTS", 500)
	ttl := time.Duration(envInt(b, "SIGIL_FLEET_TTL", 60)) * time.Second
	window := time.Duration(envInt(b, "SIGIL_FLEET_WINDOW", 20)) * time.Second
	victimRole := os.Getenv("SIGIL_FLEET_KILL")
	if victimRole == "" {
		victimRole = "leader"
	}
	if victimRole != "leader" && victimRole != "follower" {
		b.Fatalf("SIGIL_FLEET_KILL=%q: want leader or follower", victimRole)
	}
	// One descriptor per agent here and on its node, renewal connections
	// in flight, and the nodes' own.
	fleettest.RaiseFDLimit(b, uint64(n+n/4+1024))

	// SIGIL_FLEET_PPROF=dir: each node's heap profile, once the fleet is
	// synced, goes to dir/<node>.heap (sigild built with -tags pprof).
	profiles := os.Getenv("SIGIL_FLEET_PPROF")
	// SIGIL_FLEET_MAX_HANDSHAKES sets each node's api.max-handshakes;
	// the default is README's sizing rule, a quarter of the fleet (what
	// each of two survivors must take in when a node dies, with room for
	// renewals), and at least the product's default, 256.
	app := fleettest.StartAppliance(b, "fl", fleettest.ApplianceOptions{AgentTTL: ttl, Agents: n, Pprof: profiles != "",
		MaxHandshakes: envInt(b, "SIGIL_FLEET_MAX_HANDSHAKES", max(256, n/4))})
	ids := fleettest.NodeIDs()
	before := map[string]nodeFigures{}
	for _, id := range ids {
		before[id] = figures(app.MustScrape(id))
	}
	self0 := fleettest.Read(b)

	f := fleettest.Start(b, app, fleettest.Options{Agents: n})
	f.WaitSynced(10 * time.Minute)
	metric(float64(n)/f.JoinTime.Seconds(), "joins/s")

	// What a connected agent costs a node: each node's growth over the
	// agents on it, the largest of the three.
	on := map[string]int{}
	for _, a := range f.Agents {
		on[a.Current()]++
	}
	var worst nodeFigures
	for _, id := range ids {
		z, a := figures(app.AfterGC(id)), before[id]
		k := float64(max(on[id], 1))
		per := nodeFigures{heap: (z.heap - a.heap) / k, alloc: (z.alloc - a.alloc) / k, rss: (z.rss - a.rss) / k,
			goroutines: (z.goroutines - a.goroutines) / k, fds: (z.fds - a.fds) / k}
		b.Logf("%s: %d agents; heap live %.0f -> %.0f MiB, resident %.0f -> %.0f MiB, goroutines %.0f -> %.0f, descriptors %.0f -> %.0f; per agent: %.1f KiB heap, %.1f KiB resident, %.2f goroutines, %.2f descriptors",
			id, on[id], a.heap/(1<<20), z.heap/(1<<20), a.rss/(1<<20), z.rss/(1<<20), a.goroutines, z.goroutines, a.fds, z.fds,
			per.heap/1024, per.rss/1024, per.goroutines, per.fds)
		worst = nodeFigures{heap: max(worst.heap, per.heap), alloc: max(worst.alloc, per.alloc), rss: max(worst.rss, per.rss),
			goroutines: max(worst.goroutines, per.goroutines), fds: max(worst.fds, per.fds)}
	}
	if profiles != "" {
		for _, id := range ids {
			if err := app.HeapProfile(id, filepath.Join(profiles, id+".heap")); err != nil {
				b.Fatal(err)
			}
		}
	}
	metric(worst.heap/1024, "node-heap-KiB/agent")
	metric(worst.rss/1024, "node-rss-KiB/agent")
	metric(worst.goroutines, "node-goroutines/agent")
	metric(worst.fds, "node-fds/agent")
	self1 := fleettest.Read(b)
	metric(float64(int64(self1.HeapInuse)-int64(self0.HeapInuse))/float64(n)/1024, "sim-agent-heap-KiB")
	b.Logf("%d agents: joined in %v (join retries: %v); the simulated agents' process: heap in use %d -> %d MiB, goroutines %d -> %d, descriptors %d -> %d",
		n, f.JoinTime.Round(time.Millisecond), f.JoinRetriesBy(), self0.HeapInuse>>20, self1.HeapInuse>>20,
		self0.Goroutines, self1.Goroutines, self0.FDs, self1.FDs)

	// One entry change for one agent, 20 agents spread over the fleet
	// and so over the three nodes, one after another: from the admin
	// call (on a follower) to the update on that agent's stream.
	ctx := context.Background()
	leader := app.Leader("")
	follower := ids[0]
	if follower == leader {
		follower = ids[1]
	}
	admin := app.Admin(follower)
	var entry []time.Duration
	for i := 0; i < 20; i++ {
		a := f.Agents[i*n/20]
		start := time.Now()
		e, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{
			SPIFFEID: fmt.Sprintf("spiffe://example.org/fleet/sample-%d", i), ParentID: a.ID,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
		if err != nil {
			b.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, time.Minute)
		u, err := a.WaitUpdate(wctx, func(u fleettest.Update) bool { return slices.Contains(u.Entries, e.ID) })
		cancel()
		if err != nil {
			b.Fatalf("entry %s never reached its agent: %v", e.ID, err)
		}
		entry = append(entry, u.At.Sub(start))
	}
	slices.Sort(entry)
	metric(fleettest.Ms(fleettest.Quantile(entry, 0.5)), "entry-p50-ms")
	metric(fleettest.Ms(fleettest.Quantile(entry, 0.99)), "entry-p99-ms")
	metric(fleettest.Ms(entry[len(entry)-1]), "entry-max-ms")

	// One bundle change (a JWT key rotation on a follower, which every
	// agent must learn): from the call to each agent's update holding
	// the new key.
	start := time.Now()
	rot, err := admin.JWTKeyRotate(ctx, &api.Empty{})
	if err != nil {
		b.Fatal(err)
	}
	bundle := f.Arrivals(5*time.Minute, start, func(u fleettest.Update) bool { return slices.Contains(u.JWTKeys, rot.KID) })
	metric(fleettest.Ms(fleettest.Quantile(bundle, 0.5)), "bundle-p50-ms")
	metric(fleettest.Ms(fleettest.Quantile(bundle, 0.99)), "bundle-p99-ms")
	metric(fleettest.Ms(bundle[len(bundle)-1]), "bundle-all-ms")
	if u := f.Agents[0].Updates(); len(u) > 0 {
		metric(float64(u[len(u)-1].Bytes), "sync-update-bytes")
	}

	// Renewals in steady state: the fleet has joined and synced, and
	// each agent renews on its own schedule.
	r0, w0 := f.Renewals(), time.Now()
	cpu0 := nodesCPU(app, ids)
	time.Sleep(window)
	r1, w1 := f.Renewals(), time.Now()
	cpu1 := nodesCPU(app, ids)
	starts, done := f.RenewalTimes(w0, w1)
	renewals := float64(len(done))
	metric(renewals/w1.Sub(w0).Seconds(), "renewals/s")
	metric(fleettest.MaxShare1s(starts), "renew-max-1s-share")
	metric(1/w1.Sub(w0).Seconds(), "renew-even-1s-share")
	metric((cpu1-cpu0)/w1.Sub(w0).Seconds(), "node-cpu-cores")
	if renewals > 0 {
		metric((cpu1-cpu0)*1000/renewals, "node-cpu-ms/renewal")
	}
	b.Logf("steady window %v: %d renewal attempts, %d done; counters at the end: %+v (at the window's start: %+v)",
		w1.Sub(w0).Round(time.Millisecond), len(starts), len(done), r1, r0)

	// A node dies (SIGKILL) with a third of the fleet on it.
	victim := app.Leader("")
	if victimRole == "follower" {
		victim = follower
	}
	var moved []*fleettest.Agent
	for _, a := range f.Agents {
		if a.Current() == victim {
			moved = append(moved, a)
		}
	}
	var survivors []string
	for _, id := range ids {
		if id != victim {
			survivors = append(survivors, id)
		}
	}
	rk := f.Renewals()
	stopRate := make(chan struct{})
	rates := make(chan float64, 1)
	go func() { rates <- peakRate(app, survivors, stopRate) }()
	time.Sleep(2 * time.Second) // the sampler's first readings
	killed := time.Now()
	app.Kill(victim, syscall.SIGKILL)
	b.Logf("killed %s (the %s) with %d agents on it", victim, victimRole, len(moved))
	var back []time.Duration
	wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	for _, a := range moved {
		u, err := a.WaitUpdate(wctx, func(u fleettest.Update) bool { return u.Node != victim && u.At.After(killed) })
		if err != nil {
			cancel()
			b.Fatalf("agent not synced elsewhere after %s died: %v", victim, err)
		}
		back = append(back, u.At.Sub(killed))
	}
	cancel()
	slices.Sort(back)
	// Renewals go on across the failover for as long again.
	time.Sleep(max(back[len(back)-1], 10*time.Second))
	close(stopRate)
	rz := f.Renewals()
	metric(fleettest.Ms(fleettest.Quantile(back, 0.5)), "failover-p50-ms")
	metric(fleettest.Ms(fleettest.Quantile(back, 0.99)), "failover-p99-ms")
	metric(fleettest.Ms(back[len(back)-1]), "failover-all-ms")
	metric(<-rates, "failover-peak-handshakes/s")
	metric(float64(rz.Renewals-rk.Renewals), "failover-renewals")
	metric(float64(rz.FailedValid-rk.FailedValid), "failover-renew-failed-valid")
	b.Logf("failover from %s: %d agents synced elsewhere, the last after %v; renewals meanwhile: %d done, %d failed (%d while valid), %d SVIDs expired",
		victim, len(moved), back[len(back)-1].Round(time.Millisecond), rz.Renewals-rk.Renewals, rz.Failed-rk.Failed, rz.FailedValid-rk.FailedValid, rz.Expired-rk.Expired)

	metric(float64(rz.Failed), "renew-failed-total")
	metric(float64(rz.FailedValid), "renew-failed-valid-total")
	metric(float64(rz.Expired), "svid-expired-total")
	if fails := f.RenewFailuresBy(); len(fails) > 0 {
		b.Logf("failed renewals by answer: %v", fails)
	}
	if ends := f.SyncEndsBy(); len(ends) > 0 {
		b.Logf("Sync streams ended and reopened, by error: %v", ends)
	}
}

// nodesCPU sums the nodes' CPU seconds so far.
func nodesCPU(app *fleettest.Appliance, ids []string) float64 {
	var s float64
	for _, id := range ids {
		if app.Running(id) {
			s += app.MustScrape(id)["process_cpu_seconds_total"]
		}
	}
	return s
}

// peakRate samples the nodes' API handshake counters every 250 ms until
// stop and returns the largest number completed, summed over the nodes,
// in any one second.
func peakRate(app *fleettest.Appliance, ids []string, stop <-chan struct{}) float64 {
	type sample struct {
		at    time.Time
		total float64
	}
	var samples []sample
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		var total float64
		ok := true
		for _, id := range ids {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			m, err := app.Scrape(ctx, id)
			cancel()
			// A sample missing a node would read as a drop and a burst.
			ok = ok && err == nil
			total += m[handshakes]
		}
		if ok {
			samples = append(samples, sample{time.Now(), total})
		}
		select {
		case <-stop:
			peak := 0.0
			for i, s := range samples {
				for j := i + 1; j < len(samples) && samples[j].at.Sub(s.at) <= time.Second; j++ {
					peak = max(peak, samples[j].total-s.total)
				}
			}
			return peak
		case <-tick.C:
		}
	}
}
