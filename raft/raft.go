// Package raft is Sigil's replication layer: a hashicorp/raft member with
// bolt log and stable stores (fsync on every write) and file snapshots,
// reached over one mutual-TLS listener that carries both raft traffic and a
// small RPC for forwarded writes, linearizable reads, membership and the
// leader's status.
//
// It replicates opaque commands into an FSM and knows nothing about what
// they mean. hashicorp/raft's own log lines reach the node's slog logger
// as structured records at their level, repeated ones limited (hclog.go).
package raft

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"
	hraft "github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
)

// FSM is the replicated state machine. Apply must be deterministic; its
// error means the command was refused (and must have changed nothing).
type FSM interface {
	// Apply consumes the command at index. origin is the ID of the member
	// that proposed it: the leader itself for a local Node.Apply, the
	// authenticated peer (its TLS identity via Config.PeerNodeID) for one
	// forwarded by a follower; "" when unknown (a forwarded command when
	// Config.PeerNodeID is nil, or a log entry written without an origin).
	// The origin travels in the replicated log, so every replica sees the
	// same value.
	Apply(index uint64, origin string, cmd []byte) ([]byte, error)
	// AppliedIndex is the raft index of the last command the FSM has
	// consumed (its own record, updated only after the change is visible
	// to readers; after Restore, the index the snapshot covers). A refused
	// command is consumed too: its index must be recorded, or a read
	// barrier that follows it waits until its context ends.
	AppliedIndex() uint64
	Snapshot() (Snapshot, error)
	Restore(r io.Reader) error
}

// Snapshot is a point-in-time FSM state; Persist may run concurrently with
// Apply.
type Snapshot interface {
	Persist(w io.Writer) error
	Release()
}

// Config configures a Node.
type Config struct {
	NodeID        string
	BindAddr      string // host:port; ":0" picks a port (see Node.Addr)
	AdvertiseAddr string // default: the listener's address
	DataDir       string
	// TLS is used to accept and to dial. It must require and verify client
	// certificates: New refuses a config that would let anyone in.
	TLS *tls.Config
	// PeerNodeID, when set, names the node behind a verified connection:
	// a node can only ask to add itself, only current members of the
	// configuration may forward writes or ask for read indexes, and a
	// forwarded command's origin (see FSM.Apply) is this ID. When nil
	// (unit tests) any peer the TLS config accepts may forward, and
	// forwarded commands reach the FSM with origin "".
	PeerNodeID func(tls.ConnectionState) (string, error)
	Logger     *slog.Logger

	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	CommitTimeout      time.Duration
	SnapshotInterval   time.Duration
	SnapshotThreshold  uint64
	TrailingLogs       uint64
	ApplyTimeout       time.Duration
	// Limits bound inbound connections (zero fields: defaults, see
	// TransportLimits).
	Limits TransportLimits
}

var (
	// ErrNoLeader: no leader could be reached before the deadline (no
	// quorum, or an election in progress).
	ErrNoLeader = errors.New("raft: no leader")
	// ErrExistingState: Bootstrap on a node that already has raft state.
	ErrExistingState = errors.New("raft: node already has cluster state")
	// ErrNotMember: a membership request from a node outside the cluster.
	ErrNotMember = errors.New("raft: not a cluster member")
)

// ApplyError is a command the FSM refused. Across forwarding only the
// message survives; locally Unwrap gives the FSM's own error.
type ApplyError struct {
	Msg string
	err error
}

func (e *ApplyError) Error() string { return e.Msg }
func (e *ApplyError) Unwrap() error { return e.err }

// Status is a node's view of the cluster. AppliedIndex is the FSM's own
// (the last command it consumed), so it stays below CommitIndex while the
// newest entries are no-ops, barriers or configuration changes.
type Status struct {
	NodeID       string
	State        string
	Term         uint64
	LastIndex    uint64
	CommitIndex  uint64
	AppliedIndex uint64
	LeaderID     string
	LeaderAddr   string
	// ReachableWithin is the bound on a peer's last contact for it to
	// count as reachable: three heartbeat timeouts.
	ReachableWithin time.Duration
	Peers           []Peer
}

