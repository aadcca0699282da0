package cli

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// hsmCheckTimeout bounds the HSM part of --check-config: a network HSM
// that does not answer is a problem to report, not a reason to hang.
const hsmCheckTimeout = 30 * time.Second

// report is what --check-config found: problems make the config invalid;
// notChecked says what only the running node can find out.
type report struct {
	problems   []string
	notChecked []string
}

func (r *report) bad(format string, a ...any) {
	r.problems = append(r.problems, fmt.Sprintf(format, a...))
}

func (r *report) skip(format string, a ...any) {
	r.notChecked = append(r.notChecked, fmt.Sprintf(format, a...))
}

// checkConfig looks at what a node would use at start, without starting
// it: every field (node.Config.Problems), every file the config names, and
// the issuing CA key in the HSM, opened read-only, against the issuing
// certificate and the roots. It changes nothing.
func checkConfig(ctx context.Context, cfg *node.Config) *report {
	r := &report{problems: cfg.Problems()}
	roots := checkRoots(r, cfg)
	issuing := checkIssuingCert(r, cfg, roots)
	pinOK := checkPINSource(r, cfg)
	checkDirs(r, cfg)
	pub := checkHSMKey(ctx, r, cfg, pinOK)
	if pub != nil && issuing != nil {
		if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(issuing.PublicKey) {
			r.bad("issuing-key: the HSM key's public key is not the one in issuing-cert %s (%s): the certificate was made for another key", cfg.IssuingCert, issuing.Subject)
		}
	}
	checkOIDC(ctx, r, cfg)
	r.skip("raft peers not contacted (cluster.join, and the members recorded in %s)", filepath.Join(cfg.DataDir, "raft"))
	r.skip("listen addresses not bound (cluster.bind, api.listen, http.listen, http.oidc-listen, bundle.listen): another process may hold them when the node starts")
	r.skip("the state and raft stores in data-dir not opened")
	r.skip("the issuing certificate not checked against the root CRLs (they are in the replicated state)")
	r.skip("the HSM key not used to sign")
	if p := filepath.Join(node.InstalledIssuingDir(cfg.DataDir), "current.pem"); fileExists(p) {
		r.skip("%s (the issuing certificate last installed while the node ran) not checked: at start the node uses it instead of issuing-cert when it is valid for this key and trust domain and expires later (or, after a root rotation, is under a root kept from the bundle and issuing-cert is not), and logs which it used", p)
	}
	return r
}

func checkRoots(r *report, cfg *node.Config) []*x509.Certificate {
	var roots []*x509.Certificate
	for i, p := range cfg.RootCerts {
		if !fileExists(p) {
			continue // Problems reported it
		}
		c, err := pemfile.ReadCert(p)
		if err != nil {
			r.bad("root-certs[%d]: %v", i, err)
			continue
		}
		if !c.IsCA || c.CheckSignatureFrom(c) != nil {
			r.bad("root-certs[%d]: %s (%s) is not a self-signed CA certificate", i, p, c.Subject)
			continue
		}
		roots = append(roots, c)
	}
	return roots
}

// checkIssuingCert checks what ca.New checks at start, listing each
// problem rather than stopping at the first.
func checkIssuingCert(r *report, cfg *node.Config, roots []*x509.Certificate) *x509.Certificate {
	if !fileExists(cfg.IssuingCert) {
		return nil // Problems reported it
	}
	c, err := pemfile.ReadCert(cfg.IssuingCert)
	if err != nil {
		r.bad("issuing-cert: %v", err)
		return nil
	}
	if c.Subject.CommonName != cfg.NodeID {
		r.bad("issuing-cert: %s is the issuing CA certificate of node %q, this is node-id %q", cfg.IssuingCert, c.Subject.CommonName, cfg.NodeID)
	}
	if !c.IsCA {
		r.bad("issuing-cert: %s (%s) is not a CA certificate", cfg.IssuingCert, c.Subject)
	}
	if want := "spiffe://" + cfg.TrustDomain; cfg.TrustDomain != "" && (len(c.URIs) != 1 || c.URIs[0].String() != want) {
		r.bad("issuing-cert: %s names URIs %v, want exactly %s (trust-domain)", cfg.IssuingCert, c.URIs, want)
	}
	if len(roots) == 0 {
		r.skip("issuing-cert not checked against the roots: no usable root-certs")
		return c
	}
	pool := x509.NewCertPool()
	for _, root := range roots {
		pool.AddCert(root)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		if inst, path := installedInstead(cfg, c, roots); inst != nil {
			// After a root rotation's retire: root-certs names the new
			// root only, issuing-cert is still the one under the old.
			r.skip("issuing-cert %s (%s) does not chain to root-certs (%v), but the node starts with %s (serial %x, kept in data-dir by a renewal or a root rotation's switch), which does: point issuing-cert at a copy of it",
				cfg.IssuingCert, c.Subject, err, path, inst.SerialNumber)
			return c
		}
		r.bad("issuing-cert: %s (%s) does not chain to root-certs: %v", cfg.IssuingCert, c.Subject, err)
	}
	return c
}

// installedInstead is the certificate in data-dir the node starts with
// instead of configured (node.PrefersInstalled), when it is this node's
// CA and chains to root-certs or the roots kept from the bundle, as the
// node checks it at start (the HSM signature aside).
func installedInstead(cfg *node.Config, configured *x509.Certificate, roots []*x509.Certificate) (*x509.Certificate, string) {
	path := filepath.Join(node.InstalledIssuingDir(cfg.DataDir), "current.pem")
	if !fileExists(path) {
		return nil, ""
	}
	inst, err := pemfile.ReadCert(path)
	if err != nil {
		return nil, ""
	}
	kept, err := node.KeptRoots(cfg.DataDir)
	if err != nil || !node.PrefersInstalled(configured, inst, kept) || inst.Subject.CommonName != cfg.NodeID || !inst.IsCA {
		return nil, ""
	}
	pool := x509.NewCertPool()
	for _, root := range append(slices.Clone(roots), kept...) {
		pool.AddCert(root)
	}
	if _, err := inst.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, ""
	}
	return inst, path
}

