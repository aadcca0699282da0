package raft

import (
	"bytes"
	"container/list"
	"context"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	hraft "github.com/hashicorp/raft"
)

// After the TLS handshake the dialer sends one byte saying what the
// connection carries.
const (
	protoRaft byte = 0x01
	protoRPC  byte = 0x02
)

// maxFrame bounds one RPC frame: a forwarded restore command carries a
// whole state. Only verified nodes get to send frames, and readFrame
// allocates as the bytes arrive, not what the header claims.
const maxFrame = 64 << 20

// TransportLimits bound what the raft listener holds for callers it does
// not know yet. Anyone who can reach the port can open TCP connections;
// only verified nodes get past the TLS handshake, so what a stranger can
// occupy is the handshake: a slot, a goroutine and a deadline.
type TransportLimits struct {
	// HandshakeTimeout bounds the TLS handshake and the protocol byte
	// that follows it (default 10s).
	HandshakeTimeout time.Duration
	// MaxHandshakes bounds connections still in that phase (default 64).
	// A new connection beyond it closes the oldest: a flood of idle
	// connections then costs each one its slot within milliseconds, while
	// a member's handshake (a few milliseconds) still completes, where
	// refusing new ones would lock members out for the whole timeout.
	MaxHandshakes int
	// MaxConns bounds all inbound connections (default 1024): members
	// keep a few raft streams and up to 64 idle RPC connections each.
	// Connections beyond it are closed at once.
	MaxConns int
	// RPCIdleTimeout closes an RPC connection that sends no request for
	// this long (default 2m).
	RPCIdleTimeout time.Duration
}

func (l TransportLimits) withDefaults() TransportLimits {
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = 10 * time.Second
	}
	if l.MaxHandshakes <= 0 {
		l.MaxHandshakes = 64
	}
	if l.MaxConns <= 0 {
		l.MaxConns = 1024
	}
	if l.RPCIdleTimeout <= 0 {
		l.RPCIdleTimeout = 2 * time.Minute
	}
	return l
}

// connLimiter counts inbound connections and keeps those still in their
// handshake in arrival order, so the oldest can be dropped.
type connLimiter struct {
	lim TransportLimits
	log *slog.Logger

	mu       sync.Mutex
	open     int
	pending  list.List // *limitedConn, oldest first
	dropped  int       // refusals and evictions not yet logged
	lastWarn time.Time
}

// limitedConn gives its slot back when closed, whoever closes it.
type limitedConn struct {
	net.Conn
	l    *connLimiter
	elem *list.Element // in l.pending until established; guarded by l.mu
	once sync.Once
}

func (c *limitedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.elem != nil {
			c.l.pending.Remove(c.elem)
			c.elem = nil
		}
		c.l.open--
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// admit returns the connection to serve (nil: refused, over MaxConns) and
// a pending connection to close to make room for it.
func (l *connLimiter) admit(raw net.Conn) (c, evict *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.lim.MaxConns {
		l.noteDrop("refused connections: too many open", "max_conns", l.lim.MaxConns)
		return nil, nil
	}
	if l.pending.Len() >= l.lim.MaxHandshakes {
		evict = l.pending.Remove(l.pending.Front()).(*limitedConn)
		evict.elem = nil
		l.noteDrop("dropped the oldest connections awaiting a TLS handshake", "max_handshakes", l.lim.MaxHandshakes)
	}
	l.open++
	c = &limitedConn{Conn: raw, l: l}
	c.elem = l.pending.PushBack(c)
	return c, evict
}

// established takes a connection out of the handshake queue.
func (l *connLimiter) established(c *limitedConn) {
	l.mu.Lock()
	if c.elem != nil {
		l.pending.Remove(c.elem)
		c.elem = nil
	}
	l.mu.Unlock()
}

// noteDrop logs refusals at most once a second, with how many there were:
// a flood must not become a flood of log lines. Called with l.mu held.
func (l *connLimiter) noteDrop(msg string, args ...any) {
	l.dropped++
	if now := time.Now(); now.Sub(l.lastWarn) >= time.Second {
		l.log.Warn(msg, append(args, "count", l.dropped)...)
		l.dropped, l.lastWarn = 0, now
	}
}

// handshakeFailed logs a failed handshake, rate-limited like refusals.
func (l *connLimiter) handshakeFailed(remote string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.noteDrop("refused connections: TLS handshake failed", "remote", remote, "err", err)
}

type advAddr string

func (a advAddr) Network() string { return "tcp" }
func (a advAddr) String() string  { return string(a) }

// streamLayer hands raft the connections that announced protoRaft and
// dials raft connections to peers.
type streamLayer struct {
	n      *Node
	addr   net.Addr
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func (s *streamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.conns:
		return c, nil
	case <-s.closed:
		return nil, net.ErrClosed
	}
}

func (s *streamLayer) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}

