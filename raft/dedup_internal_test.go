package raft

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// dropAnswers makes the leader lose its answer to the next drops forwarded
// applies of cmd (after applying them: the connection is closed instead of
// the answer being written), and records the request ID of every apply of
// cmd it gets.
func dropAnswers(t *testing.T, leader *Node, cmd []byte, drops int) (ids func() [][]byte) {
	t.Helper()
	var mu sync.Mutex
	var seen [][]byte
	hook := func(req *rpcRequest, _ *rpcResponse) bool {
		if req.Op != opApply || !bytes.Equal(req.Cmd, cmd) {
			return true
		}
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, req.RequestID)
		if drops > 0 {
			drops--
			return false
		}
		return true
	}
	leader.testBeforeAnswer.Store(&hook)
	t.Cleanup(func() { leader.testBeforeAnswer.Store(nil) })
	return func() [][]byte {
		mu.Lock()
		defer mu.Unlock()
		return append([][]byte(nil), seen...)
	}
}

// steadyLeader: these tests need one leader throughout (a new leader does
// not know the IDs, and raw requests are not retried elsewhere), so they
// ride out a loaded machine's stalls with longer timeouts than the
// default test cluster's.
func steadyLeader(cfg *Config) {
	cfg.HeartbeatTimeout, cfg.ElectionTimeout = time.Second, time.Second
}

// The leader commits a forwarded command and the follower loses the answer
// (the connection closes before it is written): the follower re-sends it,
// and must get the first answer back while every replica applies the
// command once. Before request IDs it was applied once per send.
func TestForwardedApplyLostAnswerAppliedOnce(t *testing.T) {
	const applyTimeout = 2 * time.Second
	c := newTestClusterWith(t, func(c *testCluster) {
		c.opts = func(cfg *Config) {
			steadyLeader(cfg)
			cfg.ApplyTimeout = applyTimeout
		}
	}, "a", "b", "c")
	leaderID, leader := c.leader()
	fol := c.nodes[c.followers(leaderID)[0]]
	ctx := context.Background()

	for _, tc := range []struct {
		name  string
		cmd   []byte
		drops int
	}{
		// rpcPool.call re-sends on a fresh connection.
		{"answer lost once", set("token", "t1"), 1},
		// Both of the pool's attempts lose it: Apply's loop re-sends.
		{"answer lost three times", set("join", "j1"), 3},
		{"refusal lost", set("fail", "x"), 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			seen := dropAnswers(t, leader, tc.cmd, tc.drops)
			resp, err := fol.Apply(ctx, tc.cmd)
			if bytes.Contains(tc.cmd, []byte(`"fail"`)) {
				var ae *ApplyError
				if !errors.As(err, &ae) || !strings.Contains(ae.Msg, "not allowed") {
					t.Fatalf("refused command whose answer was lost: %v", err)
				}
			} else if err != nil || len(resp) == 0 {
				t.Fatalf("Apply: %q, %v", resp, err)
			}
			ids := seen()
			if len(ids) != tc.drops+1 {
				t.Fatalf("leader got %d sends, want %d", len(ids), tc.drops+1)
			}
			for _, id := range ids {
				if len(id) != requestIDLen || !bytes.Equal(id, ids[0]) {
					t.Fatalf("re-sends carry request IDs %x, want one 16-byte ID", ids)
				}
			}
			for id, n := range c.nodes {
				if err := n.ReadIndex(ctx); err != nil {
					t.Fatal(err)
				}
				if got := c.fsms[id].applies(tc.cmd); got != 1 {
					t.Fatalf("%s applied the command %d times", id, got)
				}
			}
		})
	}

	// A leader that never gets an answer through: the follower re-sends
	// for ApplyTimeout after its first send and then says the outcome is
	// unknown, even with a longer context, since the leader keeps answers
	// only for a while. All its re-sends were deduplicated.
	t.Run("answer always lost", func(t *testing.T) {
		cmd := set("lost", "l1")
		seen := dropAnswers(t, leader, cmd, 1<<30)
		lctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		start := time.Now()
		_, err := fol.Apply(lctx, cmd)
		if !errors.Is(err, ErrNoLeader) || !strings.Contains(err.Error(), "may have been applied") {
			t.Fatalf("Apply with every answer lost: %v", err)
		}
		if took := time.Since(start); took < applyTimeout || took > applyTimeout+3*time.Second {
			t.Fatalf("gave up after %v, want about %v", took, applyTimeout)
		}
		if len(seen()) < 3 {
			t.Fatalf("only %d sends", len(seen()))
		}
		if got := c.fsms[leaderID].applies(cmd); got != 1 {
			t.Fatalf("leader applied the command %d times", got)
		}
	})
}

