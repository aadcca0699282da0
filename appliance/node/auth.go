package node

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/unixsock"
)

type callerKey struct{}

// caller is who made a request, as audit records name them.
type caller struct {
	Actor string
	Role  ca.Role
	Peer  ca.Peer
	// Local is root on this node's local socket (Role is RoleAdmin, Peer
	// is empty): it may issue any admin name and role.
	Local bool
	// Serial is the serial (lowercase hex) of the verified admin
	// certificate that made the call: the revocation checks and the role
	// go by it, here and (carried in the command) at commit.
	Serial string
}

func callerFrom(ctx context.Context) caller {
	c, _ := ctx.Value(callerKey{}).(caller)
	return c
}

// authenticate identifies mTLS callers from their verified certificate
// chain and lets only admins call the admin service.
func (n *Node) authenticate(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "not a TLS connection")
	}
	who := ca.Peer{Role: ca.RoleNone}
	if len(ti.State.PeerCertificates) > 0 {
		if err := n.checkNotExpired(info.FullMethod, ti.State.PeerCertificates[0], time.Now()); err != nil {
			return nil, err
		}
		var err error
		if who, err = n.auth.PeerFromState(ti.State); err != nil {
			n.authLog.warn("api call refused: unverified client", "method", info.FullMethod, "remote", p.Addr.String(), "err", err)
			return nil, status.Error(codes.Unauthenticated, "client certificate not accepted")
		}
	}
	if err := n.authorize(info.FullMethod, who); err != nil {
		return nil, err
	}
	actor := who.ID.String()
	if who.Role == ca.RoleNone {
		actor = "anonymous@" + p.Addr.String()
	}
	c := caller{Actor: actor, Role: who.Role, Peer: who}
	if who.Role == ca.RoleAdmin {
		if err := n.checkAdmin(ctx, info.FullMethod, &c, ti.State.PeerCertificates[0]); err != nil {
			return nil, err
		}
	}
	if who.Role == ca.RoleAgent {
		n.seen.saw(actor, time.Now()) // agentseen.go
	}
	return h(context.WithValue(ctx, callerKey{}, c), req)
}

// adminTTLSlack allows for a certificate's validity starting before it
// was issued (ca.Authority backdates NotBefore by 30 s for clock skew).
const adminTTLSlack = time.Minute

// checkAdmin sets the caller's certificate serial and refuses an admin
// certificate, whichever node's CA signed it, whose name is not a valid
// admin name (made outside the API: the admin table could not record or
// revoke it), that is valid for longer than this node's
// admin-cert-max-ttl, or whose name was revoked after it was issued
// (state.AdminRecord.Accepts). Refusals are logged at most once a second
// per reason: a refused certificate can call again at will.
//
// The revocation check here uses this replica as it is, which may lag the
// leader (by a heartbeat, or by much more on a node restarting); what
// closes that gap without a read index on every call: reads check again
// after their linearizable read (admin.read), writes carry the
// certificate's serial and are refused at commit when the name's record
// does not accept it (state checkAdminActor, in log order, whichever
// replica let them through), and membership changes, which are not state
// commands, read first here. So a revocation acknowledged before a call
// counts on every node, for every method but cluster status (which must
// answer without a quorum).
func (n *Node) checkAdmin(ctx context.Context, method string, c *caller, leaf *x509.Certificate) error {
	c.Serial = leaf.SerialNumber.Text(16)
	if !state.AdminNameRE.MatchString(c.Peer.Name) {
		n.authLog.warn("admin call refused: malformed admin name", "method", method, "caller", shownID(c.Actor), "serial", c.Serial)
		return status.Errorf(codes.Unauthenticated, "admin certificate %s (serial %s): the name %q is not an admin name (want %s); it was not issued through the admin API",
			shownID(c.Actor), c.Serial, shownID(c.Peer.Name), state.AdminNameRE)
	}
	if leaf.SerialNumber.Sign() <= 0 {
		n.authLog.warn("admin call refused: serial not positive", "method", method, "caller", c.Actor, "serial", c.Serial)
		return status.Errorf(codes.Unauthenticated, "admin certificate %s: serial %s is not a positive number", c.Actor, c.Serial)
	}
	if life, max := leaf.NotAfter.Sub(leaf.NotBefore), n.adminCertMaxTTL(); life > max+adminTTLSlack {
		n.authLog.warn("admin call refused: certificate outlives admin-cert-max-ttl", "method", method, "caller", c.Actor,
			"serial", c.Serial, "validity", life.String(), "max", max.String())
		return status.Errorf(codes.Unauthenticated, "admin certificate %s (serial %s) is valid for %v, longer than admin-cert-max-ttl %v: refused whoever signed it",
			c.Actor, c.Serial, life.Round(time.Second), max)
	}
	switch method {
	case api.AdminMethodClusterJoin, api.AdminMethodClusterRemove:
		if err := n.raft.ReadIndex(ctx); err != nil {
			return status.Errorf(codes.Unavailable, "the cluster cannot confirm this admin's standing now (no leader or no quorum): %v", err)
		}
	}
	return checkAdminRevoked(n.fsm, n.authLog, method, *c)
}