// Peer is one member of the configuration as the node that took the
// Status sees it. Only the leader hears from every member (it asks each
// for its last log index once per heartbeat timeout); a follower hears
// only from the leader, and a node without a leader from no one. What the
// view cannot know is left nil (zero LastContact), never reported as zero.
type Peer struct {
	ID       string
	Addr     string
	Suffrage string
	// LastContact is when this node last heard from the peer, by its own
	// clock; ContactAge is its age when the Status was taken. Both are
	// zero when unknown. The node itself counts as heard from now.
	LastContact time.Time
	ContactAge  time.Duration
	// Reachable: heard from within ReachableWithin. Nil when the view
	// cannot tell: a follower's view of other followers, or a leader that
	// has not yet had the time to ask.
	Reachable *bool
	// MatchIndex is the last log index the peer reported to the leader;
	// Lag is the leader's LastIndex minus it. Both are known in the
	// leader's view only (nil elsewhere, or before the peer first
	// answered).
	MatchIndex *uint64
	Lag        *uint64
}

// peerStats is what the leader last heard from a peer.
type peerStats struct {
	contact time.Time
	index   uint64
}

// Node is a raft member.
type Node struct {
	cfg   Config
	log   *slog.Logger
	fsm   FSM
	fsmA  *fsmAdapter
	r     *hraft.Raft
	ln    net.Listener
	layer *streamLayer
	trans *hraft.NetworkTransport
	store *raftboltdb.BoltStore
	pool  *rpcPool
	conns connSet // established connections, for ResetConnections
	dedup *applyDedup

	// testBeforeAnswer, when set (tests only), sees each RPC answer before
	// it is written; false drops the connection instead, as if the answer
	// had been lost on the way.
	testBeforeAnswer atomic.Pointer[func(*rpcRequest, *rpcResponse) bool]

	leaderReady   atomic.Uint64 // term in which this leader committed a barrier
	leaderChanges atomic.Uint64 // leaders this node learned of (LeaderChanges)

	statsMu     sync.Mutex
	stats       map[string]peerStats // the leader's, since leaderSince
	leaderSince time.Time            // when statsLoop saw this node lead; zero when it does not
	polling     map[string]bool      // peers with a stats request in flight

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	shutOnce sync.Once
	shutErr  error
}

