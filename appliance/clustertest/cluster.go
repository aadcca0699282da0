package clustertest

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// Cluster is a set of real sigild nodes in this process, on real TCP ports
// on loopback, each with its own HSM-held issuing CA.
type Cluster struct {
	T     testing.TB
	Trust *Trust
	Dir   string
	Log   *LogBuffer

	mu      sync.Mutex
	configs map[string]*node.Config
	nodes   map[string]*node.Node

	// Admin is an admin credential (files) issued by node-1's CA.
	AdminCert, AdminKey string
	// ClientRoots is the roots file admin clients dial nodes with ("":
	// the trust's root); a root rotation's test points it at both roots.
	ClientRoots string
}

// LogBuffer collects every node's structured log for assertions.
type LogBuffer = testenv.LogBuffer

// freePort picks a free loopback port. Nodes keep their raft address
// across restarts, so ports are chosen up front rather than with :0, and
// from below the kernel's ephemeral range: a port handed out by :0 can be
// taken as the source port of an outgoing connection before (or while) the
// node that owns it is down.
//
// Ports are handed out in turn from this process's stripe of the range
// (by process ID), starting at a random place: a cluster's ports are all
// chosen before its nodes bind them, so random draws with a probe alone
// let two of its nodes draw the same one (about one cluster in 200), and
// packages tested in parallel (other processes, other stripes) rarely
// draw the same port between a probe and a bind. A port comes round
// again only after the whole stripe (thousands of ports).
func freePort(t testing.TB) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if _, err := fmt.Sscan(string(b), &low); err != nil {
			t.Fatalf("ip_local_port_range %q: %v", b, err)
		}
	}
	lo := 10000
	if low-lo < 2000 {
		t.Fatalf("ephemeral ports start at %d: no room for test ports below them", low)
	}
	const stripes = 8
	width := (low - lo) / stripes
	base := lo + (os.Getpid()%stripes)*width
	portTurn.mu.Lock()
	defer portTurn.mu.Unlock()
	if !portTurn.started {
		portTurn.next, portTurn.started = mrand.IntN(width), true
	}
	for i := 0; i < width; i++ {
		port := base + portTurn.next%width
		portTurn.next++
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if ln, err := net.Listen("tcp", addr); err == nil {
			_ = ln.Close() // only probing that the port is free
			return addr
		}
	}
	t.Fatal("no free loopback port")
	return ""
}

// portTurn is where freePort goes on in this process's stripe.
var portTurn struct {
	mu      sync.Mutex
	next    int
	started bool
}

// NewCluster configures nodes (the first bootstraps, the rest join it) and
// starts them. Call after NewTrust.
func NewCluster(t testing.TB, tr *Trust, ids ...string) *Cluster {
	t.Helper()
	return NewClusterWith(t, tr, nil, ids...)
}

// NewClusterWith is NewCluster with a hook that adjusts each node's config.
func NewClusterWith(t testing.TB, tr *Trust, mod func(*node.Config), ids ...string) *Cluster {
	t.Helper()
	c := &Cluster{T: t, Trust: tr, Dir: t.TempDir(), Log: &LogBuffer{}, configs: map[string]*node.Config{}, nodes: map[string]*node.Node{}}
	var first string
	for i, id := range ids {
		cfg := c.Config(id)
		if i == 0 {
			cfg.Cluster.Bootstrap = true
			first = cfg.Cluster.Bind
		} else {
			cfg.Cluster.Join = []string{first}
		}
		if mod != nil {
			mod(cfg)
		}
		c.configs[id] = cfg
	}
	t.Cleanup(c.StopAll)
	for _, id := range ids {
		c.Start(id)
	}
	c.WaitLeader(30 * time.Second)

	// An admin credential from node-1's CA, through its own key store.
	ks := pkcs11.New(pkcs11.Options{})
	defer func() { _ = ks.Close() }() // the credential is written: the module is only let go of
	cert := ClientCert(t, tr.Authority(t, ks, ids[0]), "/sigil/admin/test-admin")
	c.AdminCert, c.AdminKey = WriteCredential(t, c.Dir, "admin", cert)
	return c
}

