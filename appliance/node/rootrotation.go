package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// A root rotation (state/rootrotation.go) is committed phase by phase;
// each node follows the committed phase on its own (rotationLoop), so a
// node that was down, or the leader that died mid-phase, catches up from
// the state alone:
//   - its authority trusts exactly the bundle's roots (after add: old and
//     new; after retire: the new), kept in <data-dir>/roots.pem so that a
//     restart trusts what the cluster trusted, whatever root-certs says;
//   - while the rotation is switched it signs with the certificate it
//     staged under the new root (the state holds it); rolled back to
//     added, with the one it had before (issuing/previous.pem);
//   - after a change of issuing certificate its TLS certificate is
//     renewed under it, a JWT key carrying it is published, and its CA is
//     shown to the state (which retire waits for).

// keptRootsName is the file in the data directory holding the bundle's
// roots as this node last applied them.
const keptRootsName = "roots.pem"

// KeptRoots reads the roots a node kept from the replicated bundle (nil:
// none kept yet).
func KeptRoots(dataDir string) ([]*x509.Certificate, error) {
	path := filepath.Join(dataDir, keptRootsName)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return pemfile.ReadCerts(path)
}

// startRoots are the roots a node starts with: the configured root-certs
// and the roots it kept from the bundle. The rotation loop narrows them to
// the bundle's as soon as the replica is read.
func startRoots(configured, kept []*x509.Certificate) []*x509.Certificate {
	out := slices.Clone(configured)
	for _, k := range kept {
		if !slices.ContainsFunc(out, func(c *x509.Certificate) bool { return c.Equal(k) }) {
			out = append(out, k)
		}
	}
	return out
}

func rootFP(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// signedBy reports whether root signed c.
func signedBy(c, root *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, root.RawSubject) && c.CheckSignatureFrom(root) == nil
}

// underRoot reports whether one of roots with fingerprint fp signed c.
func underRoot(c *x509.Certificate, roots []*x509.Certificate, fp string) bool {
	for _, r := range roots {
		if rootFP(r) == fp && signedBy(c, r) {
			return true
		}
	}
	return false
}

func sameCerts(a, b []*x509.Certificate) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(c *x509.Certificate) bool {
		return !slices.ContainsFunc(b, func(d *x509.Certificate) bool { return c.Equal(d) })
	})
}

// rotationLoop keeps this node in step with the committed rotation.
func (r *issuingRenewal) rotationLoop(ctx context.Context) {
	wait := 30 * time.Second
	for {
		changed := r.state.ConfigChanged()
		if err := r.follow(ctx); errors.Is(err, errReplicaBehind) {
			// After a start, until raft has a leader and the log is
			// replayed: nothing is wrong yet.
			r.log.Warn("root rotation not followed yet; retrying", "err", err, "retry_in", "5s")
			wait = 5 * time.Second
		} else if err != nil {
			r.log.Error("following the root rotation failed; retrying", "err", err, "retry_in", "5s")
			wait = 5 * time.Second
		} else {
			wait = 30 * time.Second
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(wait):
		}
	}
}

// errReplicaBehind: follow waits for a read barrier, which failed.
var errReplicaBehind = errors.New("the replica is not known to be current: the root rotation is followed once it is")

// follow makes the authority's roots the bundle's and its issuing
// certificate the one the rotation's phase asks for.
//
// Only from a replica known to be current: the state is rebuilt at every
// start (an empty file, then raft's snapshot and log), so while it
// replays, the replica shows each earlier phase in turn. Acting on those
// took a node restarted after a retire back to its old-root certificate
// (it saw "added" with its certificate under the new root: a rollback),
// and once the replay reached "retired" nothing took it forward again:
// it signed under a root no peer trusted any more, locked out.
func (r *issuingRenewal) follow(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err := r.member.readIndex(rctx)
	cancel()
	if err != nil {
		return fmt.Errorf("%w: %w", errReplicaBehind, err)
	}
	return r.followCurrent(ctx)
}