// A re-send that reaches the leader while the first send is still being
// applied waits for its answer instead of applying it again.
func TestForwardedApplyDuplicateInFlightWaits(t *testing.T) {
	c := newTestClusterWith(t, func(c *testCluster) {
		c.delay = 400 * time.Millisecond
		c.opts = steadyLeader
	}, "a", "b", "c")
	leaderID, leader := c.leader()
	fol := c.nodes[c.followers(leaderID)[0]]
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := set("slow", "1")
	req := &rpcRequest{Op: opApply, Cmd: cmd, RequestID: newRequestID()}
	var wg sync.WaitGroup
	resps := make([]rpcResponse, 2)
	errs := make([]error, 2)
	for i := range resps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = fol.pool.call(ctx, leader.Addr(), req, &resps[i])
		}()
		if i == 0 {
			// kv counts the call before its delay: the first send is
			// being applied.
			eventually(t, "first send in the leader's FSM", func() bool { return c.fsms[leaderID].applies(cmd) == 1 })
		}
	}
	wg.Wait()
	for i := range resps {
		if errs[i] != nil || resps[i].Err != "" || len(resps[i].Resp) == 0 {
			t.Fatalf("send %d: %v %+v", i, errs[i], resps[i])
		}
	}
	if !bytes.Equal(resps[0].Resp, resps[1].Resp) {
		t.Fatalf("answers differ: %s, %s", resps[0].Resp, resps[1].Resp)
	}
	if got := c.fsms[leaderID].applies(cmd); got != 1 {
		t.Fatalf("leader applied the command %d times", got)
	}
}