// RenewAdmin replaces the admin credential with one from node's CA under
// issuing (a rotation's new chain) and roots: after a root is retired, a
// credential under it is refused.
func (c *Cluster) RenewAdmin(t testing.TB, node string, issuing *x509.Certificate, roots []*x509.Certificate) {
	t.Helper()
	ks := pkcs11.New(pkcs11.Options{})
	defer func() { _ = ks.Close() }() // the credential is written: the module is only let go of
	cert := ClientCert(t, c.Trust.AuthorityWith(t, ks, node, issuing, roots), "/sigil/admin/test-admin")
	c.AdminCert, c.AdminKey = WriteCredential(t, c.Dir, fmt.Sprintf("admin-%d", time.Now().UnixNano()), cert)
}

// Config builds a node config with fresh ports and a private data dir.
func (c *Cluster) Config(id string) *node.Config {
	n := c.Trust.Nodes[id]
	roots := []string{c.Trust.RootPath}
	if n.Rogue {
		roots = []string{c.Trust.RogueRootPath}
	}
	cfg := &node.Config{
		NodeID:      id,
		TrustDomain: c.Trust.TrustDomain.Name(),
		DataDir:     filepath.Join(c.Dir, id),
		IssuingKey:  n.KeyURI,
		IssuingCert: n.IssuingPath,
		RootCerts:   roots,
		Cluster: node.ClusterConfig{Bind: freePort(c.T),
			HeartbeatTimeout: node.Duration{Duration: 500 * time.Millisecond},
			ElectionTimeout:  node.Duration{Duration: 500 * time.Millisecond}},
		API:    node.APIConfig{Listen: freePort(c.T), LocalSocket: filepath.Join(c.Dir, id+"-admin.sock")},
		HTTP:   node.HTTPConfig{Listen: freePort(c.T)},
		Bundle: node.BundleConfig{Listen: freePort(c.T)},
	}
	if err := cfg.Validate(); err != nil {
		c.T.Fatal(err)
	}
	return cfg
}

// Start (re)starts a configured node.
func (c *Cluster) Start(id string) *node.Node {
	c.T.Helper()
	c.mu.Lock()
	cfg := c.configs[id]
	c.mu.Unlock()
	if cfg == nil {
		c.T.Fatalf("no config for %s", id)
	}
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n, err := node.Start(context.Background(), cfg, log)
	if err != nil {
		c.T.Fatalf("start %s: %v", id, err)
	}
	c.mu.Lock()
	c.nodes[id] = n
	c.mu.Unlock()
	return n
}

// StartWith starts a node that is not part of the configured set (a rogue
// node, for example) and returns it and its error.
func (c *Cluster) StartWith(cfg *node.Config) (*node.Node, error) {
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	n, err := node.Start(context.Background(), cfg, log)
	if err == nil {
		c.T.Cleanup(func() {
			if err := n.Stop(); err != nil {
				c.T.Errorf("stop node: %v", err)
			}
		})
	}
	return n, err
}

// Stop stops one node (its data stays).
func (c *Cluster) Stop(id string) {
	c.mu.Lock()
	n := c.nodes[id]
	delete(c.nodes, id)
	c.mu.Unlock()
	if n != nil {
		if err := n.Stop(); err != nil {
			c.T.Errorf("stop %s: %v", id, err)
		}
	}
}

// StopAll stops every running node.
func (c *Cluster) StopAll() {
	c.mu.Lock()
	ids := make([]string, 0, len(c.nodes))
	for id := range c.nodes {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	for _, id := range ids {
		c.Stop(id)
	}
}

// Node returns a running node.
func (c *Cluster) Node(id string) *node.Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[id]
}

// ConfigOf returns a node's config.
func (c *Cluster) ConfigOf(id string) *node.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.configs[id]
}

