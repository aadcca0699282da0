// Package agent is sigil-agent's core: the host's identity towards the
// appliance. It keeps its key in the TPM (a TSS2 blob in the data
// directory), joins by TPM attestation, stores its SVID, renews it at about
// half its lifetime over mutual TLS signed by the TPM key, and re-attests
// only when the SVID has expired or the appliance refuses to renew it.
// A host without a TPM joins with a one-time join token instead, its key
// a software key kept 0600 in the data directory (an identity it loses
// needs a new token). A pipeline run's agent (NewInMemory, for
// sigil-agent exec in agent/jobrun) keeps its key and SVID in memory only
// and is joined and renewed by its owner through JoinWith.
// It reaches the appliance only through appliance/api (and agent/join).
// On that identity it serves the SPIFFE Workload API to local workloads,
// keeps their SVIDs in sync with the appliance, writes file outputs, and
// exposes a health and metrics endpoint (Serve).
package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/agent/output"
	"github.com/sigil-appliance/sigil/agent/workload"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/logconfig"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/internal/strictyaml"
	"github.com/sigil-appliance/sigil/keystore/tpm"
)

// Config is sigil-agent's configuration.
type Config struct {
	// Servers are appliance API addresses (host:port). The agent keeps to
	// one of them (its current server) for the Sync stream, SVID signing,
	// joins and renewals, and moves to the next in list order, wrapping
	// around, when that one cannot be reached or answers that it is
	// unavailable.
	Servers []string `yaml:"servers"`
	// ServerOrder picks the first current server: "random" (the default)
	// draws one at start, so a fleet whose agents all list the same nodes
	// spreads over them instead of loading the first; "listed" starts at
	// the first listed.
	ServerOrder string `yaml:"server-order"`
	// RootCert is the trust domain's root certificate: what the agent
	// trusts until it has applied a trust bundle, whose roots it trusts
	// from then on (cache.Cache.Roots).
	RootCert string `yaml:"root-cert"`
	// DataDir holds agent.key (the TPM-wrapped key blob, 0600),
	// agent-svid.pem, and the bundle's roots and root CRLs (roots.pem,
	// root-crls.pem).
	DataDir string `yaml:"data-dir"`
	// TPM is /dev/tpmrm0 on hosts (an swtpm socket in tests).
	TPM string `yaml:"tpm"`
	// EK selects the endorsement key: rsa, ecc-p384, ecc-p256, or empty
	// for the first with a certificate.
	EK string `yaml:"ek"`
	// JoinTokenFile, on hosts without a TPM (tpm empty), holds a one-time
	// join token; the agent key is then a software key in the data dir.
	JoinTokenFile string `yaml:"join-token-file"`

	// WorkloadAPI is the SPIFFE Workload API socket served to local
	// workloads.
	WorkloadAPI WorkloadAPIConfig `yaml:"workload-api"`
	// HealthListen is a local address for /healthz, /readyz and /metrics
	// (empty: not served).
	HealthListen string `yaml:"health-listen"`
	// Outputs write SVIDs to files for workloads that cannot use the API.
	Outputs []output.Config `yaml:"outputs"`
	// Log is slog's level and format, as in sigild's config.
	Log logconfig.Config `yaml:"log"`
}

// WorkloadAPIConfig configures the Workload API socket.
type WorkloadAPIConfig struct {
	// Socket defaults to /run/sigil/agent.sock.
	Socket string `yaml:"socket"`
	// SocketMode is the socket's octal mode (default "0777": attestation,
	// not file permissions, decides what a caller gets).
	SocketMode string `yaml:"socket-mode"`
	// AllowUnauthenticatedVerifiers lets callers with no identity fetch
	// bundles and validate JWT-SVIDs.
	AllowUnauthenticatedVerifiers bool            `yaml:"allow-unauthenticated-verifiers"`
	Limits                        workload.Limits `yaml:"limits"`
}

// DefaultSocket is where workloads find the Workload API.
const DefaultSocket = "/run/sigil/agent.sock"

// ServerOrder values.
const (
	ServerOrderRandom = "random"
	ServerOrderListed = "listed"
)

