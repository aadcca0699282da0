package node

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/logconfig"
	"github.com/sigil-appliance/sigil/internal/nodeid"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/internal/strictyaml"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// Config is sigild's configuration file.
type Config struct {
	NodeID      string `yaml:"node-id"`
	TrustDomain string `yaml:"trust-domain"`
	DataDir     string `yaml:"data-dir"`
	// IssuingKey is the pkcs11: URI of this node's issuing CA key, with
	// pin-source (the PIN never appears here).
	IssuingKey  string   `yaml:"issuing-key"`
	IssuingCert string   `yaml:"issuing-cert"`
	RootCerts   []string `yaml:"root-certs"`

	Cluster ClusterConfig `yaml:"cluster"`
	API     APIConfig     `yaml:"api"`
	HTTP    HTTPConfig    `yaml:"http"`
	Bundle  BundleConfig  `yaml:"bundle"`
	JWT     JWTConfig     `yaml:"jwt"`
	Join    JoinConfig    `yaml:"join"`
	Audit   AuditConfig   `yaml:"audit"`
	Log     LogConfig     `yaml:"log"`
}

// AuditConfig bounds what reaches the replicated audit log and when the
// leader signs its head.
type AuditConfig struct {
	// RefusalSummaryInterval is how often a node commits its summary of
	// anonymous join refusals (counts per source and reason; default 1m).
	// Refusals are not committed one by one.
	RefusalSummaryInterval Duration `yaml:"refusal-summary-interval"`
	// CheckpointEvery and CheckpointInterval: the leader signs the audit
	// chain head with its issuing CA key after this many new records
	// (default 10000) or this long (default 5m), whichever comes first.
	CheckpointEvery    int      `yaml:"checkpoint-every"`
	CheckpointInterval Duration `yaml:"checkpoint-interval"`
	// Retain bounds the audit log held in the replicated state; the leader
	// prunes older records, and every node first writes them to a signed
	// segment file in ExportDir (default <data-dir>/audit).
	Retain    AuditRetain `yaml:"retain"`
	ExportDir string      `yaml:"export-dir"`
}

// AuditRetain is the audit retention policy: a record is pruned when it is
// past either bound.
type AuditRetain struct {
	// Records kept at most (default 1000000; at least 1000).
	Records int `yaml:"records"`
	// Age kept at most (0: no age bound).
	Age Duration `yaml:"age"`
	// Every is how often the leader checks the policy (default 10s).
	Every Duration `yaml:"every"`
}

// Audit defaults and bounds.
const (
	defaultRefusalSummaryInterval = time.Minute
	defaultCheckpointEvery        = 10000
	defaultCheckpointInterval     = 5 * time.Minute
	defaultRetainRecords          = 1_000_000
)

// BundleConfig is the federation bundle endpoint (https_spiffe profile:
// served over TLS with this node's SPIFFE identity).
type BundleConfig struct {
	Listen string `yaml:"listen"`
	// RefreshHint is the spiffe_refresh_hint the endpoint serves: how
	// often federated trust domains should fetch the bundle again
	// (default 5m). Shorter than the time between a new root or JWT key
	// and its use, so that peers have it first.
	RefreshHint Duration `yaml:"refresh-hint"`
	// MinFetchInterval bounds how often the leader fetches a foreign
	// bundle endpoint whatever that bundle's hint says (default 30s).
	MinFetchInterval Duration `yaml:"min-fetch-interval"`
}

// JoinConfig says how agents may join through this node.
type JoinConfig struct {
	// DisableTokens refuses one-time join tokens here: only TPM
	// attestation admits agents.
	DisableTokens bool `yaml:"disable-tokens"`
	// AgentSVIDTTL is the lifetime of agents' own SVIDs (default 1h);
	// agents renew at about half of it.
	AgentSVIDTTL Duration `yaml:"agent-svid-ttl"`
}

