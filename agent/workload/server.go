// Package workload serves the SPIFFE Workload API on the agent's Unix
// socket. Every call is checked for the spec's security header, counted
// against its caller's limits, and attested (agent/callerid) before the
// cache's SVIDs and bundles are matched against the caller's selectors.
// Callers see generic errors; the reasons go to the agent's log.
package workload

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/callerid"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/unixsock"
)

// Source is what the server reads: the agent's cache.
type Source interface {
	Current() (*cache.Snapshot, <-chan struct{})
	JWTSVID(ctx context.Context, e api.Entry, audience []string) (string, time.Time, error)
}

// Limits bound what one caller (one uid) may take.
type Limits struct {
	// StreamsPerCaller caps concurrent streams per uid (default 1024).
	StreamsPerCaller int `yaml:"streams-per-caller"`
	// RequestsPerSecond and Burst bound calls and stream opens per uid
	// (defaults 50 and 200).
	RequestsPerSecond float64 `yaml:"requests-per-second"`
	Burst             int     `yaml:"burst"`
	// ConnectionsPerCaller caps open connections per uid (default 64)
	// and Connections those of all uids together (default 1024). Each
	// connection holds two of the agent's file descriptors (the socket
	// and the caller's pidfd), so the total must stay well under the
	// agent's open-file limit.
	ConnectionsPerCaller int `yaml:"connections-per-caller"`
	Connections          int `yaml:"connections"`
	// IdleTimeout closes a connection that has made no admitted request
	// this long after it was accepted (default 10s).
	IdleTimeout time.Duration `yaml:"idle-timeout"`
}

// Limit defaults.
const (
	DefaultConnectionsPerCaller = 64
	DefaultConnections          = 1024
	DefaultIdleTimeout          = 10 * time.Second
)

// Validate refuses negative limits (zero means the default) and a
// per-uid connection cap above an explicit total.
func (l Limits) Validate() error {
	if l.StreamsPerCaller < 0 || l.RequestsPerSecond < 0 || l.Burst < 0 || l.ConnectionsPerCaller < 0 || l.Connections < 0 || l.IdleTimeout < 0 {
		return fmt.Errorf("workload-api.limits %+v: limits cannot be negative (0 means the default)", l)
	}
	if l.Connections > 0 && l.ConnectionsPerCaller > l.Connections {
		return fmt.Errorf("workload-api.limits: connections-per-caller %d is above connections %d", l.ConnectionsPerCaller, l.Connections)
	}
	return nil
}

// Options configure the server.
type Options struct {
	Log    *slog.Logger
	Limits Limits
	// AllowUnauthenticatedVerifiers lets callers without an identity read
	// bundles and validate JWT-SVIDs (off: only callers with at least one
	// matching entry may).
	AllowUnauthenticatedVerifiers bool
}

// Stats are counters for metrics.
type Stats struct {
	Attestations, AttestFailures atomic.Int64
	Denied, Limited              atomic.Int64
	Streams                      atomic.Int64
	// Connections is open connections; ConnRefused counts those refused
	// by the connection caps.
	Connections, ConnRefused atomic.Int64
}

// Server is the Workload API.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	src   Source
	att   *callerid.Attestor
	log   *slog.Logger
	opts  Options
	Stats Stats

	mu      sync.Mutex
	callers map[uint32]*callerLimit
	conns   int // open connections, all uids

	lastRefusalLog atomic.Int64 // unix nanoseconds

	// dupHints are the (dropped, kept) entry pairs of duplicate hints
	// already logged for the appliance view of revision dupRev: the log
	// says it once per view, not on every call.
	dupMu   sync.Mutex
	dupRev  uint64
	dupSeen map[[2]string]bool
}

