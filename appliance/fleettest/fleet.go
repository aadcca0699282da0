// Package fleettest runs a fleet of simulated agents in the test's process
// against a real appliance of three sigild processes (Appliance), to
// measure what a fleet costs the appliance. It owns the processes and the
// agents it starts (their connections, Sync streams and renewal loops)
// and stops all of them when the test ends. Only tests and benchmarks
// import it.
//
// A simulated agent is the real agent's protocol without its Workload API
// or TPM: it joins with a one-time token through the real join service
// (its key is a software P-256 key, as a token-joined sigil-agent's is),
// keeps one mutual-TLS connection to its current node with one Sync
// stream on it, and renews its own SVID on the real agent's schedule over
// a fresh connection each time; with the new SVID it replaces its
// connection (nodes serve a connection only while the SVID it was opened
// with is valid) and reopens Sync on it at once. Like sigil-agent, it lists all three nodes
// and starts on one of them (agent i on node i mod 3: the even spread a
// random start gives a large fleet); when its node fails it moves to the
// next in its list, reopening Sync after sigil-agent's jittered backoff,
// and a renewal tries each node once from the current one.
package fleettest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	mrand "math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// NodeIDs are the three nodes an Appliance runs.
func NodeIDs() []string { return []string{"node-1", "node-2", "node-3"} }

// Options shape a fleet.
type Options struct {
	Agents int
	// Joiners bounds joins in progress at once (default 16). Every
	// simulated agent joins from 127.0.0.1, one source to the nodes'
	// per-source limits on anonymous calls: refused joins are retried.
	Joiners int
}

// Update is what an agent recorded of one SyncUpdate.
type Update struct {
	Node     string // the node whose stream delivered it
	Revision uint64
	Entries  []string // entry IDs
	JWTKeys  []string // key IDs in the bundle
	At       time.Time
	// Bytes is the update's size as the API's JSON codec encodes it, for
	// the first agent only (measured, not spent on every agent).
	Bytes int
}

// Agent is one simulated agent.
type Agent struct {
	ID   string
	Node string // the node it joined and started on

	measure bool              // record each update's encoded size
	servers []string          // node IDs in this agent's order, Node first
	addrs   map[string]string // node ID to API address
	root    string
	cert    atomic.Pointer[tls.Certificate]

	// cur indexes servers: the node the connection, Sync and the first
	// renewal attempt go to. conn is nil until dialled, and after a
	// failure.
	connMu sync.Mutex
	cur    int
	conn   *grpc.ClientConn

	mu      sync.Mutex
	updates []Update
	changed chan struct{} // closed and replaced on each update

	renewals, renewFailed, renewFailedValid, expired, syncRestarts atomic.Int64
	// renewStarts are when each renewal attempt began: the schedule, before
	// the appliance's queueing smooths it.
	renewStarts, renewDone []time.Time
}

// Fleet is a set of running simulated agents.
type Fleet struct {
	T      testing.TB
	App    *Appliance
	Agents []*Agent
	// JoinRetries counts joins (or their token writes) the nodes refused
	// for a limit, for load, or dropped, and that were tried again (the first five are logged); JoinTime is
	// how long all joins took.
	JoinRetries atomic.Int64
	JoinTime    time.Duration

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu                  sync.Mutex
	joinRetries         map[string]int
	renewFailures       map[string]int
	renewFailuresLogged atomic.Int64
	syncEnds            map[string]int
	syncEndsLogged      atomic.Int64
}

// JoinRetriesBy counts retried joins by why they were retried.
func (f *Fleet) JoinRetriesBy() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.joinRetries)
}