// JWTConfig is this node's JWT key schedule, key type and OIDC issuer.
type JWTConfig struct {
	// RotateEvery is how long one JWT key signs (default 24h).
	RotateEvery Duration `yaml:"rotate-every"`
	// KeyType is the type of the JWT keys this node makes in its HSM:
	// ec-p256 (ES256, the default) or rsa-2048 (RS256, which some cloud
	// token services require). Set the same on every node of a cluster. A
	// change takes effect at the node's next start: it makes a key of the
	// new type, and its keys of the old type stay published until the
	// tokens they signed have expired.
	KeyType string `yaml:"key-type"`
	// Issuer is the cluster's OIDC issuer, an https URL without query,
	// fragment or trailing slash: JWT-SVIDs carry it as iss, and
	// http.oidc-listen serves its discovery document. Every node of a
	// cluster must have the same value (any node's token verifies against
	// the one issuer); empty: tokens carry no iss.
	Issuer string `yaml:"issuer"`
}

// JWT key types (jwt.key-type).
const (
	JWTKeyEC256   = "ec-p256"
	JWTKeyRSA2048 = "rsa-2048"
)

// JWTKeyAlgorithm is the keystore algorithm of jwt.key-type (after
// Validate).
func (c *Config) JWTKeyAlgorithm() keystore.Algorithm {
	if c.JWT.KeyType == JWTKeyRSA2048 {
		return keystore.RSA2048
	}
	return keystore.ECDSAP256
}

// ClusterConfig is raft membership and transport.
type ClusterConfig struct {
	Bind      string `yaml:"bind"`      // host:port for raft (mTLS)
	Advertise string `yaml:"advertise"` // default: bind
	// Bootstrap makes this node a one-node cluster on first start; exactly
	// one node of a new cluster sets it.
	Bootstrap bool `yaml:"bootstrap"`
	// Join lists members' raft addresses to ask for membership on first
	// start.
	Join []string `yaml:"join"`
	// Timeouts (defaults suit a LAN: 500ms heartbeat and election).
	HeartbeatTimeout Duration `yaml:"heartbeat-timeout"`
	ElectionTimeout  Duration `yaml:"election-timeout"`
	// SnapshotRateMiB paces raft snapshots of the state (MiB/s, default
	// 64), so a large state is written without starving commits.
	SnapshotRateMiB int `yaml:"snapshot-rate-mib"`
}

// APIConfig is the gRPC API.
type APIConfig struct {
	Listen string `yaml:"listen"` // host:port, mutual TLS
	// LocalSocket serves the admin API to root on this host without a
	// certificate: how the first admin credential is made.
	LocalSocket string `yaml:"local-socket"`
	// AdminCertMaxTTL bounds admin certificates issued here (default 24h).
	AdminCertMaxTTL Duration `yaml:"admin-cert-max-ttl"`

	// What callers can make the API hold (limits.go). Every request is at
	// most 1 MiB (api.MaxRequestSize) and is refused by method and TLS
	// role before it is read.
	//
	// MaxConnections bounds open connections (default 4096: an agent
	// keeps one, an admin one per command); beyond it new ones are closed.
	MaxConnections int `yaml:"max-connections"`
	// MaxHandshakes bounds connections still in their TLS handshake
	// (default 256); beyond it the oldest is dropped for the new one.
	MaxHandshakes int `yaml:"max-handshakes"`
	// MaxAnonymousConnections bounds connections without a client
	// certificate, which only joining agents need (default 256).
	MaxAnonymousConnections int `yaml:"max-anonymous-connections"`
	// MaxAnonymousConnectionsPerSource bounds them per source, an IPv4
	// address or an IPv6 /64 (default 16, at most
	// max-anonymous-connections), so one address cannot hold them all;
	// beyond it the source's oldest is dropped for the new one.
	MaxAnonymousConnectionsPerSource int `yaml:"max-anonymous-connections-per-source"`
	// AnonymousConnectionMaxAge closes a connection without a client
	// certificate this long after its handshake, busy or not (default 1m;
	// an agent dials once per join, which takes seconds): calls every few
	// hundred milliseconds would otherwise keep it from ever idling out.
	AnonymousConnectionMaxAge Duration `yaml:"anonymous-connection-max-age"`
	// MaxAnonymousCalls bounds join calls in progress at once (default 64).
	MaxAnonymousCalls int `yaml:"max-anonymous-calls"`
	// MaxAnonymousCallsPerSource and MaxAnonymousCallsPerConnection bound
	// them from one source and on one connection (defaults 8 and 4): an
	// agent makes one join call at a time.
	MaxAnonymousCallsPerSource     int `yaml:"max-anonymous-calls-per-source"`
	MaxAnonymousCallsPerConnection int `yaml:"max-anonymous-calls-per-connection"`
	// AnonymousCallTimeout ends every join call this long after its
	// headers arrived, message read or not (default 15s; a join call
	// takes milliseconds to a few seconds).
	AnonymousCallTimeout Duration `yaml:"anonymous-call-timeout"`
	// MaxStreams bounds concurrent calls on one connection (default 64).
	MaxStreams int `yaml:"max-streams"`
	// HandshakeTimeout bounds a new connection's TLS and HTTP/2 setup
	// (default 10s).
	HandshakeTimeout Duration `yaml:"handshake-timeout"`
	// IdleTimeout closes a connection with no call open for this long
	// (default 2m; an agent's Sync stream keeps its connection open).
	IdleTimeout Duration `yaml:"idle-timeout"`
}

