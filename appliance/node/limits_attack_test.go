package node_test

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// rawJSON sends a prebuilt JSON body as is, so the attacker holds one
// copy of its payload however many calls carry it, and the heap growth
// measured below is the node's.
type rawJSON struct{}

func (rawJSON) Marshal(v any) ([]byte, error) { return *v.(*[]byte), nil }
func (rawJSON) Unmarshal(data []byte, v any) error {
	*v.(*[]byte) = append([]byte(nil), data...)
	return nil
}
func (rawJSON) Name() string { return "json" }

// heapPeak samples HeapInuse until stop is called and returns the highest.
func heapPeak() (stop func() uint64) {
	var peak atomic.Uint64
	done := make(chan struct{})
	finished := make(chan struct{})
	sample := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		for {
			p := peak.Load()
			if ms.HeapInuse <= p || peak.CompareAndSwap(p, ms.HeapInuse) {
				return
			}
		}
	}
	go func() {
		defer close(finished)
		for {
			sample()
			select {
			case <-done:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return func() uint64 {
		close(done)
		<-finished
		sample()
		return peak.Load()
	}
}

func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// Twelve callers without the right certificate each send a 40 MiB message
// (admin, agent and join methods, unary and streaming) to a node of a real
// three-node cluster. The node refuses each one by method and TLS role, or
// by size, before it reads the body: its heap stays bounded and the state
// does not change. Then the largest legitimate messages still go through.
func TestAttackOversizedMessageBeforeAuth(t *testing.T) {
	ic := newIssuer(t, "ob")
	c := ic.c
	ctx := context.Background()
	adm := c.Admin("node-1")
	for i := 0; i < 3; i++ {
		if _, err := adm.EntryCreate(ctx, entryFor(i)); err != nil {
			t.Fatal(err)
		}
	}
	entriesBefore, err := adm.EntryList(ctx, &api.EntryListRequest{})
	if err != nil {
		t.Fatal(err)
	}
	auditBefore, err := adm.AuditList(ctx, &api.AuditRequest{Limit: 1})
	if err != nil {
		t.Fatal(err)
	}

	// One 40 MiB JSON body, valid for every request type (unknown fields
	// are skipped, so a node that decodes it reads all of it).
	const size = 40 << 20
	fill := base64.StdEncoding.EncodeToString(make([]byte, (size-64)/4*3))
	payload := []byte(`{"Data":"` + fill + `","Token":"x"}`)
	fill = ""

	addr := c.ConfigOf("node-1").API.Listen
	dial := func(anonymous bool) *grpc.ClientConn {
		cfg := api.DialConfig{Addr: addr, RootFile: ic.tr.RootPath, Anonymous: anonymous}
		if !anonymous {
			cfg.CertFile, cfg.KeyFile = ic.agentCert, ic.agentKey
		}
		conn, err := api.Dial(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		return conn
	}
	// The attacker lifts its own client's limits.
	opts := []grpc.CallOption{grpc.ForceCodec(rawJSON{}), grpc.MaxCallSendMsgSize(64 << 20), grpc.MaxCallRecvMsgSize(64 << 20)}
	unary := func(conn *grpc.ClientConn, method string) error {
		var resp []byte
		return conn.Invoke(ctx, method, &payload, &resp, opts...)
	}
	restore := func(conn *grpc.ClientConn) error {
		cs, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true}, "/"+api.AdminService+"/SnapshotRestore", opts...)
		if err != nil {
			return err
		}
		if err := cs.SendMsg(&payload); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		if err := cs.CloseSend(); err != nil {
			return err
		}
		var resp []byte
		return cs.RecvMsg(&resp)
	}
	type attack struct {
		name string
		call func() error
		want []codes.Code
	}
	denied := []codes.Code{codes.PermissionDenied, codes.Unauthenticated}
	var attacks []attack
	for i := 0; i < 3; i++ {
		anon, agent := dial(true), dial(false)
		attacks = append(attacks,
			attack{"anonymous EntryCreate", func() error { return unary(anon, "/"+api.AdminService+"/EntryCreate") }, denied},
			attack{"anonymous SnapshotRestore", func() error { return restore(dial(true)) }, denied},
			attack{"agent SnapshotRestore", func() error { return restore(agent) }, denied},
			// Joining is open to anyone: refused by size.
			attack{"anonymous join Token", func() error { return unary(dial(true), "/"+api.JoinService+"/Token") }, []codes.Code{codes.ResourceExhausted}},
		)
	}

	base := heapInuse()
	stop := heapPeak()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(attacks))
	for i, a := range attacks {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = a.call() }()
	}
	wg.Wait()
	elapsed := time.Since(start)
	peak := stop()
	runtime.KeepAlive(payload)
	growth := int64(peak) - int64(base)
	t.Logf("%d calls of %d MiB refused in %v; node heap in use %.1f MiB before, peak %.1f MiB (growth %.1f MiB)",
		len(attacks), size>>20, elapsed.Round(time.Millisecond), float64(base)/(1<<20), float64(peak)/(1<<20), float64(growth)/(1<<20))
	for i, a := range attacks {
		code := status.Code(errs[i])
		ok := false
		for _, w := range a.want {
			ok = ok || code == w
		}
		if !ok {
			t.Errorf("%s: %v, want %v", a.name, errs[i], a.want)
		}
	}
	// The attack sent 480 MiB; a node that reads it before refusing grows
	// by about that (or more: the body is copied to decode it).
	if limit := int64(48 << 20); growth > limit {
		t.Fatalf("node heap grew by %.1f MiB under %d refused %d MiB messages (limit %d MiB)", float64(growth)/(1<<20), len(attacks), size>>20, limit>>20)
	}

	// Each refusal by role is counted, before any message was read.
	if body := metrics(t, c.Node("node-1").HTTPAddr()); !strings.Contains(body, `sigil_api_calls_refused_total{reason="not-admin"} 9`) {
		t.Errorf("/metrics does not count the 9 refused admin calls")
	}

	// Nothing changed.
	entriesAfter, err := adm.EntryList(ctx, &api.EntryListRequest{})
	if err != nil || len(entriesAfter.Entries) != len(entriesBefore.Entries) {
		t.Fatalf("entries after the attack: %d, %v; before %d", len(entriesAfter.Entries), err, len(entriesBefore.Entries))
	}
	auditAfter, err := adm.AuditList(ctx, &api.AuditRequest{After: auditBefore.Head})
	if err != nil || len(auditAfter.Records) != 0 {
		t.Fatalf("audit records after the attack: %+v, %v", auditAfter, err)
	}

	// The largest legitimate messages fit: a 64-CSR batch from the agent
	// (what sigil-agent sends), a restore streamed in 512 KiB chunks.
	ag := ic.agent(t, "node-1")
	var batch api.X509SVIDBatch
	for i := 0; i < 64; i++ {
		e := ic.entry(t, fmt.Sprintf("spiffe://example.org/w/%d", i), agentID)
		batch.Requests = append(batch.Requests, api.X509SVIDRequest{EntryID: e.ID, CSR: csrFor(t, "")})
	}
	res, err := ag.SignX509SVIDs(ctx, &batch)
	if err != nil {
		t.Fatalf("64-CSR batch: %v", err)
	}
	for _, r := range res.Results {
		if r.Error != "" || len(r.Chain) == 0 {
			t.Fatalf("64-CSR batch: %+v", r)
		}
	}
	snap, err := adm.SnapshotSave(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.SnapshotRestore(ctx, &api.SnapshotArchive{Archive: snap.Archive}); err != nil {
		t.Fatalf("restore in %d-byte chunks: %v", api.SnapshotChunkSize, err)
	}
}