// adminCertMaxTTL is the longest admin certificate validity this node
// issues or accepts: admin-cert-max-ttl, which the config keeps within
// state.MaxAdminCertTTL (the admin table forgets a revocation once every
// certificate it revoked must have expired).
func (n *Node) adminCertMaxTTL() time.Duration {
	return min(n.cfg.API.AdminCertMaxTTL.Duration, state.MaxAdminCertTTL)
}

// adminTable is the replica's admin records.
type adminTable interface {
	Admin(name string) (state.AdminRecord, bool, error)
}

// checkAdminRevoked refuses an admin certificate whose name was revoked
// after it was issued, as this replica knows it. Refusals are logged to
// authLog.
func checkAdminRevoked(admins adminTable, authLog *rateLog, method string, c caller) error {
	rec, ok, err := admins.Admin(c.Peer.Name)
	if err != nil {
		authLog.warn("admin call refused: admin table unreadable", "method", method, "caller", c.Actor, "err", err)
		return status.Errorf(codes.Internal, "the admin table cannot be read, so no admin is accepted: %v", err)
	}
	if ok && !rec.Accepts(c.Serial) {
		authLog.warn("admin call refused: certificate revoked", "method", method, "caller", c.Actor, "serial", c.Serial,
			"revoked_at", rec.RevokedAt.Format(time.RFC3339), "revoked_by", rec.RevokedBy)
		return status.Errorf(codes.Unauthenticated, "admin certificate %s (serial %s) was revoked: the name was revoked at %s by %s, and this certificate was not issued since",
			c.Actor, c.Serial, rec.RevokedAt.Format(time.RFC3339), rec.RevokedBy)
	}
	return nil
}

// authorize lets admins call the admin service and agents the agent
// service, nothing else.
func (n *Node) authorize(method string, who ca.Peer) error {
	switch {
	case strings.HasPrefix(method, "/"+api.AdminService+"/"):
		if who.Role != ca.RoleAdmin {
			n.authLog.warn("admin call refused: not an admin", "method", method, "caller", who.ID.String(), "role", who.Role.String())
			return status.Errorf(codes.PermissionDenied, "%s is not an admin (admin IDs are under spiffe://%s/sigil/admin/)", who.ID, n.td.Name())
		}
	case method == api.JoinMethodRenew:
		if who.Role != ca.RoleAgent {
			return status.Errorf(codes.PermissionDenied, "renewal needs the agent's current certificate")
		}
	case strings.HasPrefix(method, "/"+api.JoinService+"/"):
		// Joining is open to anyone: the evidence is the credential.
	case strings.HasPrefix(method, "/"+api.AgentService+"/"):
		if who.Role != ca.RoleAgent {
			n.authLog.warn("agent call refused: not an agent", "method", method, "caller", who.ID.String(), "role", who.Role.String())
			return status.Errorf(codes.PermissionDenied, "%s is not an agent", who.ID)
		}
	default:
		return status.Errorf(codes.PermissionDenied, "unknown service %s", method)
	}
	return nil
}

// authenticateStream is authenticate for streaming calls.
func (n *Node) authenticateStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx := ss.Context()
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "not a TLS connection")
	}
	if len(ti.State.PeerCertificates) == 0 {
		return status.Error(codes.Unauthenticated, "a client certificate is required")
	}
	leaf := ti.State.PeerCertificates[0]
	if err := n.checkNotExpired(info.FullMethod, leaf, time.Now()); err != nil {
		return err
	}
	who, err := n.auth.PeerFromState(ti.State)
	if err != nil {
		return status.Error(codes.Unauthenticated, "client certificate not accepted")
	}
	if err := n.authorize(info.FullMethod, who); err != nil {
		return err
	}
	c := caller{Actor: who.ID.String(), Role: who.Role, Peer: who}
	if who.Role == ca.RoleAdmin {
		if err := n.checkAdmin(ctx, info.FullMethod, &c, ti.State.PeerCertificates[0]); err != nil {
			return err
		}
	}
	if who.Role == ca.RoleAgent { // agentseen.go
		if info.FullMethod == api.AgentMethodSync {
			defer n.seen.syncOpened(c.Actor, time.Now())()
		} else {
			n.seen.saw(c.Actor, time.Now())
		}
	}
	// The stream ends when the certificate it was opened with expires:
	// its context is cancelled then (a timer per stream), and the
	// handler's return, whatever it is, becomes the expiry's status.
	sctx, cancel := context.WithDeadlineCause(context.WithValue(ctx, callerKey{}, c), leaf.NotAfter, errPeerExpired)
	defer cancel()
	err = h(srv, &callerStream{ServerStream: ss, ctx: sctx})
	if errors.Is(context.Cause(sctx), errPeerExpired) {
		n.log.Warn("stream ended: the caller's certificate expired", "method", info.FullMethod, "caller", c.Actor,
			"role", who.Role.String(), "serial", leaf.SerialNumber.Text(16), "expired", leaf.NotAfter.UTC().Format(time.RFC3339))
		return expiredStatus(leaf)
	}
	return err
}