// Start joins opt.Agents agents, spread evenly over the appliance's three
// nodes, opens each one's Sync stream as soon as it has joined (as a fleet
// that boots does) and starts its renewals. It logs progress every 10%.
func Start(t testing.TB, app *Appliance, opt Options) *Fleet {
	t.Helper()
	if opt.Joiners <= 0 {
		opt.Joiners = 16
	}
	ctx, cancel := context.WithCancel(context.Background())
	f := &Fleet{T: t, App: app, ctx: ctx, cancel: cancel, joinRetries: map[string]int{}, renewFailures: map[string]int{}, syncEnds: map[string]int{}}
	t.Cleanup(f.stop)
	admins := map[string]*api.AdminClient{}
	ids := NodeIDs()
	addrs := map[string]string{}
	for _, id := range ids {
		admins[id] = app.Admin(id)
		addrs[id] = app.Proc(id).API
	}
	f.Agents = make([]*Agent, opt.Agents)
	for i := range f.Agents {
		order := append(slices.Clone(ids[i%len(ids):]), ids[:i%len(ids)]...)
		f.Agents[i] = &Agent{Node: order[0], measure: i == 0, servers: order, addrs: addrs, root: app.Trust.RootPath, changed: make(chan struct{})}
	}
	start := time.Now()
	var done atomic.Int64
	var firstErr atomic.Pointer[error]
	sem := make(chan struct{}, opt.Joiners)
	var jwg sync.WaitGroup
	for _, a := range f.Agents {
		sem <- struct{}{}
		if firstErr.Load() != nil {
			break
		}
		jwg.Add(1)
		go func() {
			defer jwg.Done()
			defer func() { <-sem }()
			if err := f.join(a, admins[a.Node]); err != nil {
				firstErr.CompareAndSwap(nil, &err)
				return
			}
			f.run(a)
			n := done.Add(1)
			if step := max(int64(opt.Agents)/10, 1); n%step == 0 || n == int64(opt.Agents) {
				el := time.Since(start)
				t.Logf("fleet: %d/%d agents joined and syncing (%v, %.0f joins/s, %d join retries)",
					n, opt.Agents, el.Round(time.Millisecond), float64(n)/el.Seconds(), f.JoinRetries.Load())
			}
		}()
	}
	jwg.Wait()
	if err := firstErr.Load(); err != nil {
		t.Fatalf("fleet join: %v", *err)
	}
	f.JoinTime = time.Since(start)
	return f
}

// retryable classes a failed join the way an operator would have to
// act on it ("" for not retryable): the node refused it for one of its
// limits or for load (an agent retries), or, under load, it reported a
// fresh token as existing or already used: the node retried a write that
// had committed (the agent would need a new token).
func retryable(err error) string {
	switch st, _ := status.FromError(err); {
	case st.Code() == codes.ResourceExhausted || st.Code() == codes.Unavailable:
		return "limit or load (" + st.Code().String() + ")"
	case st.Code() == codes.FailedPrecondition && strings.Contains(st.Message(), "exists"):
		return "new token refused as existing"
	case st.Code() == codes.PermissionDenied && strings.Contains(st.Message(), "already used"):
		return "new token refused as used"
	}
	return ""
}

func (f *Fleet) join(a *Agent, admin *api.AdminClient) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	var svid *api.AgentSVID
	for attempt := 0; ; attempt++ {
		// A fresh token each time: a join the node completed but whose
		// answer was lost (the connection dropped) has used its token.
		tok, err := admin.TokenCreate(f.ctx, &api.TokenRequest{TTL: 600})
		if err == nil {
			svid, err = tokenJoin(f.ctx, a.addrs[a.Node], a.root, tok.Token, csr)
		}
		if err == nil {
			break
		}
		class := retryable(err)
		if class == "" || attempt == 50 {
			return fmt.Errorf("token and join to %s: %w", a.Node, err)
		}
		f.mu.Lock()
		f.joinRetries[class]++
		f.mu.Unlock()
		if f.JoinRetries.Add(1) <= 5 {
			f.T.Logf("fleet: join to %s retried (%s): %v", a.Node, class, err)
		}
		time.Sleep(time.Duration(50+mrand.IntN(200)) * time.Millisecond)
	}
	cert, err := tlsCert(svid, key)
	if err != nil {
		return err
	}
	a.ID = svid.AgentID
	a.cert.Store(cert)
	_, _, err = a.connection()
	return err
}

