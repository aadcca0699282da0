package node

import (
	"cmp"
	"container/list"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
)

// What a caller can make a node hold before the node knows who it is:
//
//   - a TCP connection in its TLS handshake: at most max-handshakes of them
//     (the oldest is dropped for a new one) for at most handshake-timeout;
//   - an established connection: at most max-connections in all, of which
//     at most max-anonymous-connections without a client certificate
//     (max-anonymous-connections-per-source from one IPv4 address or
//     IPv6 /64, its oldest dropped for a new one); closed after
//     idle-timeout without a call and, anonymous ones,
//     anonymous-connection-max-age after their handshake whatever they
//     do;
//   - a call: refused by method and TLS role before its message is read
//     (tapGate); only the join service takes anonymous calls, at most
//     max-anonymous-calls at once (max-anonymous-calls-per-source from
//     one source, max-anonymous-calls-per-connection on one connection),
//     each ended anonymous-call-timeout after its headers, message read
//     or not; and no message over api.MaxRequestSize is read at all.
//
// The health and bundle HTTP listeners get fixed bounds of the same kind.

// Keepalive: the node pings a client after a minute without traffic and
// drops it if the ping goes unanswered (a dead agent's Sync stream must
// not hold its slot forever); clients may ping at most every 30 s, and
// only while a call is open.
const (
	keepaliveTime     = time.Minute
	keepaliveTimeout  = 20 * time.Second
	keepaliveMinPing  = 30 * time.Second
	maxHeaderListSize = 16 << 10 // gRPC metadata; gRPC's own default is 16 MiB
)

// apiReadBufferSize is each API connection's read buffer (see
// grpcLimitOptions).
const apiReadBufferSize = 1 << 10

// HTTP listeners (health, metrics, bundle): few callers, small requests.
const (
	httpMaxConns          = 256
	httpMaxHandshakes     = 64
	httpReadHeaderTimeout = 5 * time.Second
	httpReadTimeout       = 10 * time.Second
	httpWriteTimeout      = 30 * time.Second
	httpIdleTimeout       = time.Minute
	httpMaxHeaderBytes    = 16 << 10
)

// grpcLimitOptions are the connection and stream bounds both gRPC servers
// (the API and the local socket) share.
func grpcLimitOptions(c APIConfig) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ConnectionTimeout(c.HandshakeTimeout.Duration),
		grpc.MaxConcurrentStreams(uint32(c.MaxStreams)),
		grpc.MaxHeaderListSize(maxHeaderListSize),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: keepaliveMinPing}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: c.IdleTimeout.Duration,
			Time:              keepaliveTime,
			Timeout:           keepaliveTimeout,
		}),
		// An idle connection does not keep a 32 KiB write buffer: gRPC
		// shares write buffers by default (the deprecated
		// grpc.SharedWriteBuffer(true) asked for what is now the default).
		// Its read buffer is per connection for the connection's life, and
		// at gRPC's default of 32 KiB it was half of what each connected
		// agent cost a node (heap profile of BenchmarkFleet). Agents' calls
		// are a few hundred bytes; a larger message (an admin's snapshot
		// chunk) is read straight into its destination, not refused.
		grpc.ReadBufferSize(apiReadBufferSize),
		// No HPACK dynamic table for what callers send: it held ~1 KiB of
		// header strings per connection for the connection's life, to
		// save a few hundred bytes on calls an agent makes every few
		// minutes.
		grpc.HeaderTableSize(0),
	}
}

// connLimiter bounds a listener's connections. Connections not yet
// established (in their handshake; for HTTP, also idle between requests)
// are kept in arrival order: beyond maxPending the oldest is closed for
// the new one, so a flood of connections that never handshake costs each
// of them its slot within moments while a genuine handshake, which takes
// milliseconds, still completes. Refusing new connections instead would
// lock everyone out for the whole handshake timeout.
type connLimiter struct {
	name                             string
	max, maxPending, maxAnon         int
	maxAnonPerSource                 int           // 0: maxAnon
	anonMaxAge                       time.Duration // 0: none
	log                              *rateLog
	refusedMax, evicted, refusedAnon atomic.Uint64 // refusal counters, for metrics
	refusedAnonSource, agedOut       atomic.Uint64
	// handshakes counts connections that completed their handshake: a
	// fleet reconnecting after a node died shows as its rate.
	handshakes atomic.Uint64

	mu           sync.Mutex
	open         int
	anonymous    int
	anonBySource map[string]*list.List // established anonymous connections (*limitedConn) by sourceKey, oldest first
	pending      list.List             // *limitedConn, oldest first
}