// New returns a Workload API server over src.
func New(src Source, att *callerid.Attestor, opts Options) *Server {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Limits.StreamsPerCaller <= 0 {
		opts.Limits.StreamsPerCaller = 1024
	}
	if opts.Limits.RequestsPerSecond <= 0 {
		opts.Limits.RequestsPerSecond = 50
	}
	if opts.Limits.Burst <= 0 {
		opts.Limits.Burst = 200
	}
	if opts.Limits.ConnectionsPerCaller <= 0 {
		opts.Limits.ConnectionsPerCaller = DefaultConnectionsPerCaller
	}
	if opts.Limits.Connections <= 0 {
		opts.Limits.Connections = DefaultConnections
	}
	// A total set below the default per-uid cap caps each uid too.
	opts.Limits.ConnectionsPerCaller = min(opts.Limits.ConnectionsPerCaller, opts.Limits.Connections)
	if opts.Limits.IdleTimeout <= 0 {
		opts.Limits.IdleTimeout = DefaultIdleTimeout
	}
	return &Server{src: src, att: att, log: opts.Log, opts: opts, callers: map[uint32]*callerLimit{}}
}

// Listen creates the socket: its directory 0755 (created if missing), the
// socket itself with mode (0777 when 0) because the Workload API is open
// to every local process and attestation decides what each one gets. A
// stale socket from an earlier run is replaced.
func Listen(path string, mode os.FileMode) (net.Listener, error) {
	if mode == 0 {
		mode = 0o777
	}
	return unixsock.Listen(path, 0o755, mode)
}

// GRPCServer returns a gRPC server with the Workload API registered on
// the attesting transport, and gRPC server reflection (v1 and v1alpha),
// which the Workload Endpoint spec recommends so that generic tools
// (grpcurl) can find the API.
func (s *Server) GRPCServer() *grpc.Server {
	g := grpc.NewServer(
		grpc.Creds(callerid.Credentials()),
		grpc.UnaryInterceptor(s.unary),
		grpc.StreamInterceptor(s.stream),
	)
	workload.RegisterSpiffeWorkloadAPIServer(g, s)
	opts := reflection.ServerOptions{Services: g, DescriptorResolver: workloadFiles(), ExtensionResolver: new(protoregistry.Types)}
	reflectionv1.RegisterServerReflectionServer(g, reflection.NewServerV1(opts))
	reflectionv1alpha.RegisterServerReflectionServer(g, reflection.NewServer(opts))
	return g
}

// reflectionMethods are the reflection services' one method each. They
// carry no credential and no caller's data, so they are answered without
// the Workload API's security header (generic clients do not send it) and
// without attestation; the caller's rate and stream limits still apply.
var reflectionMethods = map[string]bool{
	reflectionv1.ServerReflection_ServerReflectionInfo_FullMethodName:      true,
	reflectionv1alpha.ServerReflection_ServerReflectionInfo_FullMethodName: true,
}

// workloadFiles is what reflection may describe: the services this
// socket serves (workload.proto, and reflection's own) and the files they
// import. Left to its default, reflection would resolve any symbol of any
// proto linked into the agent; a caller of this socket has no business
// with those.
func workloadFiles() *protoregistry.Files {
	files := new(protoregistry.Files)
	var add func(fd protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if _, err := files.FindFileByPath(fd.Path()); err == nil {
			return
		}
		imports := fd.Imports()
		for i := range imports.Len() {
			add(imports.Get(i).FileDescriptor)
		}
		// Only a conflict could fail, and each file is added once, after
		// its imports.
		_ = files.RegisterFile(fd)
	}
	add(workload.File_workload_proto)
	add(reflectionv1.File_grpc_reflection_v1_reflection_proto)
	add(reflectionv1alpha.File_grpc_reflection_v1alpha_reflection_proto)
	return files
}

// Serve serves on l until ctx ends, under the connection caps and idle
// timeout of the server's limits.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	g := s.GRPCServer()
	go func() {
		<-ctx.Done()
		g.Stop()
	}()
	al, err := callerid.Listen(l, callerid.ConnPolicy{Admit: s.admitConn, IdleTimeout: s.opts.Limits.IdleTimeout, Log: s.log})
	if err != nil {
		_ = l.Close() // never served: the listen error is the one to report
		return err
	}
	err = g.Serve(al)
	if ctx.Err() != nil {
		return nil
	}
	return err
}

type callerKey struct{}

type call struct {
	caller *callerid.Caller
	sel    callerid.Selectors
}

