package agent_test

import (
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// The agent joins once, keeps its key in the TPM and its SVID on disk,
// and after a restart of host and TPM renews without joining again.
func TestAgentJoinsOnceAndRenewsAfterRestart(t *testing.T) {
	tr := clustertest.NewTrust(t, "ag", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	// Listed order: the renewal below starts at node-3, which is down.
	cfg := agent.Config{
		Servers:     []string{c.ConfigOf("node-3").API.Listen, c.ConfigOf("node-1").API.Listen},
		ServerOrder: agent.ServerOrderListed,
		RootCert:    tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
	}
	log := slog.New(slog.NewTextHandler(c.Log, nil))
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	first := a.SVID()
	if a.Joins() != 1 || first == nil {
		t.Fatalf("joins %d", a.Joins())
	}
	if st, _ := os.Stat(cfg.DataDir + "/agent.key"); st.Mode().Perm() != 0o600 {
		t.Fatalf("key blob mode %v", st.Mode().Perm())
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	// Host and TPM restart.
	sw.Stop(t)
	sw.Start(t)
	b, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = b.Close() }()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Joins() != 0 || b.SVID().ID != first.ID {
		t.Fatalf("restart joined again (%d) or changed identity", b.Joins())
	}
	// The first node is down: renewal goes to the next one.
	c.Stop("node-3")
	if err := b.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Renewals() != 1 || b.SVID().Chain[0].SerialNumber.Cmp(first.Chain[0].SerialNumber) == 0 {
		t.Fatal("not renewed")
	}
	ag, err := c.Admin("node-1").AgentShow(ctx, &api.IDRequest{ID: first.ID})
	if err != nil || ag.SerialNumber != b.SVID().Chain[0].SerialNumber.Text(16) || time.Until(ag.ExpiresAt) < 50*time.Minute {
		t.Fatalf("appliance's record of the agent: %+v %v", ag, err)
	}
}

func TestLoadConfig(t *testing.T) {
	c, err := agent.LoadConfig("../packaging/agent.yaml")
	if err != nil || len(c.Servers) != 3 || c.ServerOrder != agent.ServerOrderRandom || c.TPM != "/dev/tpmrm0" || c.WorkloadAPI.Socket != agent.DefaultSocket || c.Log.Level != "info" ||
		c.WorkloadAPI.Limits.StreamsPerCaller != 1024 || len(c.Outputs) != 1 || c.Outputs[0].UID != 1500 {
		t.Fatalf("example config: %+v %v", c, err)
	}
	if err := c.Validate(); err != nil {
		t.Fatalf("example config: %v", err)
	}
	for name, mod := range map[string]func(*agent.Config){
		"relative socket":     func(c *agent.Config) { c.WorkloadAPI.Socket = "agent.sock" },
		"server order":        func(c *agent.Config) { c.ServerOrder = "first" },
		"bad socket mode":     func(c *agent.Config) { c.WorkloadAPI.SocketMode = "rwx" },
		"relative output dir": func(c *agent.Config) { c.Outputs[0].Dir = "out" },
		"output selector":     func(c *agent.Config) { c.Outputs[0].Selectors = []string{"uid"} },
		"tpm and token":       func(c *agent.Config) { c.JoinTokenFile = "/etc/sigil/token" },
		"log level":           func(c *agent.Config) { c.Log.Level = "loud" },
		"log format":          func(c *agent.Config) { c.Log.Format = "xml" },
	} {
		bad, _ := agent.LoadConfig("../packaging/agent.yaml")
		mod(&bad)
		if err := bad.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	p := t.TempDir() + "/bad.yaml"
	if err := os.WriteFile(p, []byte("servers: [a:1]\ncolour: blue\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := agent.LoadConfig(p); err == nil {
		t.Fatal("unknown field accepted")
	}
}

// A host without a TPM joins with a one-time token; its key is a software
// key kept 0600 in the data dir, and a restart reuses the identity.
func TestAgentTokenJoin(t *testing.T) {
	tr := clustertest.NewTrust(t, "at", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	tokFile := dir + "/token"
	if err := os.WriteFile(tokFile, []byte(tok.Token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := agent.Config{Servers: []string{c.ConfigOf("node-1").API.Listen}, RootCert: tr.RootPath, DataDir: dir + "/data", JoinTokenFile: tokFile}
	a, err := agent.New(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(a.SVID().ID, "/sigil/agent/join_token/") {
		t.Fatalf("token agent ID %s", a.SVID().ID)
	}
	if st, _ := os.Stat(cfg.DataDir + "/agent-key.pem"); st.Mode().Perm() != 0o600 {
		t.Fatalf("software key mode %v", st.Mode().Perm())
	}
	b, err := agent.New(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil || b.Joins() != 0 || b.SVID().ID != a.SVID().ID {
		t.Fatalf("restart of a token agent: joins %d, %v", b.Joins(), err)
	}
	if err := b.Renew(ctx); err != nil {
		t.Fatal(err)
	}
}

// Run renews on its own at about half the SVID's lifetime.
func TestAgentRenewsOnSchedule(t *testing.T) {
	tr := clustertest.NewTrust(t, "rs", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) { cfg.Join.AgentSVIDTTL = node.Duration{Duration: 4 * time.Second} }, "node-1")
	sw := testenv.NewTPM(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	a, err := agent.New(ctx, agent.Config{Servers: []string{c.ConfigOf("node-1").API.Listen}, RootCert: tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	first := a.SVID()
	go a.Run(ctx)
	clustertest.Eventually(t, 20*time.Second, "a scheduled renewal", func() bool {
		s := a.SVID()
		return s.Chain[0].SerialNumber.Cmp(first.Chain[0].SerialNumber) != 0
	})
	renewedAt := time.Now()
	if renewedAt.After(first.Chain[0].NotAfter) {
		t.Fatal("renewed only after the SVID expired")
	}
	if a.Joins() != 1 {
		t.Fatalf("renewal joined again (%d joins)", a.Joins())
	}
}

// The nodes serve a connection only while the SVID it was opened with is
// valid, so the agent reconnects with each new SVID: its Sync stream and
// its signing go on across the expiry of the SVIDs it started with, and a
// reconnect is not counted as a sync failure. (Before it reconnected, the
// nodes ended its stream at the first SVID's expiry and refused every
// call on the connection it kept.)
func TestAgentSyncsAcrossSVIDExpiry(t *testing.T) {
	tr := clustertest.NewTrust(t, "ax", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) { cfg.Join.AgentSVIDTTL = node.Duration{Duration: 3 * time.Second} }, "node-1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/token", []byte(tok.Token), 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.New(ctx, agent.Config{Servers: []string{c.ConfigOf("node-1").API.Listen}, RootCert: tr.RootPath,
		DataDir: dir + "/data", JoinTokenFile: dir + "/token"}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	first := a.SVID()
	done := make(chan struct{}, 2)
	go func() { a.Run(ctx); done <- struct{}{} }()
	go func() { a.Cache().Run(ctx); done <- struct{}{} }()
	defer func() { cancel(); <-done; <-done }()
	clustertest.Eventually(t, 10*time.Second, "the first sync", func() bool { return a.Cache().Stats.Connected.Load() })

	time.Sleep(time.Until(first.Chain[0].NotAfter) + time.Second)
	if a.Renewals() == 0 {
		t.Fatal("the agent did not renew before its first SVID expired")
	}
	e, err := c.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/expiry/later", ParentID: first.ID,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}, X509TTL: 600}})
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 15*time.Second, "the entry made after the first SVID expired, synced and signed", func() bool {
		snap, _ := a.Cache().Current()
		return snap.SVIDs[e.ID] != nil
	})
	if n := a.Cache().Stats.SyncFailures.Load(); n != 0 {
		t.Errorf("%d sync failures across %d renewals, want none: a reconnect for a new SVID is not a failure", n, a.Renewals())
	}
	t.Logf("%d renewals; entry synced and signed %v after the first SVID expired", a.Renewals(), time.Since(first.Chain[0].NotAfter).Round(time.Millisecond))
}
