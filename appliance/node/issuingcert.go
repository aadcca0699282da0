package node

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// Renewing the issuing CA while the node runs (issue #18): the root
// ceremony signs a new certificate for the node's existing HSM key
// (sign-issuing with the node's CSR again), and an admin hands it to the
// node (NodeIssuingCertInstall, sigilctl node issuing-cert install).
//
// The order is chosen so that a refusal changes nothing and a failure
// leaves the node consistent:
//  1. the certificate is checked as at start-up, plus revocation and a
//     later expiry (ca.Authority.CheckRenewal);
//  2. it is staged in the node's data directory (InstalledIssuingDir:
//     written and synced, not yet in place): a full disk fails here,
//     before anything is recorded;
//  3. the change is committed (state.CmdNodeCAInstall, the admin's command
//     proposed by this node: the state machine checks the chain again and
//     records the CA as this node's, audited with both serials);
//  4. the authority swaps its certificate (signings in flight finish with
//     the old one, which stays valid: peers verify both against the root);
//  5. the staged file becomes <data-dir>/issuing/current.pem, the one it
//     replaces (if any) kept as previous.pem, so that a restart uses the
//     new certificate (startIssuing);
//  6. the node's TLS certificate is renewed under the new CA and a JWT
//     key carrying it is published (JWT keys carry their CA so that a
//     root CRL revoking the old CA withdraws only the old keys).
//
// The configured issuing-cert file is the operator's: the daemon never
// writes it (under the packaged unit's ProtectSystem=strict it cannot:
// /etc is read-only to sigild, and the data directory is its own). At
// start the node takes the data directory's copy instead of the
// configured file when that copy is for the same key, node and trust
// domain, chains to the roots now, and expires later (startIssuing);
// otherwise the configured file, with a warning naming why the copy was
// ignored. An operator who puts a newer certificate in the configured
// file wins the same way: the later expiry is used.
//
// A failure after 3 leaves a committed record of a certificate that is
// valid and the node's: the error says which step failed, and repeating
// the install finishes it (CheckRenewal then refuses only when the swap
// itself happened: the same certificate again).

// issuingRenewal installs renewed issuing certificates on this node, and
// shows the state the CA this node signs with when the state records
// another (show).
type issuingRenewal struct {
	mu    sync.Mutex // one install or show at a time, from check to publication
	dir   string     // where installed certificates are kept (InstalledIssuingDir)
	auth  *ca.Authority
	ident *ca.NodeIdentity
	jwt   interface {
		Rotate(context.Context) (string, error)
	}
	state  *state.FSM
	member raftMember
	actor  string // this node, as the audit names it
	log    *slog.Logger
	// dataDir keeps the bundle's roots (rootrotation.go; "": not kept).
	dataDir string
	// configured is the issuing-cert file: a rollback's certificate when
	// the data directory has none under the old root.
	configured string
}

// showLoop records this node's issuing CA in the state whenever the
// state's record for it is missing, names another certificate, or lacks
// the expiry (written before expiries were kept): after a start with a
// certificate replaced while the node was stopped, and on a node that has
// published no JWT key yet, so that every node's CA is recorded (the
// expiry metric of every node, checkOriginCA) from its first minutes.
func (r *issuingRenewal) showLoop(ctx context.Context) {
	const every = 30 * time.Second
	wait, failWait := time.Second, time.Second
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		// A new cluster's roots are set by its first leader (bundleLoop):
		// until then no CA can be checked against them.
		if !r.member.leaderKnown() || len(r.state.Bundle().Roots) == 0 {
			wait = time.Second
			continue
		}
		if err := r.show(ctx); err != nil {
			// Retried soon (an election, a replica catching up), then
			// every 30s.
			wait, failWait = failWait, min(2*failWait, every)
			r.log.Warn("showing this node's issuing CA to the state failed", "err", err, "retry_in", wait.String())
			continue
		}
		wait, failWait = every, time.Second
	}
}

// show commits this node's current CA when the state records another.
func (r *issuingRenewal) show(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.showLocked(ctx)
}