// connection is the agent's connection to its current node, dialled if
// there is none. It presents whatever SVID is current at each handshake,
// as sigil-agent's does.
func (a *Agent) connection() (*grpc.ClientConn, string, error) {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	node := a.servers[a.cur%len(a.servers)]
	if a.conn == nil {
		conn, err := api.Dial(api.DialConfig{Addr: a.addrs[node], RootFile: a.root,
			Certificate: func() (*tls.Certificate, error) { return a.cert.Load(), nil }})
		if err != nil {
			a.cur++
			return nil, node, err
		}
		a.conn = conn
	}
	return a.conn, node, nil
}

// failed moves to the next node when err says the node could not be
// reached or answer (sigil-agent's rule), if conn is still the current
// connection (nil: a renewal's own connection to the current node).
func (a *Agent) failed(conn *grpc.ClientConn, node string, err error) {
	if c := status.Code(err); c != codes.Unavailable && c != codes.DeadlineExceeded {
		return
	}
	a.connMu.Lock()
	defer a.connMu.Unlock()
	if a.servers[a.cur%len(a.servers)] != node || (conn != nil && a.conn != conn) {
		return
	}
	if a.conn != nil {
		_ = a.conn.Close() // the node is gone or failing: nothing more goes through it
		a.conn = nil
	}
	a.cur++
}

// reconnect drops the agent's connection, so that Sync reopens at once on
// a new one presenting the current SVID, as sigil-agent does with each new
// SVID.
func (a *Agent) reconnect() {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	if a.conn != nil {
		_ = a.conn.Close() // replaced: nothing more goes through it
		a.conn = nil
	}
}

// replaced reports whether conn is no longer the agent's connection.
func (a *Agent) replaced(conn *grpc.ClientConn) bool {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	return a.conn != conn
}

// Current is the node the agent is on now.
func (a *Agent) Current() string {
	a.connMu.Lock()
	defer a.connMu.Unlock()
	return a.servers[a.cur%len(a.servers)]
}

// syncBackoff is sigil-agent's wait before reopening Sync after its
// fails-th consecutive failure (agent/cache): anywhere up to 2 s doubling
// to 30 s.
func syncBackoff(fails int) time.Duration {
	d := min(2*time.Second<<min(fails, 8), 30*time.Second)
	return time.Duration(mrand.Int64N(int64(d) + 1))
}

func tokenJoin(ctx context.Context, addr, root, token string, csr []byte) (*api.AgentSVID, error) {
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: root, Anonymous: true})
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.Close() }() // one call per join connection, as the agent does
	return api.NewJoinClient(conn).Token(ctx, &api.JoinTokenRequest{Token: token, CSR: csr})
}

func tlsCert(s *api.AgentSVID, key *ecdsa.PrivateKey) (*tls.Certificate, error) {
	if len(s.Chain) == 0 {
		return nil, errors.New("empty agent SVID chain")
	}
	leaf, err := x509.ParseCertificate(s.Chain[0])
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: s.Chain, PrivateKey: key, Leaf: leaf}, nil
}

func (f *Fleet) run(a *Agent) {
	f.wg.Add(2)
	go func() { defer f.wg.Done(); f.sync(a) }()
	go func() { defer f.wg.Done(); f.renewLoop(a) }()
}

// sync keeps the agent's Sync stream open, resuming after the last
// revision it saw when the stream ends, as the agent's cache does: on the
// next node when this one failed, after a jittered backoff.
func (f *Fleet) sync(a *Agent) {
	var rev uint64
	fails := 0
	for f.ctx.Err() == nil {
		conn, node, err := a.connection()
		if err == nil {
			var st grpc.ServerStreamingClient[api.SyncUpdate]
			st, err = api.NewAgentClient(conn).Sync(f.ctx, &api.SyncRequest{Revision: rev})
			for err == nil {
				var u *api.SyncUpdate
				if u, err = st.Recv(); err == nil {
					a.record(u, node)
					rev, fails = u.Revision, 0
				}
			}
			if status.Code(err) == codes.Canceled && a.replaced(conn) {
				continue // a new SVID: reopen at once, not a failure
			}
			a.failed(conn, node, err)
		}
		if f.ctx.Err() != nil {
			return
		}
		a.syncRestarts.Add(1)
		f.count(f.syncEnds, err)
		if f.syncEndsLogged.Add(1) <= 5 {
			f.T.Logf("fleet: Sync stream of %s on %s ended (resuming after revision %d): %v", a.ID, node, rev, err)
		}
		sleep(f.ctx, syncBackoff(fails))
		fails++
	}
}

