package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
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
// TLS with the agent's current SVID (the TPM key signs each handshake). It
// stays on one server until that one fails, then moves to the next.
type appliance struct {
	a *Agent

	mu   sync.Mutex
	idx  int
	conn *grpc.ClientConn
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
		srv := p.a.cfg.Servers[p.idx%len(p.a.cfg.Servers)]
		peer := &atomic.Pointer[[]*x509.Certificate]{}
		conn, err := api.Dial(api.DialConfig{Addr: srv, RootFile: p.a.cfg.RootCert,
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
			p.idx++
			return nil, nil, err
		}
		p.conn, p.peer = conn, peer
	}
	return api.NewAgentClient(p.conn), p.conn, nil
}

// failed moves to the next server when conn could not reach its own. A
// call refused as unauthenticated (the SVID the connection was opened
// with has expired, by the node's clock) drops the connection but stays
// on the server: the next call handshakes again with the current SVID.
func (p *appliance) failed(conn *grpc.ClientConn, err error) {
	c := status.Code(err)
	if c != codes.Unavailable && c != codes.DeadlineExceeded && c != codes.Unauthenticated {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != conn || conn == nil {
		return
	}
	_ = conn.Close() // fails only when already closed
	p.conn = nil
	if c == codes.Unauthenticated {
		p.a.log.Warn("appliance refused this connection's SVID; reconnecting with the current one", "server", p.a.cfg.Servers[p.idx%len(p.a.cfg.Servers)], "err", err)
		return
	}
	p.a.log.Warn("appliance server unreachable; trying the next", "server", p.a.cfg.Servers[p.idx%len(p.a.cfg.Servers)], "err", err)
	p.idx++
}

// reconnect closes the connection so that the next call dials anew and
// presents the agent's current SVID: TLS presents a certificate only at
// the handshake, and the nodes end every call on a connection once the
// SVID it was opened with expires. The agent calls it whenever it has a
// new SVID. The Sync stream on the closed connection ends with
// cache.ErrReconnect, which the cache reopens at once; a signing call in
// flight on it fails and is retried as any failed call is.
func (p *appliance) reconnect() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conn != nil {
		_ = p.conn.Close() // fails only when already closed
		p.conn = nil
	}
}

// replaced reports whether conn is no longer the connection calls use
// (closed for a new SVID, a revoked node, a failure).
func (p *appliance) replaced(conn *grpc.ClientConn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conn != conn
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
		p.a.log.Warn("appliance server's issuing CA is revoked by the root's CRL; leaving it", "server", p.a.cfg.Servers[p.idx%len(p.a.cfg.Servers)],
			"node", (*ch)[0].URIs)
		_ = p.conn.Close() // fails only when already closed
		p.conn = nil
		p.idx++
	}
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