func (c *Config) defaults() error {
	if c.NodeID == "" {
		return errors.New("raft: NodeID is required")
	}
	if c.TLS == nil || len(c.TLS.Certificates) == 0 && c.TLS.GetCertificate == nil {
		return errors.New("raft: TLS config with a certificate is required")
	}
	verifies := c.TLS.ClientAuth == tls.RequireAndVerifyClientCert ||
		c.TLS.ClientAuth == tls.RequireAnyClientCert && (c.TLS.VerifyConnection != nil || c.TLS.VerifyPeerCertificate != nil)
	if !verifies {
		return errors.New("raft: TLS config must require and verify client certificates")
	}
	set := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	set(&c.HeartbeatTimeout, 500*time.Millisecond)
	set(&c.ElectionTimeout, 500*time.Millisecond)
	set(&c.LeaderLeaseTimeout, c.HeartbeatTimeout/2)
	// A follower learns that an entry committed only from the leader's
	// next AppendEntries, which an idle leader sends every CommitTimeout
	// (1x-2x, randomized). A read on a follower right after a write waits
	// for it: at hashicorp's 50 ms default, sequential admin writes through
	// a follower (each reads first) took 80 ms each (BenchmarkEntryWrites).
	// At 5 ms an idle leader sends each follower 100-200 empty
	// AppendEntries a second: a few hundred bytes each, no fsync.
	set(&c.CommitTimeout, 5*time.Millisecond)
	set(&c.SnapshotInterval, 2*time.Minute)
	set(&c.ApplyTimeout, 10*time.Second)
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = 8192
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = 10240
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// New opens the stores, starts the listener and the raft member. A node
// with existing state rejoins its cluster; a new one waits for Bootstrap
// or to be added.
func New(ctx context.Context, cfg Config, fsm FSM) (*Node, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	n := &Node{cfg: cfg, log: cfg.Logger.With("component", "raft"), fsm: fsm, fsmA: newFSMAdapter(fsm),
		stats: map[string]peerStats{}, polling: map[string]bool{}, dedup: newApplyDedup(cfg.ApplyTimeout + dedupMargin)}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	ok := false
	defer func() {
		if !ok {
			// The error New returns says what failed; what stopping the
			// half-built node adds goes to the log.
			if err := n.Shutdown(); err != nil {
				n.log.Warn("stopping the node that failed to start", "err", err)
			}
		}
	}()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	var err error
	n.store, err = raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
	if err != nil {
		return nil, fmt.Errorf("raft: open log store: %w", err)
	}
	hlog := newHCLogger(n.log)
	snaps, err := hraft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 3, hlog)
	if err != nil {
		return nil, fmt.Errorf("raft: open snapshot store: %w", err)
	}
	if n.ln, err = net.Listen("tcp", cfg.BindAddr); err != nil {
		return nil, fmt.Errorf("raft: listen on %s: %w", cfg.BindAddr, err)
	}
	adv := cfg.AdvertiseAddr
	if adv == "" {
		adv = n.ln.Addr().String()
	}
	n.cfg.AdvertiseAddr = adv
	n.layer = &streamLayer{n: n, addr: advAddr(adv), conns: make(chan net.Conn, 16), closed: make(chan struct{})}
	n.pool = &rpcPool{n: n, idle: map[string][]*rpcConn{}}
	n.trans = hraft.NewNetworkTransportWithConfig(&hraft.NetworkTransportConfig{
		Stream: n.layer, MaxPool: 4, Timeout: 10 * time.Second, Logger: hlog,
	})
	rc := hraft.DefaultConfig()
	rc.LocalID = hraft.ServerID(cfg.NodeID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	rc.Logger = hlog
	n.r, err = hraft.NewRaft(rc, n.fsmA, n.store, n.store, snaps, n.trans)
	if err != nil {
		return nil, fmt.Errorf("raft: start: %w", err)
	}
	obs := make(chan hraft.Observation, 16)
	observer := hraft.NewObserver(obs, false, func(o *hraft.Observation) bool {
		_, ok := o.Data.(hraft.LeaderObservation)
		return ok
	})
	n.r.RegisterObserver(observer)
	n.wg.Add(3)
	go func() { defer n.wg.Done(); n.acceptLoop() }()
	go func() { defer n.wg.Done(); n.statsLoop() }()
	go func() { defer n.wg.Done(); n.observeLeaders(obs, observer) }()
	ok = true
	return n, nil
}

// observeLeaders counts the leaders this node learns of (an election won
// by anyone, or a new leader heard from) until the node shuts down.
func (n *Node) observeLeaders(obs chan hraft.Observation, o *hraft.Observer) {
	defer n.r.DeregisterObserver(o)
	for {
		select {
		case <-n.ctx.Done():
			return
		case ob := <-obs:
			if l, ok := ob.Data.(hraft.LeaderObservation); ok && l.LeaderID != "" {
				n.leaderChanges.Add(1)
				n.log.Info("raft leader changed", "leader", string(l.LeaderID), "term", n.r.CurrentTerm())
			}
		}
	}
}

// LeaderChanges is how many times this node learned of a new leader since
// it started (a leader lost and then found again counts once more).
func (n *Node) LeaderChanges() uint64 { return n.leaderChanges.Load() }

// Addr is the advertised raft address.
func (n *Node) Addr() string { return n.cfg.AdvertiseAddr }

// Bootstrap makes this node a one-voter cluster. It refuses when the node
// already has state, so a restart never re-bootstraps.
func (n *Node) Bootstrap(ctx context.Context) error {
	snaps, err := hraft.NewFileSnapshotStoreWithLogger(n.cfg.DataDir, 3, hclog.NewNullLogger())
	if err != nil {
		return err
	}
	has, err := hraft.HasExistingState(n.store, n.store, snaps)
	if err != nil {
		return err
	}
	if has {
		return ErrExistingState
	}
	return n.r.BootstrapCluster(hraft.Configuration{Servers: []hraft.Server{{
		ID: hraft.ServerID(n.cfg.NodeID), Address: hraft.ServerAddress(n.cfg.AdvertiseAddr), Suffrage: hraft.Voter,
	}}}).Error()
}

// IsLeader reports whether this node leads.
func (n *Node) IsLeader() bool { return n.r.State() == hraft.Leader }

// Snapshot takes a raft snapshot of this node's FSM now (as the periodic
// ones do: FSM.Snapshot, Persist into the snapshot store, log compaction)
// and returns how long it took. ctx bounds only the wait: a snapshot that
// has started runs to its end.
func (n *Node) Snapshot(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	f := n.r.Snapshot()
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return time.Since(start), err
	case <-ctx.Done():
		return time.Since(start), ctx.Err()
	}
}