func (a *Agent) record(u *api.SyncUpdate, node string) {
	r := Update{Node: node, Revision: u.Revision, At: time.Now()}
	if a.measure {
		b, _ := json.Marshal(u)
		r.Bytes = len(b)
	}
	for _, e := range u.Entries {
		r.Entries = append(r.Entries, e.ID)
	}
	for _, k := range u.Bundle.JWTKeys {
		r.JWTKeys = append(r.JWTKeys, k.KID)
	}
	a.mu.Lock()
	a.updates = append(a.updates, r)
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// renewLoop is sigil-agent's Run for a token-joined agent: renew at half
// the SVID's life less a random tenth of it, retry a failure after a
// second. An agent whose SVID expires would have to join again with a new
// token; the simulated one stops and is counted as expired. A renewal
// counts as failed when no node gave a new SVID (each was tried once).
func (f *Fleet) renewLoop(a *Agent) {
	for {
		leaf := a.cert.Load().Leaf
		life := leaf.NotAfter.Sub(leaf.NotBefore)
		at := leaf.NotBefore.Add(life/2 - time.Duration(mrand.Int64N(int64(life/10)+1)))
		if !sleep(f.ctx, max(time.Until(at), time.Second)) {
			return
		}
		if time.Now().After(leaf.NotAfter) {
			a.expired.Add(1)
			return
		}
		start := time.Now()
		err := a.renew(f.ctx)
		if f.ctx.Err() != nil {
			return
		}
		a.mu.Lock()
		a.renewStarts = append(a.renewStarts, start)
		if err == nil {
			a.renewDone = append(a.renewDone, time.Now())
		}
		a.mu.Unlock()
		if err == nil {
			a.renewals.Add(1)
			continue
		}
		a.renewFailed.Add(1)
		valid := time.Now().Before(leaf.NotAfter)
		if valid {
			a.renewFailedValid.Add(1)
		}
		f.renewFailure(a, err, valid)
	}
}

// renewFailure counts a failed renewal by its gRPC code and message and
// logs the first five.
func (f *Fleet) renewFailure(a *Agent, err error, valid bool) {
	f.count(f.renewFailures, err)
	if f.renewFailuresLogged.Add(1) <= 5 {
		f.T.Logf("fleet: renewal by %s on %s failed (SVID still valid: %v): %v", a.ID, a.Node, valid, err)
	}
}

// count adds err to m by its gRPC code and message, cut where the
// appliance's messages start naming agents and serials.
func (f *Fleet) count(m map[string]int, err error) {
	st, _ := status.FromError(err)
	class := st.Code().String() + ": " + st.Message()
	if i := strings.Index(class, "spiffe://"); i > 0 {
		class = class[:i] + "..."
	}
	if len(class) > 100 {
		class = class[:100] + "..."
	}
	f.mu.Lock()
	m[class]++
	f.mu.Unlock()
}

// SyncEndsBy counts Sync streams that ended (and were reopened) by the
// error they ended with.
func (f *Fleet) SyncEndsBy() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.syncEnds)
}

// RenewFailuresBy counts failed renewals by gRPC code and message.
func (f *Fleet) RenewFailuresBy() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.renewFailures)
}

// renew asks each node once, from the current one, as sigil-agent's
// Renew does.
func (a *Agent) renew(ctx context.Context) error {
	var errs []error
	for range a.servers {
		node := a.Current()
		err := a.renewAt(ctx, node)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", node, err))
		a.failed(nil, node, err)
		if ctx.Err() != nil {
			break
		}
	}
	// Each node's answer, for the log; the last one for counting.
	if len(errs) > 1 {
		return fmt.Errorf("%w (before it: %v)", errs[len(errs)-1], errors.Join(errs[:len(errs)-1]...))
	}
	return errs[0]
}

