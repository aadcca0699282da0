package state

import (
	"fmt"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// BenchmarkJobStateGrowth: 1,000,000 pipeline runs through one state
// machine, one every 86 ms of simulated time (a million a day), each
// joining with its own token; half end themselves (job.end), half just
// expire. Reported at 10,000 and at 1,000,000 runs: the job agents and
// used tokens the state holds and the bytes their buckets and indexes use
// (x-job-bytes-growth: 1,000,000 over 10,000, target ~1: what stays is
// the last TTL's and replay window's worth, not the history).
func BenchmarkJobStateGrowth(b *testing.B) {
	const small, large = 10_000, 1_000_000
	a := &applier{t: b, fsm: newFSM(b)}
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	r, ok := a.fsm.JoinRule("gh")
	if !ok {
		b.Fatal("no rule")
	}
	rev := r.Revision
	step := 24 * time.Hour / large
	usage := func() (agents, used int, bytes int) {
		err := a.fsm.db.View(func(tx *bolt.Tx) error {
			for _, name := range [][]byte{bAgents, bJobTokens, bJobTokensByExpiry, bJobAgentsByExpiry} {
				st := tx.Bucket(name).Stats()
				bytes += st.LeafInuse + st.BranchInuse
			}
			agents, used = tx.Bucket(bAgents).Stats().KeyN, tx.Bucket(bJobTokens).Stats().KeyN
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		return
	}
	var smallBytes int
	start := time.Now()
	for i := range large {
		at := t0.Add(time.Duration(i) * step)
		j := jobJoin("gh", rev, fmt.Sprintf("%d-1", i), fmt.Sprintf("token-%d", i), at)
		if _, err := a.apply(CmdJobJoin, at, j); err != nil {
			b.Fatal(err)
		}
		if i%2 == 0 {
			if _, err := a.apply(CmdJobEnd, at.Add(step/2), JobEnd{Agent: j.Agent.ID}); err != nil {
				b.Fatal(err)
			}
		}
		switch i + 1 {
		case small:
			agents, used, bytes := usage()
			smallBytes = bytes
			b.ReportMetric(float64(agents), "agents@10k")
			b.ReportMetric(float64(used), "tokens@10k")
		case large:
			agents, used, bytes := usage()
			b.ReportMetric(float64(agents), "agents@1M")
			b.ReportMetric(float64(used), "tokens@1M")
			b.ReportMetric(float64(bytes)/float64(smallBytes), "x-job-bytes-growth")
		}
		if (i+1)%100_000 == 0 {
			b.Logf("%d runs applied in %v", i+1, time.Since(start).Round(time.Second))
		}
	}
	b.ReportMetric(float64(time.Since(start).Microseconds())/float64(large+large/2), "us/command")
}
