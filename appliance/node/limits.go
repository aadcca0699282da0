package node

import (
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
//     at most max-anonymous-connections without a client certificate,
//     closed after idle-timeout without a call;
//   - a call: refused by method and TLS role before its message is read
//     (tapGate); only the join service takes anonymous calls, at most
//     max-anonymous-calls at once; and no message over api.MaxRequestSize
//     is read at all.
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
		// An idle connection does not keep a 32 KiB write buffer.
		grpc.SharedWriteBuffer(true),
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
	log                              *rateLog
	refusedMax, evicted, refusedAnon atomic.Uint64 // refusal counters, for metrics

	mu        sync.Mutex
	open      int
	anonymous int
	pending   list.List // *limitedConn, oldest first
}

func newConnLimiter(name string, max, maxPending, maxAnon int, log *slog.Logger) *connLimiter {
	return &connLimiter{name: name, max: max, maxPending: maxPending, maxAnon: maxAnon, log: newRateLog(log)}
}

// limiterStats is a point-in-time view for metrics.
type limiterStats struct {
	Open, Pending, Anonymous              int
	RefusedMax, Evicted, RefusedAnonymous uint64
}

func (l *connLimiter) stats() limiterStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	return limiterStats{Open: l.open, Pending: l.pending.Len(), Anonymous: l.anonymous,
		RefusedMax: l.refusedMax.Load(), Evicted: l.evicted.Load(), RefusedAnonymous: l.refusedAnon.Load()}
}

// limitedConn gives its slot back when closed, whoever closes it.
type limitedConn struct {
	net.Conn
	l    *connLimiter
	elem *list.Element // in l.pending while not established; guarded by l.mu
	anon bool          // counted in l.anonymous; guarded by l.mu
	once sync.Once
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

// established takes c out of the pending queue; an anonymous connection
// also needs one of maxAnon slots (false: none left, close it).
func (l *connLimiter) established(c *limitedConn, anonymous bool) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c.elem != nil {
		l.pending.Remove(c.elem)
		c.elem = nil
	}
	if anonymous && !c.anon {
		if l.anonymous >= l.maxAnon {
			l.refusedAnon.Add(1)
			l.log.warn(l.name+": connections refused: too many without a client certificate", "max_anonymous_connections", l.maxAnon)
			return false
		}
		l.anonymous++
		c.anon = true
	}
	return true
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
		if evict != nil {
			evict.Close()
		}
		if c != nil {
			return c, nil
		}
		raw.Close()
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
	if !lc.l.established(lc, !isTLS || len(ti.State.PeerCertificates) == 0) {
		conn.Close()
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
	td       spiffeid.TrustDomain
	maxAnon  int
	log      *rateLog
	refused  sync.Map // reason -> *atomic.Uint64
	inflight atomic.Int64
}

func newTapGate(td spiffeid.TrustDomain, maxAnonCalls int, log *slog.Logger) *tapGate {
	return &tapGate{td: td, maxAnon: maxAnonCalls, log: newRateLog(log)}
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
	// Anonymous (join) calls in progress are bounded; each holds at most
	// api.MaxRequestSize of message while it is read.
	if g.inflight.Add(1) > int64(g.maxAnon) {
		g.inflight.Add(-1)
		g.count("anonymous-calls")
		g.log.warn("api call refused: too many anonymous calls in progress", "method", method, "max_anonymous_calls", g.maxAnon)
		return ctx, status.Errorf(codes.ResourceExhausted, "too many join calls in progress on this node; retry later")
	}
	// The stream's context ends with the call however it ends.
	context.AfterFunc(ctx, func() { g.inflight.Add(-1) })
	return ctx, nil
}

// allow is authorize by role alone: who may call which service. reason
// names the refusal for metrics and logs.
func (g *tapGate) allow(method string, role ca.Role, who string) (string, error) {
	switch {
	case strings.HasPrefix(method, "/"+api.AdminService+"/"):
		if role != ca.RoleAdmin {
			return "not-admin", status.Errorf(codes.PermissionDenied, "%s is not an admin (admin IDs are under spiffe://%s/sigil/admin/)", who, g.td.Name())
		}
	case method == "/"+api.JoinService+"/Renew":
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
