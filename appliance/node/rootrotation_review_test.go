package node_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// TestAttackRetireAfterFromProposerConfigOnly: retire_after is the
// switch's time plus the longest lifetime a node signs for, but that
// lifetime was computed from the proposing node's configuration alone.
// join.agent-svid-ttl (up to 30 days) and admin-cert-max-ttl are per-node
// settings: an admin connected to a node with short ones switches, and
// retire is allowed long before the agent SVIDs another node signed under
// the old root just before the switch expire; those agents are then
// refused by every node.
func TestAttackRetireAfterFromProposerConfigOnly(t *testing.T) {
	const longTTL = 7 * 24 * time.Hour
	tr := clustertest.NewTrust(t, "rt", []string{"node-1", "node-2"}, nil)
	newRootPath, _ := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		if cfg.NodeID == "node-2" {
			cfg.Join.AgentSVIDTTL = node.Duration{Duration: longTTL}
		}
	}, "node-1", "node-2")
	ctx := context.Background()
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Admin("node-1").RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM}); err != nil {
		t.Fatalf("add: %v", err)
	}
	for _, id := range []string{"node-1", "node-2"} {
		path, _ := tr.SignIssuingBy(t, id, "2y", "root2", newRootPath)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		clustertest.Eventually(t, 10*time.Second, id+" to stage", func() bool {
			r, err := c.Admin(id).NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: b})
			return err == nil && r.Staged
		})
	}
	// The admin happens to be connected to node-1 (agent SVIDs of 1 h).
	st, err := c.Admin("node-1").RootRotate(ctx, &api.RootRotateRequest{Phase: "switch", Force: true})
	if err != nil {
		t.Fatalf("switch: %v", err)
	}
	if min := time.Now().Add(longTTL - time.Minute); st.RetireAfter.Before(min) {
		t.Fatalf("retire allowed after %s, %s after the switch: node-2 signed agent SVIDs under the old root valid for %s until the switch",
			st.RetireAfter.UTC().Format(time.RFC3339), time.Until(st.RetireAfter).Round(time.Minute), longTTL)
	}
}

// TestRestartAfterRetireWithStaleKeptRoots: a node that stopped after it
// applied the retire but before it rewrote roots.pem (a crash in between,
// or a failed write, which follow only logs) starts with the roots it kept
// before (old and new). Its switched certificate expires before its
// configured one, so startIssuing picks the configured one, under the
// retired root; follow() swaps certificates only in phases switched and
// added, so the retired node went on signing under the retired root and
// could never narrow its roots to the bundle's (SetRoots refuses a set
// its certificate does not chain to), retrying forever.
func TestRestartAfterRetireWithStaleKeptRoots(t *testing.T) {
	tr := clustertest.NewTrust(t, "rs", []string{"node-1"}, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Bundle.RefreshHint = node.Duration{Duration: time.Second}
	}, "node-1")
	ctx := context.Background()
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.LocalAdmin("node-1").RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM}); err != nil {
		t.Fatalf("add: %v", err)
	}
	path, switched := tr.SignIssuingBy(t, "node-1", "300d", "root2", newRootPath) // the configured one is valid 1y
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if r, err := c.LocalAdmin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: b}); err != nil || !r.Staged {
		t.Fatalf("stage: %+v %v", r, err)
	}
	if _, err := c.LocalAdmin("node-1").RootRotate(ctx, &api.RootRotateRequest{Phase: "switch", Force: true}); err != nil {
		t.Fatalf("switch: %v", err)
	}
	clustertest.Eventually(t, 15*time.Second, "node-1's CA recorded under the new root", func() bool {
		st, err := c.LocalAdmin("node-1").RootRotation(ctx, &api.Empty{})
		return err == nil && len(st.NodesNotStaged) == 0
	})
	// roots.pem as it was before the retire.
	kept, err := os.ReadFile(filepath.Join(c.ConfigOf("node-1").DataDir, "roots.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.LocalAdmin("node-1").RootRotate(ctx, &api.RootRotateRequest{Phase: "retire", Force: true}); err != nil {
		t.Fatalf("retire: %v", err)
	}
	c.Stop("node-1")
	if err := os.WriteFile(filepath.Join(c.ConfigOf("node-1").DataDir, "roots.pem"), kept, 0o644); err != nil {
		t.Fatal(err)
	}
	c.Start("node-1")
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		a := c.Node("node-1").Authority()
		if roots := a.Roots(); a.Issuing().Equal(switched) && len(roots) == 1 && roots[0].Equal(newRoot) {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	a := c.Node("node-1").Authority()
	t.Fatalf("after the restart node-1 signs with serial %x (the switched one is %x) and trusts %d roots, not the bundle's new root alone",
		a.Issuing().SerialNumber, switched.SerialNumber, len(a.Roots()))
}

// TestAttackBundleAckFlood: an agent's acknowledgement is meant to cost
// at most one commit per rotation phase, but the node checked the
// replica's record before proposing and nothing held concurrent calls of
// one agent back: an agent (compromised, or a bug) sending its
// acknowledgement many times at once got each proposed, a raft entry
// (fsynced on every node) apiece, all but one refused at apply.
func TestAttackBundleAckFlood(t *testing.T) {
	tr := clustertest.NewTrust(t, "af", []string{"node-1", "node-2", "node-3"}, nil)
	newRootPath, _ := tr.NewRoot(t, "root2", "3y")
	ic := newIssuerOn(t, tr, nil)
	c := ic.c
	ctx := context.Background()
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	leader := c.WaitLeader(10 * time.Second)
	st, err := c.Admin(leader).RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM})
	if err != nil {
		t.Fatalf("add: %v", err)
	}
	ag := ic.agent(t, "node-2")
	time.Sleep(time.Second) // let background commands settle
	before := c.Node(leader).State().Index()
	const burst = 64
	var wg sync.WaitGroup
	for range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = ag.BundleAck(ctx, &api.BundleAckRequest{Sequence: st.Sequence})
		}()
	}
	wg.Wait()
	time.Sleep(time.Second)
	if n := c.Node(leader).State().Index() - before; n > 5 {
		t.Fatalf("%d acknowledgements sent at once made %d raft entries; want one (at most a few background ones besides)", burst, n)
	}
}

