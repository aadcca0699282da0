package raft

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A flood of TCP connections to a member's raft port that never start
// TLS: at most the handshake cap is held at once (the oldest is dropped
// for a new one), the rest are closed after the handshake timeout, and the
// members keep replicating and forwarding through it.
func TestAttackRaftIdleConnections(t *testing.T) {
	const handshakeTimeout = 1500 * time.Millisecond
	const maxHandshakes = 32
	c := newTestClusterWith(t, func(c *testCluster) {
		c.opts = func(cfg *Config) {
			cfg.Limits = TransportLimits{HandshakeTimeout: handshakeTimeout, MaxHandshakes: maxHandshakes}
		}
	}, "a", "b", "c")
	leaderID, leader := c.leader()
	var target string
	for _, id := range []string{"a", "b", "c"} {
		if id != leaderID {
			target = id
			break
		}
	}
	ctx := context.Background()
	if _, err := leader.Apply(ctx, set("before", "1")); err != nil {
		t.Fatal(err)
	}

	const flood = 400
	start := time.Now()
	conns := make([]net.Conn, 0, flood)
	for i := 0; i < flood; i++ {
		cn, err := net.Dial("tcp", c.addrs[leaderID])
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, cn)
	}
	dialled := time.Since(start)
	var early, inTime, open atomic.Int64
	var wg sync.WaitGroup
	for _, cn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { _ = cn.Close() }() // the server has hung up, or the test failed
			if err := cn.SetReadDeadline(start.Add(handshakeTimeout + 2*time.Second)); err != nil {
				t.Error(err)
				return
			}
			_, err := cn.Read(make([]byte, 1))
			var ne net.Error
			switch since := time.Since(start); {
			case errors.As(err, &ne) && ne.Timeout():
				open.Add(1)
			case since < dialled+500*time.Millisecond:
				early.Add(1)
			default:
				inTime.Add(1)
			}
		}()
	}

	// During the flood a follower forwards writes to the leader over new
	// RPC connections, and raft replicates them.
	time.Sleep(100 * time.Millisecond)
	c.nodes[target].pool.closeAll()
	for i := 0; i < 5; i++ {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := c.nodes[target].Apply(actx, set("during", "1"))
		cancel()
		if err != nil {
			t.Fatalf("forwarded write during the flood: %v", err)
		}
	}
	wg.Wait()
	t.Logf("%d idle connections dialled in %v: %d closed at once, %d after the handshake timeout, %d still open",
		flood, dialled.Round(time.Millisecond), early.Load(), inTime.Load(), open.Load())
	if n := open.Load(); n > 0 {
		t.Fatalf("%d idle connections still open after %v (handshake timeout %v)", n, handshakeTimeout+2*time.Second, handshakeTimeout)
	}
	if n := flood - early.Load(); n > maxHandshakes+8 {
		t.Fatalf("%d connections awaiting a handshake held at once, cap %d", n, maxHandshakes)
	}
	eventually(t, "the write on every member", func() bool {
		for _, id := range []string{"a", "b", "c"} {
			if _, ok := c.fsms[id].get("during"); !ok {
				return false
			}
		}
		return true
	})
}

// A verified peer that completes TLS but never says what the connection
// carries is dropped after the handshake timeout, and an RPC connection
// that sends no request after the RPC idle timeout.
func TestTransportTimeouts(t *testing.T) {
	c := newTestClusterWith(t, func(c *testCluster) {
		c.opts = func(cfg *Config) {
			cfg.Limits = TransportLimits{HandshakeTimeout: 500 * time.Millisecond, RPCIdleTimeout: time.Second}
		}
	}, "a")
	peer := c.ca.tls(t, "b")
	for _, tc := range []struct {
		name  string
		proto []byte
		want  time.Duration
	}{
		{"no protocol byte", nil, 500 * time.Millisecond},
		{"idle RPC connection", []byte{protoRPC}, time.Second},
	} {
		conn, err := tls.Dial("tcp", c.addrs["a"], peer)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if len(tc.proto) > 0 {
			if _, err := conn.Write(tc.proto); err != nil {
				t.Fatal(err)
			}
		}
		if err := conn.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		_, err = conn.Read(make([]byte, 1))
		took := time.Since(start)
		_ = conn.Close() // read is all the test needs
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: still open after 5s", tc.name)
		}
		if took < tc.want-100*time.Millisecond || took > tc.want+time.Second {
			t.Fatalf("%s: closed after %v, want about %v", tc.name, took, tc.want)
		}
	}
}

// A frame header claiming the largest frame, with nothing behind it, does
// not make the reader allocate what the header claims.
func TestReadFrameAllocatesWhatArrives(t *testing.T) {
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], maxFrame)
	r := io.MultiReader(bytes.NewReader(hdr[:]), bytes.NewReader([]byte(`{"Op":"stats"`)))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	var req rpcRequest
	err := readFrame(r, &req)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated frame: %v, want unexpected EOF", err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("a %d-byte frame header with 13 bytes behind it allocated %d bytes", maxFrame, n)
	}
}