func newConnLimiter(name string, max, maxPending, maxAnon int, log *slog.Logger) *connLimiter {
	return &connLimiter{name: name, max: max, maxPending: maxPending, maxAnon: maxAnon, log: newRateLog(log), anonBySource: map[string]*list.List{}}
}

// newAPIConnLimiter is the API listener's limiter, with the bounds on
// anonymous connections by source and age.
func newAPIConnLimiter(c APIConfig, log *slog.Logger) *connLimiter {
	l := newConnLimiter("api", c.MaxConnections, c.MaxHandshakes, c.MaxAnonymousConnections, log)
	l.maxAnonPerSource, l.anonMaxAge = c.MaxAnonymousConnectionsPerSource, c.AnonymousConnectionMaxAge.Duration
	return l
}

// limiterStats is a point-in-time view for metrics.
type limiterStats struct {
	Open, Pending, Anonymous              int
	RefusedMax, Evicted, RefusedAnonymous uint64
	RefusedAnonymousSource, AgedOut       uint64
	Handshakes                            uint64
}

func (l *connLimiter) stats() limiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return limiterStats{Open: l.open, Pending: l.pending.Len(), Anonymous: l.anonymous,
		RefusedMax: l.refusedMax.Load(), Evicted: l.evicted.Load(), RefusedAnonymous: l.refusedAnon.Load(),
		RefusedAnonymousSource: l.refusedAnonSource.Load(), AgedOut: l.agedOut.Load(), Handshakes: l.handshakes.Load()}
}

// limitedConn gives its slot back when closed, whoever closes it.
type limitedConn struct {
	net.Conn
	l       *connLimiter
	elem    *list.Element // in l.pending while not established; guarded by l.mu
	anon    bool          // counted in l.anonymous and l.anonBySource[source]; guarded by l.mu
	source  string        // sourceKey of the remote address, once anon
	srcEl   *list.Element // in l.anonBySource[source]; guarded by l.mu
	age     *time.Timer   // closes an anonymous connection at its maximum age; guarded by l.mu
	counted bool          // in l.handshakes; guarded by l.mu
	once    sync.Once
}

func (c *limitedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.elem != nil {
			c.l.pending.Remove(c.elem)
			c.elem = nil
		}
		if c.anon {
			c.l.anonymous--
			if q := c.l.anonBySource[c.source]; q != nil {
				q.Remove(c.srcEl)
				if q.Len() == 0 {
					delete(c.l.anonBySource, c.source)
				}
			}
		}
		if c.age != nil {
			c.age.Stop()
		}
		c.l.open--
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}

// admit returns the connection to serve (nil: over max, refused) and a
// pending connection to close to make room for it.
func (l *connLimiter) admit(raw net.Conn) (c, evict *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open >= l.max {
		l.refusedMax.Add(1)
		l.log.warn(l.name+": connections refused: too many open", "max_connections", l.max)
		return nil, nil
	}
	if l.pending.Len() >= l.maxPending {
		evict = l.pending.Remove(l.pending.Front()).(*limitedConn)
		evict.elem = nil
		l.evicted.Add(1)
		l.log.warn(l.name+": dropped the oldest connections still in their handshake", "max_handshakes", l.maxPending)
	}
	l.open++
	c = &limitedConn{Conn: raw, l: l}
	c.elem = l.pending.PushBack(c)
	return c, evict
}