func (a *Agent) renewAt(ctx context.Context, node string) error {
	cur := a.cert.Load()
	conn, err := api.Dial(api.DialConfig{Addr: a.addrs[node], RootFile: a.root,
		Certificate: func() (*tls.Certificate, error) { return cur, nil }})
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }() // one call per renewal connection, as the agent does
	key := cur.PrivateKey.(*ecdsa.PrivateKey)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	s, err := api.NewJoinClient(conn).Renew(cctx, &api.RenewRequest{CSR: csr})
	if err != nil {
		return err
	}
	next, err := tlsCert(s, key)
	if err != nil {
		return err
	}
	a.cert.Store(next)
	a.reconnect()
	return nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-tm.C:
		return true
	}
}

func (f *Fleet) stop() {
	f.cancel()
	for _, a := range f.Agents {
		if a == nil {
			continue
		}
		a.connMu.Lock()
		if a.conn != nil {
			_ = a.conn.Close() // the fleet is over: nothing more goes through it
		}
		a.connMu.Unlock()
	}
	f.wg.Wait()
}

// Updates returns what the agent has recorded so far.
func (a *Agent) Updates() []Update {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]Update(nil), a.updates...)
}

// WaitUpdate returns the first recorded update that satisfies cond,
// waiting for one until ctx ends.
func (a *Agent) WaitUpdate(ctx context.Context, cond func(Update) bool) (Update, error) {
	seen := 0
	for {
		a.mu.Lock()
		for ; seen < len(a.updates); seen++ {
			if cond(a.updates[seen]) {
				u := a.updates[seen]
				a.mu.Unlock()
				return u, nil
			}
		}
		ch := a.changed
		a.mu.Unlock()
		select {
		case <-ctx.Done():
			return Update{}, fmt.Errorf("agent %s on %s: %w", a.ID, a.Current(), ctx.Err())
		case <-ch:
		}
	}
}

// WaitSynced waits until every agent has had its first SyncUpdate.
func (f *Fleet) WaitSynced(timeout time.Duration) {
	f.T.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, timeout)
	defer cancel()
	for _, a := range f.Agents {
		if _, err := a.WaitUpdate(ctx, func(Update) bool { return true }); err != nil {
			f.T.Fatalf("fleet not synced: %v", err)
		}
	}
}

// Arrivals waits until every agent has an update satisfying cond and
// returns how long after since each one arrived, sorted.
func (f *Fleet) Arrivals(timeout time.Duration, since time.Time, cond func(Update) bool) []time.Duration {
	f.T.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, timeout)
	defer cancel()
	out := make([]time.Duration, 0, len(f.Agents))
	for _, a := range f.Agents {
		u, err := a.WaitUpdate(ctx, cond)
		if err != nil {
			f.T.Fatalf("update not delivered to every agent: %v", err)
		}
		out = append(out, u.At.Sub(since))
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// Renewals counts the agent's successful renewals.
func (a *Agent) Renewals() int64 { return a.renewals.Load() }

// RenewalStats counts the fleet's renewals so far.
type RenewalStats struct {
	Renewals int64
	// Failed counts failed attempts; FailedValid those among them made
	// while the agent's SVID was still valid (the appliance, not the
	// clock, refused or dropped them).
	Failed, FailedValid int64
	// Expired counts agents whose SVID expired before a renewal succeeded.
	Expired      int64
	SyncRestarts int64
}

// Renewals sums the counters of every agent.
func (f *Fleet) Renewals() RenewalStats {
	var s RenewalStats
	for _, a := range f.Agents {
		s.Renewals += a.renewals.Load()
		s.Failed += a.renewFailed.Load()
		s.FailedValid += a.renewFailedValid.Load()
		s.Expired += a.expired.Load()
		s.SyncRestarts += a.syncRestarts.Load()
	}
	return s
}

// RenewalTimes returns when renewal attempts started and when successful
// ones finished, within [from, to).
func (f *Fleet) RenewalTimes(from, to time.Time) (starts, done []time.Time) {
	in := func(t time.Time) bool { return !t.Before(from) && t.Before(to) }
	for _, a := range f.Agents {
		a.mu.Lock()
		for _, t := range a.renewStarts {
			if in(t) {
				starts = append(starts, t)
			}
		}
		for _, t := range a.renewDone {
			if in(t) {
				done = append(done, t)
			}
		}
		a.mu.Unlock()
	}
	return starts, done
}