func (s *streamLayer) Addr() net.Addr { return s.addr }

func (s *streamLayer) Dial(address hraft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return s.n.dial(string(address), protoRaft, timeout)
}

func (n *Node) dial(addr string, proto byte, timeout time.Duration) (net.Conn, error) {
	gen := n.conns.generation()
	d := &net.Dialer{Timeout: timeout}
	c, err := tls.DialWithDialer(d, "tcp", addr, n.cfg.TLS.Clone())
	if err != nil {
		return nil, err
	}
	if err := c.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
		drop(c)
		return nil, err
	}
	if _, err := c.Write([]byte{proto}); err != nil {
		drop(c)
		return nil, err
	}
	if err := c.SetWriteDeadline(time.Time{}); err != nil {
		drop(c)
		return nil, err
	}
	tc, err := n.conns.track(c, gen, true)
	if err != nil {
		drop(c)
		return nil, err
	}
	return tc, nil
}

// drop closes a connection that is being given up (refused, failed, idle
// or no longer wanted). Its Close error has nowhere useful to go: the peer
// sees the connection end either way, and the reason was logged or
// returned where it was given up.
func drop(c io.Closer) { _ = c.Close() }

// connSet holds every established connection, inbound (after the
// handshake and the protocol byte) and outbound, so that ResetConnections
// can close them. Each remembers the generation it was verified in: a
// connection whose handshake began before a reset is closed as soon as it
// would be tracked, since its peer was verified against what the TLS config
// accepted before.
type connSet struct {
	mu   sync.Mutex
	gen  uint64
	m    map[*trackedConn]struct{}
	shut bool
}

// errConnReset refuses a connection whose handshake predates a reset.
var errConnReset = errors.New("raft: connection verified before a connection reset")

type trackedConn struct {
	net.Conn
	s        *connSet
	gen      uint64
	outbound bool
	once     sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.s.mu.Lock()
		delete(c.s.m, c)
		c.s.mu.Unlock()
	})
	return c.Conn.Close()
}

func (s *connSet) generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// track adds c, verified while the set was at generation gen; it refuses
// (and the caller closes c) when a reset came in between.
func (s *connSet) track(c net.Conn, gen uint64, outbound bool) (*trackedConn, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shut {
		return nil, net.ErrClosed
	}
	if gen != s.gen {
		return nil, errConnReset
	}
	tc := &trackedConn{Conn: c, s: s, gen: gen, outbound: outbound}
	if s.m == nil {
		s.m = map[*trackedConn]struct{}{}
	}
	s.m[tc] = struct{}{}
	return tc, nil
}

// next starts a new generation (shut: the last one) and returns it.
func (s *connSet) next(shut bool) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gen++
	s.shut = s.shut || shut
	return s.gen
}