// API limit defaults.
const (
	defaultMaxConnections          = 4096
	defaultMaxHandshakes           = 256
	defaultMaxAnonymousConnections = 256
	defaultMaxAnonymousCalls       = 64
	defaultMaxAnonConnsPerSource   = 16
	defaultAnonConnMaxAge          = time.Minute
	defaultMaxAnonCallsPerSource   = 8
	defaultMaxAnonCallsPerConn     = 4
	defaultAnonymousCallTimeout    = 15 * time.Second
	defaultMaxStreams              = 64
	defaultHandshakeTimeout        = 10 * time.Second
	defaultIdleTimeout             = 2 * time.Minute
)

// HTTPConfig serves /healthz, /readyz and /metrics (no secrets) and,
// when OIDCListen is set, the OIDC discovery document and JWKS.
type HTTPConfig struct {
	Listen string `yaml:"listen"`
	// OIDCListen (host:port) serves jwt.issuer's discovery document
	// (/.well-known/openid-configuration under the issuer's path) and the
	// JWKS it names over TLS with an operator's certificate (https_web):
	// what cloud token services (AWS STS, GCP, Azure) fetch to verify
	// JWT-SVIDs. It needs jwt.issuer, OIDCCert and OIDCKey.
	OIDCListen string `yaml:"oidc-listen"`
	// OIDCCert is the listener's certificate chain (PEM, leaf first), from
	// a CA the cloud services trust, for the issuer's host name.
	OIDCCert string `yaml:"oidc-cert"`
	// OIDCKey is its private key: a PEM file readable by its owner only
	// (0600), or a key in this node's HSM by pkcs11: URI with pin-source.
	OIDCKey string `yaml:"oidc-key"`
}

// LogConfig is slog's level and format, shared with sigil-agent.
type LogConfig = logconfig.Config