// followCurrent is follow on a replica the caller knows is current.
func (r *issuingRenewal) followCurrent(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	b := r.state.Bundle()
	if len(b.Roots) == 0 {
		return nil // a new cluster: its first leader sets them
	}
	var roots []*x509.Certificate
	now := time.Now()
	for _, d := range b.Roots {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return fmt.Errorf("bundle root: %w", err)
		}
		if now.After(c.NotAfter) {
			// An old root that ran out before its rotation retired it
			// verifies nothing; the authority refuses it in a set.
			continue
		}
		roots = append(roots, c)
	}
	if len(roots) == 0 {
		return errors.New("every root of the trust bundle has expired")
	}
	// Widen first (never drop a root the current certificate needs before
	// the swap), swap, then narrow to the bundle's.
	// A root of the current set that is no longer valid (an old root
	// still listed in root-certs after it expired) is not carried into
	// the wider set: SetRoots refuses a set holding one, which would fail
	// every follow and keep the node from ever trusting a new root.
	cur := r.auth.Roots()
	valid := slices.DeleteFunc(slices.Clone(cur), func(c *x509.Certificate) bool { return now.After(c.NotAfter) || now.Before(c.NotBefore) })
	if wide := startRoots(valid, roots); !sameCerts(wide, cur) {
		if err := r.auth.SetRoots(wide); err != nil {
			return fmt.Errorf("trust the bundle's roots: %w", err)
		}
	}
	rot := r.state.RootRotation()
	iss := r.auth.Issuing()
	switch {
	case rot != nil && rot.Phase == state.PhaseSwitched && !underRoot(iss, roots, rot.New):
		s := stagedFor(rot, r.auth.NodeID())
		if s == nil {
			return fmt.Errorf("the rotation switched to root %.16s but the state holds no certificate staged for this node", rot.New)
		}
		c, err := x509.ParseCertificate(s.Cert)
		if err != nil {
			return fmt.Errorf("staged certificate: %w", err)
		}
		if err := r.swap(ctx, c, "the rotation switched: new SVIDs chain to the new root"); err != nil {
			return err
		}
	case rot != nil && rot.Phase == state.PhaseAdded && underRoot(iss, roots, rot.New):
		prev, err := r.beforeSwitch(roots, rot)
		if err != nil {
			return fmt.Errorf("the rotation rolled back but this node has no certificate under the old root to sign with: %w", err)
		}
		if err := r.swap(ctx, prev, "the rotation rolled back: new SVIDs chain to the old root again"); err != nil {
			return err
		}
	case (rot == nil || rot.Phase == state.PhaseRetired) && !slices.ContainsFunc(roots, func(root *x509.Certificate) bool { return signedBy(iss, root) }):
		// Under none of the bundle's roots in any other phase (retired,
		// or none after a rollback): a node restarted with stale kept
		// roots picked a certificate under a root the cluster dropped.
		// Go back to the one it kept under a bundle root.
		c, err := r.underBundle(roots)
		if err != nil {
			return fmt.Errorf("this node's issuing certificate (serial %x) is under none of the trust bundle's roots, and neither is a certificate it kept: %w", iss.SerialNumber, err)
		}
		if err := r.swap(ctx, c, "the issuing certificate was under none of the trust bundle's roots"); err != nil {
			return err
		}
	}
	if !sameCerts(r.auth.Roots(), roots) {
		if err := r.auth.SetRoots(roots); err != nil {
			return fmt.Errorf("trust exactly the bundle's roots: %w", err)
		}
		r.log.Warn("trusted roots changed with the bundle", "roots", fingerprints(roots), "sequence", b.Sequence)
	}
	if err := r.keepRoots(roots); err != nil {
		r.log.Error("the bundle's roots could not be kept in the data directory: a restart trusts root-certs until the replica is read", "err", err)
	}
	// The TLS certificate follows the issuing certificate (a renewal that
	// failed at the swap is retried here).
	if tc, err := r.ident.Certificate(); err == nil && len(tc.Certificate) > 1 && !bytes.Equal(tc.Certificate[1], r.auth.Issuing().Raw) {
		if err := r.ident.Renew(); err != nil {
			return fmt.Errorf("renew the node TLS certificate under the current issuing CA: %w", err)
		}
	}
	return nil
}

