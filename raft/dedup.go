package raft

import (
	"container/list"
	"crypto/rand"
	"fmt"
	"sync"
	"time"
)

// Forwarded applies are deduplicated on the leader. A follower that sent a
// command and lost the answer (the connection broke, or the read timed
// out) cannot tell a command the leader committed from one it never got,
// and re-sends it; without a way to recognise the re-send the leader
// applied it twice (a new join token reported as existing, a join that
// succeeded answered "already used"). So the follower picks a random ID
// once per Apply call and sends it with every re-send of that command, and
// the leader keeps the answer it gave under (forwarding peer, ID) for a
// while.
//
// Residual: the table lives in the leader's memory only. When leadership
// changes between the first send and a re-send, the new leader does not
// know the ID and applies the command again (as it does when the follower
// itself became leader and applies locally, or when the first attempt
// ended in ErrLeadershipLost after its entry had committed). Replicating
// the table through the log would close that, at the price of a log entry
// the FSM does not see and a deterministic expiry; not done.

// requestIDLen is the size of a forwarded apply's request ID: 128 random
// bits, so that IDs from one follower never collide.
const requestIDLen = 16

type requestID [requestIDLen]byte

func newRequestID() []byte {
	id := make([]byte, requestIDLen)
	// crypto/rand.Read never returns an error (it crashes the program
	// when the OS cannot supply randomness).
	_, _ = rand.Read(id)
	return id
}

func parseRequestID(b []byte) (requestID, error) {
	var id requestID
	if len(b) != requestIDLen {
		return id, fmt.Errorf("raft rpc apply refused: request ID of %d bytes, want %d", len(b), requestIDLen)
	}
	copy(id[:], b)
	return id, nil
}

const (
	// dedupPerPeer bounds the answers kept for one forwarding peer. Entries
	// whose answer the peer has provably read are dropped at once (see
	// serveRPC), so what accumulates is answers given on connections that
	// closed afterwards, plus the last answer on each idle pooled
	// connection: a handful in normal operation.
	dedupPerPeer = 4096
	// dedupMargin is how much longer than ApplyTimeout an answer is kept
	// after it was given. A follower re-sends an ID only within its
	// ApplyTimeout of the first send (Node.Apply), and the leader's answer
	// comes after that first send, so the margin covers network delay and
	// members configured with different ApplyTimeouts.
	dedupMargin = 30 * time.Second
)

// applyDedup is the leader's table of forwarded applies, by peer and ID.
// It is bounded per peer in count (dedupPerPeer, the oldest completed
// entry evicted first) and in age (ttl after the answer); expired entries
// are dropped whenever a new forwarded apply arrives. An ID that is no
// longer in the table, evicted or expired, is indistinguishable from a new
// one and is applied again: the follower's re-send window keeps honest
// re-sends well inside the ttl, so only eviction by count (over
// dedupPerPeer answers outstanding from one peer) can still cause that.
type applyDedup struct {
	ttl        time.Duration
	maxPerPeer int
	now        func() time.Time

	mu    sync.Mutex
	peers map[string]*peerApplies
}

type peerApplies struct {
	byID map[requestID]*dedupEntry
	done list.List // *dedupEntry whose answer is known, in the order answered
}

type dedupEntry struct {
	id   requestID
	resp *rpcResponse  // set before done is closed; read-only afterwards
	done chan struct{} // closed once resp is set
	at   time.Time     // when resp was set
	elem *list.Element // in peerApplies.done once answered
}

func newApplyDedup(ttl time.Duration) *applyDedup {
	return &applyDedup{ttl: ttl, maxPerPeer: dedupPerPeer, now: time.Now, peers: map[string]*peerApplies{}}
}

// begin registers request id from peer. first is true when the caller is
// to apply it and then call finish; otherwise e is the earlier request
// with that ID, whose answer the caller waits for on e.done. An error means
// the peer has too many requests in flight to remember another one.
func (d *applyDedup) begin(peer string, id requestID) (e *dedupEntry, first bool, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.expire()
	p := d.peers[peer]
	if p == nil {
		p = &peerApplies{byID: map[requestID]*dedupEntry{}}
		d.peers[peer] = p
	}
	if e := p.byID[id]; e != nil {
		return e, false, nil
	}
	if len(p.byID) >= d.maxPerPeer {
		front := p.done.Front()
		if front == nil {
			// Every entry is in flight, each holding one of the peer's
			// connections: only possible with MaxConns above the bound.
			return nil, false, fmt.Errorf("raft rpc apply refused: %d forwarded applies from %q in flight", len(p.byID), peer)
		}
		p.remove(front.Value.(*dedupEntry))
	}
	e = &dedupEntry{id: id, done: make(chan struct{})}
	p.byID[id] = e
	return e, true, nil
}

// finish records the answer to e and wakes the requests waiting for it.
// A not-leader answer is not kept: it says nothing was applied here, and a
// re-send (after this node leads again) must be applied.
func (d *applyDedup) finish(peer string, e *dedupEntry, resp *rpcResponse) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e.resp = resp
	close(e.done)
	p := d.peers[peer]
	if p == nil || p.byID[e.id] != e {
		return
	}
	if resp.NotLeader {
		p.remove(e)
		d.dropIfEmpty(peer, p)
		return
	}
	e.at = d.now()
	e.elem = p.done.PushBack(e)
}

// ack forgets an answered request whose answer the peer has read.
func (d *applyDedup) ack(peer string, id requestID) {
	d.mu.Lock()
	defer d.mu.Unlock()
	p := d.peers[peer]
	if p == nil {
		return
	}
	if e := p.byID[id]; e != nil && e.elem != nil {
		p.remove(e)
		d.dropIfEmpty(peer, p)
	}
}

// expire drops answers older than ttl. Called with d.mu held.
func (d *applyDedup) expire() {
	cutoff := d.now().Add(-d.ttl)
	for peer, p := range d.peers {
		for f := p.done.Front(); f != nil && f.Value.(*dedupEntry).at.Before(cutoff); f = p.done.Front() {
			p.remove(f.Value.(*dedupEntry))
		}
		d.dropIfEmpty(peer, p)
	}
}

func (d *applyDedup) dropIfEmpty(peer string, p *peerApplies) {
	if len(p.byID) == 0 {
		delete(d.peers, peer)
	}
}

func (p *peerApplies) remove(e *dedupEntry) {
	delete(p.byID, e.id)
	if e.elem != nil {
		p.done.Remove(e.elem)
		e.elem = nil
	}
}

// size is how many requests the table holds, for tests and bounds.
func (d *applyDedup) size() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, p := range d.peers {
		n += len(p.byID)
	}
	return n
}
