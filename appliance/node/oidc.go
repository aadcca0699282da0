package node

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/keystore"
)

// The OIDC listener (http.oidc-listen) serves what a cloud token service
// needs to verify JWT-SVIDs as OIDC ID tokens: jwt.issuer's discovery
// document and the JWKS it names, over TLS with an operator's certificate
// (the https_web profile: the clouds trust public CAs, not the appliance's
// root). Both documents are public, read-only and small, and both are
// built from the replicated bundle, so every node serves the same keys:
// every node's, whichever node signed a token.
const (
	oidcDiscoveryPath = "/.well-known/openid-configuration"
	oidcKeysPath      = "/keys"
	// oidcMaxAge is how long clients may cache a response. A new key is
	// published before it signs, but a token service that cached the JWKS
	// before that misses it: rotation (jwt.rotate-every, at least hours in
	// production) and MaxJWTTTL are far longer than this, and token
	// services refetch on an unknown kid anyway.
	oidcMaxAge = 5 * time.Minute
	// oidcMaxKeyFile bounds the key file read (a PEM key is a few KiB).
	oidcMaxKeyFile = 64 << 10
)

// oidcServer builds and serves the discovery document and the JWKS.
type oidcServer struct {
	issuer string
	base   string // the issuer URL's path: documents are served under it
	alg    string // the configured key type's algorithm, for an empty bundle
	bundle func() state.Bundle
	log    *slog.Logger
	reqs   *prometheus.CounterVec
	// The JWKS built last: of bundle sequence seq, until the first of its
	// keys expires (or oidcMaxAge), and the algorithms of its keys.
	mu    sync.Mutex
	cache []byte
	algs  []string
	seq   uint64
	until time.Time
	built bool
}

func newOIDCServer(issuer string, alg string, bundle func() state.Bundle, reg prometheus.Registerer, log *slog.Logger) (*oidcServer, error) {
	u, err := url.Parse(issuer)
	if err != nil {
		return nil, fmt.Errorf("jwt.issuer %q: %w", issuer, err)
	}
	s := &oidcServer{issuer: issuer, base: u.Path, alg: alg, bundle: bundle, log: log,
		reqs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sigil_oidc_requests_total",
			Help: "Requests to the OIDC listener (http.oidc-listen) by path (discovery, keys or other) and HTTP status code.",
		}, []string{"path", "code"})}
	if err := reg.Register(s.reqs); err != nil {
		return nil, err
	}
	return s, nil
}

// jwks returns the JWKS and the algorithms its keys sign with. It is
// rebuilt when the bundle changes or a key in it expires.
func (s *oidcServer) jwks(now time.Time) ([]byte, []string, error) {
	b := s.bundle()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.built && s.seq == b.Sequence && now.Before(s.until) {
		return s.cache, s.algs, nil
	}
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{}}
	until := now.Add(oidcMaxAge)
	var algs []string
	for _, k := range b.JWTKeys {
		// A key stays in the replicated bundle until its node withdraws it,
		// a little after its NotAfter; no token it signed is valid then.
		if !now.Before(k.NotAfter) {
			continue
		}
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			return nil, nil, fmt.Errorf("JWT key %s: %w", k.KID, err)
		}
		alg, err := ca.JWTAlgorithm(pub)
		if err != nil {
			// The state admits only keys of these types; one it admitted
			// before is left out rather than break every other key.
			s.log.Warn("JWT key left out of the OIDC JWKS", "kid", k.KID, "err", err)
			continue
		}
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: pub, KeyID: k.KID, Algorithm: string(alg), Use: "sig"})
		if !slices.Contains(algs, string(alg)) {
			algs = append(algs, string(alg))
		}
		if k.NotAfter.Before(until) {
			until = k.NotAfter
		}
	}
	doc, err := json.Marshal(set)
	if err != nil {
		return nil, nil, err
	}
	slices.Sort(algs)
	s.cache, s.algs, s.seq, s.until, s.built = doc, algs, b.Sequence, until, true
	return doc, algs, nil
}

// discovery is the OpenID Provider metadata: only what a relying party
// verifying ID tokens reads. Sigil is no authorization server, so
// authorization_endpoint (required by the discovery spec for one) is
// absent, as in other workload-identity issuers.
func (s *oidcServer) discovery(algs []string) ([]byte, error) {
	if len(algs) == 0 {
		algs = []string{s.alg}
	}
	return json.Marshal(map[string]any{
		"issuer":                                s.issuer,
		"jwks_uri":                              s.issuer + oidcKeysPath,
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": algs,
		"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss", "jti"},
	})
}

