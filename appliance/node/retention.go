package node

import (
	"context"
	"time"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// retentionLoop runs on every node and acts only while the node leads: it
// proposes audit.prune for records past audit.retain (count or age), at
// most state.MaxPrunePerCommand at a time, so the replicated log stays
// bounded. Every node exports what a prune removes to a signed segment in
// its audit.export-dir before deleting it (in the state machine).
func (n *Node) retentionLoop(ctx context.Context) {
	every := n.cfg.Audit.Retain.Every.Duration
	if every <= 0 {
		every = 10 * time.Second
	}
	wait := every
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = every
		if !n.raft.IsLeader() {
			continue
		}
		before := n.pruneTarget(time.Now())
		if before == 0 {
			continue
		}
		first := n.fsm.AuditFirst()
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := n.apply(pctx, n.actor(), state.CmdAuditPrune, state.AuditPrune{Before: before})
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				n.log.Error("audit prune failed; retrying", "before", before, "err", err)
			}
			continue
		}
		n.log.Info("audit records pruned", "from", first, "to", before-1, "retained_from", before)
		if n.pruneTarget(time.Now()) != 0 {
			wait = 100 * time.Millisecond // still behind: keep going, but let other commands in
		}
	}
}

// pruneTarget is the first record to keep under the retention policy, or 0
// when nothing is due. One prune removes at most state.MaxPrunePerCommand.
func (n *Node) pruneTarget(now time.Time) uint64 {
	head, _ := n.fsm.AuditHead()
	first := n.fsm.AuditFirst()
	if head <= first {
		return 0
	}
	var before uint64
	// Pruning waits for some slack past the bound: each prune appends its
	// own record, and pruning one record at a time would write a segment
	// and sign with the HSM for every new record.
	if keep := uint64(n.cfg.Audit.Retain.Records); keep > 0 && head-first+1 > keep+pruneSlack(keep) {
		before = head - keep + 1
	}
	if age := n.cfg.Audit.Retain.Age.Duration; age > 0 {
		if b := n.fsm.FirstAuditAtOrAfter(now.Add(-age), state.MaxPrunePerCommand); b > before {
			before = b
		}
	}
	before = min(before, first+state.MaxPrunePerCommand, head)
	if before <= first {
		return 0
	}
	return before
}

// pruneSlack is how far past audit.retain.records the log may grow before
// the leader prunes back to the bound: 1% of it, at least 100 records.
func pruneSlack(keep uint64) uint64 { return max(keep/100, 100) }
