package raft

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// kv is a tiny deterministic FSM: "set k v" commands; "fail" is refused.
// It records each key's origin, and its applied index after the change.
type kv struct {
	delay time.Duration // a slow Apply, so raft's applied index runs ahead

	mu      sync.Mutex
	m       map[string]string
	origins map[string]string
	calls   map[string]int // Apply calls per command, refused ones included
	applied atomic.Uint64
}

func newKV() *kv {
	return &kv{m: map[string]string{}, origins: map[string]string{}, calls: map[string]int{}}
}

func (k *kv) Apply(index uint64, origin string, cmd []byte) ([]byte, error) {
	defer k.applied.Store(index) // refused commands are consumed too
	k.mu.Lock()
	k.calls[string(cmd)]++
	k.mu.Unlock()
	if k.delay > 0 {
		time.Sleep(k.delay)
	}
	var c struct{ K, V string }
	if err := json.Unmarshal(cmd, &c); err != nil {
		return nil, err
	}
	if c.K == "fail" {
		return nil, errors.New("refused: key fail is not allowed")
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.m[c.K] = c.V
	k.origins[c.K] = origin
	return []byte(fmt.Sprint(index)), nil
}

func (k *kv) AppliedIndex() uint64 { return k.applied.Load() }

func (k *kv) get(key string) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	v, ok := k.m[key]
	return v, ok
}

func (k *kv) origin(key string) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	o, ok := k.origins[key]
	return o, ok
}

// applies is how many times this replica applied cmd.
func (k *kv) applies(cmd []byte) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.calls[string(cmd)]
}

func (k *kv) size() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.m)
}

type kvSnap struct{ b []byte }

func (s *kvSnap) Persist(w io.Writer) error { _, err := w.Write(s.b); return err }
func (s *kvSnap) Release()                  {}

type kvState struct {
	M, Origins map[string]string
	Index      uint64
}

func (k *kv) Snapshot() (Snapshot, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	b, err := json.Marshal(kvState{k.m, k.origins, k.applied.Load()})
	return &kvSnap{b}, err
}

func (k *kv) Restore(r io.Reader) error {
	var st kvState
	if err := json.NewDecoder(r).Decode(&st); err != nil {
		return err
	}
	if st.M == nil {
		st.M = map[string]string{}
	}
	if st.Origins == nil {
		st.Origins = map[string]string{}
	}
	k.mu.Lock()
	k.m, k.origins = st.M, st.Origins
	k.mu.Unlock()
	k.applied.Store(st.Index)
	return nil
}

func set(k, v string) []byte {
	b, _ := json.Marshal(struct{ K, V string }{k, v})
	return b
}

// testCA issues node certificates (CN = node ID, IP SAN 127.0.0.1).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newCA(t testing.TB) *testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

func (ca *testCA) tls(t testing.TB, id string) *tls.Config {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: id},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: ca.pool, RootCAs: ca.pool,
		MinVersion: tls.VersionTLS13,
	}
}

type testCluster struct {
	t     testing.TB
	ca    *testCA
	dir   string
	delay time.Duration // each FSM's Apply delay
	opts  func(*Config) // applied to every node's config
	logs  lockedBuffer  // every node's warnings
	mu    sync.Mutex
	nodes map[string]*Node
	fsms  map[string]*kv
	addrs map[string]string
}

func peerID(cs tls.ConnectionState) (string, error) {
	if len(cs.PeerCertificates) == 0 {
		return "", errors.New("no certificate")
	}
	return cs.PeerCertificates[0].Subject.CommonName, nil
}

func (c *testCluster) config(id string) Config {
	cfg := Config{NodeID: id, BindAddr: c.addrs[id], DataDir: filepath.Join(c.dir, id), TLS: c.ca.tls(c.t, id),
		PeerNodeID: peerID, HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&c.logs, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", id)}
	if c.opts != nil {
		c.opts(&cfg)
	}
	return cfg
}

// lockedBuffer collects log output from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (c *testCluster) start(id string, mod func(*Config)) *Node {
	c.t.Helper()
	cfg := c.config(id)
	if mod != nil {
		mod(&cfg)
	}
	fsm := newKV()
	fsm.delay = c.delay
	n, err := New(context.Background(), cfg, fsm)
	if err != nil {
		c.t.Fatalf("start %s: %v", id, err)
	}
	c.mu.Lock()
	c.nodes[id], c.fsms[id] = n, fsm
	c.mu.Unlock()
	return n
}

