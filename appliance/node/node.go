// Package node is one sigild appliance node: it opens the node's issuing CA
// in its HSM, joins the raft cluster over mutual TLS with the node's SPIFFE
// identity, applies the replicated state, and serves the appliance's API
// and its HTTP health, metrics and bundle endpoints.
//
// It owns:
//   - Node (node.go): start-up, wiring and shutdown, and raftMember, the
//     raft member as the services use it (commands, reads, leader known).
//   - Issuance (issuance.go): the issuer, the one place that signs
//     identities for agents (workload X.509-SVIDs and JWT-SVIDs, the
//     agents' own SVIDs) and records each through raft before it is sent.
//     Its dependencies are interfaces declared there.
//   - The gRPC services, each given what it uses rather than the Node:
//     agentSvc (agentsvc.go; joined agents: issuance calls and the sync
//     stream), joinSvc (join.go, joinlimit.go; TPM and token joins,
//     renewals), admin (admin.go, revocation.go; mutual TLS for admins, a
//     root-only Unix socket on the host).
//   - Authentication and authorization of API callers (auth.go), the
//     listeners' connection and call bounds (limits.go), and anonymous
//     refusals summarized into the audit (refusals.go).
//   - The audit's batching of issuance records (auditbatch.go), its
//     signed checkpoints (checkpoint.go) and retention (retention.go).
//   - The wiring of the CA's JWT key rotation to the HSM and the
//     replicated bundle (jwtkeys.go); signing and rotation are
//     appliance/ca's.
//   - Root CRLs and this node's CRL (revocation.go, crl.go), the HTTP and
//     bundle endpoints and metrics (http.go; the services' counters, peer
//     reachability, expiries and the once-per-period audit of banned
//     agents in metrics.go), conversions between state and API types
//     (convert.go), and the node's configuration (config.go).
//   - The OIDC listener (oidc.go): jwt.issuer's discovery document and
//     JWKS for cloud token services, over the operator's certificate.
package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	"github.com/sigil-appliance/sigil/raft"
)

// Node is a running appliance node.
type Node struct {
	// pendingAcks is the rotation's pending agents as the metric counts
	// them (rootrotation.go).
	pendingAcks pendingCount
	seen        seenAgents // agentseen.go
	cfg         *Config
	log         *slog.Logger
	td          spiffeid.TrustDomain
	roots       []*x509.Certificate

	ks    *pkcs11.KeyStore
	auth  *ca.Authority
	ident *ca.NodeIdentity
	fsm   *state.FSM
	raft  *raft.Node

	apiLn    net.Listener
	localLn  net.Listener
	grpc     *grpc.Server
	local    *grpc.Server
	http     *http.Server
	httpLn   net.Listener
	bundle   *http.Server
	bundleLn net.Listener
	oidc     *http.Server // http.oidc-listen (oidc.go)
	oidcLn   net.Listener
	metrics  *metrics
	batch    *auditBatcher
	refusals *refusals // anonymous join refusals, summarized (refusals.go)
	jwt      *ca.JWTKeys
	issuer   *issuer            // X.509- and JWT-SVIDs for agents (issuance.go)
	fed      *federationFetcher // the leader's fetches of foreign bundles (federation.go)
	crls     crlCache
	renew    *issuingRenewal // issuingcert.go

	// Connection and call bounds of the listeners (limits.go).
	apiLim, httpLim, bundleLim, oidcLim *connLimiter
	gate                                *tapGate
	// authLog logs refusals of authenticated callers (auth.go), which
	// they can repeat at will, at most once a second per reason.
	authLog *rateLog

	stop     context.CancelFunc
	wg       sync.WaitGroup
	stopOnce sync.Once
}

// raftFSM adapts the state machine to the raft package. Apply(index,
// origin, cmd), AppliedIndex and Restore are state.FSM's own; only
// Snapshot needs its return type converted.
type raftFSM struct{ *state.FSM }

var _ raft.FSM = raftFSM{}

func (r raftFSM) Snapshot() (raft.Snapshot, error) { return r.FSM.Snapshot() }

