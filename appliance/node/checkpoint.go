package node

import (
	"context"
	"fmt"
	"time"

	"github.com/sigil-appliance/sigil/appliance/state"
)

const (
	// checkpointMinGap spaces the loop's looks at the head: it wakes on
	// every applied change, which under load is thousands a second.
	checkpointMinGap = 100 * time.Millisecond
	// checkpointRetry bounds how soon a failed checkpoint is retried.
	checkpointRetry = 5 * time.Second
)

// checkpointLoop runs on every node and acts only while the node leads:
// after audit.checkpoint-every new records or audit.checkpoint-interval,
// whichever comes first, it signs the audit chain head with the node's
// HSM-held issuing CA key and commits the signature (CmdAuditCheckpoint),
// so that the log up to there can be verified against the root. A failure
// is logged and retried, never fatal.
func (n *Node) checkpointLoop(ctx context.Context) {
	every := uint64(n.cfg.Audit.CheckpointEvery)
	if every == 0 {
		every = defaultCheckpointEvery
	}
	interval := n.cfg.Audit.CheckpointInterval.Duration
	if interval <= 0 {
		interval = defaultCheckpointInterval
	}
	poll := min(interval, time.Second)
	var (
		since   time.Time // start of the time window: last checkpoint, or leadership
		leading bool
		retryAt time.Time
	)
	for {
		changed := n.fsm.Changed()
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(poll):
		}
		// At most one look per gap, however fast changes are applied.
		select {
		case <-ctx.Done():
			return
		case <-time.After(checkpointMinGap):
		}
		if !n.raft.IsLeader() {
			leading = false
			continue
		}
		now := time.Now()
		if !leading {
			leading, since = true, now
		}
		if now.Before(retryAt) {
			continue
		}
		last := n.fsm.LastCheckpoint()
		seq, hash := n.fsm.AuditHead()
		if n.checkpointDue(seq, last, every, now.Sub(since) >= interval) {
			if err := n.checkpoint(ctx, seq, hash); err != nil {
				if ctx.Err() != nil {
					return
				}
				n.log.Error("audit checkpoint failed; retrying", "seq", seq, "retry_in", min(interval, checkpointRetry), "err", err)
				retryAt = now.Add(min(interval, checkpointRetry))
				continue
			}
			since = time.Now()
		}
	}
}

// checkpointDue: the head is past the last checkpoint by more than the
// checkpoint's own record (the state appends one), and either enough
// records or enough time have gone by.
func (n *Node) checkpointDue(seq, last, every uint64, timeUp bool) bool {
	if seq <= last {
		return false
	}
	if seq == last+1 {
		if recs := n.fsm.Audit(last, 1); len(recs) == 1 && recs[0].Action == state.CmdAuditCheckpoint {
			return false
		}
	}
	return seq-last >= every || timeUp
}

// checkpoint signs (seq, hash) and commits it as this node.
func (n *Node) checkpoint(ctx context.Context, seq uint64, hash string) error {
	digest := state.CheckpointDigest(n.td.Name(), seq, hash)
	sig, err := n.auth.SignCheckpoint(digest)
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, quorumWait)
	defer cancel()
	if _, err := n.apply(actx, n.actor(), state.CmdAuditCheckpoint, state.AuditCheckpoint{
		Seq: seq, Hash: hash, Node: n.cfg.NodeID, Cert: n.auth.Issuing().Raw, Signature: sig,
	}); err != nil {
		return fmt.Errorf("commit checkpoint: %w", err)
	}
	n.log.Info("audit checkpoint", "seq", seq, "hash", hashPrefix(hash))
	return nil
}

func hashPrefix(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}