func fingerprints(cs []*x509.Certificate) string {
	var fps []string
	for _, c := range cs {
		fps = append(fps, rootFP(c)[:16])
	}
	return strings.Join(fps, ",")
}

func stagedFor(rot *state.RootRotation, node string) *state.StagedCA {
	for i := range rot.Staged {
		if rot.Staged[i].Node == node {
			return &rot.Staged[i]
		}
	}
	return nil
}

// beforeSwitch is the certificate to sign with after a rollback from
// switched: the one the switch replaced (previous.pem), else the
// configured issuing-cert, whichever is under an old root and valid.
func (r *issuingRenewal) beforeSwitch(roots []*x509.Certificate, rot *state.RootRotation) (*x509.Certificate, error) {
	var problems []string
	for _, path := range []string{filepath.Join(r.dir, installedPreviousName), r.configured} {
		if path == "" {
			continue
		}
		c, err := pemfile.ReadCert(path)
		if err == nil && !slices.ContainsFunc(rot.Old, func(fp string) bool { return underRoot(c, roots, fp) }) {
			err = errors.New("not under the old root")
		}
		if err == nil {
			err = r.auth.CheckNext(c)
		}
		if err == nil {
			return c, nil
		}
		problems = append(problems, path+": "+err.Error())
	}
	return nil, errors.New(strings.Join(problems, "; "))
}

// underBundle is a certificate this node kept (issuing/current.pem,
// issuing/previous.pem, then the configured issuing-cert) that one of the
// bundle's roots signed and that it can sign with now.
func (r *issuingRenewal) underBundle(roots []*x509.Certificate) (*x509.Certificate, error) {
	var problems []string
	for _, path := range []string{filepath.Join(r.dir, installedIssuingName), filepath.Join(r.dir, installedPreviousName), r.configured} {
		if path == "" {
			continue
		}
		if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
			continue
		}
		c, err := pemfile.ReadCert(path)
		if err == nil && !slices.ContainsFunc(roots, func(root *x509.Certificate) bool { return signedBy(c, root) }) {
			err = errors.New("not under a bundle root")
		}
		if err == nil {
			err = r.auth.CheckNext(c)
		}
		if err == nil {
			return c, nil
		}
		problems = append(problems, path+": "+err.Error())
	}
	if len(problems) == 0 {
		return nil, errors.New("no certificate kept")
	}
	return nil, errors.New(strings.Join(problems, "; "))
}

// swap signs with c from now on, keeps it as current.pem (the one it
// replaces as previous.pem), renews the TLS certificate, publishes a JWT
// key carrying it and shows it to the state (r.mu held).
func (r *issuingRenewal) swap(ctx context.Context, c *x509.Certificate, why string) error {
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return err
	}
	cur := filepath.Join(r.dir, installedIssuingName)
	if _, err := os.Lstat(cur); errors.Is(err, os.ErrNotExist) {
		// The node signs with the configured file: keep that as current
		// for a moment, so that it becomes previous.pem (a rollback's).
		if err := os.WriteFile(cur, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.auth.Issuing().Raw}), 0o644); err != nil {
			return fmt.Errorf("keep the current certificate in %s: %w", r.dir, err)
		}
	}
	staged, err := stageFile(cur, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	if err != nil {
		return fmt.Errorf("keep the certificate in %s: %w", r.dir, err)
	}
	defer func() { _ = os.Remove(staged) }() // gone once renamed into place
	old, err := r.auth.Switch(c)
	if err != nil {
		return fmt.Errorf("sign with certificate %s: %w", c.SerialNumber.Text(16), err)
	}
	r.log.Warn("issuing CA switched: "+why, "serial", c.SerialNumber.Text(16), "issuer", c.Issuer.String(),
		"not_after", c.NotAfter.UTC(), "previous_serial", old.SerialNumber.Text(16), "previous_issuer", old.Issuer.String())
	if err := replaceKeepingPrevious(r.dir, staged); err != nil {
		r.log.Error("the node signs with the switched certificate but it was not kept in the data directory; the rotation loop switches again after a restart", "dir", r.dir, "err", err)
	}
	if err := r.ident.Renew(); err != nil {
		r.log.Warn("node TLS certificate not renewed under the switched CA; retried", "err", err)
	}
	if kid, err := r.jwt.Rotate(ctx); err != nil {
		r.log.Error("no JWT key published with the switched issuing CA; the rotation schedule publishes one later", "err", err)
	} else {
		r.log.Info("JWT key published with the switched issuing CA", "kid", kid)
	}
	if err := r.showLocked(ctx); err != nil {
		r.log.Warn("showing the switched issuing CA to the state failed; the show loop retries", "err", err)
	}
	return nil
}