// Idle TCP connections that never start TLS are closed after the handshake
// timeout, and at most max-handshakes of them are held at once (the oldest
// is dropped for a new one); connections without a client certificate are
// capped on their own and closed when idle; all connections are capped.
// Through the flood an admin, an agent and a joining agent still call.
func TestAttackConnectionFlood(t *testing.T) {
	const (
		handshakeTimeout = time.Second
		idleTimeout      = 2 * time.Second
		maxPending       = 32
		maxAnon          = 8
		maxConns         = 48
	)
	ic := newIssuerWith(t, "cf", func(cfg *node.Config) {
		cfg.API.HandshakeTimeout = node.Duration{Duration: handshakeTimeout}
		cfg.API.IdleTimeout = node.Duration{Duration: idleTimeout}
		cfg.API.MaxHandshakes = maxPending
		cfg.API.MaxAnonymousConnections = maxAnon
		cfg.API.MaxConnections = maxConns
	})
	c := ic.c
	ctx := context.Background()
	addr := c.ConfigOf("node-1").API.Listen
	web := ic.entry(t, "spiffe://example.org/web", agentID)

	adm := c.Admin("node-1")
	if _, err := adm.EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatal(err)
	}
	join := func(cctx context.Context) error {
		conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: ic.tr.RootPath, Anonymous: true})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		_, err = api.NewJoinClient(conn).Token(cctx, &api.JoinTokenRequest{Token: "no-such-token", CSR: csrFor(t, "")})
		return err
	}

	// The flood: raw TCP connections that send nothing.
	const flood = 600
	var closedEarly, closedInTime, stillOpen atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	conns := make([]net.Conn, 0, flood)
	for i := 0; i < flood; i++ {
		cn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conns = append(conns, cn)
	}
	dialled := time.Since(start)
	for _, cn := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { _ = cn.Close() }()
			if err := cn.SetReadDeadline(start.Add(handshakeTimeout + 3*time.Second)); err != nil {
				t.Error(err) // without it the Read could wait for ever
				return
			}
			_, err := cn.Read(make([]byte, 1))
			var ne net.Error
			switch since := time.Since(start); {
			case errors.As(err, &ne) && ne.Timeout():
				stillOpen.Add(1)
			case since < dialled+handshakeTimeout*3/4: // the held ones close at handshakeTimeout
				closedEarly.Add(1)
			default:
				closedInTime.Add(1)
			}
		}()
	}

	// While the flood holds its connections, callers with certificates
	// and a joining agent still get through.
	time.Sleep(100 * time.Millisecond)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := adm.EntryList(cctx, &api.EntryListRequest{}); err != nil {
		t.Errorf("admin on its open connection during the flood: %v", err)
	}
	if _, err := c.Admin("node-1").EntryList(cctx, &api.EntryListRequest{}); err != nil {
		t.Errorf("admin on a new connection during the flood: %v", err)
	}
	res, err := ic.agent(t, "node-1").SignX509SVIDs(cctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
	if err != nil || res.Results[0].Error != "" {
		t.Errorf("agent on a new connection during the flood: %+v, %v", res, err)
	}
	if err := join(cctx); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a join during the flood: %v, want the token refused (PermissionDenied)", err)
	}
	wg.Wait()
	t.Logf("%d idle connections dialled in %v: %d closed at once (over the cap), %d closed after the handshake timeout, %d still open",
		flood, dialled.Round(time.Millisecond), closedEarly.Load(), closedInTime.Load(), stillOpen.Load())
	if n := stillOpen.Load(); n > 0 {
		t.Fatalf("%d idle pre-handshake connections still open %v after the flood began (handshake timeout %v)", n, handshakeTimeout+3*time.Second, handshakeTimeout)
	}
	if n := flood - closedEarly.Load(); n > maxPending {
		t.Fatalf("%d idle pre-handshake connections held at once, cap %d", n, maxPending)
	}

	// Anonymous connections: maxAnon held (each made a call, so it is a
	// real gRPC connection), the next one refused; certificates still work.
	var anon []*grpc.ClientConn
	for i := 0; i < maxAnon; i++ {
		conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: ic.tr.RootPath, Anonymous: true})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		if _, err := api.NewJoinClient(conn).Token(ctx, &api.JoinTokenRequest{Token: "x", CSR: csrFor(t, "")}); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("anonymous connection %d: %v", i, err)
		}
		anon = append(anon, conn)
	}
	if err := join(ctx); status.Code(err) != codes.Unavailable {
		t.Fatalf("anonymous connection %d: %v, want Unavailable (refused)", maxAnon+1, err)
	}
	if _, err := c.Admin("node-1").EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("admin with %d anonymous connections open: %v", maxAnon, err)
	}
	// They are closed when idle, and joins go through again.
	clustertest.Eventually(t, idleTimeout+5*time.Second, "a join after the anonymous connections idled out", func() bool {
		return status.Code(join(ctx)) == codes.PermissionDenied
	})
	for _, conn := range anon {
		_ = conn.Close() // idled out by the node already
	}

	// All connections: fill the cap with admins; the next is closed at once.
	time.Sleep(200 * time.Millisecond) // the closes above reach the node
	var held []*api.AdminClient
	var refused error
	for i := 0; i < maxConns+1 && refused == nil; i++ {
		a := c.Admin("node-1")
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, refused = a.EntryList(cctx, &api.EntryListRequest{})
		cancel()
		held = append(held, a)
	}
	if status.Code(refused) != codes.Unavailable || len(held) < maxConns-4 {
		t.Fatalf("connection %d: %v, want Unavailable at about %d connections", len(held), refused, maxConns)
	}
	t.Logf("connection %d refused: %v", len(held), refused)

	// The HTTP listeners: idle connections beyond their handshake bound
	// are dropped oldest first, and requests still get through.
	for name, target := range map[string]string{"health": "http://" + c.Node("node-1").HTTPAddr() + "/healthz", "bundle": "https://" + c.Node("node-1").BundleAddr() + "/"} {
		hostport := strings.SplitN(strings.SplitN(target, "//", 2)[1], "/", 2)[0]
		var idle []net.Conn
		for i := 0; i < 200; i++ {
			cn, err := net.Dial("tcp", hostport)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = cn.Close() }()
			idle = append(idle, cn)
		}
		// The listener accepts and evicts as fast as the machine lets it:
		// poll (a dropped connection stays dropped) until the cap holds or
		// a generous deadline passes, instead of assuming a fixed delay.
		dropped, gone := 0, make([]bool, len(idle))
		for deadline := time.Now().Add(15 * time.Second); dropped < 200-64 && time.Now().Before(deadline); {
			time.Sleep(50 * time.Millisecond)
			for i, cn := range idle {
				if gone[i] {
					continue
				}
				if err := cn.SetReadDeadline(time.Now().Add(time.Millisecond)); err != nil {
					t.Fatal(err)
				}
				if _, err := cn.Read(make([]byte, 1)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
					gone[i] = true
					dropped++
				}
			}
		}
		if dropped < 200-64 {
			t.Errorf("%s listener: %d of 200 idle connections dropped, want all but 64", name, dropped)
		}
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
		resp, err := hc.Get(target)
		if err != nil {
			t.Fatalf("%s listener during an idle flood: %v", name, err)
		}
		_ = resp.Body.Close() // only the status matters
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s listener during an idle flood: %s", name, resp.Status)
		}
		hc.CloseIdleConnections()
	}

	body := metrics(t, c.Node("node-1").HTTPAddr())
	for _, m := range []string{
		`sigil_listener_connections_refused_total{listener="api",reason="handshake-evicted"}`,
		`sigil_listener_connections_refused_total{listener="api",reason="max-anonymous-connections"}`,
		`sigil_listener_connections_refused_total{listener="api",reason="max-connections"}`,
		`sigil_listener_connections_refused_total{listener="http",reason="handshake-evicted"}`,
		`sigil_listener_connections_refused_total{listener="bundle",reason="handshake-evicted"}`,
	} {
		if !strings.Contains(body, m) || strings.Contains(body, m+" 0\n") {
			t.Errorf("/metrics: %s missing or zero", m)
		}
	}
}