// established takes c out of the pending queue. An anonymous connection
// also takes one of its source's maxAnonPerSource slots, the source's
// oldest anonymous connection being dropped for it when they are all
// taken (returned as evict, for the caller to close), and otherwise one
// of maxAnon (false: none left, close c). It is closed when it reaches
// anonMaxAge: calls every few hundred milliseconds would keep it from
// ever idling out, and an agent dials anew for each join.
//
// Dropping the source's oldest rather than refusing the new one means a
// source that leaves its connections open (a client that does not close
// them, many agents behind one NAT address) cannot lock itself out until
// they idle out, while other sources keep their slots either way.
func (l *connLimiter) established(c *limitedConn, anonymous bool) (ok bool, evict *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.elem != nil {
		l.pending.Remove(c.elem)
		c.elem = nil
	}
	if !c.counted {
		c.counted = true
		l.handshakes.Add(1)
	}
	if !anonymous || c.anon {
		return true, nil
	}
	src := sourceKey(c.RemoteAddr())
	q := l.anonBySource[src]
	if perSource := cmp.Or(l.maxAnonPerSource, l.maxAnon); q != nil && q.Len() >= perSource {
		evict = q.Remove(q.Front()).(*limitedConn)
		evict.srcEl, evict.anon = nil, false
		l.anonymous--
		l.refusedAnonSource.Add(1)
		l.log.warn(l.name+": dropped the oldest connection without a client certificate from a source at its bound",
			"source", src, "max_anonymous_connections_per_source", perSource)
	} else if l.anonymous >= l.maxAnon {
		l.refusedAnon.Add(1)
		l.log.warn(l.name+": connections refused: too many without a client certificate", "max_anonymous_connections", l.maxAnon)
		return false, nil
	}
	if q == nil {
		q = list.New()
		l.anonBySource[src] = q
	}
	l.anonymous++
	c.anon, c.source, c.srcEl = true, src, q.PushBack(c)
	if l.anonMaxAge > 0 {
		c.age = time.AfterFunc(l.anonMaxAge, func() {
			l.agedOut.Add(1)
			_ = c.Close() // dropping it: its error tells no one anything
		})
	}
	return true, evict
}

// idle puts an established connection back at the end of the pending
// queue (HTTP keep-alive between requests: safe to drop, clients retry).
func (l *connLimiter) idle(c *limitedConn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.elem == nil {
		c.elem = l.pending.PushBack(c)
	}
}

// limitListener serves a connLimiter's connections.
type limitListener struct {
	net.Listener
	l *connLimiter
}

func (ll limitListener) Accept() (net.Conn, error) {
	for {
		raw, err := ll.Listener.Accept()
		if err != nil {
			return nil, err
		}
		c, evict := ll.l.admit(raw)
		// The evicted and the refused connections are dropped: a failed
		// Close leaves nothing to undo and no one to tell.
		if evict != nil {
			_ = evict.Close()
		}
		if c != nil {
			return c, nil
		}
		_ = raw.Close()
	}
}

// limitCreds marks a connection established once its TLS handshake is
// done and holds anonymous connections to their own cap.
type limitCreds struct {
	credentials.TransportCredentials
}

var errTooManyAnonymous = errors.New("too many connections without a client certificate; retry later")

func (c limitCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	conn, info, err := c.TransportCredentials.ServerHandshake(raw)
	if err != nil {
		return nil, nil, err
	}
	lc, ok := raw.(*limitedConn)
	if !ok {
		return conn, info, nil
	}
	ti, isTLS := info.(credentials.TLSInfo)
	ok, evict := lc.l.established(lc, !isTLS || len(ti.State.PeerCertificates) == 0)
	// As in Accept: the evicted and the refused connections are dropped,
	// and a failed Close changes nothing.
	if evict != nil {
		_ = evict.Close()
	}
	if !ok {
		_ = conn.Close()
		return nil, nil, errTooManyAnonymous
	}
	return conn, info, nil
}

func (c limitCreds) Clone() credentials.TransportCredentials {
	return limitCreds{c.TransportCredentials.Clone()}
}

// tapGate refuses calls by method and TLS role before gRPC reads their
// message: the interceptors (auth.go) run only after the request is
// decoded, and decoding is what an unauthenticated caller must not get.
// It mirrors authorize coarsely, by role; authorize stays the authority.
type tapGate struct {
	td                          spiffeid.TrustDomain
	maxAnon, perSource, perConn int
	callTimeout                 time.Duration
	log                         *rateLog
	refused                     sync.Map // reason -> *atomic.Uint64

	mu       sync.Mutex
	inflight int            // anonymous calls in progress
	bySource map[string]int // of them, by sourceKey
	byConn   map[string]int // of them, by connection (remote address)
}