// Running lists running node IDs.
func (c *Cluster) Running() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for id := range c.nodes {
		ids = append(ids, id)
	}
	return ids
}

// WaitLeader waits until every running node agrees on a leader and has the
// trust bundle, and returns the leader's ID.
func (c *Cluster) WaitLeader(timeout time.Duration) string {
	c.T.Helper()
	deadline := time.Now().Add(timeout)
	for {
		leader, agreed := "", true
		for _, id := range c.Running() {
			n := c.Node(id)
			if n == nil {
				continue
			}
			st := n.Raft().Status(context.Background())
			if st.LeaderID == "" || (leader != "" && st.LeaderID != leader) || len(n.State().Bundle().Roots) == 0 {
				agreed = false
				break
			}
			leader = st.LeaderID
		}
		if agreed && leader != "" && c.Node(leader) != nil {
			return leader
		}
		if time.Now().After(deadline) {
			c.T.Fatalf("no agreed leader with a trust bundle after %v\n%s", timeout, tail(c.Log.String(), 4000))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Admin dials a node's API with the admin credential.
func (c *Cluster) Admin(id string) *api.AdminClient {
	return c.Client(id, c.AdminCert, c.AdminKey)
}

// LocalAdmin dials a node's local admin socket (root on the node: no
// certificate, so no root or admin-cert-max-ttl to keep up with).
func (c *Cluster) LocalAdmin(id string) *api.AdminClient {
	c.T.Helper()
	conn, err := api.Dial(api.DialConfig{Socket: c.ConfigOf(id).API.LocalSocket})
	if err != nil {
		c.T.Fatal(err)
	}
	c.T.Cleanup(func() { _ = conn.Close() }) // the test is over: nothing more goes through it
	return api.NewAdminClient(conn)
}

// Client dials a node's API with any credential files.
func (c *Cluster) Client(id, cert, key string) *api.AdminClient {
	c.T.Helper()
	roots := c.Trust.RootPath
	if c.ClientRoots != "" {
		roots = c.ClientRoots
	}
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(id).API.Listen, CertFile: cert, KeyFile: key, RootFile: roots})
	if err != nil {
		c.T.Fatal(err)
	}
	c.T.Cleanup(func() { _ = conn.Close() }) // the test is over: nothing more goes through it
	return api.NewAdminClient(conn)
}

// Eventually polls cond until it holds.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// FreePort returns a free loopback address below the ephemeral range.
func FreePort(t testing.TB) string { t.Helper(); return freePort(t) }

// TrustEKCAs makes the cluster trust TPM vendor CAs (PEM files, such as a
// test swtpm's EKCARoot and EKCAIssuer).
func TrustEKCAs(t testing.TB, admin *api.AdminClient, paths ...string) {
	t.Helper()
	for _, p := range paths {
		certs, err := pemfile.ReadCerts(p)
		if err != nil || len(certs) == 0 {
			t.Fatalf("EK CA %s: %v", p, err)
		}
		if _, err := admin.EKCAAdd(context.Background(), &api.EKCARequest{DER: certs[0].Raw}); err != nil {
			t.Fatal(err)
		}
	}
}

// LeaderVia waits for a leader other than exclude that sees three voters,
// asking nodes through their admin APIs (for nodes run as processes);
// exclude is not asked either.
func LeaderVia(t testing.TB, clients map[string]*api.AdminClient, exclude string) string {
	t.Helper()
	ids := make([]string, 0, len(clients))
	for id := range clients {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var leader string
	Eventually(t, 60*time.Second, "a leader with three voters", func() bool {
		for _, id := range ids {
			if id == exclude {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := clients[id].ClusterStatus(ctx, &api.Empty{})
			cancel()
			if err == nil && st.LeaderID != "" && st.LeaderID != exclude && len(st.Peers) == 3 {
				leader = st.LeaderID
				return true
			}
		}
		return false
	})
	return leader
}