// showLocked is show with r.mu held.
func (r *issuingRenewal) showLocked(ctx context.Context) error {
	// The replica must be current: one replaying its log after a start
	// would otherwise see an old record and show a CA already recorded.
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := r.member.readIndex(rctx); err != nil {
		return err
	}
	own := r.auth.Issuing()
	prev := ""
	for _, rec := range r.state.NodeCAs() {
		if rec.Node != r.auth.NodeID() {
			continue
		}
		if bytes.Equal(rec.Issuer, own.RawIssuer) && rec.Serial == own.SerialNumber.Text(16) && !rec.NotAfter.IsZero() {
			return nil
		}
		prev = rec.Serial
	}
	if r.auth.Revoked() {
		return nil // refused anyway; the revocation is logged where it bites
	}
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := r.member.apply(actx, r.actor, state.CmdNodeCAInstall, state.NodeCAInstall{Cert: own.Raw, Previous: prev}); err != nil {
		return err
	}
	r.log.Info("this node's issuing CA recorded in the state", "serial", own.SerialNumber.Text(16), "previous_recorded_serial", prev)
	return nil
}

// NodeIssuingCertInstall installs a renewed issuing CA certificate on
// this node (see issuingRenewal). The request must name this node; one
// naming another node is refused rather than forwarded: the certificate
// is for a key in that node's HSM, which only that node can check, and
// an admin who reached the wrong node should learn it rather than have
// the change made elsewhere.
func (a *admin) NodeIssuingCertInstall(ctx context.Context, r *api.IssuingCertRequest) (*api.IssuingCertInstalled, error) {
	const what = "node issuing-cert install"
	c := callerFrom(ctx)
	refuse := func(code codes.Code, err error) error {
		a.log.Warn("admin request refused", "request", what, "actor", c.Actor, "reason", err.Error())
		return status.Error(code, err.Error())
	}
	if a.renew == nil {
		return nil, refuse(codes.Unimplemented, errors.New("this node cannot install issuing certificates"))
	}
	certs, err := pemfile.ParseCerts("the request's certificate", r.PEM)
	if err != nil {
		return nil, refuse(codes.InvalidArgument, err)
	}
	cert := certs[0]
	node := r.Node
	if node == "" {
		node = cert.Subject.CommonName
	}
	if node != a.nodeID {
		return nil, refuse(codes.FailedPrecondition, fmt.Errorf("the request is for node %q, and this is node %s: send it to node %q's API (sigilctl --server), which alone holds the key the certificate is for", node, a.nodeID, node))
	}
	if cert.Subject.CommonName != node {
		return nil, refuse(codes.InvalidArgument, fmt.Errorf("the certificate (serial %x) is for node %q, not node %q", cert.SerialNumber, cert.Subject.CommonName, node))
	}
	if err := a.read(ctx, what); err != nil { // the CRLs committed before the call count
		return nil, err
	}
	if a.renew.rotationStaging(cert) {
		// The new root is in the bundle: make sure this node trusts it
		// before checking the certificate against it.
		if err := a.renew.follow(ctx); err != nil {
			a.log.Warn("following the root rotation before staging failed", "err", err)
		}
		return a.renew.stage(ctx, cert, func(ctx context.Context, p state.NodeCAStage) error {
			if a.rotation != nil {
				// This node's lifetimes, which the switch waits for
				// whichever node proposes it.
				p.MaxTTL = a.rotation.maxSignedLife()
			}
			_, err := write[api.Empty](ctx, a, state.CmdNodeCAStage, p)
			return err
		}, func(err error) error { return refuse(codes.FailedPrecondition, err) })
	}
	return a.renew.install(ctx, cert, func(ctx context.Context, p state.NodeCAInstall) error {
		_, err := write[api.Empty](ctx, a, state.CmdNodeCAInstall, p)
		return err
	}, func(err error) error { return refuse(codes.FailedPrecondition, err) })
}