// firstServer is the index of the first current server. math/rand is
// enough: the draw spreads load, nothing depends on it being unpredictable.
func (c Config) firstServer() int {
	if c.ServerOrder == ServerOrderListed {
		return 0
	}
	return mrand.IntN(len(c.Servers))
}

// Validate checks the whole configuration before anything starts and
// lists every problem it finds.
func (c Config) Validate() error { return c.validate(false) }

// validate checks c for a host agent, or with inMemory for an agent whose
// identity lives only in the process (NewInMemory): it has no data dir,
// TPM or join token file.
func (c Config) validate(inMemory bool) error {
	var p strictyaml.Problems
	for _, f := range []struct {
		name    string
		missing bool
	}{{"servers", len(c.Servers) == 0}, {"root-cert", c.RootCert == ""}, {"data-dir", c.DataDir == "" && !inMemory}} {
		if f.missing {
			p.Add(f.name, "is required")
		}
	}
	if o := c.ServerOrder; o != "" && o != ServerOrderRandom && o != ServerOrderListed {
		p.Add("server-order", "%q: want %s or %s", o, ServerOrderRandom, ServerOrderListed)
	}
	switch {
	case inMemory && (c.DataDir != "" || c.TPM != "" || c.JoinTokenFile != ""):
		p.Add("data-dir, tpm, join-token-file:", "an in-memory agent has none of them")
	case !inMemory && (c.TPM == "") == (c.JoinTokenFile == ""):
		p.Add("tpm, join-token-file:", "set exactly one (tpm on hosts with a TPM, join-token-file on hosts without)")
	}
	_, err := c.socketMode()
	p.AddErr(err)
	p.AddErr(c.WorkloadAPI.Limits.Validate())
	if c.WorkloadAPI.Socket != "" && !filepath.IsAbs(c.WorkloadAPI.Socket) {
		p.AddErr(fmt.Errorf("workload-api.socket %q: must be an absolute path", c.WorkloadAPI.Socket))
	}
	for _, o := range c.Outputs {
		p.AddErr(o.Validate())
	}
	for _, s := range c.Log.Problems() {
		p.AddErr(errors.New(s))
	}
	return p.Err("sigil-agent config")
}

func (c Config) socketMode() (os.FileMode, error) {
	if c.WorkloadAPI.SocketMode == "" {
		return 0o777, nil
	}
	m, err := strconv.ParseUint(c.WorkloadAPI.SocketMode, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("workload-api.socket-mode %q: want an octal mode such as 0770", c.WorkloadAPI.SocketMode)
	}
	return os.FileMode(m), nil
}

// Agent is a running agent identity.
type Agent struct {
	cfg Config
	log *slog.Logger
	tpm *tpm.TPM // nil for token-joined agents
	key string
	// soft is the software key of a token-joined or in-memory agent.
	soft crypto.Signer
	// inMemory: nothing is persisted and the caller keeps the identity
	// current (NewInMemory).
	inMemory bool

	mu   sync.Mutex
	svid *join.SVID
	wl   *workload.Server

	app   *appliance
	cache *cache.Cache
	// revoked wakes Run when a root CRL revoked something: the agent's
	// own SVID may be among it.
	revoked chan struct{}

	joins, renewals atomic.Int64
	outputStats     output.Stats
}

// Joins and Renewals count what the agent did, for tests and metrics.
func (a *Agent) Joins() int64    { return a.joins.Load() }
func (a *Agent) Renewals() int64 { return a.renewals.Load() }

// New opens the TPM and makes sure the agent key exists in it.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Agent, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	if cfg.TPM == "" {
		k, err := softKey(filepath.Join(cfg.DataDir, "agent-key.pem"))
		if err != nil {
			return nil, err
		}
		log.Warn("no TPM configured: the agent key is a software key on disk", "file", filepath.Join(cfg.DataDir, "agent-key.pem"))
		a := &Agent{cfg: cfg, log: log, soft: k}
		if err := a.init(); err != nil {
			return nil, err
		}
		return a, nil
	}
	t, err := tpm.Open(ctx, tpm.Config{Path: cfg.TPM, EK: cfg.EK})
	if err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: log, tpm: t, key: "tpmkey:file=" + filepath.Join(cfg.DataDir, "agent.key")}
	if err := a.init(); err != nil {
		_ = t.Close() // best effort: the init error is the one to report
		return nil, err
	}
	if err := join.EnsureKey(ctx, t, a.key); err != nil {
		_ = t.Close() // best effort: the key error is the one to report
		return nil, fmt.Errorf("agent key: %w", err)
	}
	return a, nil
}