func (c *testCluster) stop(id string) {
	c.mu.Lock()
	n := c.nodes[id]
	delete(c.nodes, id)
	c.mu.Unlock()
	if n != nil {
		if err := n.Shutdown(); err != nil {
			c.t.Errorf("stop %s: %v", id, err)
		}
	}
}

func (c *testCluster) leader() (string, *Node) {
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		for id, n := range c.nodes {
			if n.IsLeader() {
				c.mu.Unlock()
				return id, n
			}
		}
		c.mu.Unlock()
		time.Sleep(20 * time.Millisecond)
	}
	c.t.Fatal("no leader")
	return "", nil
}

func newTestCluster(t testing.TB, ids ...string) *testCluster {
	return newTestClusterWith(t, nil, ids...)
}

// newTestClusterWith lets setup change the cluster (FSM delay, config
// options) before any node starts.
func newTestClusterWith(t testing.TB, setup func(*testCluster), ids ...string) *testCluster {
	c := &testCluster{t: t, ca: newCA(t), dir: t.TempDir(), nodes: map[string]*Node{}, fsms: map[string]*kv{}, addrs: map[string]string{}}
	if setup != nil {
		setup(c)
	}
	for _, id := range ids {
		c.addrs[id] = stablePort(t)
	}
	t.Cleanup(func() {
		for _, id := range ids {
			c.stop(id)
		}
	})
	ctx := context.Background()
	first := c.start(ids[0], nil)
	if err := first.Bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	c.leader()
	for _, id := range ids[1:] {
		n := c.start(id, nil)
		jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := n.JoinCluster(jctx, c.addrs[ids[0]])
		cancel()
		if err != nil {
			t.Fatalf("join %s: %v", id, err)
		}
	}
	return c
}

