package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// appliance is the agent service on the appliance, reached over mutual
// TLS with the agent's current SVID (the TPM key signs each handshake).
// It holds the agent's current server: the Sync stream and SVID signing
// use its connection, and joins and renewals start there, so all of them
// stay on one server until it fails and then move on together.
type appliance struct {
	a *Agent

	mu sync.Mutex
	// idx is the current server, an index into Servers.
	idx int
	// conn is the connection to server connIdx (nil: none yet).
	conn    *grpc.ClientConn
	connIdx int
	// peer is the chain the current connection's server last presented.
	peer *atomic.Pointer[[]*x509.Certificate]
	// banned is the appliance's refusal while it refuses this agent as
	// banned (nil otherwise): health and readiness report it until a call
	// succeeds again (an unban).
	banned atomic.Pointer[string]
}

// observe keeps the banned state from a call's outcome: the appliance
// answers a banned agent's calls with PermissionDenied naming the ban
// ("agent is banned", "is banned or gone"); any success clears it.
func (p *appliance) observe(err error) {
	if err == nil {
		if p.banned.Swap(nil) != nil {
			p.a.log.Info("the appliance serves this agent again: no longer banned")
		}
		return
	}
	st, ok := status.FromError(err)
	if !ok || st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), "banned") {
		return
	}
	msg := st.Message()
	if p.banned.Swap(&msg) == nil {
		p.a.log.Error("the appliance refuses this agent: it is banned; an operator must unban it", "reason", msg)
	}
}

// bannedReason is the appliance's refusal while this agent is banned ("":
// not banned, as far as the last call said).
func (p *appliance) bannedReason() string {
	if m := p.banned.Load(); m != nil {
		return *m
	}
	return ""
}

func (p *appliance) client() (*api.AgentClient, *grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn == nil {
		srv := p.a.cfg.Servers[p.idx]
		peer := &atomic.Pointer[[]*x509.Certificate]{}
		conn, err := api.Dial(api.DialConfig{Addr: srv, Roots: p.a.cache.Roots,
			Certificate: func() (*tls.Certificate, error) {
				s := p.a.SVID()
				if s == nil {
					return &tls.Certificate{}, nil
				}
				return s.TLSCertificate(), nil
			},
			VerifyChain: func(chains [][]*x509.Certificate) error {
				if err := p.a.cache.CheckChain(chains); err != nil {
					return err
				}
				peer.Store(&chains[0])
				return nil
			}})
		if err != nil {
			p.idx = p.next(p.idx)
			return nil, nil, err
		}
		p.conn, p.connIdx, p.peer = conn, p.idx, peer
	}
	return api.NewAgentClient(p.conn), p.conn, nil
}

func (p *appliance) next(i int) int { return (i + 1) % len(p.a.cfg.Servers) }

// current is the index of the current server.
func (p *appliance) current() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.idx
}

// unreachable reports whether err means the agent should pass this server
// over: Unavailable (no connection, or a node that asks to be passed over,
// such as one that knows no leader) or DeadlineExceeded.
func unreachable(err error) bool {
	c := status.Code(err)
	return c == codes.Unavailable || c == codes.DeadlineExceeded
}

// failed leaves conn's server when conn could not reach it. A call
// refused as unauthenticated (the SVID the connection was opened with has
// expired, by the node's clock) drops the connection but stays on the
// server: the next call handshakes again with the current SVID.
func (p *appliance) failed(conn *grpc.ClientConn, err error) {
	unauthenticated := status.Code(err) == codes.Unauthenticated
	if !unreachable(err) && !unauthenticated {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != conn || conn == nil {
		return
	}
	if unauthenticated {
		_ = conn.Close() // fails only when already closed
		p.conn = nil
		p.a.log.Warn("appliance refused this connection's SVID; reconnecting with the current one", "server", p.a.cfg.Servers[p.connIdx], "err", err)
		return
	}
	p.leave(p.connIdx, err)
}

// reconnect closes the connection so that the next call dials anew and
// presents the agent's current SVID: TLS presents a certificate only at
// the handshake, and the nodes end every call on a connection once the
// SVID it was opened with expires. The agent calls it whenever it has a
// new SVID. The Sync stream on the closed connection ends with
// cache.ErrReconnect, which the cache reopens at once; a signing call in
// flight on it fails and is retried as any failed call is.
func (p *appliance) reconnect() { p.close() }

// replaced reports whether conn is no longer the connection calls use
// (closed for a new SVID, a revoked node, a failure).
func (p *appliance) replaced(conn *grpc.ClientConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn != conn
}

// serverFailed leaves server i when a call of its own (a join or a
// renewal, on a connection of their own) could not reach it.
func (p *appliance) serverFailed(i int, err error) {
	if !unreachable(err) {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.leave(i, err)
}

// leave makes the server after i current, unless another caller already
// moved on from i (two calls failing on one dead server must not skip a
// live one), and closes the connection to i so that Sync follows.
// p.mu is held.
func (p *appliance) leave(i int, err error) {
	if p.idx == i {
		p.idx = p.next(i)
		p.a.log.Warn("appliance server unavailable; moving to the next", "server", p.a.cfg.Servers[i], "next", p.a.cfg.Servers[p.idx], "err", err)
	}
	if p.conn != nil && p.connIdx == i {
		_ = p.conn.Close() // fails only when already closed
		p.conn = nil
	}
}

// eachServer calls f on the servers in list order from the current one,
// wrapping around, each at most once, until f succeeds; an unreachable
// server makes the next one current. It returns f's last error.
func (p *appliance) eachServer(ctx context.Context, f func(srv string) error) error {
	start, n := p.current(), len(p.a.cfg.Servers)
	var last error
	for k := range n {
		i := (start + k) % n
		err := f(p.a.cfg.Servers[i])
		if err == nil {
			return nil
		}
		last = err
		p.serverFailed(i, err)
		// Past the caller's deadline every further server would fail too,
		// and be left for it.
		if ctx.Err() != nil {
			break
		}
	}
	return last
}

// dropRevoked closes the connection when the server it reached presented
// a chain a root CRL now revokes: an established connection is not
// verified again, and the next dial goes to the next server.
func (p *appliance) dropRevoked() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn == nil || p.peer == nil {
		return
	}
	if ch := p.peer.Load(); ch != nil && p.a.cache.Revoked(*ch) {
		p.a.log.Warn("appliance server's issuing CA is revoked by the root's CRL; leaving it", "server", p.a.cfg.Servers[p.connIdx],
			"node", (*ch)[0].URIs)
		_ = p.conn.Close() // fails only when already closed
		p.conn = nil
		if p.idx == p.connIdx {
			p.idx = p.next(p.connIdx)
		}
	}
}

// dropUntrusted closes the connection when the chain its server presented
// ends at a root the agent no longer trusts (a retired root): the
// established connection is not verified again, and the next call
// handshakes against the roots of now. It stays on the server, which
// presents a certificate under the new root by then.
func (p *appliance) dropUntrusted() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn == nil || p.peer == nil {
		return
	}
	ch := p.peer.Load()
	if ch == nil || len(*ch) == 0 {
		return
	}
	root := (*ch)[len(*ch)-1]
	if slices.ContainsFunc(p.a.cache.Roots(), func(r *x509.Certificate) bool { return bytes.Equal(r.Raw, root.Raw) }) {
		return
	}
	// Info: a root rotation's retire does this on every agent.
	p.a.log.Info("appliance server's chain ends at a root no longer trusted; reconnecting", "server", p.a.cfg.Servers[p.connIdx],
		"root", root.Subject.String())
	_ = p.conn.Close() // fails only when already closed
	p.conn = nil
}

