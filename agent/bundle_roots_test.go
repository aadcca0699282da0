package agent_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// tokenAgent is a token-joined agent on servers, serving until the test
// ends (or stop is called), logging at debug into log.
type tokenAgent struct {
	a    *agent.Agent
	cfg  agent.Config
	log  *testenv.LogBuffer
	stop func()
}

// startTokenAgent starts an agent on cfg; admin makes its join token when
// it has none.
func startTokenAgent(t *testing.T, admin *api.AdminClient, cfg agent.Config) *tokenAgent {
	t.Helper()
	ctx := context.Background()
	if _, err := os.Stat(cfg.JoinTokenFile); err != nil {
		tok, err := admin.TokenCreate(ctx, &api.TokenRequest{TTL: 600})
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(cfg.JoinTokenFile, []byte(tok.Token), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ta := &tokenAgent{cfg: cfg, log: &testenv.LogBuffer{}}
	a, err := agent.New(ctx, cfg, slog.New(slog.NewJSONHandler(ta.log, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	ta.a = a
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Serve(sctx) }()
	stopped := false
	ta.stop = func() {
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
		_ = a.Close() // test cleanup
	}
	t.Cleanup(ta.stop)
	return ta
}

// logLines are the agent's log records with message msg.
func (ta *tokenAgent) logLines(msg string) []map[string]any {
	var out []map[string]any
	for l := range strings.SplitSeq(ta.log.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(l), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

func tokenAgentConfig(t *testing.T, c *clustertest.Cluster, rootCert string, servers ...string) agent.Config {
	t.Helper()
	dir := t.TempDir()
	var addrs []string
	for _, id := range servers {
		addrs = append(addrs, c.ConfigOf(id).API.Listen)
	}
	return agent.Config{Servers: addrs, ServerOrder: agent.ServerOrderListed, RootCert: rootCert,
		DataDir: filepath.Join(dir, "data"), JoinTokenFile: filepath.Join(dir, "token"),
		WorkloadAPI:  agent.WorkloadAPIConfig{Socket: filepath.Join(dir, "agent.sock")},
		HealthListen: clustertest.FreePort(t)}
}

func hasCert(certs []*x509.Certificate, c *x509.Certificate) bool {
	return slices.ContainsFunc(certs, func(x *x509.Certificate) bool { return bytes.Equal(x.Raw, c.Raw) })
}

// memAgent is an in-memory agent (as sigil-agent exec runs one) joined
// with join tokens through its owner's JoinWith.
type memAgent struct {
	a     *agent.Agent
	admin *api.AdminClient // makes its join tokens
	key   *ecdsa.PrivateKey
	sock  string
}

func startInMemoryAgent(t *testing.T, c *clustertest.Cluster, admin *api.AdminClient, rootCert string, servers ...string) *memAgent {
	t.Helper()
	var addrs []string
	for _, id := range servers {
		addrs = append(addrs, c.ConfigOf(id).API.Listen)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	m := &memAgent{admin: admin, key: key, sock: filepath.Join(t.TempDir(), "agent.sock")}
	m.a, err = agent.NewInMemory(agent.Config{Servers: addrs, ServerOrder: agent.ServerOrderListed, RootCert: rootCert,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: m.sock, SocketMode: "0600"}}, key, slog.New(slog.NewJSONHandler(c.Log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	m.join(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.a.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("in-memory agent Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("in-memory agent did not stop")
		}
	})
	return m
}

// join joins (again) with a fresh token.
func (m *memAgent) join(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	tok, err := m.admin.TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.a.JoinWith(ctx, func(ctx context.Context, jc *api.JoinClient) (*join.SVID, error) {
		return join.Token(ctx, jc, tok.Token, m.key)
	}); err != nil {
		t.Fatal(err)
	}
}

// An agent configured with root A keeps the bundle's roots (A and B, as
// after a rotation's add) from its Sync stream, and dials a node whose
// certificates chain to B once its first server is gone: the Sync stream,
// SVID signing and a renewal all go to that node. Without the kept roots
// (root-cert alone) the handshake with it fails. An in-memory agent
// (sigil-agent exec's) does the same with the roots in memory.
func TestAgentDialsNodeUnderKeptRoot(t *testing.T) {
	tr := clustertest.NewTrust(t, "kroot", []string{"node-1", "node-2"}, []string{"node-3"})
	rootB, err := pemfile.ReadCert(tr.RogueRootPath)
	if err != nil {
		t.Fatal(err)
	}
	// The bundle holds both roots; node-3's issuing CA is B's.
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) { cfg.RootCerts = []string{tr.RootPath, tr.RogueRootPath} }, "node-1", "node-2", "node-3")
	ctx := context.Background()
	node3 := c.ConfigOf("node-3").API.Listen

	// What the agent trusted before: root-cert (A) does not verify node-3.
	conn, err := api.Dial(api.DialConfig{Addr: node3, RootFile: tr.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = api.NewAgentClient(conn).BundleAck(ctx, &api.BundleAckRequest{Sequence: 1})
	_ = conn.Close() // the call's error is the one looked at
	if err == nil || !strings.Contains(err.Error(), "not a node of") {
		t.Fatalf("root-cert alone reached node-3 (issuing CA under root B): %v", err)
	}

	// The test's admin credential trusts root A: it talks to node-2, which
	// forwards to the leader, whichever node that is.
	admin := c.Admin("node-2")
	ta := startTokenAgent(t, admin, tokenAgentConfig(t, c, tr.RootPath, "node-1", "node-3"))
	a := ta.a
	mem := startInMemoryAgent(t, c, admin, tr.RootPath, "node-1", "node-3")
	rootsFile := filepath.Join(ta.cfg.DataDir, "roots.pem")
	clustertest.Eventually(t, 20*time.Second, "the bundle's roots kept", func() bool { return a.Cache().KeptRoots() })
	kept, err := pemfile.ReadCerts(rootsFile)
	if err != nil || len(kept) != 2 || !hasCert(kept, tr.Root) || !hasCert(kept, rootB) {
		t.Fatalf("%s: %d roots, %v", rootsFile, len(kept), err)
	}
	if st, err := os.Stat(rootsFile); err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("%s: %v %v", rootsFile, st.Mode(), err)
	}
	if got := a.Cache().Roots(); len(got) != 2 || !hasCert(got, rootB) {
		t.Fatalf("trusted roots: %d, B among them %v", len(got), hasCert(got, rootB))
	}
	if n := len(ta.logLines("the configured root-cert holds none of the trust bundle's roots: update root-cert (an agent without kept roots trusts only it)")); n != 0 {
		t.Fatalf("warned %d times that root-cert is stale; it holds A, a bundle root", n)
	}

	// The in-memory agent (sigil-agent exec's) keeps them too, in memory.
	clustertest.Eventually(t, 20*time.Second, "the in-memory agent's bundle roots kept", func() bool { return mem.a.Cache().KeptRoots() })
	if got := mem.a.Cache().Roots(); len(got) != 2 || !hasCert(got, rootB) {
		t.Fatalf("in-memory agent's trusted roots: %d, B among them %v", len(got), hasCert(got, rootB))
	}

	// node-1 goes: the agents move to node-3, under B.
	c.Stop("node-1")
	c.WaitLeader(30 * time.Second)
	entry := func(parent, path string) *api.Entry {
		t.Helper()
		e, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/kept-root/" + path, ParentID: parent,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}, X509TTL: 600}})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e, me := entry(a.SVID().ID, "host"), entry(mem.a.SVID().ID, "job")
	signedByNode3 := func(ag *agent.Agent, id string) func() bool {
		return func() bool {
			s, _ := ag.Cache().Current()
			v := s.SVIDs[id]
			return v != nil && len(v.Chain) > 1 && v.Chain[1].Subject.CommonName == "node-3"
		}
	}
	clustertest.Eventually(t, 30*time.Second, "the entry made after node-1 stopped, synced and signed by node-3", signedByNode3(a, e.ID))
	clustertest.Eventually(t, 30*time.Second, "the in-memory agent's entry, synced and signed by node-3", signedByNode3(mem.a, me.ID))
	// Its owner's join (a job run's renewal) goes to node-3 too.
	mem.join(t)
	if got := mem.a.SVID().Chain[1].Subject.CommonName; got != "node-3" {
		t.Fatalf("the in-memory agent joined again through %s, want node-3", got)
	}
	if a.Server() != node3 {
		t.Fatalf("current server %s, want node-3 (%s)", a.Server(), node3)
	}
	s, _ := a.Cache().Current()
	chain := s.SVIDs[e.ID].Chain
	pool := x509.NewCertPool()
	pool.AddCert(rootB)
	inter := x509.NewCertPool()
	inter.AddCert(chain[1])
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("the SVID node-3 signed does not chain to root B: %v", err)
	}
	before := a.Renewals()
	if err := a.Renew(ctx); err != nil {
		t.Fatalf("renewal through node-3: %v", err)
	}
	if a.Renewals() != before+1 || a.SVID().Chain[1].Subject.CommonName != "node-3" {
		t.Fatalf("renewals %d, issuer %s", a.Renewals(), a.SVID().Chain[1].Subject.CommonName)
	}
	if n := a.Cache().Stats.SyncFailures.Load(); n == 0 {
		t.Log("no sync failure counted across the failover")
	}
	seq := a.Cache().Stats.BundleAcked.Load()
	if v := metric(t, ta.cfg.HealthListen, "sigil_agent_bundle_acked_sequence"); v != strconv.FormatUint(seq, 10) || seq == 0 {
		t.Fatalf("sigil_agent_bundle_acked_sequence %s, cache %d", v, seq)
	}
}

// The agent acknowledges each bundle change it applies, once, to the node
// it syncs with (BundleAck; the node records nothing yet, so this is
// asserted from the agent's side: its gauge and its debug log): the
// bundle at start, a new sequence after a root CRL, nothing for a view
// that leaves the bundle as it was, and the bundle it has again after a
// restart.
func TestAgentAcksBundleOncePerChange(t *testing.T) {
	tr := clustertest.NewTrust(t, "back", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	admin := c.Admin("node-1")
	sequence := func() uint64 {
		t.Helper()
		b, err := admin.BundleShow(ctx, &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		return b.Bundle.Sequence
	}
	cfg := tokenAgentConfig(t, c, tr.RootPath, "node-1")
	ta := startTokenAgent(t, admin, cfg)
	const acked = "trust bundle acknowledged"
	// acks are the sequences the agent's log says it acknowledged.
	acks := func(ta *tokenAgent) []uint64 {
		var out []uint64
		for _, r := range ta.logLines(acked) {
			out = append(out, uint64(r["bundle_sequence"].(float64)))
		}
		return out
	}
	waitAcked := func(ta *tokenAgent, seq uint64) {
		t.Helper()
		clustertest.Eventually(t, 20*time.Second, "the acknowledgement of bundle "+strconv.FormatUint(seq, 10), func() bool {
			return ta.a.Cache().Stats.BundleAcked.Load() == seq
		})
		if v := metric(t, ta.cfg.HealthListen, "sigil_agent_bundle_acked_sequence"); v != strconv.FormatUint(seq, 10) {
			t.Fatalf("sigil_agent_bundle_acked_sequence %s, want %d", v, seq)
		}
	}
	first := sequence()
	waitAcked(ta, first)
	testReadmeAgentMetrics(t, cfg.HealthListen)
	kept, err := pemfile.ReadCerts(filepath.Join(cfg.DataDir, "roots.pem"))
	if err != nil || len(kept) != 1 || !kept[0].Equal(tr.Root) {
		t.Fatalf("roots.pem: %d roots, %v", len(kept), err)
	}

	// A bundle change: the root's (empty) CRL.
	if _, err := admin.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: tr.RootCRL(t, 1)}); err != nil {
		t.Fatal(err)
	}
	second := sequence()
	if second <= first {
		t.Fatalf("bundle sequence %d after the CRL, %d before", second, first)
	}
	waitAcked(ta, second)

	// A view that changes entries only: no call.
	e, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/ack/w", ParentID: ta.a.SVID().ID,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "the entry at the agent", func() bool {
		s, _ := ta.a.Cache().Current()
		return s.SVIDs[e.ID] != nil
	})
	time.Sleep(500 * time.Millisecond)
	if got := acks(ta); !slices.Equal(got, []uint64{first, second}) {
		t.Fatalf("acknowledged %v, want [%d %d]: once per bundle change", got, first, second)
	}

	// A restart acknowledges the bundle it has, once.
	ta.stop()
	tb := startTokenAgent(t, admin, cfg)
	if !tb.a.Cache().KeptRoots() {
		t.Fatal("the restarted agent did not load its kept roots")
	}
	waitAcked(tb, second)
	time.Sleep(500 * time.Millisecond)
	if got := acks(tb); !slices.Equal(got, []uint64{second}) {
		t.Fatalf("after a restart, acknowledged %v, want [%d]", got, second)
	}
	if n := len(tb.logLines("trust bundle acknowledgement failed; will retry")) + len(ta.logLines("trust bundle acknowledgement failed; will retry")); n != 0 {
		t.Fatalf("%d failed acknowledgements", n)
	}
}