func (n *Node) timeout(ctx context.Context) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return max(time.Until(d), time.Millisecond)
	}
	return n.cfg.ApplyTimeout
}

// Apply commits cmd and returns the FSM's response. On a follower the
// command is forwarded to the leader; while there is no leader it waits
// (bounded by ctx, or ApplyTimeout) for one. The FSM sees this node's ID as
// the command's origin (the leader takes it from the TLS identity of the
// forwarding connection, not from anything the follower says).
//
// Every forward of one call carries the same request ID, so a leader that
// committed the command and whose answer was lost answers the re-send with
// that answer instead of applying it again (dedup.go, which also says when
// a command can still be applied twice: a leadership change in between).
// Since the leader keeps answers for a limited time, a follower re-sends
// for at most ApplyTimeout after its first send, however long ctx allows.
func (n *Node) Apply(ctx context.Context, cmd []byte) ([]byte, error) {
	ctx, cancel := n.bounded(ctx)
	defer cancel()
	var req *rpcRequest
	var resendUntil time.Time
	for {
		if n.IsLeader() {
			resp, err := n.applyLocal(ctx, n.cfg.NodeID, cmd)
			if !errors.Is(err, hraft.ErrNotLeader) && !errors.Is(err, hraft.ErrLeadershipLost) {
				return resp, err
			}
		} else if _, leader := n.leader(); leader != "" {
			if req == nil {
				req = &rpcRequest{Op: opApply, Cmd: cmd, RequestID: newRequestID()}
				resendUntil = time.Now().Add(n.cfg.ApplyTimeout)
			} else if !time.Now().Before(resendUntil) {
				return nil, fmt.Errorf("%w: no answer from the leader within %v of forwarding the command (request %x); it may have been applied", ErrNoLeader, n.cfg.ApplyTimeout, req.RequestID)
			}
			var r rpcResponse
			cctx, ccancel := context.WithDeadline(ctx, resendUntil)
			err := n.pool.call(cctx, leader, req, &r)
			ccancel()
			if err == nil && !r.NotLeader {
				if r.Refused {
					return nil, &ApplyError{Msg: r.Err}
				}
				if r.Err != "" {
					return nil, errors.New(r.Err)
				}
				return r.Resp, nil
			}
			if err != nil {
				n.log.Debug("forward to leader failed", "leader", leader, "err", err)
			}
		}
		if err := n.waitLeaderChange(ctx); err != nil {
			return nil, err
		}
	}
}

// bounded gives a context without a deadline the ApplyTimeout, so no
// caller can wait forever for a leader.
func (n *Node) bounded(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, n.cfg.ApplyTimeout)
}

// waitLeaderChange backs off briefly, or fails when ctx ends.
func (n *Node) waitLeaderChange(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return fmt.Errorf("%w: %v", ErrNoLeader, ctx.Err())
	case <-n.ctx.Done():
		return fmt.Errorf("%w: node shut down", ErrNoLeader)
	case <-time.After(25 * time.Millisecond):
		return nil
	}
}

type applyResult struct {
	resp []byte
	err  error
}

// applyLocal proposes cmd on this (leader) node, recording origin in the
// log entry's Extensions.
func (n *Node) applyLocal(ctx context.Context, origin string, cmd []byte) ([]byte, error) {
	f := n.r.ApplyLog(hraft.Log{Data: cmd, Extensions: encodeOrigin(origin)}, n.timeout(ctx))
	if err := f.Error(); err != nil {
		return nil, err
	}
	res, _ := f.Response().(applyResult)
	if res.err != nil {
		return nil, &ApplyError{Msg: res.err.Error(), err: res.err}
	}
	return res.resp, nil
}

// LeaderID is the leader this node knows of ("" when none): cheaper than
// Status, which asks raft's main loop for the configuration.
func (n *Node) LeaderID() string {
	id, _ := n.leader()
	return id
}

func (n *Node) leader() (id, addr string) {
	a, i := n.r.LeaderWithID()
	return string(i), string(a)
}