func (p *appliance) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil {
		_ = p.conn.Close() // fails only when already closed
		p.conn = nil
	}
}

// unary tries each server at most once.
func unaryCall[Req, Resp any](ctx context.Context, p *appliance, f func(*api.AgentClient, context.Context, *Req) (*Resp, error), r *Req) (*Resp, error) {
	var last error
	for range p.a.cfg.Servers {
		c, conn, err := p.client()
		if err != nil {
			last = err
			continue
		}
		resp, err := f(c, ctx, r)
		p.observe(err)
		if err == nil {
			return resp, nil
		}
		last = err
		p.failed(conn, err)
		if c := status.Code(err); c != codes.Unavailable || ctx.Err() != nil {
			break
		}
	}
	return nil, last
}

func (p *appliance) SignX509SVIDs(ctx context.Context, r *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	return unaryCall(ctx, p, (*api.AgentClient).SignX509SVIDs, r)
}

func (p *appliance) SignJWTSVID(ctx context.Context, r *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	return unaryCall(ctx, p, (*api.AgentClient).SignJWTSVID, r)
}

// BundleAck tells the appliance the agent applied a trust bundle (the
// cache calls it once per bundle change).
func (p *appliance) BundleAck(ctx context.Context, r *api.BundleAckRequest) (*api.Empty, error) {
	return unaryCall(ctx, p, (*api.AgentClient).BundleAck, r)
}

// RunEnd ends a job agent's run (an in-memory agent joined by a job join):
// the appliance revokes the serials, records the exit code and removes the
// agent and its run's entry. It tries each server at most once.
// The agent is over with it: its connection is closed.
func (a *Agent) RunEnd(ctx context.Context, r *api.RunEndRequest) error {
	defer a.app.close()
	_, err := unaryCall(ctx, a.app, (*api.AgentClient).RunEnd, r)
	return err
}

// Sync opens the update stream; the cache retries a failed one, which then
// goes to the next server.
func (p *appliance) Sync(ctx context.Context, r *api.SyncRequest) (grpc.ServerStreamingClient[api.SyncUpdate], error) {
	c, conn, err := p.client()
	if err != nil {
		return nil, err
	}
	s, err := c.Sync(ctx, r)
	if err != nil {
		if err := p.reconnecting(conn, err); err != nil {
			return nil, err
		}
		p.observe(err)
		p.failed(conn, err)
		return nil, err
	}
	return &syncStream{ServerStreamingClient: s, p: p, conn: conn}, nil
}

// reconnecting returns err as cache.ErrReconnect when it is conn's closing
// because the agent replaced it (a new SVID), and nil otherwise.
func (p *appliance) reconnecting(conn *grpc.ClientConn, err error) error {
	if status.Code(err) == codes.Canceled && p.replaced(conn) {
		return fmt.Errorf("%w: %v", cache.ErrReconnect, err)
	}
	return nil
}

type syncStream struct {
	grpc.ServerStreamingClient[api.SyncUpdate]
	p    *appliance
	conn *grpc.ClientConn
}

func (s *syncStream) Recv() (*api.SyncUpdate, error) {
	u, err := s.ServerStreamingClient.Recv()
	if err != nil {
		// The agent closed this connection to reconnect (a new SVID):
		// not a failure of the appliance.
		if err := s.p.reconnecting(s.conn, err); err != nil {
			return nil, err
		}
	}
	s.p.observe(err)
	if err != nil {
		s.p.failed(s.conn, err)
	}
	return u, err
}