// errPeerExpired is the cause with which a stream's context ends when the
// client certificate of its connection expires.
var errPeerExpired = errors.New("the client certificate of this connection expired")

// checkNotExpired refuses a call on a connection whose client certificate
// (leaf, as presented at the handshake) has expired since. TLS checks a
// certificate's validity only at the handshake, and a gRPC connection
// lives as long as its ends keep it: an agent's, held open by its Sync
// stream, outlives its SVID unless the agent reconnects after renewing.
// (Classify would refuse the call too, as an unverified chain; this says
// why.) Refusals are logged at most once a second: the caller may call
// again at will.
func (n *Node) checkNotExpired(method string, leaf *x509.Certificate, now time.Time) error {
	if !now.After(leaf.NotAfter) {
		return nil
	}
	if n.gate != nil {
		n.gate.count("certificate-expired")
	}
	caller := "(no SPIFFE ID)"
	if len(leaf.URIs) == 1 {
		caller = shownID(leaf.URIs[0].String())
	}
	n.authLog.warn("api call refused: the caller's certificate expired after the connection was opened", "method", method,
		"caller", caller, "serial", leaf.SerialNumber.Text(16), "expired", leaf.NotAfter.UTC().Format(time.RFC3339))
	return expiredStatus(leaf)
}

// expiredStatus is the status of a call refused, or a stream ended,
// because the connection's client certificate (leaf) expired: for an
// agent, its SVID. The connection was verified at its handshake, so the
// leaf's SPIFFE ID is the caller's.
func expiredStatus(leaf *x509.Certificate) error {
	id, path := "(no SPIFFE ID)", ""
	if len(leaf.URIs) == 1 {
		id, path = shownID(leaf.URIs[0].String()), leaf.URIs[0].Path
	}
	at := leaf.NotAfter.UTC().Format(time.RFC3339)
	switch {
	case strings.HasPrefix(path, "/sigil/agent/"):
		return status.Errorf(codes.Unauthenticated, "agent SVID %s expired at %s: this connection was opened with it and is no longer served; "+
			"the agent must renew its SVID before it expires (or join again) and reconnect with the new one", id, at)
	case strings.HasPrefix(path, "/sigil/admin/"):
		return status.Errorf(codes.Unauthenticated, "admin certificate %s expired at %s: this connection was opened with it and is no longer served; reconnect with a current admin certificate", id, at)
	}
	return status.Errorf(codes.Unauthenticated, "client certificate %s expired at %s: this connection was opened with it and is no longer served; reconnect with a current certificate", id, at)
}

type callerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *callerStream) Context() context.Context { return s.ctx }

// authenticateLocal admits root (or sigild's own user) on the local socket:
// whoever is root on a node can already read its HSM PIN, so this grants
// nothing new, and it is how the first admin certificate is issued.
func (n *Node) authenticateLocal(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	c, err := n.localCaller(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return h(context.WithValue(ctx, callerKey{}, c), req)
}

// authenticateLocalStream is authenticateLocal for streaming calls.
func (n *Node) authenticateLocalStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	c, err := n.localCaller(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return h(srv, &callerStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), callerKey{}, c)})
}

func (n *Node) localCaller(ctx context.Context, method string) (caller, error) {
	la, ok := api.LocalPeer(ctx)
	if !ok {
		return caller{}, status.Error(codes.Unauthenticated, "no peer credentials")
	}
	if la.UID != 0 && la.UID != uint32(os.Getuid()) {
		n.log.Warn("local admin call refused", "method", method, "uid", la.UID, "pid", la.PID)
		return caller{}, status.Errorf(codes.PermissionDenied, "uid %d may not use the local admin socket", la.UID)
	}
	return caller{Actor: fmt.Sprintf("local:uid=%d@%s", la.UID, n.cfg.NodeID), Role: ca.RoleAdmin, Local: true}, nil
}

// listenLocal makes the socket 0600 in a 0700 directory before anyone can
// connect.
func listenLocal(path string) (net.Listener, error) { return unixsock.Listen(path, 0o700, 0o600) }