func metrics(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// An anonymous caller opens join calls that send their headers and never
// their message: gRPC's unary handler waits for the message, so each call
// held one of the node's max-anonymous-calls slots for as long as its
// connection stayed open (and open calls keep a connection from idling
// out). Three connections from one address each open 64 such calls (the
// node's max-streams, and its max-anonymous-calls). Each call now ends by
// api.anonymous-call-timeout, and one connection and one source hold only
// their share of the slots: a genuine join from another address succeeds
// during the attack.
func TestAttackAnonymousSlowCalls(t *testing.T) {
	const callTimeout = 2 * time.Second
	tr := clustertest.NewTrust(t, "sc", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.API.AnonymousCallTimeout = node.Duration{Duration: callTimeout}
	}, "node-1")
	ctx := context.Background()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	addr := c.ConfigOf("node-1").API.Listen

	const conns, streams = 3, 64
	type result struct {
		code codes.Code
		took time.Duration
	}
	results := make(chan result, conns*streams)
	actx, stop := context.WithCancel(ctx)
	defer stop()
	start := time.Now()
	for i := 0; i < conns; i++ {
		cc := anonConnFrom(t, tr, addr, "127.0.0.1", nil)
		for j := 0; j < streams; j++ {
			// NewStream sends the call's headers; no message follows.
			cs, err := cc.NewStream(actx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/"+api.JoinService+"/Token", grpc.ForceCodec(rawJSON{}))
			if err != nil {
				results <- result{status.Code(err), time.Since(start)}
				continue
			}
			go func() {
				var resp []byte
				err := cs.RecvMsg(&resp)
				results <- result{status.Code(err), time.Since(start)}
			}()
		}
	}
	time.Sleep(500 * time.Millisecond) // the headers reach the node

	// A genuine agent joins from another address during the attack.
	jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	svid, err := joinClientFrom(t, tr, addr, "127.0.0.2").Token(jctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csrFor(t, "")})
	if err != nil {
		t.Errorf("a token join from 127.0.0.2 while 127.0.0.1 holds %d stalled calls: %v", conns*streams, err)
	} else if !strings.HasPrefix(svid.AgentID, "spiffe://example.org/sigil/agent/join_token/") {
		t.Errorf("token join: agent ID %s", svid.AgentID)
	}

	// Every stalled call ends: refused at once over the per-connection or
	// per-source share, or by the call timeout.
	held, refused := 0, 0
	var slowest time.Duration
	wait := time.After(callTimeout + 5*time.Second)
	for n := 0; n < conns*streams; n++ {
		select {
		case r := <-results:
			switch r.code {
			case codes.ResourceExhausted:
				refused++
			case codes.DeadlineExceeded:
				held++
				slowest = max(slowest, r.took)
			default:
				t.Errorf("a stalled call ended with %v, want ResourceExhausted or DeadlineExceeded", r.code)
			}
		case <-wait:
			t.Fatalf("%d of %d stalled anonymous calls still open %v after they began (anonymous-call-timeout %v; %d held so far, %d refused)",
				conns*streams-n, conns*streams, time.Since(start).Round(time.Millisecond), callTimeout, held, refused)
		}
	}
	t.Logf("%d stalled calls from one address on %d connections: %d refused at once, %d held until the call timeout (the last ended %v after the attack began)",
		conns*streams, conns, refused, held, slowest.Round(time.Millisecond))
	// The defaults: 4 per connection, 8 per source.
	if held > 8 {
		t.Fatalf("one source held %d anonymous calls, want at most 8 (max-anonymous-calls-per-source)", held)
	}
	if slowest > callTimeout+2*time.Second {
		t.Fatalf("a stalled call lasted %v, anonymous-call-timeout %v", slowest, callTimeout)
	}
	body := metrics(t, c.Node("node-1").HTTPAddr())
	for _, m := range []string{`sigil_api_calls_refused_total{reason="anonymous-calls-per-connection"}`, `sigil_api_calls_refused_total{reason="anonymous-calls-per-source"}`} {
		if !strings.Contains(body, m) || strings.Contains(body, m+" 0\n") {
			t.Errorf("/metrics: %s missing or zero", m)
		}
	}
}

