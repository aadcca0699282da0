package node

import (
	"testing"
	"time"
)

// A banned agent's refusals are audited once per agent per period, the
// next record carrying how many were left out; agents are apart.
func TestBannedAuditPeriod(t *testing.T) {
	now := time.Unix(1000, 0)
	b := newBannedAudit()
	b.now = func() time.Time { return now }
	if ok, n := b.take("a"); !ok || n != 0 {
		t.Fatalf("first refusal: %v %d", ok, n)
	}
	for i := 0; i < 100; i++ {
		if ok, _ := b.take("a"); ok {
			t.Fatalf("refusal %d within the period audited", i)
		}
	}
	if ok, _ := b.take("b"); !ok {
		t.Fatal("another agent's first refusal not audited")
	}
	now = now.Add(bannedAuditEvery)
	if ok, n := b.take("a"); !ok || n != 100 {
		t.Fatalf("after the period: %v, %d left out, want 100", ok, n)
	}
	if ok, _ := (*bannedAudit)(nil).take("a"); !ok {
		t.Fatal("no limiter: every refusal is audited")
	}
}