// keepRoots writes the roots to <data-dir>/roots.pem when they differ.
func (r *issuingRenewal) keepRoots(roots []*x509.Certificate) error {
	if r.dataDir == "" {
		return nil
	}
	var buf bytes.Buffer
	for _, c := range roots {
		_ = pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}) // a bytes.Buffer does not fail
	}
	path := filepath.Join(r.dataDir, keptRootsName)
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, buf.Bytes()) {
		return nil
	}
	tmp, err := stageFile(path, buf.Bytes())
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp) // the rename's error is the one to report
		return err
	}
	return nil
}

// stage is install for a certificate under the new root while the
// rotation is in phase added: checked, then committed as this node's
// staged CA (state.CmdNodeCAStage); the node signs with it at the switch.
func (r *issuingRenewal) stage(ctx context.Context, cert *x509.Certificate, commit func(context.Context, state.NodeCAStage) error, refused func(error) error) (*api.IssuingCertInstalled, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.auth.CheckNext(cert); err != nil {
		return nil, refused(err)
	}
	if err := commit(ctx, state.NodeCAStage{Cert: cert.Raw}); err != nil {
		return nil, err
	}
	old := r.auth.Issuing()
	r.log.Info("issuing certificate under the new root staged: the node signs with it when the rotation switches",
		"serial", cert.SerialNumber.Text(16), "issuer", cert.Issuer.String(), "not_after", cert.NotAfter.UTC())
	return &api.IssuingCertInstalled{Node: r.auth.NodeID(), Serial: cert.SerialNumber.Text(16), NotAfter: cert.NotAfter.UTC(),
		PreviousSerial: old.SerialNumber.Text(16), PreviousNotAfter: old.NotAfter.UTC(), Staged: true}, nil
}

// rotationStaging reports whether cert is to be staged rather than
// installed: a rotation is in phase added and the new root signed it.
func (r *issuingRenewal) rotationStaging(cert *x509.Certificate) bool {
	rot := r.state.RootRotation()
	if rot == nil || rot.Phase != state.PhaseAdded {
		return false
	}
	for _, d := range r.state.Bundle().Roots {
		if root, err := x509.ParseCertificate(d); err == nil && rootFP(root) == rot.New && signedBy(cert, root) {
			return true
		}
	}
	return false
}

// maxSignedLife is the longest lifetime of anything this node signs: an
// old root's chain is trusted until it has passed since the switch. Its
// own TLS certificate is not counted: it is renewed at the switch, and
// retire waits until every node shows its CA under the new root.
func (n *Node) maxSignedLife() time.Duration {
	life := max(n.cfg.Join.AgentSVIDTTL.Duration, n.adminCertMaxTTL())
	for _, e := range n.fsm.Entries() {
		x509TTL, jwtTTL := e.X509TTL.Duration(), e.JWTTTL.Duration()
		if x509TTL == 0 {
			x509TTL = defaultX509TTL
		}
		if jwtTTL == 0 {
			jwtTTL = defaultJWTTTL
		}
		life = max(life, x509TTL, jwtTTL)
	}
	for _, jr := range n.fsm.JoinRules() {
		// A run's SVIDs end with its job agent; its JWT-SVIDs live as
		// long as any entry's default.
		life = max(life, jr.TTL.Duration(), defaultJWTTTL)
	}
	// Clocks of the nodes and of the relying parties differ a little.
	return life + time.Minute
}

