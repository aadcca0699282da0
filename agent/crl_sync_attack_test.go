package agent_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ceremony"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// crlEnv is a one-node appliance whose trust bundle holds two roots (the
// test root and a second one, "rogue-root", as during a root rotation),
// and a running agent whose root file holds only the first (it keeps both
// once synced). node-2 has an
// issuing CA from the root but never runs: a CA the root can revoke
// without taking the appliance away.
type crlEnv struct {
	tr     *clustertest.Trust
	c      *clustertest.Cluster
	a      *agent.Agent
	socket string
	log    *testenv.LogBuffer
}

func newCRLEnv(t *testing.T, prefix string) *crlEnv {
	t.Helper()
	tr := clustertest.NewTrust(t, prefix, []string{"node-1", "node-2"}, []string{"rogue"})
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.RootCerts = []string{tr.RootPath, tr.RogueRootPath}
	}, "node-1")
	sw := testenv.NewTPM(t)
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	cfg := agent.Config{
		Servers: []string{c.ConfigOf("node-1").API.Listen}, RootCert: tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: filepath.Join(t.TempDir(), "agent.sock")},
	}
	e := &crlEnv{tr: tr, c: c, socket: cfg.WorkloadAPI.Socket, log: &testenv.LogBuffer{}}
	ctx := context.Background()
	a, err := agent.New(ctx, cfg, slog.New(slog.NewJSONHandler(e.log, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	e.a = a
	if err := a.Start(ctx); err != nil {
		_ = a.Close() // the Start error is the one to report
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- a.Serve(sctx) }()
	t.Cleanup(func() {
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
	})
	clustertest.Eventually(t, 10*time.Second, "the Workload API socket", func() bool {
		_, err := os.Stat(cfg.WorkloadAPI.Socket)
		return err == nil
	})
	return e
}

func (e *crlEnv) entry(t *testing.T, path, sel string) *api.Entry {
	t.Helper()
	typ, val, _ := strings.Cut(sel, ":")
	en, err := e.c.Admin("node-1").EntryCreate(context.Background(), &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: "spiffe://example.org" + path, ParentID: e.a.SVID().ID, Selectors: []api.Selector{{Type: typ, Value: val}}}})
	if err != nil {
		t.Fatal(err)
	}
	return en
}

// hasEntry reports whether the agent's cache holds the entry.
func (e *crlEnv) hasEntry(id string) bool {
	s, _ := e.a.Cache().Current()
	for _, en := range s.Entries {
		if en.ID == id {
			return true
		}
	}
	return false
}