// ReadIndex is a linearizable read barrier: when it returns, this node's
// FSM reflects every write acknowledged before the call.
func (n *Node) ReadIndex(ctx context.Context) error {
	ctx, cancel := n.bounded(ctx)
	defer cancel()
	for {
		var idx uint64
		var err error
		if n.IsLeader() {
			idx, err = n.leaderReadIndex(ctx)
		} else if _, leader := n.leader(); leader != "" {
			var r rpcResponse
			if err = n.pool.call(ctx, leader, &rpcRequest{Op: opReadIndex}, &r); err == nil {
				if r.NotLeader {
					err = hraft.ErrNotLeader
				} else if r.Err != "" {
					// The leader refused us (not a member): retrying
					// would not help.
					return fmt.Errorf("raft: read index via %s: %s", leader, r.Err)
				}
				idx = r.Index
			}
		} else {
			err = ErrNoLeader
		}
		if err == nil {
			return n.waitApplied(ctx, idx)
		}
		if werr := n.waitLeaderChange(ctx); werr != nil {
			return fmt.Errorf("%w (last error: %v)", werr, err)
		}
	}
}

// leaderReadIndex follows the raft read-index rule: the commit index is
// only safe once this leader has committed an entry of its own term, and
// only if it is still the leader after taking it.
func (n *Node) leaderReadIndex(ctx context.Context) (uint64, error) {
	term := n.r.CurrentTerm()
	if n.leaderReady.Load() != term {
		if err := n.await(ctx, n.r.Barrier(n.timeout(ctx))); err != nil {
			return 0, err
		}
		n.leaderReady.Store(term)
	}
	idx := n.r.CommitIndex()
	if err := n.await(ctx, n.r.VerifyLeader()); err != nil {
		return 0, err
	}
	return idx, nil
}

// await is f.Error() bounded by ctx and this node's life: hashicorp's
// Barrier and VerifyLeader futures know neither, and a VerifyLeader was
// seen never answered (a node's Stop waited minutes for its rotation loop,
// blocked in one, under the node package's full test load). The goroutine
// left waiting ends with the future, if ever.
func (n *Node) await(ctx context.Context, f hraft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-n.ctx.Done():
		return hraft.ErrRaftShutdown
	}
}

// waitApplied returns once the FSM reflects every command up to idx.
//
// hashicorp's AppliedIndex is set before the FSM goroutine has consumed the
// entries (HARDWARE-NOTES gotcha 14), so it only tells us that the log up
// to idx is committed and stored here. The FSM's own AppliedIndex is what
// readers can trust, but it only moves on commands: no-ops, barriers and
// configuration entries never reach it. So: wait for raft to reach idx,
// find the last command at or below idx in the local log, and wait for the
// FSM to have consumed that one.
func (n *Node) waitApplied(ctx context.Context, idx uint64) error {
	if err := n.waitRaftApplied(ctx, idx); err != nil {
		return err
	}
	target, err := n.lastCommandAtOrBelow(idx)
	if err != nil {
		return err
	}
	for {
		// Take the channel before reading the index, so an Apply between
		// the two cannot be missed.
		changed := n.fsmA.changed()
		at := n.fsm.AppliedIndex()
		if at >= target {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("raft: waiting for the state machine to apply index %d (at %d): %w", target, at, ctx.Err())
		case <-n.ctx.Done():
			return fmt.Errorf("raft: waiting for the state machine to apply index %d: node shut down", target)
		}
	}
}

// waitRaftApplied waits for raft's own applied index to reach idx. Raft
// gives no notification for it; the FSM's does the waking for commands (raft
// moves its index just before handing them over), and a short backoff
// covers no-ops, barriers and configuration entries.
func (n *Node) waitRaftApplied(ctx context.Context, idx uint64) error {
	backoff := 500 * time.Microsecond
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		changed := n.fsmA.changed()
		at := n.r.AppliedIndex()
		if at >= idx {
			return nil
		}
		if timer == nil {
			timer = time.NewTimer(backoff)
		} else {
			timer.Reset(backoff)
		}
		select {
		case <-changed:
		case <-timer.C:
			backoff = min(2*backoff, 5*time.Millisecond)
		case <-ctx.Done():
			return fmt.Errorf("raft: waiting to apply index %d (at %d): %w", idx, at, ctx.Err())
		case <-n.ctx.Done():
			return fmt.Errorf("raft: waiting to apply index %d: node shut down", idx)
		}
	}
}

