package fleettest_test

import (
	"context"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/fleettest"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// TestFleetSmoke keeps the harness honest at a small size: every agent
// joins, syncs, sees its own entry change and a bundle change, and
// renews. A 10 s TTL renews about every second (SVIDs are backdated 30 s,
// so half their life has passed at once) with 10 s to spare: a 2 s TTL
// let a renewal slowed by a loaded CI machine expire its SVID.
func TestFleetSmoke(t *testing.T) {
	app := fleettest.StartAppliance(t, "fs", fleettest.ApplianceOptions{AgentTTL: 10 * time.Second, Agents: 12})
	f := fleettest.Start(t, app, fleettest.Options{Agents: 12, Joiners: 4})
	f.WaitSynced(time.Minute)
	nodes := map[string]int{}
	for _, a := range f.Agents {
		nodes[a.Node]++
	}
	if len(nodes) != 3 || nodes["node-1"] != 4 || nodes["node-2"] != 4 || nodes["node-3"] != 4 {
		t.Errorf("agents spread over nodes as %v, want 4 on each of three", nodes)
	}
	ctx := context.Background()
	a := f.Agents[5]
	e, err := app.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: "spiffe://example.org/fleet/smoke", ParentID: a.ID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := a.WaitUpdate(wctx, func(u fleettest.Update) bool { return slices.Contains(u.Entries, e.ID) }); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	rot, err := app.Admin("node-2").JWTKeyRotate(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if got := f.Arrivals(30*time.Second, start, func(u fleettest.Update) bool { return slices.Contains(u.JWTKeys, rot.KID) }); len(got) != 12 {
		t.Errorf("bundle change reached %d agents, want 12", len(got))
	}
	for _, a := range f.Agents {
		clustertest.Eventually(t, 30*time.Second, "a renewal by "+a.ID, func() bool { return a.Renewals() > 0 })
	}
	if s := f.Renewals(); s.FailedValid != 0 || s.Expired != 0 || s.SyncRestarts != 0 {
		t.Errorf("renewals: %+v, want no failures, expiries or stream restarts", s)
	}

	// A node dies: its agents move to the next node in their lists, are
	// synced there and go on renewing, with no renewal failing.
	const victim = "node-3"
	done := map[*fleettest.Agent]int64{}
	for _, a := range f.Agents {
		done[a] = a.Renewals()
	}
	killed := time.Now()
	app.Kill(victim, syscall.SIGKILL)
	for _, a := range f.Agents {
		if a.Node != victim {
			continue
		}
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		u, err := a.WaitUpdate(wctx, func(u fleettest.Update) bool { return u.Node != victim && u.At.After(killed) })
		cancel()
		if err != nil {
			t.Fatalf("after %s died: %v", victim, err)
		}
		if a.Current() != u.Node {
			t.Errorf("%s synced from %s but is on %s", a.ID, u.Node, a.Current())
		}
	}
	for _, a := range f.Agents {
		clustertest.Eventually(t, 30*time.Second, "a renewal by "+a.ID+" after the kill", func() bool { return a.Renewals() > done[a]+1 })
	}
	if s := f.Renewals(); s.FailedValid != 0 || s.Expired != 0 {
		t.Errorf("renewals across the kill: %+v, want no failures or expiries", s)
	}
}

func TestMaxShare1s(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms ...int) []time.Time {
		var ts []time.Time
		for _, m := range ms {
			ts = append(ts, t0.Add(time.Duration(m)*time.Millisecond))
		}
		return ts
	}
	for _, tc := range []struct {
		ts   []time.Time
		want float64
	}{
		{nil, 0},
		{at(0, 1000, 2000, 3000), 0.25},
		// A sliding window finds the bunch that straddles a second boundary.
		{at(900, 1100, 1200, 5000), 0.75},
		{at(3000, 0, 2999, 2500), 0.75},
	} {
		if got := fleettest.MaxShare1s(tc.ts); got != tc.want {
			t.Errorf("MaxShare1s(%v) = %v, want %v", tc.ts, got, tc.want)
		}
	}
	sorted := []time.Duration{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	if q := fleettest.Quantile(sorted, 0.5); q != 5 {
		t.Errorf("p50 = %v, want 5", q)
	}
	if q := fleettest.Quantile(sorted, 0.99); q != 10 {
		t.Errorf("p99 = %v, want 10", q)
	}
}