// validateOIDC checks jwt.issuer, jwt.key-type and the OIDC listener.
func (c *Config) validateOIDC(bad func(field, format string, a ...any)) {
	switch c.JWT.KeyType {
	case "":
		c.JWT.KeyType = JWTKeyEC256
	case JWTKeyEC256, JWTKeyRSA2048:
	default:
		bad("jwt.key-type", "must be %s or %s (got %q)", JWTKeyEC256, JWTKeyRSA2048, c.JWT.KeyType)
	}
	if c.JWT.Issuer != "" {
		if err := checkIssuer(c.JWT.Issuer); err != nil {
			bad("jwt.issuer", "%v (got %q)", err, c.JWT.Issuer)
		}
	}
	h := c.HTTP
	if h.OIDCListen == "" {
		for _, f := range [][2]string{{"http.oidc-cert", h.OIDCCert}, {"http.oidc-key", h.OIDCKey}} {
			if f[1] != "" {
				bad(f[0], "is set but http.oidc-listen is not: nothing would use it")
			}
		}
		return
	}
	if _, _, err := net.SplitHostPort(h.OIDCListen); err != nil {
		bad("http.oidc-listen", "must be host:port (got %q)", h.OIDCListen)
	}
	if c.JWT.Issuer == "" {
		bad("http.oidc-listen", "needs jwt.issuer: the discovery document names it")
	}
	if h.OIDCCert == "" {
		bad("http.oidc-cert", "is required with http.oidc-listen (a PEM certificate chain for the issuer's host)")
	} else if _, err := os.Stat(h.OIDCCert); err != nil {
		bad("http.oidc-cert", "%v", err)
	}
	switch {
	case h.OIDCKey == "":
		bad("http.oidc-key", "is required with http.oidc-listen (a 0600 PEM key file or a pkcs11: URI)")
	case strings.HasPrefix(h.OIDCKey, "pkcs11:"):
		if u, err := pkcs11.ParseURI(h.OIDCKey); err != nil {
			bad("http.oidc-key", "%v", err)
		} else if u.PINSource == "" {
			bad("http.oidc-key", "needs pin-source=file:/path (the PIN is never in the config)")
		} else if iss, err := pkcs11.ParseURI(c.IssuingKey); err == nil && u.Token == iss.Token &&
			(u.Object != "" && u.Object == iss.Object || len(u.ID) > 0 && string(u.ID) == string(iss.ID)) {
			bad("http.oidc-key", "names the issuing CA's key: a TLS key must be a key of its own")
		} else if strings.HasPrefix(u.Object, "sigil-jwt-") {
			bad("http.oidc-key", "names a JWT signing key: a TLS key must be a key of its own")
		}
	default:
		if err := checkKeyFileMode(h.OIDCKey); err != nil {
			bad("http.oidc-key", "%v", err)
		}
	}
}

// checkIssuer: an OIDC issuer is an https URL with a host and no query or
// fragment (OpenID Connect Discovery 1.0, section 2), compared by token
// services character for character, so it has no trailing slash either
// (the JWKS URL is the issuer plus /keys).
func checkIssuer(s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("is not a URL: %v", err)
	case u.Scheme != "https":
		return fmt.Errorf("must be an https URL (cloud token services fetch its keys over TLS only)")
	case u.Host == "" || u.Hostname() == "":
		return fmt.Errorf("must name a host")
	case u.User != nil:
		return fmt.Errorf("must not carry user information")
	case u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || strings.Contains(s, "#"):
		return fmt.Errorf("must not have a query or fragment")
	case strings.HasSuffix(s, "/"):
		return fmt.Errorf("must not end in a slash (iss is compared character for character)")
	case u.RawPath != "" || u.Opaque != "":
		return fmt.Errorf("must have a plain path")
	case len(s) > 255:
		return fmt.Errorf("is longer than 255 bytes")
	}
	return nil
}

// checkKeyFileMode refuses a private key file that group or others could
// read (or that is not a regular file).
func checkKeyFileMode(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	return pemfile.CheckPrivate(path, st)
}

