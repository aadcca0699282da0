package node

import (
	"testing"
	"time"
)

// The view records calls and open sync streams, stays within its bound,
// and forgets agents the state no longer holds.
func TestAgentSeenView(t *testing.T) {
	s := &seenAgents{limit: 2}
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if last, conn := s.contact("a"); !last.IsZero() || conn {
		t.Fatalf("unseen agent: %v %v", last, conn)
	}
	s.saw("a", t0)
	s.saw("a", t0.Add(-time.Minute)) // a late report does not go back
	if last, conn := s.contact("a"); !last.Equal(t0) || conn {
		t.Fatalf("a: %v %v", last, conn)
	}
	done := s.syncOpened("b", t0)
	if _, conn := s.contact("b"); !conn {
		t.Fatal("b's open sync stream not shown")
	}
	s.saw("c", t0) // over the bound: not recorded
	if last, _ := s.contact("c"); !last.IsZero() {
		t.Fatal("recorded past the bound")
	}
	s.prune(func(string) bool { return false })
	if last, _ := s.contact("a"); !last.IsZero() {
		t.Fatal("a removed agent was kept")
	}
	if _, conn := s.contact("b"); !conn {
		t.Fatal("prune dropped an open stream")
	}
	done()
	if last, conn := s.contact("b"); conn || !last.After(t0) {
		t.Fatalf("b after its stream closed: %v %v", last, conn)
	}
}
