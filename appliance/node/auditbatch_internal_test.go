package node

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// slowApplier commits after a delay and counts commits and events.
type slowApplier struct {
	delay   time.Duration
	commits atomic.Int32
	events  atomic.Int32
}

func (a *slowApplier) apply(ctx context.Context, _, _ string, payload any) ([]byte, error) {
	select {
	case <-time.After(a.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	a.commits.Add(1)
	a.events.Add(int32(len(payload.(state.AuditAppend).Events)))
	return json.Marshal(state.IssueResult{})
}

// Records made while a commit is in flight share the next commit: 64
// concurrent callers behind a 50 ms commit cost a handful of commits, not
// 64, and every event is committed exactly once.
func TestAuditBatcherGroupsConcurrentRecords(t *testing.T) {
	app := &slowApplier{delay: 50 * time.Millisecond}
	b := newAuditBatcher(app, "node-1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.run(ctx)
	var wg sync.WaitGroup
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := b.record(ctx, state.AuditEvent{Action: "svid.x509.issue"}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if c, e := app.commits.Load(), app.events.Load(); c > 4 || e != 64 {
		t.Fatalf("64 concurrent records: %d commits holding %d events; want at most 4 commits holding 64", c, e)
	}
}

// An announced record that never comes does not stop the others from
// committing (the wait for it is bounded), and an announcement is counted
// once whether it is settled, recorded, or both.
func TestAuditBatcherExpectationSettles(t *testing.T) {
	app := &slowApplier{}
	b := newAuditBatcher(app, "node-1")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go b.run(ctx)
	never := b.expect()
	for i := 0; i < 3; i++ {
		if err := b.record(ctx, state.AuditEvent{Action: "svid.x509.issue"}); err != nil {
			t.Fatal(err)
		}
	}
	never.settle()
	exp := b.expect()
	if err := b.record(ctx, state.AuditEvent{Action: "svid.x509.issue"}); err != nil {
		t.Fatal(err)
	}
	exp.settle()
	exp.settle() // twice: counted once
	if n := b.arriving.Load(); n != 0 {
		t.Fatalf("%d records still expected after settle", n)
	}
	exp = b.expect()
	if err := exp.record(ctx, state.AuditEvent{Action: "svid.x509.issue"}); err != nil {
		t.Fatal(err)
	}
	exp.settle()
	if n := b.arriving.Load(); n != 0 {
		t.Fatalf("%d records still expected after record and settle", n)
	}
}