// stablePort picks a free port below the ephemeral range, so no outgoing
// connection takes it while its node restarts.
func stablePort(t testing.TB) string {
	for i := 0; i < 1000; i++ {
		addr := fmt.Sprintf("127.0.0.1:%d", 10000+mrand.IntN(20000))
		if ln, err := net.Listen("tcp", addr); err == nil {
			_ = ln.Close() // only probing that the port is free
			return addr
		}
	}
	t.Fatal("no free port")
	return ""
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestReplicationForwardingFailover(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	if st := leader.Status(ctx); len(st.Peers) != 3 || st.LeaderID != leaderID {
		t.Fatalf("status %+v", st)
	}
	if err := leader.Bootstrap(ctx); !errors.Is(err, ErrExistingState) {
		t.Fatalf("second bootstrap: %v", err)
	}
	var followers []string
	for id := range c.nodes {
		if id != leaderID {
			followers = append(followers, id)
		}
	}
	// Writes on a follower are forwarded; a read index on the other
	// follower sees them at once.
	var acked []string
	for i := 0; i < 20; i++ {
		k := fmt.Sprint("k", i)
		if _, err := c.nodes[followers[0]].Apply(ctx, set(k, "v")); err != nil {
			t.Fatal(err)
		}
		acked = append(acked, k)
	}
	if err := c.nodes[followers[1]].ReadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	for _, k := range acked {
		if _, ok := c.fsms[followers[1]].get(k); !ok {
			t.Fatalf("%s missing on %s after ReadIndex", k, followers[1])
		}
	}
	// A refused command comes back as an ApplyError, across forwarding too.
	_, err := c.nodes[followers[0]].Apply(ctx, set("fail", "x"))
	var ae *ApplyError
	if !errors.As(err, &ae) || !strings.Contains(ae.Msg, "not allowed") {
		t.Fatalf("refused command via follower: %v", err)
	}
	if _, err := leader.Apply(ctx, set("fail", "x")); !errors.As(err, &ae) || ae.Unwrap() == nil {
		t.Fatalf("refused command on leader: %v", err)
	}

	// The leader dies; a new one is elected and no acknowledged write is
	// lost; writes continue.
	c.stop(leaderID)
	newID, newLeader := c.leader()
	if newID == leaderID {
		t.Fatal("dead leader still leads")
	}
	if _, err := newLeader.Apply(ctx, set("after", "failover")); err != nil {
		t.Fatal(err)
	}
	acked = append(acked, "after")
	for id, f := range c.fsms {
		if id == leaderID {
			continue
		}
		if err := c.nodes[id].ReadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		for _, k := range acked {
			if _, ok := f.get(k); !ok {
				t.Fatalf("acknowledged %s lost on %s", k, id)
			}
		}
	}
	// The old leader restarts from its data and catches up.
	c.start(leaderID, nil)
	eventually(t, "restarted node to catch up", func() bool {
		_, ok := c.fsms[leaderID].get("after")
		return ok
	})
	// Remove a node.
	if err := newLeader.Remove(ctx, leaderID); err != nil {
		t.Fatal(err)
	}
	if st := newLeader.Status(ctx); len(st.Peers) != 2 {
		t.Fatalf("after remove: %+v", st.Peers)
	}
}

func TestTLSRefusesStrangers(t *testing.T) {
	c := newTestCluster(t, "a")
	ctx := context.Background()
	// A node with a certificate from another CA cannot join.
	other := newCA(t)
	stranger := c.start("x", func(cfg *Config) {
		cfg.BindAddr = "127.0.0.1:0"
		cfg.TLS = other.tls(t, "x")
	})
	jctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if err := stranger.JoinCluster(jctx, c.addrs["a"]); err == nil {
		t.Fatal("node from another CA joined")
	}
	// A client without a certificate gets no further than the handshake.
	conn, err := tls.Dial("tcp", c.addrs["a"], &tls.Config{RootCAs: c.ca.pool})
	if err == nil {
		// The server may hang up before these writes: only the missing
		// answer is the test.
		_, _ = conn.Write([]byte{protoRPC})
		_ = writeFrame(conn, &rpcRequest{Op: opStats})
		var r rpcResponse
		if readFrame(conn, &r) == nil {
			t.Fatal("client without certificate was answered")
		}
		_ = conn.Close()
	}
	// A node may only ask to add itself.
	imp := c.start("y", func(cfg *Config) { cfg.BindAddr = "127.0.0.1:0" })
	var r rpcResponse
	err = imp.pool.call(ctx, c.addrs["a"], &rpcRequest{Op: opJoin, NodeID: "z", Addr: "127.0.0.1:1", Self: true}, &r)
	if err != nil || !strings.Contains(r.Err, "asked to add z") {
		t.Fatalf("impersonated join: %v %q", err, r.Err)
	}
	// A non-member may not change membership.
	r = rpcResponse{}
	err = imp.pool.call(ctx, c.addrs["a"], &rpcRequest{Op: opRemove, NodeID: "a"}, &r)
	if err != nil || !strings.Contains(r.Err, "not a cluster member") {
		t.Fatalf("non-member remove: %v %q", err, r.Err)
	}
	// Configs that would let anyone in are refused.
	loose := c.ca.tls(t, "l")
	loose.ClientAuth = tls.RequestClientCert
	if _, err := New(ctx, Config{NodeID: "l", BindAddr: "127.0.0.1:0", DataDir: t.TempDir(), TLS: loose}, newKV()); err == nil {
		t.Fatal("TLS config without client verification accepted")
	}
}

func TestSnapshotsAndRestart(t *testing.T) {
	c := &testCluster{t: t, ca: newCA(t), dir: t.TempDir(), nodes: map[string]*Node{}, fsms: map[string]*kv{}, addrs: map[string]string{"a": "127.0.0.1:0"}}
	c.addrs["a"] = stablePort(t)
	t.Cleanup(func() { c.stop("a") })
	small := func(cfg *Config) {
		cfg.SnapshotThreshold, cfg.TrailingLogs, cfg.SnapshotInterval = 16, 4, 50*time.Millisecond
	}
	n := c.start("a", small)
	ctx := context.Background()
	if err := n.Bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	c.leader()
	for i := 0; i < 100; i++ {
		if _, err := n.Apply(ctx, set(fmt.Sprint("k", i), "v")); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "a snapshot", func() bool {
		m, _ := filepath.Glob(filepath.Join(c.dir, "a", "snapshots", "*", "state.bin"))
		return len(m) > 0
	})
	c.stop("a")
	c.start("a", small)
	c.leader()
	if err := c.nodes["a"].ReadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if _, ok := c.fsms["a"].get(fmt.Sprint("k", i)); !ok {
			t.Fatalf("k%d lost across snapshot and restart", i)
		}
	}
	var buf bytes.Buffer
	s, _ := c.fsms["a"].Snapshot()
	if err := s.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(buf.Bytes(), []byte("k99")) {
		t.Fatal("snapshot content")
	}
}

