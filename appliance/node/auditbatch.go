package node

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// auditBatcher commits audit events from concurrent requests in shared raft
// commands: one commit per batch, not per SVID. A caller gets its answer
// only after the batch holding its events has committed, so nothing is
// issued that the cluster has not recorded.
type auditBatcher struct {
	apply   applier
	actor   string // this node, in whose name batches are committed
	in      chan auditJob
	maxWait time.Duration
	maxSize int
}

// errRefusedAtCommit: the FSM refused the issuance when it committed (the
// agent was banned or removed meanwhile).
var errRefusedAtCommit = errors.New("refused when recorded: the agent is banned or unknown")

type auditJob struct {
	events []state.AuditEvent
	done   chan error
}

func newAuditBatcher(apply applier, actor string) *auditBatcher {
	return &auditBatcher{apply: apply, actor: actor, in: make(chan auditJob, 4096), maxWait: 2 * time.Millisecond, maxSize: 1024}
}

// record blocks until the events are committed, or fails.
func (b *auditBatcher) record(ctx context.Context, events ...state.AuditEvent) error {
	job := auditJob{events: events, done: make(chan error, 1)}
	select {
	case b.in <- job:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-job.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run gathers jobs for at most maxWait after the first one (or maxSize
// events) and commits them. While a commit is in flight the next batch
// fills, so batches grow with load. Two commits may be in flight at once.
func (b *auditBatcher) run(ctx context.Context) {
	sem := make(chan struct{}, 2)
	for {
		var jobs []auditJob
		var events []state.AuditEvent
		select {
		case <-ctx.Done():
			return
		case j := <-b.in:
			jobs, events = append(jobs, j), append(events, j.events...)
		}
		timer := time.NewTimer(b.maxWait)
	fill:
		for len(events) < b.maxSize {
			select {
			case j := <-b.in:
				jobs, events = append(jobs, j), append(events, j.events...)
			case <-timer.C:
				break fill
			}
		}
		timer.Stop()
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			cctx, cancel := context.WithTimeout(ctx, quorumWait)
			resp, err := b.apply.apply(cctx, b.actor, state.CmdIssue, state.AuditAppend{Events: events})
			cancel()
			var res state.IssueResult
			if err == nil {
				err = json.Unmarshal(resp, &res)
			}
			refused := map[int]bool{}
			for _, i := range res.Refused {
				refused[i] = true
			}
			at := 0
			for _, j := range jobs {
				jerr := err
				for range j.events {
					if refused[at] && jerr == nil {
						jerr = errRefusedAtCommit
					}
					at++
				}
				j.done <- jerr
			}
		}()
	}
}