// connLives records when each dialled connection was opened and closed.
type connLives struct {
	mu    sync.Mutex
	lives [][2]time.Time // opened, closed (zero: open)
}

type livedConn struct {
	net.Conn
	l    *connLives
	i    int
	once sync.Once
}

func (c *livedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		c.l.lives[c.i][1] = time.Now()
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

func (l *connLives) wrap(c net.Conn) net.Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lives = append(l.lives, [2]time.Time{time.Now()})
	return &livedConn{Conn: c, l: l, i: len(l.lives) - 1}
}

// longest is the longest life among the connections, open ones counted
// up to now.
func (l *connLives) longest() (time.Duration, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var d time.Duration
	for _, lv := range l.lives {
		end := lv[1]
		if end.IsZero() {
			end = time.Now()
		}
		d = max(d, end.Sub(lv[0]))
	}
	return d, len(l.lives)
}

// One address opens more anonymous connections than the node takes in
// all and keeps each busy with a bogus TPMProve every 400 ms, so none
// idles out: it held every max-anonymous-connections slot and a joining
// agent's handshake was closed. Now one source holds at most
// max-anonymous-connections-per-source of them (a new one drops the
// source's oldest), so a joiner from another address joins during the
// attack; and no anonymous connection outlives
// api.anonymous-connection-max-age, busy or not.
func TestAttackAnonymousConnectionsOneSource(t *testing.T) {
	const (
		maxAnon, perSource = 4, 2
		idleTimeout        = time.Second
		maxAge             = 3 * time.Second
		callTimeout        = time.Second
	)
	tr := clustertest.NewTrust(t, "os", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.API.MaxAnonymousConnections = maxAnon
		cfg.API.MaxAnonymousConnectionsPerSource = perSource
		cfg.API.IdleTimeout = node.Duration{Duration: idleTimeout}
		cfg.API.AnonymousConnectionMaxAge = node.Duration{Duration: maxAge}
		cfg.API.AnonymousCallTimeout = node.Duration{Duration: callTimeout}
	}, "node-1")
	ctx := context.Background()
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	addr := c.ConfigOf("node-1").API.Listen

	// attack keeps n anonymous connections from 127.0.0.1 busy until the
	// returned stop is called, which closes them and reports how many
	// calls were answered.
	attack := func(n int, lives *connLives) (stop func() (answered, failed int64)) {
		var answered, failed atomic.Int64
		done := make(chan struct{})
		var wg sync.WaitGroup
		var conns []*grpc.ClientConn
		for i := 0; i < n; i++ {
			conn := anonConnFrom(t, tr, addr, "127.0.0.1", lives.wrap)
			conns = append(conns, conn)
			jc := api.NewJoinClient(conn)
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					_, err := jc.TPMProve(cctx, &api.JoinTPMProof{Nonce: []byte("bogus")})
					cancel()
					if status.Code(err) == codes.PermissionDenied {
						answered.Add(1)
					} else {
						failed.Add(1)
					}
					select {
					case <-done:
						return
					case <-time.After(400 * time.Millisecond):
					}
				}
			}()
		}
		var once sync.Once
		stop = func() (int64, int64) {
			once.Do(func() {
				close(done)
				wg.Wait()
				for _, conn := range conns {
					_ = conn.Close() // the load is over
				}
			})
			return answered.Load(), failed.Load()
		}
		t.Cleanup(func() { stop() })
		return stop
	}

	// More busy connections than the node takes anonymously in all.
	var flood connLives
	stop := attack(6, &flood)
	time.Sleep(idleTimeout + 500*time.Millisecond) // past the idle timeout: busy connections stay
	jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	svid, err := joinClientFrom(t, tr, addr, "127.0.0.2").Token(jctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csrFor(t, "")})
	if err != nil {
		t.Errorf("a token join from 127.0.0.2 while 127.0.0.1 keeps 6 anonymous connections busy: %v", err)
	} else if !strings.HasPrefix(svid.AgentID, "spiffe://example.org/sigil/agent/join_token/") {
		t.Errorf("token join: agent ID %s", svid.AgentID)
	}
	answered, failed := stop()
	_, dialled := flood.longest()
	t.Logf("6 busy anonymous connections from one address: %d calls answered, %d failed (closed), %d connections dialled", answered, failed, dialled)

	// As many busy connections as the source may hold: kept busy for
	// twice the maximum age, they are closed at it.
	time.Sleep(200 * time.Millisecond) // the closes reach the node
	var held connLives
	start := time.Now()
	stop = attack(perSource, &held)
	time.Sleep(2 * maxAge)
	answered, failed = stop()
	longest, dialled := held.longest()
	t.Logf("%d busy anonymous connections for %v: %d calls answered, %d failed, %d connections dialled, the longest lived %v",
		perSource, time.Since(start).Round(time.Millisecond), answered, failed, dialled, longest.Round(time.Millisecond))
	if answered == 0 {
		t.Fatal("no attacking call was answered: the attack did not hold a connection")
	}
	if limit := maxAge + 1500*time.Millisecond; longest > limit {
		t.Fatalf("a busy anonymous connection lived %v, anonymous-connection-max-age %v", longest.Round(time.Millisecond), maxAge)
	}
	body := metrics(t, c.Node("node-1").HTTPAddr())
	for _, m := range []string{
		`sigil_listener_connections_refused_total{listener="api",reason="max-anonymous-connections-per-source"}`,
		`sigil_listener_connections_refused_total{listener="api",reason="anonymous-max-age"}`,
	} {
		if !strings.Contains(body, m) || strings.Contains(body, m+" 0\n") {
			t.Errorf("/metrics: %s missing or zero", m)
		}
	}
}