// secondRootCRL runs the crl ceremony with the second root's key (label
// "rogue-root" on the root token), revoking nothing.
func secondRootCRL(t *testing.T, tr *clustertest.Trust, number int64) []byte {
	t.Helper()
	out := filepath.Join(tr.Dir, fmt.Sprintf("second-root-%d.crl", number))
	script := fmt.Sprintf("kind: crl\ntrust-domain: example.org\ntranscript: %s\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: rogue-root\ncrl:\n  root-certificate: %s\n  revoke: []\n  number: %d\n  validity: 30d\n  output: %s\n",
		filepath.Join(tr.Dir, "transcript.jsonl"), tr.Module, tr.RootToken.Label, tr.RootToken.PINFile, tr.RogueRootPath, number, out)
	cfg, err := ceremony.Parse([]byte(script), ceremony.KindCRL)
	if err != nil {
		t.Fatalf("crl script: %v", err)
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		t.Fatalf("crl: %v", err)
	}
	if err := ceremony.Run(context.Background(), plan, ceremony.Options{}); err != nil {
		t.Fatalf("crl ceremony: %v", err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "X509 CRL" {
		t.Fatalf("%s: no PEM CRL", out)
	}
	return blk.Bytes
}

// TestAttackBogusCRLBlocksSync: the sync stream carries root CRLs. A CRL
// the agent could not verify (a forgery from a compromised node, or, as
// this test first reproduced with honest nodes, a CRL of a bundle root
// missing from the agent's root file) made the agent refuse the whole
// update, and every later one: it never learnt new entries, bundle
// changes, SVID revocations or the root's other CRLs. Skipping such a CRL
// is now tested on the cache (TestRootCRLsInCache, forged CRLs); honest
// nodes can no longer produce one, since the agent checks CRLs against the
// bundle roots it kept from its sync stream. Here the agent's root file
// holds only the first root: the second root's CRL is adopted all the
// same, beside the first root's, and the sync goes on.
func TestAttackBogusCRLBlocksSync(t *testing.T) {
	e := newCRLEnv(t, "bogus")
	ctx := context.Background()
	admin := e.c.Admin("node-1")
	first := e.entry(t, "/before", "unix:uid:1001")
	clustertest.Eventually(t, 20*time.Second, "the first entry at the agent", func() bool { return e.hasEntry(first.ID) })
	if !e.a.Cache().KeptRoots() || len(e.a.Cache().Roots()) != 2 {
		t.Fatalf("the agent trusts %d roots (kept from the bundle: %v), want the bundle's 2", len(e.a.Cache().Roots()), e.a.Cache().KeptRoots())
	}

	// The second root's CRL: not in the agent's root file, in its kept
	// roots.
	secondCRL := secondRootCRL(t, e.tr, 1)
	if _, err := admin.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: secondCRL}); err != nil {
		t.Fatalf("the appliance refused the second root's CRL: %v", err)
	}
	after := e.entry(t, "/after", "unix:uid:1002")
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) && !e.hasEntry(after.ID) {
		time.Sleep(100 * time.Millisecond)
	}
	if !e.hasEntry(after.ID) {
		t.Fatalf("ATTACK SUCCEEDED: 20 s after the second root's CRL entered the sync stream, an entry created after it has not reached the agent (sync failures: %d)",
			e.a.Cache().Stats.SyncFailures.Load())
	}
	clustertest.Eventually(t, 20*time.Second, "the second root's CRL at the agent", func() bool {
		crls := e.a.Cache().RootCRLs()
		return len(crls) == 1 && bytes.Equal(crls[0], secondCRL)
	})

	// The root revokes node-2's CA: that CRL arrives beside the second
	// root's, and counts.
	rootCRL := e.tr.RootCRL(t, 1, "node-2")
	if _, err := admin.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: rootCRL}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "the root's CRL at the agent", func() bool {
		crls := e.a.Cache().RootCRLs()
		return len(crls) == 2 && slices.ContainsFunc(crls, func(c []byte) bool { return bytes.Equal(c, rootCRL) })
	})
	if !e.a.Cache().Revoked([]*x509.Certificate{e.tr.Nodes["node-2"].Issuing}) {
		t.Fatal("the root's CRL did not revoke node-2's CA at the agent")
	}
	e.entry(t, "/later", "unix:uid:1003")
	time.Sleep(time.Second)
	if n := strings.Count(e.log.String(), "root CRL from the appliance ignored"); n != 0 {
		t.Fatalf("%d CRLs of bundle roots skipped, want none", n)
	}
	if n := e.a.Cache().Stats.SyncFailures.Load(); n != 0 {
		t.Fatalf("%d sync streams failed", n)
	}
}

// The Workload API's X.509-SVID response carries the root CRLs (the
// response's crl field, DER), so a workload that checks peers' chains
// also refuses node CAs the root revoked; a new CRL is pushed on open
// streams.
func TestWorkloadAPICarriesRootCRLs(t *testing.T) {
	e := newCRLEnv(t, "wlcrl")
	ctx := context.Background()
	e.entry(t, "/crl-reader", "unix:uid:0")
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	sctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"), 30*time.Second)
	defer cancel()
	// The entry was just created: until the agent has synced it and has
	// the SVID, the Workload API answers PermissionDenied.
	var stream grpc.ServerStreamingClient[workload.X509SVIDResponse]
	var r *workload.X509SVIDResponse
	clustertest.Eventually(t, 20*time.Second, "the workload's first SVID", func() bool {
		stream, err = workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(sctx, &workload.X509SVIDRequest{})
		if err == nil {
			r, err = stream.Recv()
		}
		if err != nil && status.Code(err) != codes.PermissionDenied {
			t.Fatal(err)
		}
		return err == nil
	})
	if len(r.Svids) != 1 || len(r.Crl) != 0 {
		t.Fatalf("before any CRL: %d SVIDs, %d CRLs", len(r.Svids), len(r.Crl))
	}
	rootCRL := e.tr.RootCRL(t, 1, "node-2")
	if _, err := e.c.Admin("node-1").RootCRLAdd(ctx, &api.RootCRLRequest{CRL: rootCRL}); err != nil {
		t.Fatal(err)
	}
	for len(r.Crl) == 0 {
		if r, err = stream.Recv(); err != nil {
			t.Fatalf("no response with the CRL: %v", err)
		}
	}
	if len(r.Crl) != 1 || !bytes.Equal(r.Crl[0], rootCRL) || len(r.Svids) != 1 {
		t.Fatalf("after the CRL: %d SVIDs, %d CRLs (the root's: %v)", len(r.Svids), len(r.Crl), len(r.Crl) == 1 && bytes.Equal(r.Crl[0], rootCRL))
	}
	// A new stream gets it in its first response.
	stream2, err := workload.NewSpiffeWorkloadAPIClient(conn).FetchX509SVID(sctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if r, err = stream2.Recv(); err != nil || len(r.Crl) != 1 || !bytes.Equal(r.Crl[0], rootCRL) {
		t.Fatalf("a new stream's first response: %v, %d CRLs", err, len(r.GetCrl()))
	}
}