// validateAPILimits fills the API limits' defaults and checks their
// ranges. The upper bounds keep a typo from disabling a limit.
func (c *Config) validateAPILimits(bad func(field, format string, a ...any)) {
	a := &c.API
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&a.MaxConnections, defaultMaxConnections)
	def(&a.MaxHandshakes, defaultMaxHandshakes)
	def(&a.MaxAnonymousConnections, defaultMaxAnonymousConnections)
	def(&a.MaxAnonymousCalls, defaultMaxAnonymousCalls)
	def(&a.MaxStreams, defaultMaxStreams)
	// The per-source and per-connection defaults never exceed the caps
	// they divide (a small max-anonymous-connections needs no second
	// setting).
	def(&a.MaxAnonymousConnectionsPerSource, min(defaultMaxAnonConnsPerSource, max(a.MaxAnonymousConnections, 1)))
	def(&a.MaxAnonymousCallsPerSource, min(defaultMaxAnonCallsPerSource, max(a.MaxAnonymousCalls, 1)))
	def(&a.MaxAnonymousCallsPerConnection, min(defaultMaxAnonCallsPerConn, max(a.MaxAnonymousCallsPerSource, 1)))
	defDur := func(v *Duration, d time.Duration) {
		if v.Duration == 0 {
			v.Duration = d
		}
	}
	defDur(&a.AnonymousCallTimeout, defaultAnonymousCallTimeout)
	defDur(&a.AnonymousConnectionMaxAge, max(defaultAnonConnMaxAge, a.AnonymousCallTimeout.Duration))
	if a.HandshakeTimeout.Duration == 0 {
		a.HandshakeTimeout.Duration = defaultHandshakeTimeout
	}
	if a.IdleTimeout.Duration == 0 {
		a.IdleTimeout.Duration = defaultIdleTimeout
	}
	if n := a.MaxConnections; n < 16 || n > 1_000_000 {
		bad("api.max-connections", "must be between 16 and 1000000 (got %d)", n)
	}
	for _, f := range []struct {
		name string
		n    int
	}{{"api.max-handshakes", a.MaxHandshakes}, {"api.max-anonymous-connections", a.MaxAnonymousConnections}} {
		if f.n < 1 || f.n > a.MaxConnections {
			bad(f.name, "must be between 1 and api.max-connections, %d (got %d)", a.MaxConnections, f.n)
		}
	}
	if n := a.MaxAnonymousCalls; n < 1 || n > 100_000 {
		bad("api.max-anonymous-calls", "must be between 1 and 100000 (got %d)", n)
	}
	if n := a.MaxAnonymousConnectionsPerSource; n < 1 || n > a.MaxAnonymousConnections {
		bad("api.max-anonymous-connections-per-source", "must be between 1 and api.max-anonymous-connections, %d (got %d)", a.MaxAnonymousConnections, n)
	}
	if n := a.MaxAnonymousCallsPerSource; n < 1 || n > a.MaxAnonymousCalls {
		bad("api.max-anonymous-calls-per-source", "must be between 1 and api.max-anonymous-calls, %d (got %d)", a.MaxAnonymousCalls, n)
	}
	if n := a.MaxAnonymousCallsPerConnection; n < 1 || n > a.MaxAnonymousCallsPerSource {
		bad("api.max-anonymous-calls-per-connection", "must be between 1 and api.max-anonymous-calls-per-source, %d (got %d)", a.MaxAnonymousCallsPerSource, n)
	}
	if d := a.AnonymousCallTimeout.Duration; d < 100*time.Millisecond || d > 10*time.Minute {
		bad("api.anonymous-call-timeout", "must be between 100ms and 10m (got %v)", d)
	}
	// A call begun on a new connection must be able to run to its own
	// deadline before the connection's age closes it.
	if d := a.AnonymousConnectionMaxAge.Duration; d < a.AnonymousCallTimeout.Duration || d > 24*time.Hour {
		bad("api.anonymous-connection-max-age", "must be between api.anonymous-call-timeout, %v, and 24h (got %v)", a.AnonymousCallTimeout.Duration, d)
	}
	if n := a.MaxStreams; n < 1 || n > 10_000 {
		bad("api.max-streams", "must be between 1 and 10000 (got %d)", n)
	}
	if d := a.HandshakeTimeout.Duration; d < 100*time.Millisecond || d > 5*time.Minute {
		bad("api.handshake-timeout", "must be between 100ms and 5m (got %v)", d)
	}
	if d := a.IdleTimeout.Duration; d < time.Second || d > 24*time.Hour {
		bad("api.idle-timeout", "must be between 1s and 24h (got %v)", d)
	}
}

// Duration is a duration in the config file (strictyaml.Duration: "90s",
// "36h", "7d").
type Duration = strictyaml.Duration

// DecodeConfigFile reads and decodes a config file strictly without
// validating it (Problems does): sigild --check-config lists every problem.
func DecodeConfigFile(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c Config
	if err := strictyaml.Decode(b, &c); err != nil {
		return nil, err
	}
	return &c, nil
}