// closeBefore closes the connections of one direction verified before
// generation gen.
func (s *connSet) closeBefore(gen uint64, outbound bool) int {
	s.mu.Lock()
	var conns []*trackedConn
	for c := range s.m {
		if c.gen < gen && c.outbound == outbound {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		drop(c)
	}
	return len(conns)
}

// ResetConnections makes every peer of this node pass the TLS config's
// verification again: call it when what the config accepts has narrowed (a
// peer's certificate revoked), or a peer verified before keeps its
// connections for as long as it keeps them busy.
//
// Inbound connections (what peers send: forwarded writes, votes, and log
// entries from a leader) and idle pooled RPC connections are closed at
// once, as are handshakes under way. Outbound connections in use (this
// node's log entries and heartbeats to followers) are closed after
// outboundGrace: they carry nothing from the peer but its answers, and
// keeping them a moment longer lets a follower that is being cut off learn
// that the entry causing the reset committed (an honest node whose
// certificate was revoked then stops on its own). Requests in flight on a
// closed connection fail (forwarded writes are retried once on a fresh
// connection); raft's replication retries on its own. It returns how many
// connections it closed at once.
func (n *Node) ResetConnections(outboundGrace time.Duration) int {
	gen := n.conns.next(false)
	n.pool.closeAll()
	closed := n.conns.closeBefore(gen, false)
	closeOutbound := func() {
		if n.ctx.Err() != nil {
			return
		}
		// Empty raft's pool first, so that nothing takes a connection
		// about to be closed from it.
		n.trans.CloseStreams()
		n.pool.closeAll()
		n.conns.closeBefore(gen, true)
	}
	if outboundGrace <= 0 {
		closeOutbound()
	} else {
		time.AfterFunc(outboundGrace, closeOutbound)
	}
	return closed
}

func (n *Node) acceptLoop() {
	lim := &connLimiter{lim: n.cfg.Limits.withDefaults(), log: n.log}
	for {
		raw, err := n.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			n.log.Warn("accept", "err", err)
			time.Sleep(50 * time.Millisecond)
			continue
		}
		c, evict := lim.admit(raw)
		if evict != nil {
			drop(evict)
		}
		if c == nil {
			drop(raw)
			continue
		}
		go n.handleConn(c, lim)
	}
}

// handleConn does the TLS handshake (the config verifies the peer) and
// routes the connection by its first byte. The deadline is on the TCP
// connection before the first byte is read, so a peer that sends nothing
// is dropped after HandshakeTimeout too.
func (n *Node) handleConn(raw *limitedConn, lim *connLimiter) {
	gen := n.conns.generation()
	// Without its deadline a connection could be held open for nothing.
	if err := raw.SetDeadline(time.Now().Add(lim.lim.HandshakeTimeout)); err != nil {
		drop(raw)
		return
	}
	c := tls.Server(raw, n.cfg.TLS)
	if err := c.Handshake(); err != nil {
		lim.handshakeFailed(raw.RemoteAddr().String(), err)
		drop(c)
		return
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		drop(c)
		return
	}
	lim.established(raw)
	if err := c.SetDeadline(time.Time{}); err != nil {
		drop(c)
		return
	}
	cs := c.ConnectionState()
	tc, err := n.conns.track(c, gen, false)
	if err != nil {
		// Verified before a reset: the peer reconnects and is verified
		// again.
		drop(c)
		return
	}
	switch b[0] {
	case protoRaft:
		// hashicorp's AppendEntries and InstallSnapshot do not check who
		// sends them: only members (or anyone, while this node has no
		// configuration yet and is waiting to be added) may speak raft.
		if err := n.authorizeRaftPeer(cs); err != nil {
			n.log.Warn("refused raft connection", "remote", raw.RemoteAddr().String(), "err", err)
			drop(tc)
			return
		}
		select {
		case n.layer.conns <- tc:
		case <-n.layer.closed:
			drop(tc)
		}
	case protoRPC:
		n.serveRPC(tc, cs)
	default:
		n.log.Warn("refused connection: unknown protocol", "remote", raw.RemoteAddr().String(), "byte", b[0])
		drop(tc)
	}
}

// RPC ops.
const (
	opApply     = "apply"
	opReadIndex = "read-index"
	opJoin      = "join"
	opRemove    = "remove"
	opStats     = "stats"
	// opLeaderStatus asks the leader for its Status (Node.LeaderStatus).
	opLeaderStatus = "leader-status"
)