// admit checks the header, the caller's limits and attests it. Every
// stream of the Workload API is a server stream that counts against the
// caller's stream limit until done is called.
func (s *Server) admit(ctx context.Context, method string, stream bool) (context.Context, func(), error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		s.log.Warn("workload API call without the security header", "method", method)
		return nil, nil, status.Error(codes.InvalidArgument, "security header missing from request")
	}
	c, done, err := s.limits(ctx, method, stream)
	if err != nil {
		return nil, nil, err
	}
	snap, _ := s.src.Current()
	sel, err := s.att.Attest(ctx, c)
	if err == nil {
		// What Attest read must be about the process that connected,
		// running what it ran then. The check comes after snap existed,
		// so it also stands for snap's first push on this stream.
		err = c.VerifyAs(snap)
	}
	if err != nil {
		done()
		s.Stats.AttestFailures.Add(1)
		s.log.Warn("workload attestation failed", "method", method, "uid", c.UID, "pid", c.PID, "exe", c.ExePath(), "err", err)
		return nil, nil, status.Error(codes.PermissionDenied, "workload attestation failed")
	}
	c.Active()
	s.Stats.Attestations.Add(1)
	return context.WithValue(ctx, callerKey{}, &call{caller: c, sel: sel}), done, nil
}

// limits counts a call against its caller's request rate and, for a
// stream, its stream limit; done gives the stream's place back. Over a
// limit the answer is Unavailable, the code the Workload Endpoint spec
// gives for a server that cannot serve now (clients such as go-spiffe's
// retry it with backoff).
func (s *Server) limits(ctx context.Context, method string, stream bool) (*callerid.Caller, func(), error) {
	c, ok := callerid.FromContext(ctx)
	if !ok {
		return nil, nil, status.Error(codes.Internal, "caller credentials missing")
	}
	lim := s.limit(c.UID)
	if !lim.allow() {
		s.Stats.Limited.Add(1)
		s.log.Warn("workload API caller over its request rate", "method", method, "uid", c.UID, "pid", c.PID)
		return nil, nil, status.Error(codes.Unavailable, "too many requests")
	}
	done := func() {}
	if stream {
		if !lim.openStream(s.opts.Limits.StreamsPerCaller) {
			s.Stats.Limited.Add(1)
			s.log.Warn("workload API caller over its stream limit", "method", method, "uid", c.UID, "pid", c.PID)
			return nil, nil, status.Error(codes.Unavailable, "too many streams")
		}
		s.Stats.Streams.Add(1)
		done = func() { lim.closeStream(); s.Stats.Streams.Add(-1) }
	}
	return c, done, nil
}

// still re-checks a caller before an answer or a pushed message leaves:
// it is alive and runs the executable it connected with (a poll and a
// stat; its selectors came from that executable). Pushes name the
// snapshot they carry (snap), so that a rotation fanned out to many
// streams of one caller checks it once (Caller.VerifyOnce).
func (s *Server) still(c *call, method string, snap *cache.Snapshot) error {
	check := c.caller.Verify
	if snap != nil {
		check = func() error { return c.caller.VerifyOnce(snap) }
	}
	if err := check(); err != nil {
		s.Stats.AttestFailures.Add(1)
		s.log.Warn("workload API caller changed: nothing more sent", "method", method, "uid", c.caller.UID,
			"pid", c.caller.PID, "exe", c.caller.ExePath(), "err", err)
		return status.Error(codes.PermissionDenied, "workload attestation failed")
	}
	return nil
}

// admitConn counts a new connection against its uid's and the total
// caps; the release it returns gives the place back.
func (s *Server) admitConn(uid uint32, pid int32) (func(), error) {
	lim := s.limit(uid)
	s.mu.Lock()
	why := ""
	switch {
	case s.conns >= s.opts.Limits.Connections:
		why = "the agent's connection cap is reached"
	case lim.conns >= s.opts.Limits.ConnectionsPerCaller:
		why = "the uid's connection cap is reached"
	default:
		s.conns++
		lim.conns++
	}
	s.mu.Unlock()
	if why != "" {
		s.Stats.ConnRefused.Add(1)
		// A flood must not become a flood of log lines: one a second.
		now := time.Now().UnixNano()
		if last := s.lastRefusalLog.Load(); now-last >= int64(time.Second) && s.lastRefusalLog.CompareAndSwap(last, now) {
			s.log.Warn("workload API connection refused", "uid", uid, "pid", pid, "reason", why,
				"per_uid_cap", s.opts.Limits.ConnectionsPerCaller, "total_cap", s.opts.Limits.Connections,
				"refused_total", s.Stats.ConnRefused.Load())
		}
		return nil, errors.New(why)
	}
	s.Stats.Connections.Add(1)
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.conns--
			lim.conns--
			s.mu.Unlock()
			s.Stats.Connections.Add(-1)
		})
	}, nil
}

