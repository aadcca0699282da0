package agent_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// TestAttackRevokedNodeCAAgent: a real agent joined through the node that
// is later compromised (its own SVID and its workload SVIDs come from that
// node's issuing CA). After the root revokes the CA and the node is
// removed (it keeps running: the attacker holds it), the agent must stop
// trusting that node, drop the SVIDs its CA signed and get new ones from
// a good node, and remember the revocation across a restart.
func TestAttackRevokedNodeCAAgent(t *testing.T) {
	tr := clustertest.NewTrust(t, "ra", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	bad := "node-3"
	if c.WaitLeader(30*time.Second) == bad {
		bad = "node-2"
	}
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	// Listed order: the agent must join through the node that goes bad.
	cfg := agent.Config{
		Servers:     []string{c.ConfigOf(bad).API.Listen, c.ConfigOf("node-1").API.Listen},
		ServerOrder: agent.ServerOrderListed,
		RootCert:    tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: filepath.Join(t.TempDir(), "agent.sock")},
	}
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = a.Close() }()
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := a.SVID().Chain[1].Subject.CommonName; got != bad {
		t.Fatalf("the agent joined through %s, want %s (its first server)", got, bad)
	}
	e, err := c.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/payments",
		ParentID: a.SVID().ID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Serve(sctx) }()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop")
		}
	}
	defer stop()
	issuer := func() string {
		s, _ := a.Cache().Current()
		if v := s.SVIDs[e.ID]; v != nil && len(v.Chain) > 1 {
			return v.Chain[1].Subject.CommonName
		}
		return ""
	}
	clustertest.Eventually(t, 20*time.Second, "a workload SVID from "+bad, func() bool { return issuer() == bad })

	// The root revokes the node's CA; the node is removed but keeps
	// running.
	crl := tr.RootCRL(t, 1, bad)
	revokedAt := time.Now()
	addRootCRL(t, c.Admin("node-1"), crl)
	if _, err := c.Admin("node-1").ClusterRemove(ctx, &api.IDRequest{ID: bad}); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && (issuer() == bad || issuer() == "" || a.SVID().Chain[1].Subject.CommonName == bad) {
		time.Sleep(100 * time.Millisecond)
	}
	if got := issuer(); got == bad || got == "" {
		t.Errorf("ATTACK SUCCEEDED: 30 s after the revocation the agent still serves a workload SVID from %q (revoked: %s)", got, bad)
	}
	if got := a.SVID().Chain[1].Subject.CommonName; got == bad {
		t.Errorf("ATTACK SUCCEEDED: 30 s after the revocation the agent still uses its own SVID from %s's revoked CA", bad)
	}
	t.Logf("agent re-attested (own SVID from %s) and replaced its workload SVID (from %s) %v after the CRL was added",
		a.SVID().Chain[1].Subject.CommonName, issuer(), time.Since(revokedAt).Round(time.Millisecond))
	stop()
	checkAgentRefuses(t, a, cfg, c.ConfigOf(bad).API.Listen, c.ConfigOf("node-1").API.Listen, log)
}

func addRootCRL(t *testing.T, admin *api.AdminClient, der []byte) {
	t.Helper()
	if _, err := admin.RootCRLAdd(context.Background(), &api.RootCRLRequest{CRL: der}); err != nil {
		t.Fatalf("root CRL refused: %v", err)
	}
}

// checkAgentRefuses: the agent's verification refuses the revoked node and
// accepts a good one, and a restarted agent remembers the revocation
// before it has synced with anything.
func checkAgentRefuses(t *testing.T, a *agent.Agent, cfg agent.Config, bad, good string, log *slog.Logger) {
	t.Helper()
	ctx := context.Background()
	if len(a.Cache().RootCRLs()) != 1 {
		t.Fatalf("the agent holds %d root CRLs, want 1", len(a.Cache().RootCRLs()))
	}
	dial := func(c *cache.Cache, addr string) error {
		conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: cfg.RootCert, Anonymous: true, VerifyChain: c.CheckChain})
		if err != nil {
			return err
		}
		defer func() { _ = conn.Close() }()
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err = api.NewJoinClient(conn).Token(cctx, &api.JoinTokenRequest{Token: "not-a-token"})
		return err
	}
	if err := dial(a.Cache(), bad); err == nil || !strings.Contains(err.Error(), "revoked by the root's CRL") {
		t.Errorf("ATTACK SUCCEEDED: the agent's verification let it talk to the revoked node: %v", err)
	}
	if err := dial(a.Cache(), good); err == nil || strings.Contains(err.Error(), "revoked") {
		t.Errorf("a good node: %v (want the node's own refusal of a bad token)", err)
	}
	// A restart: the CRL comes from the data dir, not from any node.
	b, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = b.Close() }()
	if len(b.Cache().RootCRLs()) != 1 {
		t.Fatalf("restarted agent holds %d root CRLs, want 1 (persisted)", len(b.Cache().RootCRLs()))
	}
	if err := dial(b.Cache(), bad); err == nil || !strings.Contains(err.Error(), "revoked by the root's CRL") {
		t.Errorf("ATTACK SUCCEEDED: the restarted agent trusts the revoked node again: %v", err)
	}
}