// What the leader keeps is bounded: answers a peer has read are dropped
// when its next request arrives on the connection; the others, at most
// maxPerPeer per peer (oldest answer evicted), for ttl. An ID evicted or
// expired is unknown again, so its re-send is applied again (a follower
// re-sends for ApplyTimeout only, well inside the ttl). IDs are per peer,
// malformed ones are refused, and a request without one (a follower from
// before request IDs) is applied as it comes.
func TestForwardedApplyTableBounded(t *testing.T) {
	c := newTestClusterWith(t, func(c *testCluster) { c.opts = steadyLeader }, "a", "b", "c")
	leaderID, leader := c.leader()
	fols := c.followers(leaderID)
	fol, other := c.nodes[fols[0]], c.nodes[fols[1]]
	lfsm := c.fsms[leaderID]
	d := leader.dedup
	const maxPerPeer = 8
	now := time.Now()
	d.mu.Lock()
	d.maxPerPeer = maxPerPeer
	d.now = func() time.Time { return now } // called with d.mu held
	d.mu.Unlock()
	advance := func(dt time.Duration) {
		d.mu.Lock()
		now = now.Add(dt)
		d.mu.Unlock()
	}

	dial := func(from *Node) net.Conn {
		t.Helper()
		conn, err := from.dial(leader.Addr(), protoRPC, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	call := func(conn net.Conn, req *rpcRequest) rpcResponse {
		t.Helper()
		var r rpcResponse
		if err := writeFrame(conn, req); err != nil {
			t.Fatal(err)
		}
		if err := readFrame(conn, &r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	// once sends req on a connection of its own, closed after the answer:
	// the leader never learns that the answer arrived.
	once := func(from *Node, req *rpcRequest) rpcResponse {
		t.Helper()
		conn := dial(from)
		defer drop(conn)
		return call(conn, req)
	}
	apply := func(cmd []byte, id []byte) *rpcRequest {
		return &rpcRequest{Op: opApply, Cmd: cmd, RequestID: id}
	}

	// Answers read on a reused connection are forgotten at the next request.
	conn := dial(fol)
	for i := 0; i < 3*maxPerPeer; i++ {
		if r := call(conn, apply(set(fmt.Sprint("seq", i), "v"), newRequestID())); r.Err != "" {
			t.Fatal(r.Err)
		}
	}
	drop(conn)
	if got := d.size(); got != 1 {
		t.Fatalf("after %d requests on one connection the leader keeps %d answers, want 1 (the last)", 3*maxPerPeer, got)
	}

	// Answers on connections that closed stay, up to the bound.
	const n = 3 * maxPerPeer
	cmds, ids, answers := make([][]byte, n), make([][]byte, n), make([][]byte, n)
	for i := range n {
		cmds[i], ids[i] = set(fmt.Sprint("k", i), "v"), newRequestID()
		r := once(fol, apply(cmds[i], ids[i]))
		if r.Err != "" || len(r.Resp) == 0 {
			t.Fatalf("apply %d: %+v", i, r)
		}
		answers[i] = r.Resp
		if got := d.size(); got > maxPerPeer {
			t.Fatalf("leader keeps %d answers for one peer, bound %d", got, maxPerPeer)
		}
	}
	if got := d.size(); got != maxPerPeer {
		t.Fatalf("leader keeps %d answers, want %d", got, maxPerPeer)
	}
	// A recent one is answered from the table.
	if r := once(fol, apply(cmds[n-1], ids[n-1])); !bytes.Equal(r.Resp, answers[n-1]) || lfsm.applies(cmds[n-1]) != 1 {
		t.Fatalf("re-send of a kept ID: %+v, applied %d times", r, lfsm.applies(cmds[n-1]))
	}
	// The same ID from another member is that member's own request.
	if r := once(other, apply(set("other", "v"), ids[n-1])); r.Err != "" || bytes.Equal(r.Resp, answers[n-1]) || lfsm.applies(set("other", "v")) != 1 {
		t.Fatalf("another peer's request with a kept ID: %+v", r)
	}
	// An evicted one is new again.
	if r := once(fol, apply(cmds[0], ids[0])); r.Err != "" || bytes.Equal(r.Resp, answers[0]) || lfsm.applies(cmds[0]) != 2 {
		t.Fatalf("re-send of an evicted ID: %+v, applied %d times, want 2", r, lfsm.applies(cmds[0]))
	}

	// Past the ttl every answer is dropped at the next request; an expired
	// ID is new again.
	advance(d.ttl + time.Second)
	if r := once(fol, apply(set("fresh", "v"), newRequestID())); r.Err != "" {
		t.Fatal(r.Err)
	}
	if got := d.size(); got != 1 {
		t.Fatalf("after the ttl the leader keeps %d answers, want 1 (the newest)", got)
	}
	if r := once(fol, apply(cmds[n-1], ids[n-1])); r.Err != "" || bytes.Equal(r.Resp, answers[n-1]) || lfsm.applies(cmds[n-1]) != 2 {
		t.Fatalf("re-send of an expired ID: %+v, applied %d times, want 2", r, lfsm.applies(cmds[n-1]))
	}

	// A malformed ID is refused before anything is applied.
	for _, size := range []int{1, requestIDLen - 1, requestIDLen + 1, 64} {
		cmd := set(fmt.Sprint("bad", size), "v")
		r := once(fol, apply(cmd, bytes.Repeat([]byte{7}, size)))
		if want := fmt.Sprintf("request ID of %d bytes, want 16", size); !strings.Contains(r.Err, want) || r.Refused || r.Resp != nil || lfsm.applies(cmd) != 0 {
			t.Fatalf("%d-byte request ID: %+v, applied %d times", size, r, lfsm.applies(cmd))
		}
	}

	// Without an ID every send is applied, as before request IDs.
	legacy := set("legacy", "v")
	for range 2 {
		if r := once(fol, apply(legacy, nil)); r.Err != "" {
			t.Fatal(r.Err)
		}
	}
	if got := lfsm.applies(legacy); got != 2 {
		t.Fatalf("requests without an ID applied %d times, want 2", got)
	}
}

// The table on its own: a peer with maxPerPeer requests in flight cannot
// add one more (nothing answered to evict), a not-leader answer is not
// kept (a re-send after this node leads again must be applied), and
// waiters get the first answer.
func TestApplyDedupTable(t *testing.T) {
	d := newApplyDedup(time.Minute)
	d.maxPerPeer = 2
	id := func(b byte) requestID { return requestID{b} }
	e1, first, err := d.begin("b", id(1))
	if err != nil || !first {
		t.Fatal(first, err)
	}
	e2, _, _ := d.begin("b", id(2))
	if _, _, err := d.begin("b", id(3)); err == nil || !strings.Contains(err.Error(), "in flight") {
		t.Fatalf("third request in flight with a bound of 2: %v", err)
	}
	if _, first, err := d.begin("c", id(3)); err != nil || !first {
		t.Fatalf("another peer is bounded separately: %v %v", first, err)
	}
	w, first, _ := d.begin("b", id(1))
	if first || w != e1 {
		t.Fatal("a duplicate in flight is not the first request")
	}
	d.finish("b", e1, &rpcResponse{Resp: []byte("42")})
	<-w.done
	if string(w.resp.Resp) != "42" {
		t.Fatalf("waiter got %+v", w.resp)
	}
	d.finish("b", e2, &rpcResponse{NotLeader: true})
	if _, first, _ := d.begin("b", id(2)); !first {
		t.Fatal("a not-leader answer was kept")
	}
	// The bound is reached again (1 answered, 2 in flight): the answer is
	// evicted for a new request.
	if _, first, err := d.begin("b", id(4)); err != nil || !first {
		t.Fatalf("new request at the bound with an answer to evict: %v %v", first, err)
	}
	d.mu.Lock()
	_, kept := d.peers["b"].byID[id(1)]
	d.mu.Unlock()
	if kept {
		t.Fatal("the evicted answer is still known")
	}
}
