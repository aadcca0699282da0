package node

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// peersReachable is the gauge sigil_raft_peers_reachable, next to
// sigil_raft_peers (the members configured). It counts the members this
// node knows to be reachable, itself included, as raft.Status sees them:
// the leader hears from every member, so on the leader it equals
// sigil_raft_peers in a healthy cluster; a follower hears only from its
// leader, so on a follower it is 2 (itself and a leader heard from within
// three heartbeat timeouts) or 1.
func peersReachable(n *Node) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "sigil_raft_peers_reachable",
		Help: "Raft members this node heard from within three heartbeat timeouts, itself included: every member on the leader; on a follower, itself and its leader.",
	}, func() float64 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		count := 0
		for _, p := range n.raft.Status(ctx).Peers {
			if p.Reachable != nil && *p.Reachable {
				count++
			}
		}
		return float64(count)
	})
}