// lastCommandAtOrBelow is the index of the last LogCommand entry at or
// below idx, which raft has already applied here; 0 when there is none or
// when the walk reaches entries compacted into a snapshot (the FSM has
// restored or produced that snapshot, so it already covers them).
func (n *Node) lastCommandAtOrBelow(idx uint64) (uint64, error) {
	var l hraft.Log
	for i := idx; i > 0; i-- {
		if err := n.store.GetLog(i, &l); err != nil {
			if errors.Is(err, hraft.ErrLogNotFound) {
				return 0, nil
			}
			return 0, fmt.Errorf("raft: read log %d: %w", i, err)
		}
		if l.Type == hraft.LogCommand {
			return i, nil
		}
	}
	return 0, nil
}

// Join adds a voter (an operator's request), via the leader.
func (n *Node) Join(ctx context.Context, nodeID, addr string) error {
	if nodeID == "" || addr == "" {
		return errors.New("raft: join needs a node ID and an address")
	}
	return n.membership(ctx, &rpcRequest{Op: opJoin, NodeID: nodeID, Addr: addr})
}

// JoinCluster asks a member (any) to add this node.
func (n *Node) JoinCluster(ctx context.Context, memberAddr string) error {
	var r rpcResponse
	if err := n.pool.call(ctx, memberAddr, &rpcRequest{Op: opJoin, NodeID: n.cfg.NodeID, Addr: n.cfg.AdvertiseAddr, Self: true}, &r); err != nil {
		return fmt.Errorf("raft: join via %s: %w", memberAddr, err)
	}
	if r.Err != "" {
		return fmt.Errorf("raft: join via %s: %s", memberAddr, r.Err)
	}
	return nil
}

// Remove takes a node out of the configuration, via the leader.
func (n *Node) Remove(ctx context.Context, nodeID string) error {
	return n.membership(ctx, &rpcRequest{Op: opRemove, NodeID: nodeID})
}

func (n *Node) membership(ctx context.Context, req *rpcRequest) error {
	ctx, cancel := n.bounded(ctx)
	defer cancel()
	for {
		if n.IsLeader() {
			return n.changeMembership(ctx, req)
		}
		if _, leader := n.leader(); leader != "" {
			var r rpcResponse
			err := n.pool.call(ctx, leader, req, &r)
			if err == nil && !r.NotLeader {
				if r.Err != "" {
					return errors.New(r.Err)
				}
				return nil
			}
		}
		if err := n.waitLeaderChange(ctx); err != nil {
			return err
		}
	}
}

func (n *Node) changeMembership(ctx context.Context, req *rpcRequest) error {
	switch req.Op {
	case opJoin:
		cfg, err := n.configuration()
		if err != nil {
			return err
		}
		for _, s := range cfg.Servers {
			if string(s.ID) == req.NodeID && string(s.Address) == req.Addr && s.Suffrage == hraft.Voter {
				return nil // already a member: joining is idempotent
			}
		}
		n.log.Info("adding voter", "member", req.NodeID, "addr", req.Addr)
		return n.r.AddVoter(hraft.ServerID(req.NodeID), hraft.ServerAddress(req.Addr), 0, n.timeout(ctx)).Error()
	case opRemove:
		if req.NodeID == "" {
			return errors.New("raft: remove needs a node ID")
		}
		n.log.Info("removing server", "member", req.NodeID)
		return n.r.RemoveServer(hraft.ServerID(req.NodeID), 0, n.timeout(ctx)).Error()
	}
	return fmt.Errorf("raft: unknown membership op %q", req.Op)
}

func (n *Node) configuration() (hraft.Configuration, error) {
	f := n.r.GetConfiguration()
	if err := f.Error(); err != nil {
		return hraft.Configuration{}, err
	}
	return f.Configuration(), nil
}

// Members are the IDs of the cluster's servers, as this node's latest
// configuration has them.
func (n *Node) Members() ([]string, error) {
	cfg, err := n.configuration()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range cfg.Servers {
		out = append(out, string(s.ID))
	}
	return out, nil
}

func (n *Node) isMember(id string) bool {
	cfg, err := n.configuration()
	if err != nil {
		return false
	}
	for _, s := range cfg.Servers {
		if string(s.ID) == id {
			return true
		}
	}
	return false
}