// Start opens the HSM, raft and the listeners. It fails closed: any problem
// with keys, certificates or listeners stops the node before it serves.
func Start(ctx context.Context, cfg *Config, log *slog.Logger) (*Node, error) {
	if log == nil {
		log = slog.Default()
	}
	log = log.With("node", cfg.NodeID)
	n := &Node{cfg: cfg, log: log, td: spiffeid.RequireTrustDomainFromString(cfg.TrustDomain)}
	ok := false
	defer func() {
		if !ok {
			// Start's own error is the one to return; Stop's is logged.
			if err := n.StopBecause("start failed"); err != nil {
				log.Warn("stop after failed start", "err", err)
			}
		}
	}()

	issuing, err := pemfile.ReadCert(cfg.IssuingCert)
	if err != nil {
		return nil, fmt.Errorf("issuing-cert: %w", err)
	}
	for _, p := range cfg.RootCerts {
		r, err := pemfile.ReadCert(p)
		if err != nil {
			return nil, fmt.Errorf("root-certs: %w", err)
		}
		n.roots = append(n.roots, r)
	}
	// The roots the bundle had when this node last ran count too: after a
	// rotation they are what the cluster trusts (rootrotation.go).
	kept, err := KeptRoots(cfg.DataDir)
	if err != nil {
		log.Warn("the roots kept from the bundle are unreadable; starting with root-certs only", "err", err)
	}
	startWith := startRoots(n.roots, kept)
	n.ks = pkcs11.New(pkcs11.Options{Logger: log})
	signer, err := n.ks.Signer(ctx, cfg.IssuingKey)
	if err != nil {
		return nil, fmt.Errorf("issuing CA key: %w", err)
	}
	// An issuing certificate installed while the node ran, kept in the
	// data directory, when it is valid and newer (issuingcert.go).
	issuing = startIssuing(log, cfg.DataDir, n.td, cfg.NodeID, signer, issuing, startWith, kept, time.Now())
	if n.auth, err = ca.New(n.td, cfg.NodeID, signer, issuing, startWith, nil); err != nil {
		return nil, err
	}
	if n.ident, err = ca.NewNodeIdentity(n.auth, 24*time.Hour); err != nil {
		return nil, fmt.Errorf("node TLS identity: %w", err)
	}
	log.Info("issuing CA opened", "issuing_ca", issuing.Subject.String(), "not_after", issuing.NotAfter)

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	n.fsm, err = state.Open(n.td, state.Options{
		Path:      n.statePath(),
		NodeID:    cfg.NodeID,
		Logger:    log,
		ExportDir: n.auditExportDir(),
		// The default applies when a test builds a Config by hand.
		SnapshotRate: int64(max(cfg.Cluster.SnapshotRateMiB, 0)) << 20,
		SignHead: func(digest []byte) ([]byte, []byte, error) {
			sig, err := n.auth.SignCheckpoint(digest)
			return sig, n.auth.Issuing().Raw, err
		},
	})
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	n.auth.SetRevocationCheck(n.rootCRLCheck(), log) // root CRLs (revocation.go)
	n.auth.SetLogger(log)
	n.raft, err = raft.New(ctx, raft.Config{
		NodeID:        cfg.NodeID,
		BindAddr:      cfg.Cluster.Bind,
		AdvertiseAddr: cfg.Cluster.Advertise,
		DataDir:       filepath.Join(cfg.DataDir, "raft"),
		TLS:           n.ident.TLSConfig(ca.RoleNode),
		PeerNodeID: func(cs tls.ConnectionState) (string, error) {
			p, err := n.auth.PeerFromState(cs)
			if err != nil {
				return "", err
			}
			if p.Role != ca.RoleNode {
				return "", fmt.Errorf("%s is not a node", p.ID)
			}
			return p.Name, nil
		},
		Logger:           log,
		HeartbeatTimeout: cfg.Cluster.HeartbeatTimeout.Duration,
		ElectionTimeout:  cfg.Cluster.ElectionTimeout.Duration,
	}, raftFSM{n.fsm})
	if err != nil {
		return nil, fmt.Errorf("raft: %w", err)
	}
	n.metrics = newMetrics(n)
	n.metrics.reg.MustRegister(peersReachable(n)) // raftreach.go

	runCtx, cancel := context.WithCancel(context.Background())
	n.stop = cancel
	member := n.member()
	n.batch = newAuditBatcher(member, n.actor())
	n.jwt = n.auth.JWTKeys(ca.JWTConfig{
		Keys:         n.ks,
		Publisher:    jwtBundle{state: n.fsm, apply: member, actor: n.actor()},
		KeyURI:       jwtKeyURI(cfg.IssuingKey),
		Algorithm:    cfg.JWTKeyAlgorithm(),
		Rotate:       cfg.JWT.RotateEvery.Duration,
		MaxTokenLife: state.MaxJWTTTL,
		Ready:        member.leaderKnown,
		Logger:       log,
	})
	n.renew = &issuingRenewal{dir: InstalledIssuingDir(cfg.DataDir), auth: n.auth, ident: n.ident, jwt: n.jwt,
		state: n.fsm, member: member, actor: n.actor(), log: log, dataDir: cfg.DataDir, configured: cfg.IssuingCert}
	bans := newBannedAudit()
	n.issuer = &issuer{nodeID: cfg.NodeID, actor: n.actor(), agentTTL: cfg.Join.AgentSVIDTTL.Duration, log: log, jwtIssuer: cfg.JWT.Issuer,
		state: n.fsm, apply: member, quorum: member, audit: n.batch, x509: n.auth, jwt: jwtKeys{n.jwt},
		m: n.metrics.ops, bans: bans}
	n.wg.Add(3)
	go func() { defer n.wg.Done(); n.batch.run(runCtx) }()
	go func() { defer n.wg.Done(); n.jwt.Maintain(runCtx) }()
	go func() { defer n.wg.Done(); n.watchRootCRLs(runCtx) }() // revocation.go
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.renew.showLoop(runCtx) }() // issuingcert.go
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.renew.rotationLoop(runCtx) }() // rootrotation.go
	n.refusals = newNodeRefusals(n)
	n.wg.Add(2)
	go func() { defer n.wg.Done(); n.refusals.run() }()
	go func() { defer n.wg.Done(); n.checkpointLoop(runCtx) }()
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.retentionLoop(runCtx) }()
	n.fed = newFederationFetcher(n)
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.fed.run(runCtx) }() // federation.go
	if cfg.Cluster.Bootstrap {
		switch err := n.raft.Bootstrap(ctx); {
		case err == nil:
			log.Info("bootstrapped a new cluster")
		case errors.Is(err, raft.ErrExistingState):
			log.Info("cluster state exists; bootstrap skipped")
		default:
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
	}
	if len(cfg.Cluster.Join) > 0 {
		n.wg.Add(1)
		go func() { defer n.wg.Done(); n.joinLoop(runCtx) }()
	}
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.bundleLoop(runCtx) }()

	// The API: admins, agents and joining agents over TLS. Calls are
	// refused by method and role before their message is read (n.gate),
	// and connections are bounded before and after the handshake.
	ln, err := net.Listen("tcp", cfg.API.Listen)
	if err != nil {
		return nil, fmt.Errorf("api.listen: %w", err)
	}
	n.apiLim = newAPIConnLimiter(cfg.API, log)
	n.apiLn = limitListener{Listener: ln, l: n.apiLim}
	n.gate = newTapGate(n.td, cfg.API, log)
	n.authLog = newRateLog(log)
	tlsCfg := n.ident.TLSConfigAllowAnonymous(ca.RoleAdmin, ca.RoleAgent)
	n.grpc = grpc.NewServer(append(append(api.ServerOptions(), grpcLimitOptions(cfg.API)...),
		grpc.Creds(limitCreds{credentials.NewTLS(tlsCfg)}),
		grpc.InTapHandle(n.gate.tap),
		grpc.ChainUnaryInterceptor(n.authenticate),
		grpc.ChainStreamInterceptor(n.authenticateStream))...)
	api.RegisterAdmin(n.grpc, n.adminSvc())
	api.RegisterAgent(n.grpc, &agentSvc{td: n.td, state: n.fsm, issuer: n.issuer})
	api.RegisterJoin(n.grpc, newJoinSvc(joinDeps{td: n.td, disableTokens: cfg.Join.DisableTokens, actor: n.actor(), log: log,
		state: n.fsm, apply: member, quorum: member, audit: n.batch, anon: n.refusals, issuer: n.issuer,
		m: n.metrics.ops, bans: bans}, n.metrics.reg))
	n.serve(func() error { return n.grpc.Serve(n.apiLn) })

	if cfg.API.LocalSocket != "" {
		if n.localLn, err = listenLocal(cfg.API.LocalSocket); err != nil {
			return nil, fmt.Errorf("api.local-socket: %w", err)
		}
		// Root only (0600): no connection cap, the same timeouts and
		// message bounds.
		n.local = grpc.NewServer(append(append(api.ServerOptions(), grpcLimitOptions(cfg.API)...),
			grpc.Creds(api.LocalCredentials()),
			grpc.ChainUnaryInterceptor(n.authenticateLocal),
			grpc.ChainStreamInterceptor(n.authenticateLocalStream))...)
		api.RegisterAdmin(n.local, n.adminSvc())
		n.serve(func() error { return n.local.Serve(n.localLn) })
	}

	if cfg.HTTP.Listen != "" {
		ln, err := net.Listen("tcp", cfg.HTTP.Listen)
		if err != nil {
			return nil, fmt.Errorf("http.listen: %w", err)
		}
		n.httpLim = newConnLimiter("http", httpMaxConns, httpMaxHandshakes, 0, log)
		n.httpLn = limitListener{Listener: ln, l: n.httpLim}
		n.http = newHTTPServer(n.log.With("listener", "http"), n.httpHandler(), n.httpLim, nil)
		n.serve(func() error {
			if err := n.http.Serve(n.httpLn); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	if cfg.Bundle.Listen != "" {
		ln, err := net.Listen("tcp", cfg.Bundle.Listen)
		if err != nil {
			return nil, fmt.Errorf("bundle.listen: %w", err)
		}
		n.bundleLim = newConnLimiter("bundle", httpMaxConns, httpMaxHandshakes, 0, log)
		n.bundleLn = limitListener{Listener: ln, l: n.bundleLim}
		bcfg := &tls.Config{MinVersion: tls.VersionTLS12,
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return n.ident.Certificate() }}
		n.bundle = newHTTPServer(n.log.With("listener", "bundle"), n.bundleHandler(), n.bundleLim, bcfg)
		n.serve(func() error {
			if err := n.bundle.ServeTLS(n.bundleLn, "", ""); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	if cfg.HTTP.OIDCListen != "" {
		if err := n.startOIDC(ctx); err != nil {
			return nil, err
		}
	}
	log.Info("node started", "raft", n.raft.Addr(), "api", n.apiLn.Addr().String())
	ok = true
	return n, nil
}

func (n *Node) serve(fn func() error) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		if err := fn(); err != nil {
			n.log.Error("listener stopped", "err", err)
		}
	}()
}

// joinLoop asks the configured members to add this node until one does.
func (n *Node) joinLoop(ctx context.Context) {
	backoff := 200 * time.Millisecond
	for {
		if st := n.raft.Status(ctx); st.LeaderID != "" && memberOf(st, n.cfg.NodeID) {
			return
		}
		for _, addr := range n.cfg.Cluster.Join {
			jctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := n.raft.JoinCluster(jctx, addr)
			cancel()
			if err == nil {
				n.log.Info("joined the cluster", "via", addr)
				return
			}
			n.log.Warn("join failed", "via", addr, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func memberOf(st raft.Status, id string) bool {
	for _, p := range st.Peers {
		if p.ID == id {
			return true
		}
	}
	return false
}

// bundleLoop puts the configured roots into the replicated trust bundle
// once a leader exists and the bundle has none (a new cluster).
func (n *Node) bundleLoop(ctx context.Context) {
	for {
		if len(n.fsm.Bundle().Roots) > 0 {
			return
		}
		if n.raft.IsLeader() {
			var ders [][]byte
			for _, r := range n.roots {
				ders = append(ders, r.Raw)
			}
			if _, err := n.apply(ctx, n.actor(), state.CmdBundleSetRoots, state.BundleRoots{Roots: ders}); err != nil {
				n.log.Warn("setting the trust bundle roots failed", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-n.fsm.Changed():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// raftReady reports whether a leader is known.
func (n *Node) raftReady() bool { return n.member().leaderKnown() }

// JWTRotate makes and publishes a new JWT key now, unbounded (tests;
// operators rotate through the admin API, JWTKeyRotate).
func (n *Node) JWTRotate(ctx context.Context) (string, error) { return n.jwt.Rotate(ctx) }

// BundleAddr is the bundle endpoint's address, if configured.
func (n *Node) BundleAddr() string {
	if n.bundleLn == nil {
		return ""
	}
	return n.bundleLn.Addr().String()
}

// OIDCAddr is the OIDC listener's address, if configured.
func (n *Node) OIDCAddr() string {
	if n.oidcLn == nil {
		return ""
	}
	return n.oidcLn.Addr().String()
}

// actor is how this node appears in audit records.
func (n *Node) actor() string { return ca.NodeSPIFFEID(n.td, n.cfg.NodeID).String() }

// apply proposes a command and returns the FSM's response.
func (n *Node) apply(ctx context.Context, actor, typ string, payload any) ([]byte, error) {
	return n.member().apply(ctx, actor, typ, payload)
}

// member is this node's raft member as the services use it.
func (n *Node) member() raftMember { return raftMember{raft: n.raft, metrics: n.metrics} }

// raftMember is a raft member as the services use it: commands proposed
// (timed in the metrics), linearizable reads, whether a leader is known.
type raftMember struct {
	raft    *raft.Node
	metrics *metrics
}

func (m raftMember) apply(ctx context.Context, actor, typ string, payload any) ([]byte, error) {
	cmd, err := state.NewCommand(typ, actor, time.Now(), payload)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	resp, err := m.raft.Apply(ctx, cmd)
	m.metrics.observeApply(typ, time.Since(start), err)
	return resp, err
}

func (m raftMember) readIndex(ctx context.Context) error { return m.raft.ReadIndex(ctx) }

func (m raftMember) leaderKnown() bool {
	return m.raft.LeaderID() != ""
}

// Addrs are the bound addresses (useful with :0 in tests).
func (n *Node) RaftAddr() string { return n.raft.Addr() }
func (n *Node) APIAddr() string  { return n.apiLn.Addr().String() }
func (n *Node) HTTPAddr() string {
	if n.httpLn == nil {
		return ""
	}
	return n.httpLn.Addr().String()
}

// Authority is the node's CA (tests issue admin certificates with it).
func (n *Node) Authority() *ca.Authority { return n.auth }

// State is the node's replica (read-only use).
func (n *Node) State() *state.FSM { return n.fsm }

// Raft is the node's raft member.
func (n *Node) Raft() *raft.Node { return n.raft }

// Stop shuts the node down: API first, then raft, then the HSM. Each
// step runs whatever the one before it did; a step that fails is logged.
func (n *Node) Stop() error { return n.StopBecause("stop requested") }

// StopBecause is Stop with the reason the last log line gives ("signal
// terminated", "start failed"): the line an operator looks for after a
// node went away.
func (n *Node) StopBecause(reason string) error {
	n.stopOnce.Do(func() {
		start := time.Now()
		n.log.Info("sigild stopping", "reason", reason)
		defer func() {
			n.log.Info("sigild stopped", "reason", reason, "seconds", time.Since(start).Seconds())
		}()
		// A listener the gRPC or HTTP server already closed reports
		// net.ErrClosed when closed again: that is not a failure.
		closed := func(what string, err error) {
			if err != nil && !errors.Is(err, net.ErrClosed) {
				n.log.Warn(what+" close", "err", err)
			}
		}
		if n.stop != nil {
			n.stop()
		}
		if n.grpc != nil {
			n.grpc.Stop()
		}
		if n.local != nil {
			n.local.Stop()
		}
		if n.http != nil {
			closed("http server", n.http.Close())
		}
		if n.bundle != nil {
			closed("bundle server", n.bundle.Close())
		}
		if n.oidc != nil {
			closed("oidc server", n.oidc.Close())
		}
		for _, ln := range []net.Listener{n.apiLn, n.localLn, n.httpLn, n.bundleLn, n.oidcLn} {
			if ln != nil {
				closed("listener "+ln.Addr().String(), ln.Close())
			}
		}
		if n.refusals != nil {
			n.refusals.close() // the last refusal summary, while raft runs
		}
		if n.raft != nil {
			if err := n.raft.Shutdown(); err != nil {
				n.log.Warn("raft shutdown", "err", err)
			}
		}
		n.wg.Wait()
		if n.fsm != nil {
			if err := n.fsm.Close(); err != nil {
				n.log.Warn("state close", "err", err)
			}
		}
		if n.ks != nil {
			if err := n.ks.Close(); err != nil {
				n.log.Warn("key store close", "err", err)
			}
		}
	})
	return nil
}

// statePath is the replicated state's database file.
func (n *Node) statePath() string { return filepath.Join(n.cfg.DataDir, "state", "state.db") }

// auditExportDir holds the signed segments of pruned audit records.
func (n *Node) auditExportDir() string {
	if n.cfg.Audit.ExportDir != "" {
		return n.cfg.Audit.ExportDir
	}
	return filepath.Join(n.cfg.DataDir, "audit")
}

// adminSvc is the admin service over this node's state, raft member and CA.
func (n *Node) adminSvc() *admin {
	return &admin{seen: &n.seen, td: n.td, nodeID: n.cfg.NodeID, roots: n.roots, dataDir: n.cfg.DataDir, maxCertTTL: n.adminCertMaxTTL(),
		log: n.log, authLog: n.authLog, state: n.fsm, member: n.member(), ca: n.auth, jwt: n.jwt, fed: n.fed, renew: n.renew, rotation: n}
}