func (s *oidcServer) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		label, code := "other", http.StatusOK
		defer func() { s.reqs.WithLabelValues(label, strconv.Itoa(code)).Inc() }()
		var body []byte
		switch r.URL.Path {
		case s.base + oidcDiscoveryPath:
			label = "discovery"
		case s.base + oidcKeysPath:
			label = "keys"
		default:
			code = http.StatusNotFound
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			code = http.StatusMethodNotAllowed
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", code)
			return
		}
		keys, algs, err := s.jwks(time.Now())
		if err == nil && label == "discovery" {
			keys, err = s.discovery(algs)
		}
		if err != nil {
			s.log.Error("OIDC document", "path", r.URL.Path, "err", err)
			code = http.StatusInternalServerError
			http.Error(w, "unavailable", code)
			return
		}
		body = keys
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", int(oidcMaxAge.Seconds())))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if r.Method == http.MethodHead {
			return
		}
		if _, err := w.Write(body); err != nil {
			s.log.Debug("http response not written", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
		}
	})
}

// oidcCert is the OIDC listener's certificate: a PEM chain file and its
// key, a 0600 PEM file or an HSM key by pkcs11: URI. The files are
// reread when they change (an operator's certificate is renewed in
// place); a pair that does not load leaves the last good one serving,
// with an error in the log.
type oidcCert struct {
	certPath, keyRef string
	hsm              func(ctx context.Context, uri string) (crypto.Signer, error)
	log              *slog.Logger

	mu      sync.Mutex
	cur     *tls.Certificate
	stamp   string // the files' sizes and modification times when loaded
	checked time.Time
	// failLogged is when a reload that failed was last logged.
	failLogged time.Time
}

func (c *oidcCert) hsmKey() bool { return strings.HasPrefix(c.keyRef, "pkcs11:") }

// fileStamp identifies the files' current contents well enough to notice
// a replacement.
func (c *oidcCert) fileStamp() string {
	var b strings.Builder
	paths := []string{c.certPath}
	if !c.hsmKey() {
		paths = append(paths, c.keyRef)
	}
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			fmt.Fprintf(&b, "%s:-;", p)
			continue
		}
		fmt.Fprintf(&b, "%s:%d:%d;", p, st.Size(), st.ModTime().UnixNano())
	}
	return b.String()
}

