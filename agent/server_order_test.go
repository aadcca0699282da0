package agent_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// TestServerOrder: with server-order random, agents that all list the same
// three nodes start on every one of them, and join through the one they
// start on; with listed, every agent starts on (and joins through) the
// first listed.
func TestServerOrder(t *testing.T) {
	ids := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "so", ids, nil)
	c := clustertest.NewCluster(t, tr, ids...)
	ctx := context.Background()
	node := map[string]string{} // API address -> node ID
	for _, id := range ids {
		node[c.ConfigOf(id).API.Listen] = id
	}
	quiet := slog.New(slog.DiscardHandler)
	config := func(order string, servers ...string) agent.Config {
		dir := t.TempDir()
		var addrs []string
		for _, id := range servers {
			addrs = append(addrs, c.ConfigOf(id).API.Listen)
		}
		return agent.Config{Servers: addrs, ServerOrder: order, RootCert: tr.RootPath,
			DataDir: filepath.Join(dir, "data"), JoinTokenFile: filepath.Join(dir, "token")}
	}
	// join redeems a fresh token and reports the node that signed the
	// agent's SVID (each node has an issuing CA of its own).
	join := func(t *testing.T, a *agent.Agent, cfg agent.Config) string {
		t.Helper()
		tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 600})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cfg.JoinTokenFile, []byte(tok.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := a.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if a.Joins() != 1 {
			t.Fatalf("joins %d, want 1", a.Joins())
		}
		return a.SVID().Chain[1].Subject.CommonName
	}

	t.Run("random covers every server", func(t *testing.T) {
		// With 3 servers a fair draw misses one in 200 with probability
		// 3*(2/3)^200, about 1e-35.
		const draws = 200
		seen := map[string]int{}
		type started struct {
			a   *agent.Agent
			cfg agent.Config
		}
		first := map[string]started{} // one agent per starting server, to join
		for range draws {
			cfg := config("", ids...) // the default is random
			a, err := agent.New(ctx, cfg, quiet)
			if err != nil {
				t.Fatal(err)
			}
			srv := a.Server()
			seen[srv]++
			if first[srv].a == nil {
				first[srv] = started{a, cfg}
			} else if err := a.Close(); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("starting servers over %d agents: %v", draws, seen)
		for _, id := range ids {
			if seen[c.ConfigOf(id).API.Listen] == 0 {
				t.Errorf("no agent of %d started on %s: %v", draws, id, seen)
			}
		}
		for srv, s := range first {
			if got := join(t, s.a, s.cfg); got != node[srv] {
				t.Errorf("an agent starting on %s joined through %s", node[srv], got)
			}
			if err := s.a.Close(); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("listed starts at the first", func(t *testing.T) {
		cfg := config(agent.ServerOrderListed, "node-2", "node-3", "node-1")
		for range 20 {
			a, err := agent.New(ctx, cfg, quiet)
			if err != nil {
				t.Fatal(err)
			}
			if got := node[a.Server()]; got != "node-2" {
				t.Fatalf("listed order started on %s, want node-2 (the first listed)", got)
			}
			if err := a.Close(); err != nil {
				t.Fatal(err)
			}
		}
		a, err := agent.New(ctx, cfg, quiet)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = a.Close() }()
		if got := join(t, a, cfg); got != "node-2" {
			t.Errorf("listed order joined through %s, want node-2", got)
		}
	})
}

// TestServerFailover: the Sync connection, SVID signing and renewals share
// one current server. A renewal whose server has stopped goes to the next
// live one without an error and makes it current, so Sync and the next
// renewal go there too; when the node under a running Sync stream stops,
// the stream's failure and a renewal's failure on that node together move
// the agent one server on, not two.
func TestServerFailover(t *testing.T) {
	ids := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "sf", ids, nil)
	c := clustertest.NewCluster(t, tr, ids...)
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	node := map[string]string{} // API address -> node ID
	var servers []string
	for _, id := range ids {
		servers = append(servers, c.ConfigOf(id).API.Listen)
		node[c.ConfigOf(id).API.Listen] = id
	}
	cfg := agent.Config{Servers: servers, RootCert: tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: filepath.Join(t.TempDir(), "agent.sock")}}
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s0 := node[a.Server()]
	if got := a.SVID().Chain[1].Subject.CommonName; got != s0 {
		t.Fatalf("the agent starts on %s but joined through %s", s0, got)
	}
	after := func(id string) string {
		for i := range ids {
			if ids[i] == id {
				return ids[(i+1)%len(ids)]
			}
		}
		t.Fatalf("no node %s", id)
		return ""
	}
	renewOn := func(want string) {
		t.Helper()
		n := a.Renewals()
		if err := a.Renew(ctx); err != nil {
			t.Fatalf("renewal (%s expected to answer): %v", want, err)
		}
		if a.Renewals() != n+1 {
			t.Fatalf("renewals %d, want %d", a.Renewals(), n+1)
		}
		if got := a.SVID().Chain[1].Subject.CommonName; got != want {
			t.Fatalf("renewed through %s, want %s", got, want)
		}
		if got := node[a.Server()]; got != want {
			t.Fatalf("current server %s after renewing through %s", got, want)
		}
	}
	// workloadSVIDFrom registers an entry under the agent and waits for
	// the SVID the agent gets for it: the entry arrives over Sync and is
	// signed over the same connection, so the signing node is the node
	// the Sync connection is on.
	workloadSVIDFrom := func(admin, name, want string) {
		t.Helper()
		e, err := c.Admin(admin).EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/" + name,
			ParentID: a.SVID().ID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		clustertest.Eventually(t, 30*time.Second, "a workload SVID for "+name, func() bool {
			s, _ := a.Cache().Current()
			if v := s.SVIDs[e.ID]; v != nil && len(v.Chain) > 1 {
				got = v.Chain[1].Subject.CommonName
			}
			return got != ""
		})
		if got != want {
			t.Fatalf("the workload SVID for %s came from %s, want %s (the current server)", name, got, want)
		}
	}

	// The current node stops before any Sync connection exists: the
	// renewal alone finds it dead and moves on.
	c.Stop(s0)
	c.WaitLeader(30 * time.Second)
	s1 := after(s0)
	renewOn(s1)
	// s0 comes back; the agent stays where it is.
	c.Start(s0)
	// s1 must not lead when it stops below: the others would refuse
	// agents ("no leader", Unavailable) until they elect one, and the
	// agent would rightly move on from them too, which is not what the
	// last step checks. A restarted node does not take over a leader
	// (pre-vote), so stopping and starting s1 while it leads hands the
	// lead to another node; the agent has no connection open yet to
	// notice.
	for tries := 0; c.WaitLeader(30*time.Second) == s1; tries++ {
		if tries == 5 {
			t.Fatalf("%s still leads after %d restarts", s1, tries)
		}
		t.Logf("%s leads: restarting it so that another node does", s1)
		c.Stop(s1)
		c.WaitLeader(30 * time.Second)
		c.Start(s1)
	}

	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Serve(sctx) }()
	defer func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop")
		}
	}()
	workloadSVIDFrom(s1, "first", s1)
	renewOn(s1)

	// The node under a live Sync stream stops: whichever of the stream and
	// the renewal fails on it first moves the agent to the next server, and
	// the other must not move it again (s0, alive again, would mean it
	// moved twice).
	c.Stop(s1)
	c.WaitLeader(30 * time.Second)
	s2 := after(s1)
	renewOn(s2)
	workloadSVIDFrom(s2, "second", s2)
	renewOn(s2)
}