// NewInMemory returns an agent whose identity lives only in this process,
// for a pipeline run (sigil-agent exec, package agent/jobrun): key is its
// software key, kept in memory; nothing is written (cfg has no data dir:
// no key, SVID or CRL file). The caller brings the identity up and keeps
// it current with JoinWith (a job run renews by joining again with a fresh
// platform token); Serve serves on it but does not renew it.
func NewInMemory(cfg Config, key crypto.Signer, log *slog.Logger) (*Agent, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := cfg.validate(true); err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: log, soft: key, inMemory: true}
	if err := a.init(); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *Agent) init() error {
	// Trusted until the agent keeps the roots of a bundle it applied
	// (cache.Cache.Roots); read once: after that the kept roots are what
	// the agent trusts.
	roots, err := pemfile.ReadCerts(a.cfg.RootCert)
	if err != nil {
		return fmt.Errorf("root-cert: %w", err)
	}
	a.app = &appliance{a: a, idx: a.cfg.firstServer()}
	a.revoked = make(chan struct{}, 1)
	crlFile, rootsFile := "", ""
	if !a.inMemory {
		crlFile = filepath.Join(a.cfg.DataDir, "root-crls.pem")
		rootsFile = filepath.Join(a.cfg.DataDir, "roots.pem")
	}
	opts := cache.Options{Log: a.log, Roots: roots, RootsFile: rootsFile, CRLFile: crlFile, OnRevoked: a.onRevoked,
		OnRootsChanged: a.app.dropUntrusted}
	if a.inMemory {
		// A job agent's workload SVIDs end at its own expiry at the latest.
		opts.CutAt = func() time.Time {
			if s := a.SVID(); s != nil {
				return s.Chain[0].NotAfter
			}
			return time.Time{}
		}
	}
	a.cache = cache.New(a.app, opts)
	return nil
}

// onRevoked leaves a revoked appliance node and wakes Run to replace an
// identity the revoked CA signed.
func (a *Agent) onRevoked() {
	a.app.dropRevoked()
	select {
	case a.revoked <- struct{}{}:
	default:
	}
}

// ownRevoked reports whether the agent's own SVID was signed by a CA a
// root CRL revoked: every node refuses it, renewal included.
func (a *Agent) ownRevoked(s *join.SVID) bool { return s != nil && a.cache.Revoked(s.Chain) }

// Close releases the TPM.
func (a *Agent) Close() error {
	if a.tpm == nil {
		return nil
	}
	return a.tpm.Close()
}

func (a *Agent) signer(ctx context.Context) (crypto.Signer, error) {
	if a.tpm == nil {
		return a.soft, nil
	}
	return a.tpm.Signer(ctx, a.key)
}

func (a *Agent) svidPath() string { return filepath.Join(a.cfg.DataDir, "agent-svid.pem") }

// SVID returns the current identity.
func (a *Agent) SVID() *join.SVID {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.svid
}

// Start brings the identity up: the stored SVID if it is still valid and
// for this TPM's key, else a new join.
func (a *Agent) Start(ctx context.Context) error {
	if a.inMemory {
		return errors.New("an in-memory agent has no stored identity: its owner joins it with JoinWith")
	}
	signer, err := a.signer(ctx)
	if err != nil {
		return err
	}
	if s, err := a.load(signer); err == nil && a.ownRevoked(s) {
		a.log.Warn("stored SVID was signed by an issuing CA the root revoked; joining again", "agent", s.ID, "issuer", s.Chain[0].Issuer.String())
	} else if err == nil && time.Now().Before(s.Chain[0].NotAfter) {
		a.set(s)
		a.log.Info("agent identity loaded", "agent", s.ID, "expires", s.Chain[0].NotAfter)
		return nil
	} else if err != nil && !errors.Is(err, os.ErrNotExist) {
		a.log.Warn("stored SVID unusable; joining again", "err", err)
	}
	return a.Join(ctx)
}