type rpcRequest struct {
	Op     string
	Cmd    []byte `json:",omitempty"`
	NodeID string `json:",omitempty"`
	Addr   string `json:",omitempty"`
	// Self marks a node asking to add itself (checked against its TLS
	// identity); otherwise a member forwards an operator's request.
	Self bool `json:",omitempty"`
	// RequestID (apply only, 16 random bytes) is the same on every
	// re-send of one Node.Apply call: the leader answers a re-send with
	// the first answer instead of applying it again (dedup.go). Leaders
	// that predate it ignore it (unknown JSON fields are skipped), and a
	// request without it, from a follower that predates it, is applied as
	// it comes.
	RequestID []byte `json:",omitempty"`
}

type rpcResponse struct {
	Resp      []byte  `json:",omitempty"`
	Err       string  `json:",omitempty"`
	Refused   bool    `json:",omitempty"`
	NotLeader bool    `json:",omitempty"`
	Index     uint64  `json:",omitempty"`
	Status    *Status `json:",omitempty"`
}

func writeFrame(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxFrame {
		return fmt.Errorf("raft rpc: frame of %d bytes exceeds %d", len(b), maxFrame)
	}
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], uint32(len(b)))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

func readFrame(r io.Reader, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size > maxFrame {
		return fmt.Errorf("raft rpc: frame of %d bytes exceeds %d", size, maxFrame)
	}
	// Grow with what arrives: a header alone must not make the node
	// allocate maxFrame.
	var b bytes.Buffer
	b.Grow(int(min(size, 64<<10)))
	if _, err := io.CopyN(&b, r, int64(size)); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	return json.Unmarshal(b.Bytes(), v)
}

// serveRPC answers requests on one connection until it closes or idles.
func (n *Node) serveRPC(c net.Conn, cs tls.ConnectionState) {
	defer drop(c)
	peer := ""
	if n.cfg.PeerNodeID != nil {
		id, err := n.cfg.PeerNodeID(cs)
		if err != nil {
			n.log.Warn("refused rpc connection: peer identity", "remote", c.RemoteAddr().String(), "err", err)
			return
		}
		peer = id
	}
	idle := n.cfg.Limits.withDefaults().RPCIdleTimeout
	// answered is the forwarded apply last answered on this connection.
	// rpcPool sends the next request on a connection only after reading
	// the previous answer whole, so the next frame tells the leader that
	// the answer arrived and need not be kept for a re-send.
	var answered *requestID
	for {
		if err := c.SetReadDeadline(time.Now().Add(idle)); err != nil {
			return
		}
		var req rpcRequest
		if err := readFrame(c, &req); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				n.log.Debug("rpc read", "remote", c.RemoteAddr().String(), "err", err)
			}
			return
		}
		if answered != nil {
			n.dedup.ack(peer, *answered)
			answered = nil
		}
		if err := c.SetReadDeadline(time.Time{}); err != nil {
			return
		}
		resp := n.handleRPC(&req, peer, c.RemoteAddr().String())
		if hook := n.testBeforeAnswer.Load(); hook != nil && !(*hook)(&req, resp) {
			return
		}
		if err := c.SetWriteDeadline(time.Now().Add(30 * time.Second)); err != nil {
			return
		}
		if err := writeFrame(c, resp); err != nil {
			return
		}
		if req.Op == opApply {
			if id, err := parseRequestID(req.RequestID); err == nil {
				answered = &id
			}
		}
	}
}