// TestRollbackPastAddAfterSwitchOnNode: the rollback past add after a
// switch, on a running node: refused while the node's recorded CA is
// still under the new root, done once the node is back under the old one
// (it shows its CA when it swaps back), and the new root's JWT keys leave
// the bundle with it.
func TestRollbackPastAddAfterSwitchOnNode(t *testing.T) {
	tr := clustertest.NewTrust(t, "rb", []string{"node-1"}, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Bundle.RefreshHint = node.Duration{Duration: time.Second}
	}, "node-1")
	ctx := context.Background()
	adm := c.LocalAdmin("node-1")
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM}); err != nil {
		t.Fatalf("add: %v", err)
	}
	path, _ := tr.SignIssuingBy(t, "node-1", "2y", "root2", newRootPath)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: b}); err != nil {
		t.Fatal(err)
	}
	if _, err := adm.RootRotate(ctx, &api.RootRotateRequest{Phase: "switch", Force: true}); err != nil {
		t.Fatalf("switch: %v", err)
	}
	underNew := func() bool {
		for _, r := range c.Node("node-1").State().NodeCAs() {
			if r.Node == "node-1" {
				return r.Root == fp(newRoot)
			}
		}
		return false
	}
	clustertest.Eventually(t, 15*time.Second, "node-1 recorded under the new root", underNew)
	jwtUnderNew := func() int {
		n := 0
		for _, k := range c.Node("node-1").State().Bundle().JWTKeys {
			if kc, err := x509.ParseCertificate(k.CA); err == nil && kc.CheckSignatureFrom(newRoot) == nil {
				n++
			}
		}
		return n
	}
	clustertest.Eventually(t, 15*time.Second, "a JWT key under the new root", func() bool { return jwtUnderNew() > 0 })
	if _, err := adm.RootRotate(ctx, &api.RootRotateRequest{Phase: "rollback"}); err != nil {
		t.Fatalf("rollback to added: %v", err)
	}
	clustertest.Eventually(t, 15*time.Second, "node-1 recorded under the old root again", func() bool { return !underNew() })
	st, err := adm.RootRotate(ctx, &api.RootRotateRequest{Phase: "rollback", Force: true})
	if err != nil {
		t.Fatalf("rollback past add: %v", err)
	}
	if st.Phase != "" || len(st.Roots) != 1 || st.Roots[0].SHA256 != fp(tr.Root) {
		t.Fatalf("status after the rollback past add: %+v", st)
	}
	if n := jwtUnderNew(); n != 0 {
		t.Fatalf("%d JWT keys under the removed root left in the bundle", n)
	}
}
