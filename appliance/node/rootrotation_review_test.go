package node_test

import (
	"context"
	"os"
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