func (s *Server) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, done, err := s.admit(ctx, info.FullMethod, false)
	if err != nil {
		return nil, err
	}
	defer done()
	resp, err := h(ctx, req)
	if err != nil {
		return nil, err
	}
	// A JWT-SVID fetch waits on the appliance: the caller may have
	// exec'd or exited meanwhile, and the answer is a credential.
	if info.FullMethod == workload.SpiffeWorkloadAPI_FetchJWTSVID_FullMethodName {
		if err := s.still(callOf(ctx), info.FullMethod, nil); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

type wrapped struct {
	grpc.ServerStream
	ctx context.Context
}

func (w wrapped) Context() context.Context { return w.ctx }

func (s *Server) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if reflectionMethods[info.FullMethod] {
		_, done, err := s.limits(ss.Context(), info.FullMethod, true)
		if err != nil {
			return err
		}
		defer done()
		return h(srv, ss)
	}
	ctx, done, err := s.admit(ss.Context(), info.FullMethod, true)
	if err != nil {
		return err
	}
	defer done()
	return h(srv, wrapped{ss, ctx})
}

func callOf(ctx context.Context) *call { return ctx.Value(callerKey{}).(*call) }

// deny logs why a caller gets nothing and returns the generic error.
func (s *Server) deny(c *call, method, why string) error {
	s.Stats.Denied.Add(1)
	s.log.Warn("workload API request denied", "method", method, "uid", c.caller.UID, "gid", c.caller.GID,
		"pid", c.caller.PID, "selectors", c.sel.List(), "reason", why)
	return status.Error(codes.PermissionDenied, "no identity issued")
}

// FetchX509SVID sends the caller's SVIDs at once and again on every
// change. While the caller's entries exist but no SVID has been signed yet
// (the agent just started, the appliance is away), the stream waits.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	c := callOf(ctx)
	var last [32]byte
	first := true
	for {
		snap, changed := s.src.Current()
		entries := snap.Match(c.sel.Has)
		if len(entries) == 0 {
			return s.deny(c, "FetchX509SVID", "no registration entry matches the caller's selectors")
		}
		entries = s.uniqueHints(snap, entries)
		now := time.Now()
		svids := snap.SVIDsFor(entries, now)
		var expiry <-chan time.Time
		if len(svids) > 0 && snap.Bundle != nil {
			// The root CRLs go with the SVIDs (the response's crl field):
			// a workload that verifies peers' chains against the bundle
			// also refuses the node CAs the root revoked.
			resp := &workload.X509SVIDResponse{Crl: snap.RootCRLs}
			roots := rootsDER(snap)
			soonest := svids[0].NotAfter
			for _, v := range svids {
				resp.Svids = append(resp.Svids, &workload.X509SVID{
					SpiffeId: v.SPIFFEID, X509Svid: v.ChainDER, X509SvidKey: v.KeyDER, Bundle: roots, Hint: v.Hint,
				})
				soonest = minTime(soonest, v.NotAfter)
			}
			// The foreign trust domains of the SVIDs sent, not of every
			// matching entry: an entry whose SVID is not served yet
			// must not widen what the caller's peers are trusted as.
			if len(snap.Federated) > 0 {
				resp.FederatedBundles = x509Bundles(snap.FederatedFor(entriesOf(entries, svids)))
			}
			fp := fingerprint(resp.Svids, roots, resp.Crl, resp.FederatedBundles)
			if first || fp != last {
				if err := s.still(c, "FetchX509SVID", snap); err != nil {
					return err
				}
				if err := stream.Send(resp); err != nil {
					return err
				}
				if first {
					s.log.Debug("X.509-SVIDs served", "uid", c.caller.UID, "pid", c.caller.PID, "svids", len(svids))
				}
				first, last = false, fp
			}
			// An SVID that expires unrenewed must leave the stream.
			expiry = time.After(time.Until(soonest) + time.Millisecond)
		} else if !first && len(svids) == 0 {
			return s.deny(c, "FetchX509SVID", "every SVID of the caller expired and none could be renewed")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-expiry:
		}
	}
}

