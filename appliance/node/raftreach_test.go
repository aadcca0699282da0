package node_test

import (
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// sigil_raft_peers counts the configured members; sigil_raft_peers_reachable
// counts those heard from: every member on the leader, itself and its
// leader on a follower. A stopped member drops out of the leader's count.
func TestClusterPeersReachableMetric(t *testing.T) {
	ids := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "prm", ids, nil)
	c := clustertest.NewCluster(t, tr, ids...)
	leader := c.WaitLeader(30 * time.Second)
	var fs []string
	for _, id := range ids {
		if id != leader {
			fs = append(fs, id)
		}
	}
	metric := func(id, name string) float64 { return metricValue(t, c.Node(id).HTTPAddr(), name) }
	clustertest.Eventually(t, 20*time.Second, "3 of 3 reachable on the leader, 2 on each follower", func() bool {
		return metric(leader, "sigil_raft_peers") == 3 && metric(leader, "sigil_raft_peers_reachable") == 3 &&
			metric(fs[0], "sigil_raft_peers_reachable") == 2 && metric(fs[1], "sigil_raft_peers_reachable") == 2
	})
	c.Stop(fs[1])
	clustertest.Eventually(t, 20*time.Second, "the stopped member out of the leader's reachable count", func() bool {
		return metric(leader, "sigil_raft_peers") == 3 && metric(leader, "sigil_raft_peers_reachable") == 2 &&
			metric(fs[0], "sigil_raft_peers_reachable") == 2
	})
}