// RootRotate moves the rotation one phase (see state/rootrotation.go for
// the state's rules; this node adds the waits Force skips).
func (a *admin) RootRotate(ctx context.Context, r *api.RootRotateRequest) (*api.RootRotationStatus, error) {
	const what = "ca rotate"
	c := callerFrom(ctx)
	refuse := func(code codes.Code, err error) error {
		a.log.Warn("admin request refused", "request", what, "phase", r.Phase, "actor", c.Actor, "reason", err.Error())
		return status.Error(code, err.Error())
	}
	if a.rotation == nil {
		return nil, refuse(codes.Unimplemented, errors.New("this node cannot rotate roots"))
	}
	if err := a.read(ctx, what); err != nil {
		return nil, err
	}
	rot := a.state.RootRotation()
	phase := state.RootPhase{MaxTTL: a.rotation.maxSignedLife(), Force: r.Force}
	var typ string
	var payload any
	switch r.Phase {
	case "add":
		certs, err := pemfile.ParseCerts("the new root", r.Root)
		if err != nil {
			return nil, refuse(codes.InvalidArgument, err)
		}
		if len(certs) != 1 {
			return nil, refuse(codes.InvalidArgument, fmt.Errorf("the new root file holds %d certificates; want exactly one", len(certs)))
		}
		typ, payload = state.CmdRootAdd, state.RootAdd{Root: certs[0].Raw}
	case "switch", "retire":
		if rot != nil && !r.Force {
			if err := a.rotation.waitsFor(rot, r.Phase); err != nil {
				return nil, refuse(codes.FailedPrecondition, err)
			}
		}
		members, err := a.member.raft.Members()
		if err != nil {
			return nil, a.fail(what, c, err)
		}
		slices.Sort(members)
		phase.Members = members
		typ, payload = state.CmdRootSwitch, phase
		if r.Phase == "retire" {
			typ = state.CmdRootRetire
		}
	case "rollback":
		// A rollback past add checks that no member still signs under
		// the new root it removes.
		members, err := a.member.raft.Members()
		if err != nil {
			return nil, a.fail(what, c, err)
		}
		slices.Sort(members)
		phase.Members = members
		typ, payload = state.CmdRootRollback, phase
	default:
		return nil, refuse(codes.InvalidArgument, fmt.Errorf("phase %q: want add, switch, rollback or retire", truncateString(r.Phase, 32)))
	}
	if _, err := write[json.RawMessage](ctx, a, typ, payload); err != nil {
		return nil, err
	}
	// The committed phase is followed here at once (every node's loop
	// does it too), so the answer shows this node already on it.
	if err := a.renew.follow(ctx); err != nil {
		a.log.Error("following the root rotation on this node failed; its loop retries", "err", err)
	}
	return a.rotationStatus(), nil
}