// Server is the appliance server the agent currently uses (host:port).
func (a *Agent) Server() string { return a.cfg.Servers[a.app.current()] }

// Join attests the TPM to the first appliance node that answers, starting
// at the current server.
func (a *Agent) Join(ctx context.Context) error {
	return a.JoinWith(ctx, func(ctx context.Context, jc *api.JoinClient) (*join.SVID, error) {
		if a.tpm != nil {
			return join.TPM(ctx, jc, a.tpm, a.key)
		}
		return a.tokenJoin(ctx, jc)
	})
}

// JoinFunc joins over jc, an anonymous connection to one appliance server.
type JoinFunc func(ctx context.Context, jc *api.JoinClient) (*join.SVID, error)

// JoinWith joins through f on the first appliance server that answers,
// starting at the current one, and makes the SVID f returns the agent's
// identity. Join uses it with the agent's TPM or token; an in-memory
// agent's owner calls it to join and to renew.
func (a *Agent) JoinWith(ctx context.Context, f JoinFunc) error {
	err := a.app.eachServer(ctx, func(srv string) error {
		jc, closeConn, err := a.dial(srv, nil)
		if err != nil {
			return err
		}
		s, err := f(ctx, jc)
		closeConn()
		if err != nil {
			a.log.Warn("join failed", "server", srv, "err", err)
			return err
		}
		a.joins.Add(1)
		a.log.Info("joined", "agent", s.ID, "server", srv, "expires", s.Chain[0].NotAfter)
		return a.store(s)
	})
	if err != nil {
		return fmt.Errorf("join failed on every server tried: %w", err)
	}
	return nil
}

// Renew asks for a new SVID for the same TPM key over mutual TLS,
// starting at the current server.
func (a *Agent) Renew(ctx context.Context) error {
	cur := a.SVID()
	if cur == nil {
		return errors.New("no identity to renew")
	}
	return a.app.eachServer(ctx, func(srv string) error {
		jc, closeConn, err := a.dial(srv, cur)
		if err != nil {
			return err
		}
		s, err := join.Renew(ctx, jc, cur.Signer)
		closeConn()
		if err != nil {
			return err
		}
		a.renewals.Add(1)
		a.log.Info("renewed", "agent", s.ID, "server", srv, "expires", s.Chain[0].NotAfter)
		return a.store(s)
	})
}

// Run renews at about half the SVID's life (with jitter, so a fleet does
// not renew in step) until ctx ends. When the SVID has expired, or the
// appliance refuses this identity, it attests again.
func (a *Agent) Run(ctx context.Context) {
	failures := 0
	for {
		cur := a.SVID()
		wait := time.Second
		if cur != nil {
			life := cur.Chain[0].NotAfter.Sub(cur.Chain[0].NotBefore)
			at := cur.Chain[0].NotBefore.Add(life/2 - time.Duration(mrand.Int64N(int64(life/10)+1)))
			wait = max(time.Until(at), time.Second)
			if failures > 0 {
				wait = retryWait(failures, time.Until(cur.Chain[0].NotAfter))
			}
			if a.ownRevoked(cur) {
				wait = 5 * time.Second // a failed attestation is retried soon
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		case <-a.revoked:
			if !a.ownRevoked(a.SVID()) {
				continue
			}
		}
		var err error
		switch cur := a.SVID(); {
		case a.ownRevoked(cur):
			// Renewal presents the revoked SVID: only a new attestation
			// gives an identity the nodes accept.
			a.log.Warn("own SVID was signed by an issuing CA the root revoked; attesting again", "agent", cur.ID)
			err = a.Join(ctx) // store reconnects: established connections still present the old SVID
		case cur == nil || time.Now().After(cur.Chain[0].NotAfter):
			err = a.Join(ctx)
		default:
			if err = a.Renew(ctx); refusedIdentity(err) {
				a.log.Warn("renewal refused; attesting again", "err", err)
				err = a.Join(ctx)
			}
		}
		if err != nil {
			failures++
			a.log.Error("identity not refreshed; will retry", "err", err, "failures", failures)
		} else {
			failures = 0
		}
	}
}

// retryWait is how long to wait after failures failed renewals in a row,
// left before the SVID expires: doubling from 1 s to 30 s with jitter (a
// fleet whose node died must not come back in step), and never more than
// a quarter of what is left, so retries quicken as expiry nears.
func retryWait(failures int, left time.Duration) time.Duration {
	d := min(time.Second<<min(failures-1, 5), 30*time.Second)
	d = d/2 + time.Duration(mrand.Int64N(int64(d/2)+1))
	return max(min(d, left/4), time.Second)
}

// tokenJoin redeems the one-time token (it cannot be used again, so a
// token-joined agent that loses its identity needs a new token).
func (a *Agent) tokenJoin(ctx context.Context, jc *api.JoinClient) (*join.SVID, error) {
	b, err := os.ReadFile(a.cfg.JoinTokenFile)
	if err != nil {
		return nil, err
	}
	return join.Token(ctx, jc, string(bytes.TrimSpace(b)), a.soft)
}

// softKey loads or creates a token-joined agent's P-256 key (0600).
func softKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return nil, err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
			_ = f.Close() // the write error is the one to report
			return nil, err
		}
		if err := f.Sync(); err != nil {
			_ = f.Close() // the sync error is the one to report
			return nil, err
		}
		// Close reports write-back errors: the key is not stored until it succeeds.
		if err := f.Close(); err != nil {
			return nil, err
		}
		return k, nil
	}
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: no PEM key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("%s: not a signing key", path)
	}
	return s, nil
}