// Status reports this node's view (see Peer for what each view knows).
func (n *Node) Status(ctx context.Context) Status {
	leaderAddr, leaderID := n.r.LeaderWithID()
	st := Status{
		NodeID: n.cfg.NodeID, State: strings.ToLower(n.r.State().String()), Term: n.r.CurrentTerm(),
		LastIndex: n.r.LastIndex(), CommitIndex: n.r.CommitIndex(), AppliedIndex: n.fsm.AppliedIndex(),
		LeaderID: string(leaderID), LeaderAddr: string(leaderAddr), ReachableWithin: n.reachableWithin(),
	}
	cfg, err := n.configuration()
	if err != nil {
		return st
	}
	now := time.Now()
	leading := st.State == "leader"
	n.statsMu.Lock()
	defer n.statsMu.Unlock()
	for _, s := range cfg.Servers {
		p := Peer{ID: string(s.ID), Addr: string(s.Address), Suffrage: strings.ToLower(s.Suffrage.String())}
		switch {
		case p.ID == n.cfg.NodeID:
			p.LastContact, p.Reachable = now, ptr(true)
			if leading {
				p.MatchIndex, p.Lag = ptr(st.LastIndex), ptr(uint64(0))
			}
		case leading:
			if seen, ok := n.stats[p.ID]; ok {
				p.contact(seen.contact, now, st.ReachableWithin)
				p.MatchIndex = ptr(seen.index)
				p.Lag = ptr(st.LastIndex - min(seen.index, st.LastIndex))
			} else if !n.leaderSince.IsZero() && now.Sub(n.leaderSince) > st.ReachableWithin {
				// Asked for longer than the bound and never answered.
				p.Reachable = ptr(false)
			}
		case p.ID == st.LeaderID:
			// A follower hears from its leader (heartbeats, entries).
			if lc := n.r.LastContact(); !lc.IsZero() {
				p.contact(lc, now, st.ReachableWithin)
			}
		}
		st.Peers = append(st.Peers, p)
	}
	return st
}

func (p *Peer) contact(at, now time.Time, within time.Duration) {
	p.LastContact, p.ContactAge = at, max(now.Sub(at), 0)
	p.Reachable = ptr(p.ContactAge <= within)
}

func ptr[T any](v T) *T { return &v }

// reachableWithin: three heartbeat timeouts, so a peer answering the
// statsLoop (once per heartbeat timeout) stays reachable through a slow
// answer or two.
func (n *Node) reachableWithin() time.Duration { return 3 * n.cfg.HeartbeatTimeout }

// LeaderStatus is the leader's Status: this node's own when it leads, or
// the leader's, asked over the RPC listener (members only may ask). It
// does not wait for an election: with no leader known it fails with
// ErrNoLeader at once, and with the leader's error (or ctx's) when the
// leader does not answer.
func (n *Node) LeaderStatus(ctx context.Context) (Status, error) {
	if n.IsLeader() {
		return n.Status(ctx), nil
	}
	id, addr := n.leader()
	if addr == "" {
		return Status{}, fmt.Errorf("%w known to %s (no quorum, or an election under way)", ErrNoLeader, n.cfg.NodeID)
	}
	var r rpcResponse
	if err := n.pool.call(ctx, addr, &rpcRequest{Op: opLeaderStatus}, &r); err != nil {
		return Status{}, fmt.Errorf("raft: status from leader %s at %s: %w", id, addr, err)
	}
	switch {
	case r.NotLeader:
		return Status{}, fmt.Errorf("raft: status from leader %s at %s: %w: it no longer leads", id, addr, ErrNoLeader)
	case r.Err != "":
		return Status{}, fmt.Errorf("raft: status from leader %s at %s: %s", id, addr, r.Err)
	case r.Status == nil:
		return Status{}, fmt.Errorf("raft: status from leader %s at %s: empty answer", id, addr)
	}
	return *r.Status, nil
}

// statsLoop has the leader ask every peer for its last index once per
// heartbeat timeout, each peer on its own, so that one that does not
// answer delays no other; the answers are each peer's last contact and
// match index in Status. A node that stops leading forgets them: a new
// leadership starts from what it hears itself.
func (n *Node) statsLoop() {
	t := time.NewTicker(n.cfg.HeartbeatTimeout)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		if !n.IsLeader() {
			n.statsMu.Lock()
			if !n.leaderSince.IsZero() {
				n.leaderSince, n.stats = time.Time{}, map[string]peerStats{}
			}
			n.statsMu.Unlock()
			continue
		}
		cfg, err := n.configuration()
		if err != nil {
			continue
		}
		n.statsMu.Lock()
		if n.leaderSince.IsZero() {
			n.leaderSince, n.stats = time.Now(), map[string]peerStats{}
		}
		for _, s := range cfg.Servers {
			id, addr := string(s.ID), string(s.Address)
			if id == n.cfg.NodeID || n.polling[id] {
				continue
			}
			n.polling[id] = true
			n.wg.Add(1)
			go n.pollPeer(id, addr)
		}
		n.statsMu.Unlock()
	}
}