func truncateString(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// waitsFor refuses a phase while agents have not acknowledged the last
// one, and a switch before federated peers refetched the bundle.
func (n *Node) waitsFor(rot *state.RootRotation, phase string) error {
	if (phase == "switch") != (rot.Phase == state.PhaseAdded) {
		return nil // out of order: the state machine says why
	}
	if pending, count := n.fsm.PendingAcks(rot.Sequence, time.Now(), 10); count > 0 {
		var ids []string
		for _, p := range pending {
			ids = append(ids, p.ID)
		}
		more := ""
		if count > len(ids) {
			more = fmt.Sprintf(" and %d more", count-len(ids))
		}
		return fmt.Errorf("%d agents have not acknowledged bundle sequence %d (the %s): %s%s; wait (sigilctl ca rotate status), remove agents that will not return (sigilctl agent remove), or force it",
			count, rot.Sequence, rot.Phase, strings.Join(ids, ", "), more)
	}
	if phase == "switch" && n.bundleLn != nil {
		if ready := rot.Added.Add(n.cfg.Bundle.RefreshHint.Duration); time.Now().Before(ready) {
			return fmt.Errorf("federated trust domains fetch this bundle every %s: switch after %s, when they hold the new root (or force it)",
				n.cfg.Bundle.RefreshHint.Duration, ready.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// RootRotation answers where the rotation stands.
func (a *admin) RootRotation(ctx context.Context, _ *api.Empty) (*api.RootRotationStatus, error) {
	if err := a.read(ctx, "ca rotate status"); err != nil {
		return nil, err
	}
	return a.rotationStatus(), nil
}

func (a *admin) rotationStatus() *api.RootRotationStatus {
	out := &api.RootRotationStatus{}
	for _, d := range a.state.Bundle().Roots {
		if c, err := x509.ParseCertificate(d); err == nil {
			out.Roots = append(out.Roots, api.RootInfo{SHA256: rootFP(c), Subject: c.Subject.String(), NotAfter: c.NotAfter.UTC()})
		}
	}
	rot := a.state.RootRotation()
	if rot == nil {
		out.Next = "no rotation: start one with sigilctl ca rotate add NEW-ROOT.pem"
		return out
	}
	out.Phase, out.Old, out.New, out.Sequence, out.Since = rot.Phase, rot.Old, rot.New, rot.Sequence, rot.Since
	out.RetireAfter = rot.RetireAfter
	// A retired rotation waits for nothing: its acknowledgements are not
	// collected (nor counted: a scan of every agent).
	var pending []state.Agent
	count := 0
	if rot.Phase != state.PhaseRetired {
		pending, count = a.state.PendingAcks(rot.Sequence, time.Now(), api.MaxPendingListed)
	}
	out.AgentsPendingCount = count
	for _, p := range pending {
		pa := api.PendingAgent{SPIFFEID: p.ID, Acked: p.BundleAck}
		if last, _ := a.seen.contact(p.ID); !last.IsZero() {
			pa.LastSeen = last.UTC()
		}
		out.AgentsPending = append(out.AgentsPending, pa)
	}
	members, _ := a.member.raft.Members()
	slices.Sort(members)
	recs := map[string]state.NodeCA{}
	for _, rec := range a.state.NodeCAs() {
		recs[rec.Node] = rec
	}
	for _, m := range members {
		switch rot.Phase {
		case state.PhaseAdded:
			if stagedFor(rot, m) == nil {
				out.NodesNotStaged = append(out.NodesNotStaged, m)
			}
		case state.PhaseSwitched:
			if recs[m].Root != rot.New {
				out.NodesNotStaged = append(out.NodesNotStaged, m)
			}
		}
	}
	waits := ""
	if count > 0 {
		waits = fmt.Sprintf("; %d agents have not acknowledged sequence %d", count, rot.Sequence)
	}
	switch rot.Phase {
	case state.PhaseAdded:
		if len(out.NodesNotStaged) > 0 {
			out.Next = "stage each node's certificate under the new root (sigilctl node issuing-cert install), then switch"
		} else {
			out.Next = "switch (sigilctl ca rotate switch)"
		}
	case state.PhaseSwitched:
		out.Next = fmt.Sprintf("retire after %s (sigilctl ca rotate retire)", rot.RetireAfter.UTC().Format(time.RFC3339))
		if len(out.NodesNotStaged) > 0 {
			out.Next = "wait for every node to sign under the new root, then retire after " + rot.RetireAfter.UTC().Format(time.RFC3339)
		}
	case state.PhaseRetired:
		out.Next = "done: the old root is retired"
	}
	out.Next += waits
	return out
}

// BundleAck commits the calling agent's acknowledgement when a rotation
// waits for it; any other acknowledgement is answered without a commit,
// so that an agent's acks cost one command per phase.
func (s *agentSvc) BundleAck(ctx context.Context, r *api.BundleAckRequest) (*api.Empty, error) {
	actor := callerFrom(ctx).Actor
	fsm, ok := s.state.(interface {
		RootRotation() *state.RootRotation
	})
	if !ok {
		return &api.Empty{}, nil
	}
	rot := fsm.RootRotation()
	// A retired rotation waits for nothing: agents that join or catch up
	// after it cost no commit.
	if rot == nil || rot.Phase == state.PhaseRetired || r.Sequence < rot.Sequence || r.Sequence > s.state.Bundle().Sequence {
		return &api.Empty{}, nil
	}
	a, err := s.issuer.callingAgent(ctx, actor, "bundle.ack")
	if err != nil {
		return nil, err
	}
	if a.BundleAck >= rot.Sequence {
		return &api.Empty{}, nil
	}
	// Calls of one agent at once (a retry racing the first, or an agent
	// flooding) wait for the one being committed instead of each
	// proposing a command of its own.
	release, done, err := s.acks.enter(ctx, a.ID, rot.Sequence)
	if err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if done {
		return &api.Empty{}, nil
	}
	recorded := false
	defer func() { release(recorded) }()
	if cur, ok := s.state.Agent(a.ID); ok && cur.BundleAck >= rot.Sequence {
		recorded = true
		return &api.Empty{}, nil
	}
	if _, err := s.issuer.apply.apply(ctx, s.issuer.actor, state.CmdBundleAck, state.BundleAck{Agent: a.ID, Sequence: r.Sequence}); err != nil {
		if refused(err) {
			recorded = true
			return &api.Empty{}, nil // acknowledged meanwhile (a retry, or another node)
		}
		s.issuer.log.Warn("bundle acknowledgement not recorded", "agent", a.ID, "sequence", r.Sequence, "err", err)
		return nil, errNoCommit()
	}
	recorded = true
	return &api.Empty{}, nil
}

// ackGate lets one acknowledgement of each agent at a time be proposed
// through this node, and remembers the agents whose acknowledgement of
// the rotation's current phase it committed (or saw refused), so that a
// later call does not propose again before the replica shows it. Its
// zero value is ready; what it holds is bounded by the agents that
// acknowledged the current phase through this node.
type ackGate struct {
	mu    sync.Mutex
	busy  map[string]chan struct{}
	phase uint64 // the rotation sequence acked is of
	acked map[string]bool
}

// enter waits until no acknowledgement of agent is being committed here.
// done: one of phase was recorded already. Otherwise release must be
// called with whether this call's was.
func (g *ackGate) enter(ctx context.Context, agent string, phase uint64) (release func(bool), done bool, err error) {
	for {
		g.mu.Lock()
		if g.phase != phase {
			g.phase, g.acked = phase, nil
		}
		if g.acked[agent] {
			g.mu.Unlock()
			return nil, true, nil
		}
		wait, busy := g.busy[agent]
		if !busy {
			ch := make(chan struct{})
			if g.busy == nil {
				g.busy = map[string]chan struct{}{}
			}
			g.busy[agent] = ch
			g.mu.Unlock()
			return func(recorded bool) {
				g.mu.Lock()
				delete(g.busy, agent)
				if recorded && g.phase == phase {
					if g.acked == nil {
						g.acked = map[string]bool{}
					}
					g.acked[agent] = true
				}
				g.mu.Unlock()
				close(ch)
			}, false, nil
		}
		g.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
}

// pendingCount is the number of agents a rotation waits for, as the
// metric reports it: counting scans every agent (about 60 ms at 10,000
// agents, BenchmarkPendingAcks10k), so a scrape reuses a count up to 15 s
// old, and a retired rotation (which waits for nothing) is not counted.
type pendingCount struct {
	mu  sync.Mutex
	at  time.Time
	seq uint64
	n   int
}

func (p *pendingCount) count(fsm *state.FSM) int {
	rot := fsm.RootRotation()
	if rot == nil || rot.Phase == state.PhaseRetired {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if now := time.Now(); p.seq != rot.Sequence || now.Sub(p.at) > 15*time.Second {
		_, p.n = fsm.PendingAcks(rot.Sequence, now, 0)
		p.at, p.seq = now, rot.Sequence
	}
	return p.n
}