// checkPINSource checks the PIN file as the key store will read it
// (regular, not readable by group or others, not empty), without reading
// the PIN. It reports whether a login can be tried.
func checkPINSource(r *report, cfg *node.Config) bool {
	u, err := pkcs11.ParseURI(cfg.IssuingKey)
	if err != nil || u.PINSource == "" {
		return false // Problems reported it
	}
	src := u.PINSource
	if name, ok := strings.CutPrefix(src, "env:"); ok {
		if v, set := os.LookupEnv(name); !set || v == "" {
			r.bad("issuing-key: pin-source %s: the environment variable %s is not set for this process", src, name)
			return false
		}
		return true
	}
	path := strings.TrimPrefix(strings.TrimPrefix(src, "file:"), "//")
	st, err := os.Stat(path)
	switch {
	case err != nil:
		r.bad("issuing-key: pin-source: %v", err)
	case !st.Mode().IsRegular():
		r.bad("issuing-key: pin-source %s is not a regular file", path)
	case st.Mode().Perm()&0o077 != 0:
		r.bad("issuing-key: pin-source %s has mode %v; the node refuses a PIN file readable by group or others (chmod 600)", path, st.Mode().Perm())
	case st.Size() == 0:
		r.bad("issuing-key: pin-source %s is empty", path)
	default:
		f, err := os.Open(path)
		if err != nil {
			r.bad("issuing-key: pin-source: %v", err)
			return false
		}
		_ = f.Close() // opened only to see that it can be
		return true
	}
	return false
}

// checkDirs checks the paths the node creates when missing: what exists
// there must be what the node expects.
func checkDirs(r *report, cfg *node.Config) {
	dir := func(field, p string) {
		if p == "" {
			return
		}
		st, err := os.Stat(p)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if parent := existingParent(p); parent != "" {
				if pst, err := os.Stat(parent); err == nil && !pst.IsDir() {
					r.bad("%s: %s cannot be created: %s is not a directory", field, p, parent)
				}
			}
		case err != nil:
			r.bad("%s: %v", field, err)
		case !st.IsDir():
			r.bad("%s: %s is not a directory", field, p)
		}
	}
	dir("data-dir", cfg.DataDir)
	if cfg.Audit.ExportDir != "" {
		dir("audit.export-dir", cfg.Audit.ExportDir)
	}
	if s := cfg.API.LocalSocket; s != "" {
		dir("api.local-socket", filepath.Dir(s))
		if st, err := os.Lstat(s); err == nil && st.Mode()&os.ModeSocket == 0 {
			r.bad("api.local-socket: %s exists and is not a socket; the node will not replace it", s)
		}
	}
}

// checkHSMKey opens the issuing key's token read-only, logs in and finds
// the key pair, returning its public key.
func checkHSMKey(ctx context.Context, r *report, cfg *node.Config, pinOK bool) crypto.PublicKey {
	u, err := pkcs11.ParseURI(cfg.IssuingKey)
	if err != nil || u.PINSource == "" {
		r.skip("the HSM not opened: issuing-key is not a usable pkcs11: URI")
		return nil
	}
	if st, err := os.Stat(u.ModulePath); err != nil {
		r.bad("issuing-key: module-path: %v", err)
		r.skip("the HSM not opened: no PKCS#11 module")
		return nil
	} else if !st.Mode().IsRegular() {
		r.bad("issuing-key: module-path %s is not a regular file", u.ModulePath)
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, hsmCheckTimeout)
	defer cancel()
	ks := pkcs11.New(pkcs11.Options{ReadOnly: true, SessionsPerToken: 1})
	defer func() { _ = ks.Close() }() // read-only sessions: nothing to lose
	s, err := ks.Signer(ctx, cfg.IssuingKey)
	switch {
	case err == nil:
		return s.Public()
	case errors.Is(err, keystore.ErrPINSource) && !pinOK:
		// The PIN file's problem is already listed.
		r.skip("the HSM key not looked for: no login without a usable PIN (token %q was found)", u.Token)
	case errors.Is(err, keystore.ErrNotFound):
		r.bad("issuing-key: %v (the object label or id in issuing-key is wrong, or the key was made on another token)", err)
	default:
		r.bad("issuing-key: %v", err)
	}
	return nil
}

// checkOIDC loads the OIDC listener's certificate and key as the node
// would (an HSM key read-only), when the fields themselves are sound.
func checkOIDC(ctx context.Context, r *report, cfg *node.Config) {
	h := cfg.HTTP
	if h.OIDCListen == "" || !fileExists(h.OIDCCert) || h.OIDCKey == "" {
		return // nothing to check, or Problems reported it
	}
	ctx, cancel := context.WithTimeout(ctx, hsmCheckTimeout)
	defer cancel()
	ks := pkcs11.New(pkcs11.Options{ReadOnly: true, SessionsPerToken: 1})
	defer func() { _ = ks.Close() }() // read-only sessions: nothing to lose
	if err := node.CheckOIDCCertificate(ctx, cfg, ks.Signer); err != nil {
		r.bad("%v", err)
	}
	r.skip("the OIDC certificate not checked against jwt.issuer's host name or the clouds' trusted CAs")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return p != "" && err == nil
}

// existingParent is the nearest ancestor of p that exists.
func existingParent(p string) string {
	for d := filepath.Dir(p); ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil {
			return d
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}