func (n *Node) pollPeer(id, addr string) {
	defer n.wg.Done()
	ctx, cancel := context.WithTimeout(n.ctx, n.reachableWithin())
	defer cancel()
	var r rpcResponse
	err := n.pool.call(ctx, addr, &rpcRequest{Op: opStats}, &r)
	n.statsMu.Lock()
	defer n.statsMu.Unlock()
	delete(n.polling, id)
	if err == nil && !n.leaderSince.IsZero() {
		n.stats[id] = peerStats{contact: time.Now(), index: r.Index}
	}
}

// Shutdown stops raft, the listener and the stores. It is idempotent.
func (n *Node) Shutdown() error {
	n.shutOnce.Do(func() {
		n.cancel()
		if n.r != nil {
			n.shutErr = n.r.Shutdown().Error()
		}
		// The transport and listener are only being let go of: their
		// close errors (often "already closed") change nothing.
		if n.trans != nil {
			_ = n.trans.Close()
		}
		if n.ln != nil {
			_ = n.ln.Close()
		}
		if n.pool != nil {
			n.pool.closeAll()
		}
		gen := n.conns.next(true)
		n.conns.closeBefore(gen, false)
		n.conns.closeBefore(gen, true)
		n.wg.Wait()
		if n.store != nil {
			// The log store's file is what the node restarts from.
			if err := n.store.Close(); err != nil {
				n.shutErr = errors.Join(n.shutErr, fmt.Errorf("raft: close log store: %w", err))
			}
		}
	})
	return n.shutErr
}

// Origin encoding in a log entry's Extensions: a version byte, then the
// proposing member's node ID as UTF-8. No Extensions means no origin.
const originV1 byte = 0x01

func encodeOrigin(origin string) []byte {
	if origin == "" {
		return nil
	}
	return append([]byte{originV1}, origin...)
}

// decodeOrigin returns "" for a missing or malformed (unknown version,
// empty or invalid UTF-8 ID) encoding.
func decodeOrigin(ext []byte) string {
	if len(ext) < 2 || ext[0] != originV1 || !utf8.Valid(ext[1:]) {
		return ""
	}
	return string(ext[1:])
}

// fsmAdapter turns our FSM into hashicorp's, and tells waiters each time
// the FSM has consumed a command or restored a snapshot.
type fsmAdapter struct {
	fsm FSM

	mu     sync.Mutex
	notify chan struct{} // closed (and replaced) after each Apply and Restore
}

func newFSMAdapter(fsm FSM) *fsmAdapter {
	return &fsmAdapter{fsm: fsm, notify: make(chan struct{})}
}

// changed returns a channel closed after the next Apply or Restore.
func (a *fsmAdapter) changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.notify
}

func (a *fsmAdapter) wake() {
	a.mu.Lock()
	close(a.notify)
	a.notify = make(chan struct{})
	a.mu.Unlock()
}

func (a *fsmAdapter) Apply(l *hraft.Log) any {
	if l.Type != hraft.LogCommand {
		return nil
	}
	defer a.wake()
	resp, err := a.fsm.Apply(l.Index, decodeOrigin(l.Extensions), l.Data)
	return applyResult{resp: resp, err: err}
}

func (a *fsmAdapter) Snapshot() (hraft.FSMSnapshot, error) {
	s, err := a.fsm.Snapshot()
	if err != nil {
		return nil, err
	}
	return &snapAdapter{s}, nil
}

func (a *fsmAdapter) Restore(rc io.ReadCloser) error {
	// hashicorp/raft's snapshot file, read to its end by Restore: a close
	// error after that loses nothing.
	defer func() { _ = rc.Close() }()
	defer a.wake()
	return a.fsm.Restore(rc)
}

type snapAdapter struct{ s Snapshot }

func (s *snapAdapter) Persist(sink hraft.SnapshotSink) error {
	if err := s.s.Persist(sink); err != nil {
		return errors.Join(err, sink.Cancel())
	}
	return sink.Close()
}

func (s *snapAdapter) Release() { s.s.Release() }