// install runs the steps above; commit proposes the state command (its
// error is already a gRPC status), refused maps a refusal of the checks.
func (r *issuingRenewal) install(ctx context.Context, cert *x509.Certificate, commit func(context.Context, state.NodeCAInstall) error, refused func(error) error) (*api.IssuingCertInstalled, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.auth.CheckRenewal(cert); err != nil {
		return nil, refused(err)
	}
	old := r.auth.Issuing()
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		r.log.Error("issuing certificate not installed: its directory in the data directory cannot be made", "err", err)
		return nil, status.Errorf(codes.Internal, "make %s: %v (nothing changed)", r.dir, err)
	}
	staged, err := stageFile(filepath.Join(r.dir, installedIssuingName), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}))
	if err != nil {
		r.log.Error("issuing certificate not installed: it cannot be written to the data directory", "dir", r.dir, "err", err)
		return nil, status.Errorf(codes.Internal, "write the new issuing certificate to %s: %v (nothing changed)", r.dir, err)
	}
	defer func() { _ = os.Remove(staged) }() // gone once renamed into place: nothing to remove
	if err := commit(ctx, state.NodeCAInstall{Cert: cert.Raw, Previous: old.SerialNumber.Text(16)}); err != nil {
		return nil, err
	}
	if _, err := r.auth.Install(cert); err != nil {
		// A CRL revoking it committed between the check and now.
		r.log.Error("issuing certificate recorded but not installed", "serial", cert.SerialNumber.Text(16), "err", err)
		return nil, status.Errorf(codes.FailedPrecondition, "the certificate was recorded but this node does not sign with it: %v", err)
	}
	r.log.Warn("issuing CA renewed: new SVIDs are signed by the new certificate",
		"serial", cert.SerialNumber.Text(16), "not_after", cert.NotAfter.UTC(),
		"previous_serial", old.SerialNumber.Text(16), "previous_not_after", old.NotAfter.UTC())
	if err := replaceKeepingPrevious(r.dir, staged); err != nil {
		r.log.Error("the node signs with the new issuing certificate but it was not kept in the data directory: a restart would use the previous one until this is fixed",
			"dir", r.dir, "err", err)
		return nil, status.Errorf(codes.Internal, "installed and recorded, but not kept in %s (a restart would use the previous certificate; install again to retry): %v", r.dir, err)
	}
	if err := r.ident.Renew(); err != nil {
		r.log.Warn("node TLS certificate not renewed under the new issuing CA; the old one serves until its half-life", "err", err)
	}
	out := &api.IssuingCertInstalled{Node: r.auth.NodeID(), Serial: cert.SerialNumber.Text(16), NotAfter: cert.NotAfter.UTC(),
		PreviousSerial: old.SerialNumber.Text(16), PreviousNotAfter: old.NotAfter.UTC()}
	if kid, err := r.jwt.Rotate(ctx); err != nil {
		r.log.Error("no JWT key published with the new issuing CA; the rotation schedule publishes one later", "err", err)
	} else {
		out.JWTKey = kid
		r.log.Info("JWT key published with the new issuing CA", "kid", kid)
	}
	return out, nil
}

// stageFile writes data, synced, to a new file beside path and returns
// its name.
func stageFile(path string, data []byte) (string, error) {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".new-*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(0o644) // a certificate: as readable as the one it replaces
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(name) // the write's error is the one to report
		return "", err
	}
	return name, nil
}

// installedIssuingName and installedPreviousName are the files in
// InstalledIssuingDir: the certificate installed last, and the one it
// replaced there.
const (
	installedIssuingName  = "current.pem"
	installedPreviousName = "previous.pem"
)

// InstalledIssuingDir is where a node keeps the issuing certificates
// installed while it ran: in its data directory, which sigild may write
// (the configured issuing-cert file is the operator's, under /etc when
// packaged, which the unit leaves read-only to sigild).
func InstalledIssuingDir(dataDir string) string { return filepath.Join(dataDir, "issuing") }

