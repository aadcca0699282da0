package ctl_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// cluster status asked of a follower shows the leader's view of every
// member; a stopped member turns unreachable with a growing lag; with no
// leader the asked node's own view is shown, marked as such, and the
// command still succeeds (exit 0: a node answered).
func TestClusterStatusLeaderView(t *testing.T) {
	ids := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "cst", ids, nil)
	c := clustertest.NewCluster(t, tr, ids...)
	leader := c.WaitLeader(30 * time.Second)
	var fs []string
	for _, id := range ids {
		if id != leader {
			fs = append(fs, id)
		}
	}
	asked, stopped := fs[0], fs[1]
	run, _, stderr := cli(t)
	args := func(extra ...string) []string {
		return append([]string{"--server", c.ConfigOf(asked).API.Listen, "--cert", c.AdminCert, "--key", c.AdminKey, "--root", tr.RootPath}, extra...)
	}
	status := func() *api.ClusterStatus {
		t.Helper()
		out, err := run(args("-o", "json", "cluster", "status")...)
		if err != nil {
			t.Fatalf("cluster status via %s: %v\n%s%s", asked, err, out, stderr)
		}
		var st api.ClusterStatus
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("cluster status json: %v\n%s", err, out)
		}
		return &st
	}
	peer := func(st *api.ClusterStatus, id string) api.Peer {
		t.Helper()
		for _, p := range st.Peers {
			if p.ID == id {
				return p
			}
		}
		t.Fatalf("%s missing from %+v", id, st.Peers)
		return api.Peer{}
	}
	reachable := func(p api.Peer) bool { return p.Reachable != nil && *p.Reachable }
	ctx := context.Background()
	write := func() {
		t.Helper()
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := c.Admin(asked).TokenCreate(wctx, &api.TokenRequest{TTL: 600})
		if err != nil && strings.Contains(err.Error(), "exists") {
			// A forwarded write retried after its first attempt committed
			// (a loaded machine): the write went through, which is all
			// this test needs of it.
			t.Logf("write through %s committed on an earlier attempt: %v", asked, err)
			err = nil
		}
		if err != nil {
			t.Fatalf("write through %s: %v", asked, err)
		}
	}

	write()
	var last *api.ClusterStatus
	clustertest.Eventually(t, 20*time.Second, "the leader's view through a follower, every member reachable", func() bool {
		st := status()
		last = st
		if st.NodeID != asked || st.State != "follower" || !st.View.Leader || st.View.NodeID != leader || st.View.LeaderError != "" || len(st.Peers) != 3 {
			return false
		}
		for _, p := range st.Peers {
			if !reachable(p) || p.MatchIndex == nil || *p.MatchIndex == 0 || p.Lag == nil || p.ContactAgeMS == nil {
				return false
			}
		}
		return true
	})
	if *peer(last, leader).MatchIndex != last.View.LastIndex {
		t.Fatalf("the leader's own match index %d is not its last index %d", *peer(last, leader).MatchIndex, last.View.LastIndex)
	}
	out, err := run(args("cluster", "status")...)
	if err != nil {
		t.Fatalf("cluster status: %v\n%s", err, stderr)
	}
	t.Logf("every member up:\n%s", out)
	if first := strings.SplitN(out, "\n", 2)[0]; first != "view: leader "+leader+" (asked "+asked+")" {
		t.Fatalf("header %q:\n%s", first, out)
	}
	if strings.Contains(out, "unknown") {
		t.Fatalf("the leader's view shows unknowns:\n%s", out)
	}

	c.Stop(stopped)
	var lag uint64
	clustertest.Eventually(t, 30*time.Second, stopped+" unreachable with a growing lag, the others reachable", func() bool {
		write()
		st := status()
		last = st
		p := peer(st, stopped)
		if !st.View.Leader || p.Reachable == nil || *p.Reachable || p.Lag == nil || p.ContactAgeMS == nil {
			return false
		}
		grew := lag != 0 && *p.Lag > lag
		lag = *p.Lag
		return grew && reachable(peer(st, leader)) && reachable(peer(st, asked)) &&
			*p.ContactAgeMS > st.View.ReachableWithinMS
	})
	out, err = run(args("cluster", "status")...)
	if err != nil {
		t.Fatalf("cluster status: %v\n%s", err, stderr)
	}
	t.Logf("%s stopped:\n%s", stopped, out)
	if row := rowOf(out, stopped); !strings.Contains(row, " no ") {
		t.Fatalf("%s's row does not say unreachable: %q\n%s", stopped, row, out)
	}

	// No quorum: the asked node's own view, marked, with the reason.
	c.Stop(leader)
	clustertest.Eventually(t, 30*time.Second, "the asked node's own view, marked", func() bool {
		st := status()
		last = st
		l := peer(st, leader)
		return !st.View.Leader && st.View.NodeID == asked && st.View.LeaderError != "" && (l.Reachable == nil || !*l.Reachable)
	})
	if p := peer(last, stopped); p.Reachable != nil || p.MatchIndex != nil || p.Lag != nil || p.ContactAgeMS != nil {
		t.Fatalf("the follower's own view claims to know another follower: %+v", p)
	}
	if p := peer(last, asked); !reachable(p) {
		t.Fatalf("the asked node not reachable in its own view: %+v", p)
	}
	out, err = run(args("cluster", "status")...)
	if err != nil {
		t.Fatalf("cluster status without a leader must still answer (exit 0): %v\n%s", err, stderr)
	}
	t.Logf("no leader:\n%s", out)
	if first := strings.SplitN(out, "\n", 2)[0]; !strings.HasPrefix(first, "view: "+asked+"'s own, NOT the leader's (asked "+asked+"): ") {
		t.Fatalf("header %q:\n%s", first, out)
	}
	if row := rowOf(out, stopped); !strings.Contains(row, "unknown") || strings.Contains(row, " 0 ") {
		t.Fatalf("%s's row in a follower's own view: %q\n%s", stopped, row, out)
	}
}

// rowOf is the table row of one member.
func rowOf(out, id string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, id+" ") {
			return l
		}
	}
	return ""
}