func refusedIdentity(err error) bool {
	c := status.Code(unwrapStatus(err))
	return c == codes.PermissionDenied || c == codes.Unauthenticated
}

func unwrapStatus(err error) error {
	for err != nil {
		if _, ok := status.FromError(err); ok {
			return err
		}
		err = errors.Unwrap(err)
	}
	return nil
}

func (a *Agent) dial(server string, cur *join.SVID) (*api.JoinClient, func(), error) {
	cfg := api.DialConfig{Addr: server, Roots: a.cache.Roots, Anonymous: cur == nil, VerifyChain: a.cache.CheckChain}
	if cur != nil {
		cfg.Certificate = func() (*tls.Certificate, error) { return cur.TLSCertificate(), nil }
	}
	conn, err := api.Dial(cfg)
	if err != nil {
		return nil, nil, err
	}
	// ClientConn.Close fails only when the connection is already closed.
	return api.NewJoinClient(conn), func() { _ = conn.Close() }, nil
}

func (a *Agent) set(s *join.SVID) {
	a.mu.Lock()
	a.svid = s
	a.mu.Unlock()
}

// store keeps the SVID for restarts (certificates only: the key is in the
// TPM; an in-memory agent keeps nothing), makes it current and reconnects to the appliance with it: the
// connection open until now presents the previous SVID, and the nodes end
// its calls (the Sync stream too) once that one expires.
func (a *Agent) store(s *join.SVID) error {
	if a.inMemory {
		a.set(s)
		a.app.reconnect()
		return nil
	}
	var b []byte
	for _, c := range s.Chain {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	tmp := a.svidPath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, a.svidPath()); err != nil {
		return err
	}
	a.set(s)
	a.app.reconnect()
	return nil
}

func (a *Agent) load(signer crypto.Signer) (*join.SVID, error) {
	chain, err := pemfile.ReadCerts(a.svidPath())
	if err != nil {
		return nil, err
	}
	s := &join.SVID{Signer: signer, Chain: chain}
	if len(s.Chain[0].URIs) != 1 {
		return nil, errors.New("stored SVID is empty or malformed")
	}
	if k, ok := s.Chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(signer.Public()) {
		return nil, errors.New("stored SVID is for another key than this TPM's agent key")
	}
	s.ID = s.Chain[0].URIs[0].String()
	return s, nil
}

// LoadConfig reads a strict YAML config file.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, err
	}
	c, err := ParseConfig(b)
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ParseConfig decodes a strict YAML config: unknown fields and extra
// documents are errors.
func ParseConfig(b []byte) (Config, error) {
	var c Config
	err := strictyaml.Decode(b, &c)
	return c, err
}