// replaceKeepingPrevious links dir/current.pem (if any) as
// dir/previous.pem and renames staged over dir/current.pem: once a
// certificate was installed, current.pem holds a whole one at every
// moment, the old or the new (a crash between the steps leaves the old).
func replaceKeepingPrevious(dir, staged string) error {
	cur := filepath.Join(dir, installedIssuingName)
	prev := filepath.Join(dir, installedPreviousName)
	if _, err := os.Lstat(cur); err == nil {
		tmp := prev + ".new"
		if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := os.Link(cur, tmp); err != nil {
			return err
		}
		if err := os.Rename(tmp, prev); err != nil {
			_ = os.Remove(tmp) // the rename's error is the one to report
			return err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Rename(staged, cur); err != nil {
		return err
	}
	d, err := os.Open(dir) // the renames survive a crash
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

func sameKey(a, b *x509.Certificate) bool {
	k, ok := a.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b.PublicKey)
}

// PrefersInstalled reports whether a node whose issuing-cert is
// configured and whose kept bundle roots (KeptRoots) are kept starts with
// installed, the certificate in its data directory's issuing/current.pem,
// provided installed passes ca.CheckIssuing: it is another certificate
// for the same key that expires later, or, after a root rotation, one
// under a kept root while configured is under none (the configured file
// may be under a root the cluster retired: a copy under a root the bundle
// still had when the node last ran wins whatever the expiries).
// sigild --check-config asks it too.
func PrefersInstalled(configured, installed *x509.Certificate, kept []*x509.Certificate) bool {
	if installed.Equal(configured) || !sameKey(configured, installed) {
		return false
	}
	underKept := func(x *x509.Certificate) bool {
		return slices.ContainsFunc(kept, func(r *x509.Certificate) bool { return signedBy(x, r) })
	}
	return installed.NotAfter.After(configured.NotAfter) || len(kept) > 0 && underKept(installed) && !underKept(configured)
}

// startIssuing is the issuing certificate a node starts with: the one an
// install kept in the data directory (InstalledIssuingDir) when it is
// for the configured certificate's key, passes ca.CheckIssuing (this
// HSM key, this node, this trust domain, chains to roots and is valid
// now) and expires later than configured; otherwise configured. A copy
// that is there but not used is logged with the reason: it is either
// stale (the operator put a newer certificate in issuing-cert, which is
// then used) or not this node's to use.
func startIssuing(log *slog.Logger, dataDir string, td spiffeid.TrustDomain, nodeID string, signer crypto.Signer, configured *x509.Certificate, roots, kept []*x509.Certificate, now time.Time) *x509.Certificate {
	path := filepath.Join(InstalledIssuingDir(dataDir), installedIssuingName)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return configured
	}
	ignore := func(reason string, args ...any) *x509.Certificate {
		log.Warn("the issuing certificate installed in the data directory is not used: the configured issuing-cert is",
			append([]any{"path", path, "reason", reason, "serial", configured.SerialNumber.Text(16), "not_after", configured.NotAfter.UTC()}, args...)...)
		return configured
	}
	c, err := pemfile.ReadCert(path)
	if err != nil {
		return ignore(err.Error())
	}
	args := []any{"installed_serial", c.SerialNumber.Text(16), "installed_not_after", c.NotAfter.UTC()}
	if c.Equal(configured) {
		return configured // the operator copied it into issuing-cert: nothing to say
	}
	if !sameKey(configured, c) {
		return ignore("it is for another key than the configured issuing-cert", args...)
	}
	if !PrefersInstalled(configured, c, kept) {
		return ignore("it expires no later than the configured issuing-cert (stale: a newer certificate was configured)", args...)
	}
	if err := ca.CheckIssuing(td, nodeID, signer, c, roots, now); err != nil {
		return ignore(err.Error(), args...)
	}
	log.Info("issuing certificate installed while the node ran is used instead of the configured issuing-cert (it expires later)",
		"path", path, "serial", c.SerialNumber.Text(16), "not_after", c.NotAfter.UTC(),
		"configured_serial", configured.SerialNumber.Text(16), "configured_not_after", configured.NotAfter.UTC())
	return c
}