func TestNoLeaderFailsClosed(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	ctx := context.Background()
	leaderID, _ := c.leader()
	// Stop two of three: the survivor has no quorum and must not commit.
	var survivor string
	stopped := 0
	for id := range c.addrs {
		if id != leaderID && survivor == "" {
			survivor = id
			continue
		}
		c.stop(id)
		stopped++
	}
	actx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := c.nodes[survivor].Apply(actx, set("minority", "x")); !errors.Is(err, ErrNoLeader) {
		t.Fatalf("write without quorum: %v, want ErrNoLeader", err)
	}
	if _, ok := c.fsms[survivor].get("minority"); ok {
		t.Fatal("a minority applied a write")
	}
}

func (c *testCluster) followers(leaderID string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var f []string
	for id := range c.nodes {
		if id != leaderID {
			f = append(f, id)
		}
	}
	sort.Strings(f)
	return f
}

func TestOriginEncoding(t *testing.T) {
	for _, id := range []string{"a", "node-1.example", "ünïcode"} {
		if got := decodeOrigin(encodeOrigin(id)); got != id {
			t.Errorf("round trip %q: %q", id, got)
		}
	}
	for _, ext := range [][]byte{nil, {}, encodeOrigin(""), {originV1}, {0x02, 'a'}, {0x00, 'a'}, {originV1, 0xff, 0xfe}} {
		if got := decodeOrigin(ext); got != "" {
			t.Errorf("decodeOrigin(%x) = %q, want \"\"", ext, got)
		}
	}
}

// The origin of a command is the member that proposed it, carried in the
// log: the same on every replica, after a restart too, and taken from the
// forwarding connection's TLS identity, not from the request.
func TestOriginReplicated(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	fol := c.followers(leaderID)
	if _, err := c.nodes[fol[0]].Apply(ctx, set("via-follower", "1")); err != nil {
		t.Fatal(err)
	}
	resp, err := leader.Apply(ctx, set("on-leader", "1"))
	if err != nil {
		t.Fatal(err)
	}
	// A member that claims to forward for someone else is still recorded
	// as itself.
	var r rpcResponse
	if err := c.nodes[fol[0]].pool.call(ctx, leader.Addr(), &rpcRequest{Op: opApply, Cmd: set("forged", "1"), NodeID: fol[1]}, &r); err != nil || r.Err != "" || r.NotLeader {
		t.Fatalf("forward with a claimed node ID: %v %+v", err, r)
	}
	want := map[string]string{"via-follower": fol[0], "on-leader": leaderID, "forged": fol[0]}
	check := func(id string) {
		t.Helper()
		for k, o := range want {
			if got, ok := c.fsms[id].origin(k); !ok || got != o {
				t.Errorf("%s: origin of %s = %q (present %v), want %q", id, k, got, ok, o)
			}
		}
	}
	for id, n := range c.nodes {
		if err := n.ReadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		check(id)
		var idx uint64
		if _, err := fmt.Sscan(string(resp), &idx); err != nil {
			t.Fatalf("%s: write index %q: %v", id, resp, err)
		}
		if st := n.Status(ctx); st.AppliedIndex != c.fsms[id].AppliedIndex() || st.AppliedIndex < idx {
			t.Errorf("%s: Status.AppliedIndex %d, FSM %d, write at %d", id, st.AppliedIndex, c.fsms[id].AppliedIndex(), idx)
		}
	}
	// A follower restarted with an empty FSM replays the same origins from
	// its log.
	c.stop(fol[1])
	c.start(fol[1], nil)
	eventually(t, "restarted follower to replay", func() bool { return c.fsms[fol[1]].size() == len(want) })
	check(fol[1])
}

