package node

import (
	"log/slog"
	"net"
	"testing"
	"time"
)

// tcpPair is a connected pair of loopback TCP connections.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ln.Close() }() // one connection is all it is for
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if server, err = ln.Accept(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close(); _ = server.Close() })
	return server, client
}

// With every handshake slot taken, a new connection takes the slot of
// the oldest one that has waited on its client for handshakeWait (a
// flood that never handshakes); while the slots are held by handshakes
// this node has yet to compute (a fleet reconnecting at once), the new
// connection is refused instead, and none of them is dropped half done.
func TestHandshakeSlotsBusyRefuseNew(t *testing.T) {
	l := newConnLimiter("api", 16, 2, 16, slog.New(slog.DiscardHandler))
	admit := func() (*limitedConn, *limitedConn) {
		raw, _ := tcpPair(t)
		return l.admit(raw)
	}
	a, _ := admit()
	b, _ := admit()
	if a == nil || b == nil {
		t.Fatal("the first two connections were refused")
	}
	// Neither reads yet: both wait on this node.
	if c, evict := admit(); c != nil || evict != nil {
		t.Fatalf("with both slots computing: admitted %v, evicted %v; want the new one refused", c != nil, evict != nil)
	}
	if st := l.stats(); st.RefusedBusy != 1 || st.Evicted != 0 || st.Pending != 2 {
		t.Fatalf("stats %+v, want one refusal, no eviction, two pending", st)
	}
	// b waits on its client (a read with nothing to read) past
	// idleHandshakeWait, having sent nothing: the next connection takes
	// its slot.
	go func() { _, _ = b.Read(make([]byte, 1)) }() // returns when the test closes it
	time.Sleep(idleHandshakeWait + 50*time.Millisecond)
	c, evict := admit()
	if c == nil || evict != b {
		t.Fatalf("admitted %v, evicted b %v; want the new one in b's slot", c != nil, evict == b)
	}
	_ = evict.Close() // as Accept does
	if st := l.stats(); st.Evicted != 1 || st.Pending != 2 || st.Open != 2 {
		t.Fatalf("stats %+v, want one eviction, two pending, two open", st)
	}

	// A handshake under way (its client has sent something, and the node
	// waits for the rest) keeps its slot for handshakeWait.
	l2 := newConnLimiter("api", 16, 1, 16, slog.New(slog.DiscardHandler))
	raw, client := tcpPair(t)
	d, _ := l2.admit(raw)
	if _, err := client.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Read(make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = d.Read(make([]byte, 1)) }() // the rest never comes
	time.Sleep(idleHandshakeWait + 50*time.Millisecond)
	raw2, _ := tcpPair(t)
	if c, evict := l2.admit(raw2); c != nil || evict != nil {
		t.Fatalf("a handshake under way lost its slot after %v", idleHandshakeWait+50*time.Millisecond)
	}
	if !d.evictable(time.Now().Add(handshakeWait).UnixNano()) {
		t.Fatalf("a handshake under way still keeps its slot after %v", handshakeWait)
	}
}
