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
	"math/big"
	mrand "math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// kv is a tiny deterministic FSM: "set k v" commands; "fail" is refused.
type kv struct {
	mu sync.Mutex
	m  map[string]string
}

func newKV() *kv { return &kv{m: map[string]string{}} }

func (k *kv) Apply(index uint64, cmd []byte) ([]byte, error) {
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
	return []byte(fmt.Sprint(index)), nil
}

func (k *kv) get(key string) (string, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	v, ok := k.m[key]
	return v, ok
}

type kvSnap struct{ b []byte }

func (s *kvSnap) Persist(w io.Writer) error { _, err := w.Write(s.b); return err }
func (s *kvSnap) Release()                  {}

func (k *kv) Snapshot() (Snapshot, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	b, err := json.Marshal(k.m)
	return &kvSnap{b}, err
}

func (k *kv) Restore(r io.Reader) error {
	m := map[string]string{}
	if err := json.NewDecoder(r).Decode(&m); err != nil {
		return err
	}
	k.mu.Lock()
	k.m = m
	k.mu.Unlock()
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
	return Config{NodeID: id, BindAddr: c.addrs[id], DataDir: filepath.Join(c.dir, id), TLS: c.ca.tls(c.t, id),
		PeerNodeID: peerID, HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond}
}

func (c *testCluster) start(id string, mod func(*Config)) *Node {
	c.t.Helper()
	cfg := c.config(id)
	if mod != nil {
		mod(&cfg)
	}
	fsm := newKV()
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
		n.Shutdown()
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
	c := &testCluster{t: t, ca: newCA(t), dir: t.TempDir(), nodes: map[string]*Node{}, fsms: map[string]*kv{}, addrs: map[string]string{}}
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
			ln.Close()
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
		conn.Write([]byte{protoRPC})
		writeFrame(conn, &rpcRequest{Op: opStats})
		var r rpcResponse
		if readFrame(conn, &r) == nil {
			t.Fatal("client without certificate was answered")
		}
		conn.Close()
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
	imp.pool.call(ctx, c.addrs["a"], &rpcRequest{Op: opRemove, NodeID: "a"}, &r)
	if !strings.Contains(r.Err, "not a cluster member") {
		t.Fatalf("non-member remove: %q", r.Err)
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
	n.Bootstrap(ctx)
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
	s.Persist(&buf)
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