// A process holding a valid peer certificate, but not in the raft
// configuration, can neither write through nor take read indexes from any
// member; nor can a member once it is removed.
func TestAttackForwardFromNonMember(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	mallory := c.ca.tls(t, "m") // same CA: a genuine node certificate
	attack := func(addr string, cfg *tls.Config) {
		t.Helper()
		conn, err := tls.Dial("tcp", addr, cfg)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		defer func() { _ = conn.Close() }() // the test is over when it runs
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write([]byte{protoRPC}); err != nil {
			t.Fatal(err)
		}
		for _, req := range []rpcRequest{
			{Op: opApply, Cmd: set("evil", "x"), NodeID: leaderID},
			{Op: opReadIndex, NodeID: leaderID},
			{Op: opLeaderStatus},
		} {
			if err := writeFrame(conn, &req); err != nil {
				t.Fatal(err)
			}
			var r rpcResponse
			if err := readFrame(conn, &r); err != nil {
				t.Fatalf("%s to %s: %v", req.Op, addr, err)
			}
			if !strings.Contains(r.Err, "not a cluster member") || r.Resp != nil || r.Index != 0 || r.NotLeader || r.Status != nil {
				t.Fatalf("%s from a non-member to %s answered %+v", req.Op, addr, r)
			}
		}
	}
	for _, id := range []string{"a", "b", "c"} {
		attack(c.addrs[id], mallory)
	}
	if logs := c.logs.String(); !strings.Contains(logs, "peer is not a cluster member") || !strings.Contains(logs, "peer=m") || !strings.Contains(logs, "remote=127.0.0.1:") {
		t.Fatalf("refusal not logged with peer and remote address:\n%s", logs)
	}

	// A removed member is a stranger too: its old certificate still
	// verifies, but it may not forward anything.
	removed := c.followers(leaderID)[1]
	if err := leader.Remove(ctx, removed); err != nil {
		t.Fatal(err)
	}
	attack(leader.Addr(), c.ca.tls(t, removed))
	rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var r rpcResponse
	if err := c.nodes[removed].pool.call(rctx, leader.Addr(), &rpcRequest{Op: opApply, Cmd: set("evil", "y")}, &r); err != nil || !strings.Contains(r.Err, "not a cluster member") {
		t.Fatalf("removed member's forward: %v %+v", err, r)
	}

	// A legitimate write afterwards reaches everyone; the attacks reached
	// no one.
	if _, err := leader.Apply(ctx, set("legit", "1")); err != nil {
		t.Fatal(err)
	}
	for id, n := range c.nodes {
		if id == removed {
			continue
		}
		if err := n.ReadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		if _, ok := c.fsms[id].get("legit"); !ok {
			t.Fatalf("legit write missing on %s", id)
		}
	}
	for id, f := range c.fsms {
		if _, ok := f.get("evil"); ok {
			t.Fatalf("a non-member's write was applied on %s", id)
		}
	}
}

