package node

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"sync/atomic"
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
	maxSize int
	// arriving counts expected records not queued yet (expect).
	arriving atomic.Int64
}

// maxInFlight commits of audit batches run at once. One: the batch that
// waits for the commit in flight becomes the next batch, as large as the
// load makes it. With two in flight the second slot took whatever had
// arrived, and batches alternated between ~57 events and ~7 for 64
// callers; the benchmarks measured no gain from a second slot.
const maxInFlight = 1

// maxGather bounds how long a batch that has a commit slot waits for
// expected records (see run): about what checking and signing a request
// takes on a busy node, a fraction of a commit. gatherPoll is how often
// the wait looks again at whether any are still expected (a request may
// end without a record).
const (
	maxGather  = time.Millisecond
	gatherPoll = 100 * time.Microsecond
)

// errRefusedAtCommit: the FSM refused the issuance when it committed (the
// agent was banned or removed meanwhile).
var errRefusedAtCommit = errors.New("refused when recorded: the agent is banned or unknown")

type auditJob struct {
	events []state.AuditEvent
	done   chan error
	// expected: an announced record (expect); the batcher counts it as
	// arrived when it takes the job, so that it never waits for a record
	// it already holds.
	expected bool
}

func newAuditBatcher(apply applier, actor string) *auditBatcher {
	return &auditBatcher{apply: apply, actor: actor, in: make(chan auditJob, 4096), maxSize: 1024}
}

// record blocks until the events are committed, or fails.
func (b *auditBatcher) record(ctx context.Context, events ...state.AuditEvent) error {
	return b.enqueue(ctx, auditJob{events: events})
}

// expect says that a record is on its way: its request is being checked
// and signed. A batch that could commit waits (briefly) for expected
// records, so that callers answered together are committed together again
// (see run). The expectation ends when the batcher takes its record, or
// when settle is called (the request ended without one).
func (b *auditBatcher) expect() expectation {
	b.arriving.Add(1)
	return &expected{b: b}
}

type expected struct {
	b    *auditBatcher
	once sync.Once // the expectation ends once: settled, or handed over
}

func (e *expected) settle() { e.once.Do(func() { e.b.arriving.Add(-1) }) }

func (e *expected) record(ctx context.Context, events ...state.AuditEvent) error {
	handed := false
	e.once.Do(func() { handed = true })
	return e.b.enqueue(ctx, auditJob{events: events, expected: handed})
}

// enqueue queues a job and waits for its commit.
func (b *auditBatcher) enqueue(ctx context.Context, job auditJob) error {
	job.done = make(chan error, 1)
	select {
	case b.in <- job:
	case <-ctx.Done():
		if job.expected {
			b.arriving.Add(-1)
		}
		return ctx.Err()
	}
	select {
	case err := <-job.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run commits jobs as a group commit does: a batch goes to raft once a
// commit slot is free, holding every job queued by then (up to maxSize
// events); while a commit is in flight the next batch fills, so batches
// grow with load. A lone request commits at once.
//
// Callers answered by one commit come back one by one (each checks and
// signs first), and a batch that went as soon as the slot freed would hold
// only the first of them: with 4 callers, commits alternated between two
// groups of 2, and each caller waited for two commits per SVID. So a batch
// with a free slot waits, for at most maxGather, while records are
// expected (requests being checked and signed on this node): callers
// answered together are committed together again. Nothing is waited for
// when no request is under way.
func (b *auditBatcher) run(ctx context.Context) {
	sem := make(chan struct{}, maxInFlight)
	lastJobs := 0             // jobs in the batch committed last
	var lastDone atomic.Int64 // when its callers were answered (Unix ns)
	for {
		var jobs []auditJob
		var events []state.AuditEvent
		take := func(j auditJob) {
			jobs, events = append(jobs, j), append(events, j.events...)
			if j.expected {
				b.arriving.Add(-1)
			}
		}
		select {
		case <-ctx.Done():
			return
		case j := <-b.in:
			take(j)
		}
		// A commit slot; waited: the slot was busy when the first job came.
		acquired, waited := false, false
		select {
		case sem <- struct{}{}:
			acquired = true
		default:
			waited = true
		}
	fill:
		for !acquired && len(events) < b.maxSize {
			select {
			case j := <-b.in:
				take(j)
			case sem <- struct{}{}:
				acquired = true
				break fill
			}
		}
		if !acquired {
			sem <- struct{}{}
		}
		// The callers the last commit answered are likely to be back
		// soon, if it ended just now: expect them. Jobs that waited for
		// the slot arrived during that commit and are others.
		returning := 0
		if done := lastDone.Load(); done != 0 && time.Since(time.Unix(0, done)) < maxGather {
			returning = lastJobs
			if waited {
				returning += len(jobs)
			}
		}
		if b.arriving.Load() > 0 || len(jobs) < returning {
			deadline := time.Now().Add(maxGather)
			poll := time.NewTimer(gatherPoll)
			for len(events) < b.maxSize && (b.arriving.Load() > 0 || len(jobs) < returning) && time.Now().Before(deadline) {
				select {
				case j := <-b.in:
					take(j)
				case <-poll.C:
					poll.Reset(gatherPoll)
				}
			}
			poll.Stop()
		}
	drain:
		for len(events) < b.maxSize {
			select {
			case j := <-b.in:
				take(j)
			default:
				break drain
			}
		}
		lastJobs = len(jobs)
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
			lastDone.Store(time.Now().UnixNano())
		}()
	}
}
