package raft

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// TestResetConnectionsReverifiesPeers: the TLS config is consulted only at
// the handshake, so a peer whose certificate the config stops accepting
// keeps the connections it has (forwarded writes commit over them). After
// ResetConnections on every node, each peer must handshake again: the
// refused peer can no longer forward, the others go on as before, and once
// the peer is accepted again it reconnects on its own.
func TestResetConnectionsReverifiesPeers(t *testing.T) {
	var mu sync.Mutex
	refused := map[string]bool{}
	c := newTestClusterWith(t, func(c *testCluster) {
		c.opts = func(cfg *Config) {
			cfg.TLS.VerifyConnection = func(cs tls.ConnectionState) error {
				mu.Lock()
				defer mu.Unlock()
				if len(cs.PeerCertificates) > 0 && refused[cs.PeerCertificates[0].Subject.CommonName] {
					return errors.New("peer refused by the test")
				}
				return nil
			}
		}
	}, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	fol := c.followers(leaderID)
	bad, good := fol[0], fol[1]
	if _, err := c.nodes[bad].Apply(ctx, set("warm", "1")); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	refused[bad] = true
	mu.Unlock()
	// Without a reset the warm connection still carries the write: this
	// is what ResetConnections is for.
	if _, err := c.nodes[bad].Apply(ctx, set("stale", "1")); err != nil {
		t.Fatalf("write over a connection opened before the refusal: %v (the test's premise no longer holds)", err)
	}

	// The others reset (the refused peer itself does not: it is not told).
	// The leader's outbound streams stay for the grace period.
	const grace = time.Second
	closed := 0
	for id, n := range c.nodes {
		if id != bad {
			closed += n.ResetConnections(grace)
		}
	}
	if closed == 0 {
		t.Fatal("ResetConnections closed no connection")
	}
	// Within the grace period the leader's entries still reach it.
	if _, err := leader.Apply(ctx, set("grace", "1")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(grace)
	for _, ok := c.fsms[bad].get("grace"); !ok; _, ok = c.fsms[bad].get("grace") {
		if time.Now().After(deadline) {
			t.Fatal("the refused peer did not receive the leader's entry during the grace period")
		}
		time.Sleep(10 * time.Millisecond)
	}
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	_, err := c.nodes[bad].Apply(actx, set("after", "1"))
	cancel()
	if err == nil {
		t.Fatal("a refused peer forwarded a write after ResetConnections")
	}
	if _, err := c.nodes[good].Apply(ctx, set("good", "1")); err != nil {
		t.Fatalf("a good follower's write after the reset: %v", err)
	}
	if _, err := leader.Apply(ctx, set("leader", "1")); err != nil {
		t.Fatalf("the leader's write after the reset: %v", err)
	}
	if _, ok := c.fsms[leaderID].get("after"); ok {
		t.Fatal("the refused peer's write was applied")
	}
	if id, _ := c.leader(); id != leaderID {
		t.Logf("leadership moved from %s to %s during the reset", leaderID, id)
	}
	// Past the grace period the leader's streams to the refused peer are
	// closed and cannot be reopened: it receives nothing more.
	time.Sleep(grace + 500*time.Millisecond)
	if _, err := leader.Apply(ctx, set("late", "1")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if _, ok := c.fsms[bad].get("late"); ok {
		t.Fatal("the refused peer still receives the log after the grace period")
	}
	if _, ok := c.fsms[good].get("late"); !ok {
		t.Fatal("the good follower lacks the leader's write")
	}

	// Accepted again: it reconnects by itself and catches up.
	mu.Lock()
	delete(refused, bad)
	mu.Unlock()
	if _, err := c.nodes[bad].Apply(ctx, set("back", "1")); err != nil {
		t.Fatalf("write after the peer is accepted again: %v", err)
	}
	eventually(t, "the peer catches up", func() bool { _, ok := c.fsms[bad].get("leader"); return ok })
}

// TestResetConnectionsRacesHandshake: a connection whose handshake was
// verified before a reset is not kept after it; connections verified after
// it are not closed by it.
func TestResetConnectionsRacesHandshake(t *testing.T) {
	var s connSet
	gen := s.generation()
	old, err := s.track(nopConn{}, gen, true)
	if err != nil {
		t.Fatal(err)
	}
	reset := s.next(false)
	if _, err := s.track(nopConn{}, gen, false); !errors.Is(err, errConnReset) {
		t.Fatalf("a connection verified before the reset was tracked: %v", err)
	}
	if _, err := s.track(nopConn{}, s.generation(), true); err != nil {
		t.Fatal(err)
	}
	if n := s.closeBefore(reset, false); n != 0 {
		t.Fatalf("closed %d inbound, want 0", n)
	}
	if n := s.closeBefore(reset, true); n != 1 {
		t.Fatalf("closed %d outbound, want only the one from before the reset", n)
	}
	_ = old.Close() // a nopConn: Close only untracks it
	s.next(true)
	if _, err := s.track(nopConn{}, s.generation(), false); err == nil {
		t.Fatal("tracked a connection after shutdown")
	}
}

type nopConn struct{ net.Conn }

func (nopConn) Close() error { return nil }