// uniqueHints drops every entry whose hint an earlier one of entries
// already has: the Workload API spec requires the hints of one response
// to be unique. entries are in the cache's match order (oldest entry
// first), so a hint always stands for its oldest entry, and adding an
// entry never changes what a hint names. The choice is made on entries,
// not on the SVIDs sent: while the oldest entry's SVID is being signed,
// its hint is absent rather than naming another identity for a while.
// An empty hint is no hint and is never a duplicate.
func (s *Server) uniqueHints(snap *cache.Snapshot, entries []api.Entry) []api.Entry {
	var first map[string]string // hint -> the entry that has it
	var out []api.Entry         // nil until the first duplicate
	for i, e := range entries {
		if e.Hint != "" {
			if first == nil {
				first = map[string]string{}
			}
			if kept, dup := first[e.Hint]; dup {
				s.logDuplicateHint(snap.Revision, e, kept)
				if out == nil {
					out = slices.Clone(entries[:i])
				}
				continue
			}
			first[e.Hint] = e.ID
		}
		if out != nil {
			out = append(out, e)
		}
	}
	if out == nil {
		return entries
	}
	return out
}

// logDuplicateHint says at debug level that dropped was left out for
// kept's hint, once per appliance view (a change of entries is a new
// revision), not on every call.
func (s *Server) logDuplicateHint(rev uint64, dropped api.Entry, kept string) {
	s.dupMu.Lock()
	if s.dupRev != rev || s.dupSeen == nil {
		s.dupRev, s.dupSeen = rev, map[[2]string]bool{}
	}
	key := [2]string{dropped.ID, kept}
	seen := s.dupSeen[key]
	s.dupSeen[key] = true
	s.dupMu.Unlock()
	if !seen {
		s.log.Debug("entry left out of Workload API responses: an older entry matching the same callers has its hint",
			"entry", dropped.ID, "spiffe_id", dropped.SPIFFEID, "hint", dropped.Hint, "kept_entry", kept, "revision", rev)
	}
}

func fingerprint(svids []*workload.X509SVID, roots []byte, crls [][]byte, federated map[string][]byte) [32]byte {
	h := sha256.New()
	for _, v := range svids {
		h.Write(v.X509Svid)
		h.Write([]byte(v.Hint))
	}
	h.Write(roots)
	// Lengths keep one list of CRLs from hashing like another.
	for _, c := range crls {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(c))))
		h.Write(c)
	}
	h.Write(bundlesKey(federated))
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// bundlesKey is a byte string that changes when any bundle of m changes,
// is added or leaves (sorted, length-prefixed: one map never encodes
// like another).
func bundlesKey(m map[string][]byte) []byte {
	var out []byte
	for _, td := range slices.Sorted(maps.Keys(m)) {
		out = binary.BigEndian.AppendUint32(out, uint32(len(td)))
		out = append(out, td...)
		out = binary.BigEndian.AppendUint32(out, uint32(len(m[td])))
		out = append(out, m[td]...)
	}
	return out
}

// entriesOf returns the entries of svids (which SVIDsFor took from
// entries).
func entriesOf(entries []api.Entry, svids []*cache.SVID) []api.Entry {
	served := make(map[string]bool, len(svids))
	for _, v := range svids {
		served[v.EntryID] = true
	}
	return slices.DeleteFunc(slices.Clone(entries), func(e api.Entry) bool { return !served[e.ID] })
}