// newTapGate takes the API limits from c; Validate fills them, and a
// share left unset falls back to the cap it divides (a timeout to the
// default), never to zero, which would refuse every join.
func newTapGate(td spiffeid.TrustDomain, c APIConfig, log *slog.Logger) *tapGate {
	perSource := cmp.Or(c.MaxAnonymousCallsPerSource, c.MaxAnonymousCalls)
	return &tapGate{td: td, maxAnon: c.MaxAnonymousCalls, perSource: perSource,
		perConn: cmp.Or(c.MaxAnonymousCallsPerConnection, perSource), callTimeout: cmp.Or(c.AnonymousCallTimeout.Duration, defaultAnonymousCallTimeout),
		log: newRateLog(log), bySource: map[string]int{}, byConn: map[string]int{}}
}

func (g *tapGate) count(reason string) {
	v, _ := g.refused.LoadOrStore(reason, new(atomic.Uint64))
	v.(*atomic.Uint64).Add(1)
}

// refusals returns the refusal counts by reason (metrics).
func (g *tapGate) refusals() map[string]uint64 {
	out := map[string]uint64{}
	g.refused.Range(func(k, v any) bool { out[k.(string)] = v.(*atomic.Uint64).Load(); return true })
	return out
}

// tap is a grpc.InTapHandle: it runs when a call's headers arrive, with
// the connection's peer (and its verified TLS state) in ctx.
func (g *tapGate) tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	role, who, err := tapRole(ctx)
	if err != nil {
		g.count("no-tls")
		return ctx, status.Error(codes.Unauthenticated, err.Error())
	}
	method := info.FullMethodName
	if reason, err := g.allow(method, role, who); err != nil {
		g.count(reason)
		remote := ""
		if p, ok := peer.FromContext(ctx); ok {
			remote = p.Addr.String()
		}
		g.log.warn("api call refused before reading it: "+reason, "method", method, "caller", who, "role", role.String(),
			"remote", remote, "err", status.Convert(err).Message())
		return ctx, err
	}
	if role != ca.RoleNone {
		return ctx, nil
	}
	// Anonymous (join) calls in progress are bounded in all, per source
	// and per connection; each holds at most api.MaxRequestSize of
	// message while it is read, and ends by callTimeout: gRPC's unary
	// handler otherwise waits for the message as long as the connection
	// lives, and open calls keep the connection from idling out.
	src, conn := "unknown", "unknown"
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil { // tapRole found it
		src, conn = sourceKey(p.Addr), p.Addr.String()
	}
	if err := g.acquire(method, src, conn); err != nil {
		return ctx, err
	}
	ctx, cancel := context.WithTimeout(ctx, g.callTimeout)
	// The stream's context ends with the call however it ends, or at the
	// deadline, which ends the call.
	context.AfterFunc(ctx, func() {
		cancel()
		g.release(src, conn)
	})
	return ctx, nil
}

// acquire takes an anonymous call slot in all, for src and for conn, or
// none.
func (g *tapGate) acquire(method, src, conn string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	var reason, where string
	var limit int
	switch {
	case g.inflight >= g.maxAnon:
		reason, where, limit = "anonymous-calls", "on this node", g.maxAnon
	case g.bySource[src] >= g.perSource:
		reason, where, limit = "anonymous-calls-per-source", "from "+src, g.perSource
	case g.byConn[conn] >= g.perConn:
		reason, where, limit = "anonymous-calls-per-connection", "on this connection", g.perConn
	default:
		g.inflight++
		g.bySource[src]++
		g.byConn[conn]++
		return nil
	}
	g.count(reason)
	g.log.warn("api call refused: too many anonymous calls in progress ("+reason+")", "method", method, "source", src, "limit", limit)
	return status.Errorf(codes.ResourceExhausted, "too many join calls in progress %s (at most %d); retry later", where, limit)
}

func (g *tapGate) release(src, conn string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.inflight--
	if g.bySource[src]--; g.bySource[src] <= 0 {
		delete(g.bySource, src)
	}
	if g.byConn[conn]--; g.byConn[conn] <= 0 {
		delete(g.byConn, conn)
	}
}