// LoadConfig reads and validates a config file strictly.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(b)
}

// ParseConfig parses strictly (unknown fields, a second document) and
// validates every field, reporting all problems at once.
func ParseConfig(b []byte) (*Config, error) {
	var c Config
	if err := strictyaml.Decode(b, &c); err != nil {
		return nil, err
	}
	return &c, c.Validate()
}

// Validate checks every field and fills defaults.
func (c *Config) Validate() error {
	var p strictyaml.Problems
	c.validate(p.Add)
	return p.Err("sigild config")
}

// Problems is Validate's findings one by one (filling the same defaults),
// for sigild --check-config, which lists them with what only a look at the
// HSM and the files finds.
func (c *Config) Problems() []string {
	var out []string
	c.validate(func(field, format string, a ...any) { out = append(out, field+" "+fmt.Sprintf(format, a...)) })
	return out
}

func (c *Config) validate(bad func(field, format string, a ...any)) {
	if !nodeid.Valid(c.NodeID) {
		bad("node-id", "must match %s (got %q)", nodeid.Pattern, c.NodeID)
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil || c.TrustDomain == "" {
		bad("trust-domain", "must be a trust domain name like example.org (got %q)", c.TrustDomain)
	}
	if c.DataDir == "" {
		bad("data-dir", "is required")
	}
	if u, err := pkcs11.ParseURI(c.IssuingKey); err != nil {
		bad("issuing-key", "%v", err)
	} else if u.PINSource == "" {
		bad("issuing-key", "needs pin-source=file:/path (the PIN is never in the config)")
	}
	for field, p := range map[string]string{"issuing-cert": c.IssuingCert} {
		if _, err := os.Stat(p); err != nil {
			bad(field, "%v", err)
		}
	}
	if len(c.RootCerts) == 0 {
		bad("root-certs", "needs the root certificate(s) from the ceremony")
	}
	for i, p := range c.RootCerts {
		if _, err := os.Stat(p); err != nil {
			bad(fmt.Sprintf("root-certs[%d]", i), "%v", err)
		}
	}
	if _, _, err := net.SplitHostPort(c.Cluster.Bind); err != nil {
		bad("cluster.bind", "must be host:port (got %q)", c.Cluster.Bind)
	}
	if c.Cluster.Advertise != "" {
		if h, _, err := net.SplitHostPort(c.Cluster.Advertise); err != nil || h == "" || h == "0.0.0.0" || h == "::" {
			bad("cluster.advertise", "must be a reachable host:port (got %q)", c.Cluster.Advertise)
		}
	}
	if c.Cluster.Bootstrap && len(c.Cluster.Join) > 0 {
		bad("cluster", "sets both bootstrap and join; a new cluster has one bootstrap node, the others join it")
	}
	for i, j := range c.Cluster.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			bad(fmt.Sprintf("cluster.join[%d]", i), "must be host:port (got %q)", j)
		}
	}
	if _, _, err := net.SplitHostPort(c.API.Listen); err != nil {
		bad("api.listen", "must be host:port (got %q)", c.API.Listen)
	}
	if c.HTTP.Listen != "" {
		if _, _, err := net.SplitHostPort(c.HTTP.Listen); err != nil {
			bad("http.listen", "must be host:port (got %q)", c.HTTP.Listen)
		}
	}
	c.validateOIDC(bad)
	if c.Bundle.Listen != "" {
		if _, _, err := net.SplitHostPort(c.Bundle.Listen); err != nil {
			bad("bundle.listen", "must be host:port (got %q)", c.Bundle.Listen)
		}
	}
	if c.Bundle.RefreshHint.Duration == 0 {
		c.Bundle.RefreshHint.Duration = defaultBundleRefreshHint
	}
	if d := c.Bundle.RefreshHint.Duration; d < time.Second || d > 24*time.Hour {
		bad("bundle.refresh-hint", "must be between 1s and 24h (got %v)", d)
	}
	if c.Bundle.MinFetchInterval.Duration == 0 {
		c.Bundle.MinFetchInterval.Duration = minFederationRefresh
	}
	if d := c.Bundle.MinFetchInterval.Duration; d < time.Second || d > maxFederationRefresh {
		bad("bundle.min-fetch-interval", "must be between 1s and %v (got %v)", maxFederationRefresh, d)
	}
	if c.Join.AgentSVIDTTL.Duration == 0 {
		c.Join.AgentSVIDTTL.Duration = time.Hour
	}
	if c.Join.AgentSVIDTTL.Duration < time.Second || c.Join.AgentSVIDTTL.Duration > 30*24*time.Hour {
		bad("join.agent-svid-ttl", "must be between 1s and 30 days (got %v)", c.Join.AgentSVIDTTL.Duration)
	}
	if c.JWT.RotateEvery.Duration == 0 {
		c.JWT.RotateEvery.Duration = 24 * time.Hour
	}
	if c.JWT.RotateEvery.Duration < time.Second {
		bad("jwt.rotate-every", "must be at least 1s (got %v)", c.JWT.RotateEvery.Duration)
	}
	if c.API.AdminCertMaxTTL.Duration == 0 {
		c.API.AdminCertMaxTTL.Duration = 24 * time.Hour
	}
	if d := c.API.AdminCertMaxTTL.Duration; d < time.Minute || d > state.MaxAdminCertTTL {
		bad("api.admin-cert-max-ttl", "must be between 1m and %v (got %v)", state.MaxAdminCertTTL, d)
	}
	c.validateAPILimits(bad)
	if c.Audit.RefusalSummaryInterval.Duration == 0 {
		c.Audit.RefusalSummaryInterval.Duration = defaultRefusalSummaryInterval
	}
	if d := c.Audit.RefusalSummaryInterval.Duration; d < 100*time.Millisecond || d > time.Hour {
		bad("audit.refusal-summary-interval", "must be between 100ms and 1h (got %v)", d)
	}
	if c.Audit.CheckpointEvery == 0 {
		c.Audit.CheckpointEvery = defaultCheckpointEvery
	}
	if n := c.Audit.CheckpointEvery; n < 1 || n > 10_000_000 {
		bad("audit.checkpoint-every", "must be between 1 and 10000000 records (got %d)", n)
	}
	if c.Audit.CheckpointInterval.Duration == 0 {
		c.Audit.CheckpointInterval.Duration = defaultCheckpointInterval
	}
	if d := c.Audit.CheckpointInterval.Duration; d < time.Second || d > 24*time.Hour {
		bad("audit.checkpoint-interval", "must be between 1s and 24h (got %v)", d)
	}
	if c.Cluster.SnapshotRateMiB == 0 {
		c.Cluster.SnapshotRateMiB = 64
	}
	if r := c.Cluster.SnapshotRateMiB; r < 1 || r > 100000 {
		bad("cluster.snapshot-rate-mib", "must be between 1 and 100000 (got %d)", r)
	}
	if c.Audit.Retain.Records == 0 {
		c.Audit.Retain.Records = defaultRetainRecords
	}
	if n := c.Audit.Retain.Records; n < 1000 {
		bad("audit.retain.records", "must be at least 1000 (got %d)", n)
	}
	if c.Audit.Retain.Every.Duration == 0 {
		c.Audit.Retain.Every.Duration = 10 * time.Second
	}
	if d := c.Audit.Retain.Every.Duration; d < 100*time.Millisecond || d > time.Hour {
		bad("audit.retain.every", "must be between 100ms and 1h (got %v)", d)
	}
	if d := c.Audit.Retain.Age.Duration; d < 0 || d > 0 && d < time.Hour {
		bad("audit.retain.age", "must be 0 (no bound) or at least 1h (got %v)", d)
	}
	if c.Audit.ExportDir != "" && !filepath.IsAbs(c.Audit.ExportDir) {
		bad("audit.export-dir", "must be an absolute path (got %q)", c.Audit.ExportDir)
	}
	for _, s := range c.Log.Problems() {
		field, how, _ := strings.Cut(s, " ")
		bad(field, "%s", how)
	}
}