// x509Bundles renders foreign bundles as the Workload API carries them:
// each trust domain's X.509 authorities, DER concatenated, under the
// trust domain's SPIFFE ID. A bundle without X.509 authorities (JWT
// only) is left out: it has nothing to verify a chain with.
func x509Bundles(fed map[spiffeid.TrustDomain]*spiffebundle.Bundle) map[string][]byte {
	var out map[string][]byte
	for td, b := range fed {
		der := authoritiesDER(b)
		if len(der) == 0 {
			continue
		}
		if out == nil {
			out = map[string][]byte{}
		}
		out[td.IDString()] = der
	}
	return out
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

func rootsDER(s *cache.Snapshot) []byte { return authoritiesDER(s.Bundle) }

func authoritiesDER(b *spiffebundle.Bundle) []byte {
	var out []byte
	for _, c := range b.X509Authorities() {
		out = append(out, c.Raw...)
	}
	return out
}

// verifier admits callers that may read bundles and validate tokens, and
// returns the caller's entries: the foreign trust domains they federate
// with are the ones the caller gets bundles of (an unauthenticated
// verifier, with none, gets our trust domain's only).
func (s *Server) verifier(c *call, snap *cache.Snapshot, method string) ([]api.Entry, error) {
	entries := snap.Match(c.sel.Has)
	if s.opts.AllowUnauthenticatedVerifiers || len(entries) > 0 {
		return entries, nil
	}
	return nil, s.deny(c, method, "no registration entry matches the caller's selectors (unauthenticated verifiers not allowed)")
}

// waitBundle returns the first snapshot that has a bundle.
func (s *Server) waitBundle(ctx context.Context) (*cache.Snapshot, <-chan struct{}, error) {
	for {
		snap, changed := s.src.Current()
		if snap.Bundle != nil {
			return snap, changed, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-changed:
		}
	}
}

// FetchX509Bundles streams the X.509 authorities of our trust domain and
// of every foreign one the caller's entries federate with, and the root
// CRLs, at once and again whenever any of them changes.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	return s.streamBundles(stream.Context(), "FetchX509Bundles",
		func(snap *cache.Snapshot, entries []api.Entry) (map[string][]byte, [][]byte, error) {
			m := x509Bundles(snap.FederatedFor(entries))
			if m == nil {
				m = map[string][]byte{}
			}
			m[snap.Bundle.TrustDomain().IDString()] = rootsDER(snap)
			return m, snap.RootCRLs, nil
		},
		func(bundles map[string][]byte, crls [][]byte) error {
			return stream.Send(&workload.X509BundlesResponse{Bundles: bundles, Crl: crls})
		})
}

// FetchJWTBundles streams, as JWKS, the JWT authorities of our trust
// domain and of every foreign one the caller's entries federate with.
func (s *Server) FetchJWTBundles(_ *workload.JWTBundlesRequest, stream grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	return s.streamBundles(stream.Context(), "FetchJWTBundles",
		func(snap *cache.Snapshot, entries []api.Entry) (map[string][]byte, [][]byte, error) {
			m := map[string][]byte{}
			for td, b := range snap.FederatedFor(entries) {
				if len(b.JWTAuthorities()) == 0 {
					continue // X.509 only: no key to verify a token with
				}
				jwks, err := b.JWTBundle().Marshal()
				if err != nil {
					return nil, nil, err
				}
				m[td.IDString()] = jwks
			}
			jwks, err := snap.Bundle.JWTBundle().Marshal()
			if err != nil {
				return nil, nil, err
			}
			m[snap.Bundle.TrustDomain().IDString()] = jwks
			return m, nil, nil
		},
		func(bundles map[string][]byte, _ [][]byte) error {
			return stream.Send(&workload.JWTBundlesResponse{Bundles: bundles})
		})
}

