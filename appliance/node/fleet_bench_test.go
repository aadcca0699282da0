package node_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
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

// BenchmarkFleet (issue #19): SIGIL_FLEET_AGENTS simulated agents
// (default 500; `make fleet` runs 10,000) joined by token, spread over
// three real nodes, each with its own mutual-TLS connection, Sync stream
// and renewals. It reports what each connected agent costs the process
// (both ends: client and server share it; the heap is also split by
// allocating stacks), how long one entry change and one bundle change
// take to reach the agents, and the renewals in a steady-state window of
// SIGIL_FLEET_WINDOW seconds (default 20) with agent SVIDs that live
// SIGIL_FLEET_TTL seconds (default 60; the appliance backdates SVIDs by
// 30 s and the agent renews at half the backdated life less a random
// tenth, so 60 s renews every 6-15 s).
func BenchmarkFleet(b *testing.B) {
	// Sampled finely from the start, so the heap split covers the
	// cluster's own allocations at the same rate as the agents'.
	runtime.MemProfileRate = 4096
	defer func() { runtime.MemProfileRate = 512 * 1024 }()
	n := envInt(b, "SIGIL_FLEET_AGENTS", 500)
	ttl := time.Duration(envInt(b, "SIGIL_FLEET_TTL", 60)) * time.Second
	window := time.Duration(envInt(b, "SIGIL_FLEET_WINDOW", 20)) * time.Second
	// Two descriptors per agent (its end and the node's), renewal
	// connections in flight (two more each, a few percent of the fleet at
	// once) and the cluster's own.
	fleettest.RaiseFDLimit(b, uint64(2*n+n/4+512))

	c := fleettest.NewCluster(b, "fl", ttl, n)
	leader := c.WaitLeader(30 * time.Second)
	admin := c.Admin(follower(c, leader))
	before := fleettest.Read(b)

	f := fleettest.Start(b, c, fleettest.Options{Agents: n})
	f.WaitSynced(5 * time.Minute)
	after := fleettest.Read(b)
	per := func(a, z float64) float64 { return (z - a) / float64(n) }
	b.ReportMetric(per(float64(before.HeapInuse), float64(after.HeapInuse))/1024, "KiB/agent")
	b.ReportMetric(per(float64(before.HeapAlloc), float64(after.HeapAlloc))/1024, "live-KiB/agent")
	b.ReportMetric(per(before.ServerHeap, after.ServerHeap)/1024, "server-KiB/agent")
	b.ReportMetric(per(before.ClientHeap, after.ClientHeap)/1024, "client-KiB/agent")
	b.ReportMetric(per(before.OtherHeap, after.OtherHeap)/1024, "unattributed-KiB/agent")
	b.ReportMetric(per(float64(before.Goroutines), float64(after.Goroutines)), "goroutines/agent")
	b.ReportMetric(per(float64(before.FDs), float64(after.FDs)), "fds/agent")
	b.ReportMetric(float64(n)/f.JoinTime.Seconds(), "joins/s")
	b.Logf("%d agents: joined in %v (join retries: %v); heap in use %d -> %d MiB; goroutines %d -> %d; fds %d -> %d",
		n, f.JoinTime.Round(time.Millisecond), f.JoinRetriesBy(), before.HeapInuse>>20, after.HeapInuse>>20,
		before.Goroutines, after.Goroutines, before.FDs, after.FDs)

	// One entry change for one agent, ~20 agents spread over the fleet
	// and so over the three nodes, one after another: from the admin
	// call to the update on that agent's stream.
	ctx := context.Background()
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
	b.ReportMetric(fleettest.Ms(fleettest.Quantile(entry, 0.5)), "entry-p50-ms")
	b.ReportMetric(fleettest.Ms(fleettest.Quantile(entry, 0.99)), "entry-p99-ms")
	b.ReportMetric(fleettest.Ms(entry[len(entry)-1]), "entry-max-ms")

	// One bundle change (a JWT key rotation on a follower, which every
	// agent must learn): from the call to each agent's update holding
	// the new key.
	start := time.Now()
	kid, err := c.Node(follower(c, c.WaitLeader(30*time.Second))).JWTRotate(ctx)
	if err != nil {
		b.Fatal(err)
	}
	bundle := f.Arrivals(5*time.Minute, start, func(u fleettest.Update) bool { return slices.Contains(u.JWTKeys, kid) })
	b.ReportMetric(fleettest.Ms(fleettest.Quantile(bundle, 0.5)), "bundle-p50-ms")
	b.ReportMetric(fleettest.Ms(fleettest.Quantile(bundle, 0.99)), "bundle-p99-ms")
	b.ReportMetric(fleettest.Ms(bundle[len(bundle)-1]), "bundle-all-ms")

	// Renewals in steady state: the fleet has joined and synced, and
	// each agent renews on its own schedule.
	r0, p0, w0 := f.Renewals(), fleettest.Read(b), time.Now()
	time.Sleep(window)
	r1, p1, w1 := f.Renewals(), fleettest.Read(b), time.Now()
	starts, done := f.RenewalTimes(w0, w1)
	renewals := float64(len(done))
	b.ReportMetric(renewals/w1.Sub(w0).Seconds(), "renewals/s")
	b.ReportMetric(fleettest.MaxShare1s(starts), "renew-max-1s-share")
	b.ReportMetric(1/w1.Sub(w0).Seconds(), "renew-even-1s-share")
	cpu := (p1.CPU - p0.CPU).Seconds()
	b.ReportMetric(cpu/w1.Sub(w0).Seconds(), "cpu-cores")
	if renewals > 0 {
		b.ReportMetric(cpu*1000/renewals, "cpu-ms/renewal")
	}
	b.ReportMetric(float64(r1.Failed), "renew-failed-total")
	b.ReportMetric(float64(r1.FailedValid), "renew-failed-valid-total")
	b.ReportMetric(float64(r1.Expired), "svid-expired-total")
	b.Logf("steady window %v: %d renewal attempts, %d done; counters at the end: %+v (at the window's start: %+v)",
		w1.Sub(w0).Round(time.Millisecond), len(starts), len(done), r1, r0)
	if fails := f.RenewFailuresBy(); len(fails) > 0 {
		b.Logf("failed renewals by answer: %v", fails)
	}
	if ends := f.SyncEndsBy(); len(ends) > 0 {
		b.Logf("Sync streams ended and reopened, by error: %v", ends)
	}
}