// allow is authorize by role alone: who may call which service. reason
// names the refusal for metrics and logs.
func (g *tapGate) allow(method string, role ca.Role, who string) (string, error) {
	switch {
	case strings.HasPrefix(method, "/"+api.AdminService+"/"):
		if role != ca.RoleAdmin {
			return "not-admin", status.Errorf(codes.PermissionDenied, "%s is not an admin (admin IDs are under spiffe://%s/sigil/admin/)", who, g.td.Name())
		}
	case method == api.JoinMethodRenew:
		if role != ca.RoleAgent {
			return "renew-not-agent", status.Errorf(codes.PermissionDenied, "renewal needs the agent's current certificate")
		}
	case strings.HasPrefix(method, "/"+api.JoinService+"/"):
		// Joining is open to anyone: the evidence is the credential.
	case strings.HasPrefix(method, "/"+api.AgentService+"/"):
		if role != ca.RoleAgent {
			return "not-agent", status.Errorf(codes.PermissionDenied, "%s is not an agent", who)
		}
	default:
		return "unknown-service", status.Error(codes.PermissionDenied, "unknown service")
	}
	return "", nil
}

// tapRole reads the caller's role from the connection's TLS state. The
// handshake has verified any certificate presented (the listener's
// VerifyConnection classifies it against the roots), so the leaf's SPIFFE
// ID is the caller's; no certificate is RoleNone.
func tapRole(ctx context.Context) (ca.Role, string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return ca.RoleNone, "", errors.New("no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return ca.RoleNone, "", errors.New("not a TLS connection")
	}
	if len(ti.State.PeerCertificates) == 0 {
		return ca.RoleNone, "anonymous@" + p.Addr.String(), nil
	}
	leaf := ti.State.PeerCertificates[0]
	if len(leaf.URIs) != 1 {
		return ca.RoleNone, "", errors.New("client certificate has no single SPIFFE ID")
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return ca.RoleNone, "", fmt.Errorf("client certificate: %v", err)
	}
	switch path := id.Path(); {
	case strings.HasPrefix(path, "/sigil/admin/"):
		return ca.RoleAdmin, id.String(), nil
	case strings.HasPrefix(path, "/sigil/agent/"):
		return ca.RoleAgent, id.String(), nil
	case strings.HasPrefix(path, "/sigil/node/"):
		return ca.RoleNode, id.String(), nil
	}
	return ca.RoleNone, "", fmt.Errorf("%s is not a Sigil node, admin or agent", id)
}

// newHTTPServer bounds an HTTP listener's requests and connections. The
// TLS handshake of the bundle endpoint is bounded by the shortest of the
// read and write timeouts (net/http's rule). net/http's own messages (failed
// handshakes, mostly) go to the structured log at debug level: anyone can
// cause them, so they must not flood the log at the default level.
func newHTTPServer(log *slog.Logger, h http.Handler, lim *connLimiter, tlsCfg *tls.Config) *http.Server {
	return &http.Server{
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		Handler:           h,
		TLSConfig:         tlsCfg,
		ReadHeaderTimeout: httpReadHeaderTimeout,
		ReadTimeout:       httpReadTimeout,
		WriteTimeout:      httpWriteTimeout,
		IdleTimeout:       httpIdleTimeout,
		MaxHeaderBytes:    httpMaxHeaderBytes,
		ConnState: func(c net.Conn, st http.ConnState) {
			if tc, ok := c.(*tls.Conn); ok {
				c = tc.NetConn()
			}
			lc, ok := c.(*limitedConn)
			if !ok {
				return
			}
			switch st {
			case http.StateActive:
				lim.established(lc, false)
			case http.StateIdle:
				lim.idle(lc)
			}
		},
	}
}

// rateLog logs a refusal at most once a second per message, with how many
// were left out: a flood must not become a flood of log lines.
type rateLog struct {
	log *slog.Logger
	mu  sync.Mutex
	by  map[string]*rateEntry
}

type rateEntry struct {
	last    time.Time
	skipped int
}

func newRateLog(log *slog.Logger) *rateLog { return &rateLog{log: log, by: map[string]*rateEntry{}} }

func (r *rateLog) warn(msg string, args ...any) {
	r.mu.Lock()
	e := r.by[msg]
	if e == nil {
		if len(r.by) > 64 { // messages are constants; this never grows
			clear(r.by)
		}
		e = &rateEntry{}
		r.by[msg] = e
	}
	now := time.Now()
	if now.Sub(e.last) < time.Second {
		e.skipped++
		r.mu.Unlock()
		return
	}
	skipped := e.skipped
	e.last, e.skipped = now, 0
	r.mu.Unlock()
	if skipped > 0 {
		args = append(args, "left_out_of_log", skipped)
	}
	r.log.Warn(msg, args...)
}
