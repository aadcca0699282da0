package ctl

import (
	"bufio"
	"fmt"
	"strconv"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
)

const clusterStatusLong = `Shows the answering node's own raft state, then every member as the
leader sees it: reachable (heard from within three heartbeat timeouts),
its last contact, the last log index it reported (match index) and its
lag behind the leader's last index. A follower asks the leader for that
view through raft; the first line says whose view is shown and which node
was asked.

When no leader answers (no quorum, an election, the leader unreachable)
the answering node's own view is shown, marked as such with the reason:
a follower knows only its leader's contact and a node without a leader
only itself, so the rest reads "unknown". The command still exits 0: a
node answered and the answer is the report. Scripts check "view.leader"
in the JSON output (or a node's /readyz).

Then the trust chain's expiries as the answering node's replica records
them: each node's issuing CA, the roots, and each node's newest JWT key,
with a WARNING line for each issuing CA or root expiring within
--warn-within (default 30 days) and each newest JWT key expiring within
24h (keys are short-lived by design: the newest one running out means
the node stopped rotating). The command exits 0 with warnings too; scripts
read "expiries" in the JSON output.`

// printClusterStatus prints the view's header, the answering node and the
// members. What the view cannot know reads "unknown", never 0.
func printClusterStatus(w *bufio.Writer, s *api.ClusterStatus) {
	v := s.View
	if v.Leader {
		fmt.Fprintf(w, "view: leader %s (asked %s)\n", v.NodeID, s.NodeID)
	} else {
		fmt.Fprintf(w, "view: %s's own, NOT the leader's (asked %s): %s\n", v.NodeID, s.NodeID, orUnknown(v.LeaderError))
		fmt.Fprintln(w, "  a node other than the leader cannot see the other members: their reachability, match index and lag are unknown")
	}
	leader := "unknown"
	if s.LeaderID != "" {
		leader = s.LeaderID + " at " + s.LeaderAddr
	}
	fmt.Fprintf(w, "node %s (%s), leader %s, term %d, last index %d, commit %d, applied %d\n",
		s.NodeID, s.State, leader, s.Term, s.LastIndex, s.CommitIndex, s.AppliedIndex)
	var rows [][]string
	for _, p := range s.Peers {
		reach := "unknown"
		if p.Reachable != nil {
			reach = map[bool]string{true: "yes", false: "no"}[*p.Reachable]
		}
		contact := "unknown"
		switch {
		case p.ID == v.NodeID:
			contact = "self"
		case p.ContactAgeMS != nil:
			contact = (time.Duration(*p.ContactAgeMS) * time.Millisecond).String() + " ago"
		}
		rows = append(rows, []string{p.ID, p.Addr, p.Suffrage, reach, contact, uintOrUnknown(p.MatchIndex), uintOrUnknown(p.Lag)})
	}
	table(w, "PEER\tADDRESS\tSUFFRAGE\tREACHABLE\tLAST CONTACT\tMATCH INDEX\tLAG", rows)
	if v.ReachableWithinMS > 0 {
		fmt.Fprintf(w, "(reachable: heard from within %v)\n", time.Duration(v.ReachableWithinMS)*time.Millisecond)
	}
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func uintOrUnknown(p *uint64) string {
	if p == nil {
		return "unknown"
	}
	return strconv.FormatUint(*p, 10)
}