// streamBundles sends one rendering of the caller's bundles at once and
// again whenever it changes (our bundle, a foreign one, the caller's
// entries federating with other trust domains, the CRLs), to callers the
// verifier rule admits.
func (s *Server) streamBundles(ctx context.Context, method string,
	render func(*cache.Snapshot, []api.Entry) (map[string][]byte, [][]byte, error),
	send func(bundles map[string][]byte, crls [][]byte) error,
) error {
	c := callOf(ctx)
	var last []byte
	for {
		snap, changed, err := s.waitBundle(ctx)
		if err != nil {
			return nil
		}
		entries, err := s.verifier(c, snap, method)
		if err != nil {
			return err
		}
		bundles, crls, err := render(snap, entries)
		if err != nil {
			return status.Error(codes.Internal, "bundle unavailable")
		}
		key := bundlesKey(bundles)
		for _, crl := range crls {
			key = binary.BigEndian.AppendUint32(key, uint32(len(crl)))
			key = append(key, crl...)
		}
		if last == nil || !bytes.Equal(key, last) {
			if err := s.still(c, method, snap); err != nil {
				return err
			}
			if err := send(bundles, crls); err != nil {
				return err
			}
			last = key
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// FetchJWTSVID returns a JWT-SVID for each of the caller's identities (or
// the one it names), signed by the appliance for the given audience.
func (s *Server) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	c := callOf(ctx)
	if len(req.Audience) == 0 || slices.Contains(req.Audience, "") {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.SpiffeId != "" {
		if _, err := spiffeid.FromString(req.SpiffeId); err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "spiffe_id %q: %v", req.SpiffeId, err)
		}
	}
	snap, _ := s.src.Current()
	entries := snap.Match(c.sel.Has)
	if req.SpiffeId != "" {
		entries = slices.DeleteFunc(entries, func(e api.Entry) bool { return e.SPIFFEID != req.SpiffeId })
	}
	if len(entries) == 0 {
		return nil, s.deny(c, "FetchJWTSVID", fmt.Sprintf("no registration entry for %q matches the caller's selectors", req.SpiffeId))
	}
	entries = s.uniqueHints(snap, entries)
	resp := &workload.JWTSVIDResponse{}
	seen := map[string]bool{}
	for _, e := range entries {
		if seen[e.SPIFFEID] {
			continue
		}
		seen[e.SPIFFEID] = true
		tok, _, err := s.src.JWTSVID(ctx, e, req.Audience)
		if err != nil {
			s.log.Warn("JWT-SVID not available", "entry", e.ID, "spiffe_id", e.SPIFFEID, "uid", c.caller.UID, "pid", c.caller.PID, "err", err)
			return nil, status.Error(codes.Unavailable, "could not fetch JWT-SVID")
		}
		resp.Svids = append(resp.Svids, &workload.JWTSVID{SpiffeId: e.SPIFFEID, Svid: tok, Hint: e.Hint})
	}
	return resp, nil
}

// ValidateJWTSVID checks a token against the JWT bundle of its trust
// domain: ours, or a foreign one the caller's entries federate with.
func (s *Server) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	c := callOf(ctx)
	if req.Audience == "" {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	if req.Svid == "" {
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	snap, _ := s.src.Current()
	if snap.Bundle == nil {
		return nil, status.Error(codes.Unavailable, "no trust bundle yet")
	}
	entries, err := s.verifier(c, snap, "ValidateJWTSVID")
	if err != nil {
		return nil, err
	}
	// Tokens of a foreign trust domain validate only for a caller whose
	// entries federate with it; any other is refused as having no bundle.
	set := jwtbundle.NewSet(snap.Bundle.JWTBundle())
	for _, b := range snap.FederatedFor(entries) {
		set.Add(b.JWTBundle())
	}
	svid, err := jwtsvid.ParseAndValidate(req.Svid, set, []string{req.Audience})
	if err != nil {
		s.log.Info("JWT-SVID failed validation", "uid", c.caller.UID, "pid", c.caller.PID, "err", err)
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	claims, err := toStruct(svid.Claims)
	if err != nil {
		return nil, status.Error(codes.Internal, "claims not representable")
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// toStruct goes through JSON so every claim type is one structpb knows.
func toStruct(m map[string]any) (*structpb.Struct, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	var plain map[string]any
	if err := json.Unmarshal(b, &plain); err != nil {
		return nil, err
	}
	return structpb.NewStruct(plain)
}

// callerLimit is a token bucket plus a stream count for one uid.
type callerLimit struct {
	mu      sync.Mutex
	rate    float64
	burst   float64
	tokens  float64
	last    time.Time
	streams int
	conns   int // guarded by Server.mu
}

func (s *Server) limit(uid uint32) *callerLimit {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.callers[uid]
	if l == nil {
		l = &callerLimit{rate: s.opts.Limits.RequestsPerSecond, burst: float64(s.opts.Limits.Burst),
			tokens: float64(s.opts.Limits.Burst), last: time.Now()}
		s.callers[uid] = l
	}
	return l
}

func (l *callerLimit) allow() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	l.tokens = min(l.burst, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}

func (l *callerLimit) openStream(max int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.streams >= max {
		return false
	}
	l.streams++
	return true
}

func (l *callerLimit) closeStream() {
	l.mu.Lock()
	l.streams--
	l.mu.Unlock()
}