// load reads the chain and opens the key, and checks that they belong
// together and that the certificate is valid now.
func (c *oidcCert) load(ctx context.Context) (*tls.Certificate, error) {
	chain, err := pemfile.ReadCerts(c.certPath)
	if err != nil {
		return nil, fmt.Errorf("http.oidc-cert: %w", err)
	}
	leaf := chain[0]
	now := time.Now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("http.oidc-cert %s: the certificate for %v is valid from %s to %s, not now", c.certPath,
			leaf.DNSNames, leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	var key crypto.Signer
	if c.hsmKey() {
		if key, err = c.hsm(ctx, c.keyRef); err != nil {
			return nil, fmt.Errorf("http.oidc-key: %w", err)
		}
	} else if key, err = readKeyFile(c.keyRef); err != nil {
		return nil, fmt.Errorf("http.oidc-key: %w", err)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(leaf.PublicKey) {
		return nil, fmt.Errorf("http.oidc-key %s is not the key of the certificate in http.oidc-cert %s (%s)", redactURI(c.keyRef), c.certPath, leaf.Subject)
	}
	out := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, cert := range chain {
		out.Certificate = append(out.Certificate, cert.Raw)
	}
	return out, nil
}

// redactURI shows a key reference without a pkcs11: URI's query (where a
// pin-source path, never a PIN, would be): enough to name the key.
func redactURI(ref string) string {
	if before, _, ok := strings.Cut(ref, "?"); ok && strings.HasPrefix(ref, "pkcs11:") {
		return before
	}
	return ref
}

// readKeyFile reads a PEM private key (PKCS#8, SEC 1 or PKCS#1) from a
// file readable by its owner only, checked on the file it reads.
func readKeyFile(path string) (crypto.Signer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := pemfile.CheckPrivate(path, st); err != nil {
		return nil, err
	}
	// Owned by sigild's user or root: a file another user owns could be
	// replaced by that user, and is reloaded within seconds.
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Uid != 0 && int(sys.Uid) != os.Getuid() {
		return nil, fmt.Errorf("%s is owned by uid %d; the OIDC key must be owned by sigild's user (uid %d) or root", path, sys.Uid, os.Getuid())
	}
	b, err := io.ReadAll(io.LimitReader(f, oidcMaxKeyFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > oidcMaxKeyFile {
		return nil, fmt.Errorf("%s is larger than %d bytes: not a PEM private key", path, oidcMaxKeyFile)
	}
	// The first key block is the key (openssl ecparam -genkey writes an
	// EC PARAMETERS block before it); the caller checks it against the
	// certificate.
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		var k any
		switch blk.Type {
		case "PRIVATE KEY":
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %s: %w", path, blk.Type, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: key type %T cannot sign", path, k)
		}
		return s, nil
	}
	return nil, fmt.Errorf("%s holds no PEM PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block", path)
}

// oidcRecheck is how often a handshake looks at the files again.
const oidcRecheck = 10 * time.Second

// get is tls.Config.GetCertificate: the loaded pair, reloaded when the
// files changed since.
func (c *oidcCert) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if time.Since(c.checked) < oidcRecheck {
		return c.cur, nil
	}
	c.checked = time.Now()
	stamp := c.fileStamp()
	if stamp == c.stamp {
		return c.cur, nil
	}
	ctx := context.Background()
	if hello != nil {
		ctx = hello.Context()
	}
	next, err := c.load(ctx)
	if err != nil {
		// Tried again at the next recheck (the HSM may have failed for a
		// moment; the stamp covers only the files), logged at most once a
		// minute.
		if time.Since(c.failLogged) >= time.Minute {
			c.log.Error("OIDC certificate changed but does not load; serving the previous one", "err", err)
			c.failLogged = time.Now()
		}
		return c.cur, nil
	}
	c.log.Info("OIDC certificate reloaded", "subject", next.Leaf.Subject.String(), "not_after", next.Leaf.NotAfter)
	c.cur, c.stamp = next, stamp
	return c.cur, nil
}

// start loads the pair for the first time: a node does not start with a
// certificate it cannot serve.
func (c *oidcCert) start(ctx context.Context) error {
	stamp := c.fileStamp()
	cur, err := c.load(ctx)
	if err != nil {
		return err
	}
	c.cur, c.stamp, c.checked = cur, stamp, time.Now()
	return nil
}

// CheckOIDCCertificate loads http.oidc-cert and http.oidc-key as the node
// would at start (sigild --check-config): the chain, the key (hsm opens a
// pkcs11: key), that they belong together and that the certificate is
// valid now.
func CheckOIDCCertificate(ctx context.Context, cfg *Config, hsm func(ctx context.Context, uri string) (crypto.Signer, error)) error {
	c := &oidcCert{certPath: cfg.HTTP.OIDCCert, keyRef: cfg.HTTP.OIDCKey, hsm: hsm}
	_, err := c.load(ctx)
	return err
}

// startOIDC opens the OIDC listener: its certificate first (a node does
// not start with one it cannot serve), then the port, bounded like the
// other HTTP listeners.
func (n *Node) startOIDC(ctx context.Context) error {
	cfg := n.cfg
	log := n.log.With("listener", "oidc")
	cert := &oidcCert{certPath: cfg.HTTP.OIDCCert, keyRef: cfg.HTTP.OIDCKey, hsm: n.ks.Signer, log: log}
	if err := cert.start(ctx); err != nil {
		return err
	}
	alg := "ES256"
	if cfg.JWTKeyAlgorithm() == keystore.RSA2048 {
		alg = "RS256"
	}
	srv, err := newOIDCServer(cfg.JWT.Issuer, alg, n.fsm.Bundle, n.metrics.reg, log)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.HTTP.OIDCListen)
	if err != nil {
		return fmt.Errorf("http.oidc-listen: %w", err)
	}
	n.oidcLim = newConnLimiter("oidc", httpMaxConns, httpMaxHandshakes, 0, log)
	n.oidcLn = limitListener{Listener: ln, l: n.oidcLim}
	tcfg := &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: cert.get}
	n.oidc = newHTTPServer(log, srv.handler(), n.oidcLim, tcfg)
	n.serve(func() error {
		if err := n.oidc.ServeTLS(n.oidcLn, "", ""); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	log.Info("OIDC discovery served", "issuer", cfg.JWT.Issuer, "listen", n.oidcLn.Addr().String(),
		"certificate", cert.cur.Leaf.Subject.String(), "not_after", cert.cur.Leaf.NotAfter)
	return nil
}