// handleRPC answers one request from peer, the node ID of the verified
// connection ("" when Config.PeerNodeID is nil), at remote.
func (n *Node) handleRPC(req *rpcRequest, peer, remote string) *rpcResponse {
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.ApplyTimeout)
	defer cancel()
	switch req.Op {
	case opApply, opReadIndex, opLeaderStatus:
		if err := n.authorizeMember(peer); err != nil {
			n.log.Warn("rpc refused: peer is not a cluster member", "op", req.Op, "peer", peer, "remote", remote)
			return &rpcResponse{Err: fmt.Sprintf("raft rpc %s refused: %v", req.Op, err)}
		}
	}
	switch req.Op {
	case opStats:
		return &rpcResponse{Index: n.r.LastIndex()}
	case opLeaderStatus:
		if !n.IsLeader() {
			return &rpcResponse{NotLeader: true}
		}
		st := n.Status(ctx)
		return &rpcResponse{Status: &st}
	case opApply:
		return n.forwardedApply(ctx, req, peer)
	case opReadIndex:
		if !n.IsLeader() {
			return &rpcResponse{NotLeader: true}
		}
		idx, err := n.leaderReadIndex(ctx)
		if err != nil {
			return &rpcResponse{NotLeader: true, Err: err.Error()}
		}
		return &rpcResponse{Index: idx}
	case opJoin, opRemove:
		if err := n.authorizeMembership(req, peer); err != nil {
			n.log.Warn("membership request refused", "op", req.Op, "member", req.NodeID, "peer", peer, "err", err)
			return &rpcResponse{Err: err.Error()}
		}
		// Any member may receive a join; it goes to the leader from here,
		// where this member (not the joining node) is the peer: the
		// self-join check has been made here.
		fwd := *req
		fwd.Self = false
		if err := n.membership(ctx, &fwd); err != nil {
			return &rpcResponse{Err: err.Error()}
		}
		return &rpcResponse{}
	}
	return &rpcResponse{Err: fmt.Sprintf("raft rpc: unknown op %q", req.Op)}
}

// forwardedApply applies a member's forwarded command once per request ID
// (dedup.go), keyed by the authenticated peer so that no member can reach
// another's answers. A known ID is answered from the table even when this
// node no longer leads: that answer is what happened, and a not-leader
// answer would send the follower to a new leader that does not know the ID.
func (n *Node) forwardedApply(ctx context.Context, req *rpcRequest, peer string) *rpcResponse {
	if len(req.RequestID) == 0 {
		if !n.IsLeader() {
			return &rpcResponse{NotLeader: true}
		}
		return n.applyForPeer(ctx, req.Cmd, peer)
	}
	id, err := parseRequestID(req.RequestID)
	if err != nil {
		n.log.Warn("rpc refused: malformed request ID", "peer", peer, "len", len(req.RequestID))
		return &rpcResponse{Err: err.Error()}
	}
	e, first, err := n.dedup.begin(peer, id)
	if err != nil {
		n.log.Warn("rpc refused", "op", req.Op, "peer", peer, "err", err)
		return &rpcResponse{Err: err.Error()}
	}
	if !first {
		select {
		case <-e.done:
			return e.resp
		case <-ctx.Done():
			// The first is still running: its outcome is not known, and
			// applying this one too is what the table is for avoiding.
			return &rpcResponse{Err: fmt.Sprintf("raft: forwarded apply %x is still being applied on the leader: %v", id, ctx.Err())}
		}
	}
	var resp *rpcResponse
	if n.IsLeader() {
		resp = n.applyForPeer(ctx, req.Cmd, peer)
	} else {
		resp = &rpcResponse{NotLeader: true}
	}
	n.dedup.finish(peer, e, resp)
	return resp
}

func (n *Node) applyForPeer(ctx context.Context, cmd []byte, peer string) *rpcResponse {
	// The origin is the authenticated peer, never anything in the
	// request ("" when Config.PeerNodeID is nil).
	resp, err := n.applyLocal(ctx, peer, cmd)
	var ae *ApplyError
	switch {
	case errors.As(err, &ae):
		return &rpcResponse{Refused: true, Err: ae.Msg}
	case errors.Is(err, hraft.ErrNotLeader), errors.Is(err, hraft.ErrLeadershipLost):
		return &rpcResponse{NotLeader: true}
	case err != nil:
		return &rpcResponse{Err: err.Error()}
	}
	return &rpcResponse{Resp: resp}
}

// authorizeMember: forwarded writes and read indexes are for current
// members of the configuration only. Without Config.PeerNodeID (unit tests)
// the peer is unknown and anyone the TLS config accepts may ask.
func (n *Node) authorizeMember(peer string) error {
	if n.cfg.PeerNodeID == nil {
		return nil
	}
	if peer == "" || !n.isMember(peer) {
		return fmt.Errorf("%w: %q is not in the raft configuration", ErrNotMember, peer)
	}
	return nil
}