// A read on a follower right after ReadIndex sees a write acknowledged
// before it, even when the FSM is slower than raft's own applied index.
func TestReadAfterWriteOnFollower(t *testing.T) {
	c := newTestClusterWith(t, func(c *testCluster) {
		c.delay = 3 * time.Millisecond
		c.opts = func(cfg *Config) { cfg.CommitTimeout = 5 * time.Millisecond }
	}, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	fol := c.followers(leaderID)
	for i := 0; i < 200; i++ {
		k, v := fmt.Sprint("k", i), fmt.Sprint("v", i)
		if _, err := leader.Apply(ctx, set(k, v)); err != nil {
			t.Fatal(err)
		}
		f := fol[i%2]
		if err := c.nodes[f].ReadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		if got, _ := c.fsms[f].get(k); got != v {
			t.Fatalf("iteration %d: %s read %s=%q right after ReadIndex, want %q", i, f, k, got, v)
		}
	}
	// A refused command is the last one in the log: reads still return.
	if _, err := leader.Apply(ctx, set("fail", "x")); err == nil {
		t.Fatal("refused command accepted")
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.nodes[fol[0]].ReadIndex(rctx); err != nil {
		t.Fatalf("read after a refused command: %v", err)
	}
}

// A follower that catches up by installing a snapshot (its log compacted
// away) serves reads that see everything in it.
func TestReadIndexAfterInstallSnapshot(t *testing.T) {
	small := func(cfg *Config) {
		cfg.SnapshotThreshold, cfg.TrailingLogs, cfg.SnapshotInterval = 16, 4, 50*time.Millisecond
	}
	c := newTestClusterWith(t, func(c *testCluster) { c.opts = small }, "a")
	ctx := context.Background()
	c.addrs["b"] = stablePort(t)
	t.Cleanup(func() { c.stop("b") })
	_, leader := c.leader()
	for i := 0; i < 100; i++ {
		if _, err := leader.Apply(ctx, set(fmt.Sprint("k", i), "v")); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "a snapshot", func() bool {
		m, _ := filepath.Glob(filepath.Join(c.dir, "a", "snapshots", "*", "state.bin"))
		return len(m) > 0
	})
	b := c.start("b", nil)
	jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := b.JoinCluster(jctx, leader.Addr()); err != nil {
		t.Fatal(err)
	}
	if err := b.ReadIndex(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if _, ok := c.fsms["b"].get(fmt.Sprint("k", i)); !ok {
			t.Fatalf("k%d missing on b after ReadIndex", i)
		}
	}
}

// Without Config.PeerNodeID the leader cannot name a forwarding peer: the
// command's origin is "" (a local write still names the leader).
func TestOriginUnknownWithoutPeerNodeID(t *testing.T) {
	c := newTestClusterWith(t, func(c *testCluster) {
		c.opts = func(cfg *Config) { cfg.PeerNodeID = nil }
	}, "a", "b")
	ctx := context.Background()
	leaderID, leader := c.leader()
	fol := c.followers(leaderID)[0]
	if _, err := c.nodes[fol].Apply(ctx, set("forwarded", "1")); err != nil {
		t.Fatal(err)
	}
	if _, err := leader.Apply(ctx, set("local", "1")); err != nil {
		t.Fatal(err)
	}
	for id, n := range c.nodes {
		if err := n.ReadIndex(ctx); err != nil {
			t.Fatal(err)
		}
		if o, ok := c.fsms[id].origin("forwarded"); !ok || o != "" {
			t.Errorf("%s: forwarded origin %q (present %v), want \"\"", id, o, ok)
		}
		if o, _ := c.fsms[id].origin("local"); o != leaderID {
			t.Errorf("%s: local origin %q, want %q", id, o, leaderID)
		}
	}
}

// TestAttackRaftFromNonMember: hashicorp's AppendEntries and InstallSnapshot
// do not check who sends them, so a raft connection from a node that is not
// in the configuration is closed before raft sees a byte of it.
func TestAttackRaftFromNonMember(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	mallory := c.ca.tls(t, "m")
	// A node that has not yet received the configuration admits any
	// verified node (it is waiting to be added): wait until all know it.
	deadline := time.Now().Add(20 * time.Second)
	for _, id := range []string{"a", "b", "c"} {
		for len(c.nodes[id].Status(context.Background()).Peers) != 3 {
			if time.Now().After(deadline) {
				t.Fatalf("%s never learned the configuration", id)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	for _, id := range []string{"a", "b", "c"} {
		conn, err := tls.Dial("tcp", c.addrs[id], mallory)
		if err != nil {
			t.Fatalf("dial %s: %v", id, err)
		}
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write([]byte{protoRaft}); err != nil {
			t.Fatal(err)
		}
		// An AppendEntries header would follow; the server must have hung
		// up instead of handing the stream to raft.
		var b [1]byte
		if _, err := conn.Read(b[:]); err == nil {
			t.Fatalf("%s answered a non-member's raft connection", id)
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("%s kept a non-member's raft connection open", id)
		}
		_ = conn.Close() // the server already hung up
	}
	if logs := c.logs.String(); !strings.Contains(logs, "refused raft connection") || !strings.Contains(logs, `\"m\" is not in the raft configuration`) && !strings.Contains(logs, `"m" is not in the raft configuration`) {
		t.Fatalf("refusal not logged:\n%s", logs)
	}
	// Members still replicate.
	_, leader := c.leader()
	if _, err := leader.Apply(context.Background(), set("after", "1")); err != nil {
		t.Fatal(err)
	}
}

// A follower's LeaderStatus is the leader's view: every member's contact
// and match index; a stopped member turns unreachable with a growing lag,
// and a node without a leader says so instead of answering zeros.
func TestLeaderStatusForwarded(t *testing.T) {
	c := newTestCluster(t, "a", "b", "c")
	ctx := context.Background()
	leaderID, leader := c.leader()
	if _, err := leader.Apply(ctx, set("k", "v")); err != nil {
		t.Fatal(err)
	}
	fs := c.followers(leaderID)
	asked, stopped := c.nodes[fs[0]], fs[1]
	peer := func(st Status, id string) Peer {
		for _, p := range st.Peers {
			if p.ID == id {
				return p
			}
		}
		t.Fatalf("%s missing from %+v", id, st.Peers)
		return Peer{}
	}
	reachable := func(p Peer) bool { return p.Reachable != nil && *p.Reachable }
	var st Status
	eventually(t, "the leader's view through a follower, every member reachable and caught up", func() bool {
		var err error
		if st, err = asked.LeaderStatus(ctx); err != nil {
			t.Logf("leader status via %s: %v", fs[0], err)
			return false
		}
		for _, p := range st.Peers {
			if !reachable(p) || p.MatchIndex == nil || *p.MatchIndex == 0 || p.Lag == nil || *p.Lag != 0 {
				return false
			}
		}
		return st.NodeID == leaderID && st.State == "leader" && len(st.Peers) == 3
	})
	// The follower's own view knows its leader's contact and nothing of
	// the other follower.
	local := asked.Status(ctx)
	if p := peer(local, leaderID); !reachable(p) || p.LastContact.IsZero() || p.MatchIndex != nil {
		t.Fatalf("follower's view of its leader: %+v", p)
	}
	if p := peer(local, stopped); p.Reachable != nil || !p.LastContact.IsZero() || p.MatchIndex != nil || p.Lag != nil {
		t.Fatalf("follower's view of another follower claims knowledge: %+v", p)
	}

	c.stop(stopped)
	var lag uint64
	eventually(t, "the stopped member unreachable with a growing lag, the others reachable", func() bool {
		if _, err := leader.Apply(ctx, set("k", "w")); err != nil {
			t.Fatal(err)
		}
		st, err := asked.LeaderStatus(ctx)
		if err != nil {
			return false
		}
		p := peer(st, stopped)
		if p.Reachable == nil || *p.Reachable || p.Lag == nil {
			return false
		}
		grew := lag != 0 && *p.Lag > lag
		lag = *p.Lag
		return grew && reachable(peer(st, leaderID)) && reachable(peer(st, fs[0])) && p.ContactAge > st.ReachableWithin
	})

	// Without a quorum no leader answers: an error, not a view of zeros.
	c.stop(leaderID)
	eventually(t, "no leader", func() bool {
		_, err := asked.LeaderStatus(ctx)
		return errors.Is(err, ErrNoLeader)
	})
	if p := peer(asked.Status(ctx), leaderID); p.Reachable != nil && *p.Reachable {
		t.Fatalf("a stopped leader still reachable in the local view: %+v", p)
	}
}