// authorizeRaftPeer admits a raft connection from a configuration member,
// or from any verified node while this node knows no configuration.
func (n *Node) authorizeRaftPeer(cs tls.ConnectionState) error {
	if n.cfg.PeerNodeID == nil {
		return nil
	}
	peer, err := n.cfg.PeerNodeID(cs)
	if err != nil {
		return err
	}
	cfg, err := n.configuration()
	if err != nil {
		return err
	}
	if len(cfg.Servers) == 0 {
		return nil
	}
	for _, s := range cfg.Servers {
		if string(s.ID) == peer {
			return nil
		}
	}
	return fmt.Errorf("%w: %q is not in the raft configuration", ErrNotMember, peer)
}

// authorizeMembership: a node may ask to add itself (its TLS identity must
// be the node ID it asks for); anything else must come from a member.
func (n *Node) authorizeMembership(req *rpcRequest, peer string) error {
	if n.cfg.PeerNodeID == nil {
		return nil
	}
	if req.Op == opJoin && req.Self {
		if peer != req.NodeID {
			return fmt.Errorf("%w: %s asked to add %s", ErrNotMember, peer, req.NodeID)
		}
		return nil
	}
	if !n.isMember(peer) {
		return fmt.Errorf("%w: %s", ErrNotMember, peer)
	}
	return nil
}

// rpcPool keeps a few idle RPC connections per peer: a TLS handshake per
// forwarded write would cost more than the write.
type rpcPool struct {
	n    *Node
	mu   sync.Mutex
	idle map[string][]*rpcConn
}

type rpcConn struct {
	c    net.Conn
	addr string
}

// maxIdlePerPeer matches the concurrency a node sees from its API clients;
// below it, bursts of forwarded writes would each pay a TLS handshake.
const maxIdlePerPeer = 64

func (p *rpcPool) get(ctx context.Context, addr string) (*rpcConn, error) {
	p.mu.Lock()
	if l := p.idle[addr]; len(l) > 0 {
		c := l[len(l)-1]
		p.idle[addr] = l[:len(l)-1]
		p.mu.Unlock()
		return c, nil
	}
	p.mu.Unlock()
	timeout := 5 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(d), time.Millisecond))
	}
	c, err := p.n.dial(addr, protoRPC, timeout)
	if err != nil {
		return nil, err
	}
	return &rpcConn{c: c, addr: addr}, nil
}

func (p *rpcPool) put(c *rpcConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.idle[c.addr]) >= maxIdlePerPeer || p.n.ctx.Err() != nil {
		drop(c.c)
		return
	}
	p.idle[c.addr] = append(p.idle[c.addr], c)
}

func (p *rpcPool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, l := range p.idle {
		for _, c := range l {
			drop(c.c)
		}
		delete(p.idle, a)
	}
}

// call sends one request; a pooled connection that went stale is retried
// once on a fresh one. The retry is the same request: a forwarded apply
// keeps its request ID, so a leader that got the first one does not apply
// it twice.
func (p *rpcPool) call(ctx context.Context, addr string, req *rpcRequest, resp *rpcResponse) error {
	// An ended context would only fail the write and cost a pooled
	// connection.
	if err := ctx.Err(); err != nil {
		return err
	}
	for attempt := 0; attempt < 2; attempt++ {
		c, err := p.get(ctx, addr)
		if err != nil {
			return err
		}
		deadline := time.Now().Add(p.n.cfg.ApplyTimeout + 5*time.Second)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		if err = c.c.SetDeadline(deadline); err == nil {
			if err = writeFrame(c.c, req); err == nil {
				err = readFrame(c.c, resp)
			}
		}
		if err == nil {
			// A connection whose deadline cannot be cleared is not reused.
			if c.c.SetDeadline(time.Time{}) == nil {
				p.put(c)
			} else {
				drop(c.c)
			}
			return nil
		}
		drop(c.c)
		if ctx.Err() != nil {
			return err
		}
	}
	return fmt.Errorf("raft rpc to %s failed twice", addr)
}
