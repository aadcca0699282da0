package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// The roots the agent trusts (to dial nodes, and to check root CRLs) are
// those of the last trust bundle it applied from a sync stream, kept in
// Options.RootsFile across restarts; only an agent that never applied one
// (a new data dir, a job agent before its first sync) trusts the roots it
// was configured with. A root rotation changes the bundle's roots: the
// agent learns a root that is added before nodes present certificates
// under it, and stops trusting one once it is retired. The kept roots
// were only ever learnt over a sync stream from a node whose chain
// verified, so they are trusted as much as the bundle the agent already
// serves its workloads.

// rootSet is an immutable view of the trusted roots.
type rootSet struct {
	certs []*x509.Certificate
	// kept: the roots of an applied bundle (else the configured ones).
	kept bool
	// gen counts the changes of the trusted roots in this process.
	gen uint64
}

func (s *rootSet) same(certs []*x509.Certificate) bool {
	return s.kept && sameRoots(s.certs, certs)
}

// sameRoots compares two sets of roots, in any order (a repeated root
// counts once).
func sameRoots(a, b []*x509.Certificate) bool {
	return subset(a, b) && subset(b, a)
}

// overlaps reports whether a and b share a certificate.
func overlaps(a, b []*x509.Certificate) bool {
	for _, x := range a {
		for _, y := range b {
			if x.Equal(y) {
				return true
			}
		}
	}
	return false
}

func subset(a, b []*x509.Certificate) bool {
	for _, x := range a {
		if !slices.ContainsFunc(b, func(y *x509.Certificate) bool { return bytes.Equal(x.Raw, y.Raw) }) {
			return false
		}
	}
	return true
}

// Roots returns the roots the agent trusts now: the kept bundle roots
// when it has applied a bundle, else the configured ones. Callers must not
// modify the slice. api.DialConfig.Roots asks it at every handshake.
func (c *Cache) Roots() []*x509.Certificate { return c.roots.Load().certs }

// KeptRoots reports whether the trusted roots are those of an applied
// bundle (false: the configured ones).
func (c *Cache) KeptRoots() bool { return c.roots.Load().kept }

// loadRoots starts from the kept roots when the file holds usable ones.
// It runs in New, before the CRLs are loaded: they are checked against the
// roots it chose.
func (c *Cache) loadRoots() {
	c.roots.Store(&rootSet{certs: c.opts.Roots})
	if c.opts.RootsFile == "" {
		return
	}
	b, err := os.ReadFile(c.opts.RootsFile)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var certs []*x509.Certificate
	if err == nil {
		certs, err = pemfile.ParseCerts(c.opts.RootsFile, b)
	}
	if err == nil {
		err = c.sameTrustDomain(certs)
	}
	if err != nil {
		c.log.Error("kept trust bundle roots unusable; trusting the configured root-cert until the appliance sends the bundle again",
			"file", c.opts.RootsFile, "err", err)
		return
	}
	set := &rootSet{certs: certs, kept: true}
	c.roots.Store(set)
	c.rootsSaved = true
	c.log.Info("trusting the trust bundle roots kept from the last sync", "file", c.opts.RootsFile, "roots", fingerprints(certs))
	c.warnConfigured(set)
}

// sameTrustDomain refuses kept roots of another trust domain than the
// configured ones name (a data dir reused for another appliance).
func (c *Cache) sameTrustDomain(certs []*x509.Certificate) error {
	want := trustDomainOf(c.opts.Roots)
	if want.IsZero() {
		return nil
	}
	if got := trustDomainOf(certs); got != want {
		return fmt.Errorf("the kept roots are of trust domain %q, root-cert of %q", got.Name(), want.Name())
	}
	return nil
}

// trustDomainOf is the trust domain a root names in its URI SAN.
func trustDomainOf(roots []*x509.Certificate) spiffeid.TrustDomain {
	for _, r := range roots {
		if len(r.URIs) == 1 {
			if id, err := spiffeid.FromURI(r.URIs[0]); err == nil {
				return id.TrustDomain()
			}
		}
	}
	return spiffeid.TrustDomain{}
}

// bundleRoots parses and checks the roots of an update: each a CA
// certificate, none naming another trust domain, one naming td (dialing a
// node finds the trust domain there), and the same set as the X.509
// authorities of the bundle document the workloads are served (an ack
// says both were applied).
func bundleRoots(td spiffeid.TrustDomain, ders [][]byte, doc *spiffebundle.Bundle) ([]*x509.Certificate, error) {
	if len(ders) == 0 {
		return nil, errors.New("the bundle lists no roots")
	}
	certs := make([]*x509.Certificate, 0, len(ders))
	named := false
	for i, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("root %d: %w", i+1, err)
		}
		if !c.BasicConstraintsValid || !c.IsCA {
			return nil, fmt.Errorf("root %d (%q) is not a CA certificate", i+1, c.Subject.String())
		}
		for _, u := range c.URIs {
			id, err := spiffeid.FromURI(u)
			if err != nil || id.TrustDomain() != td {
				return nil, fmt.Errorf("root %d (%q) names %s, not trust domain %s", i+1, c.Subject.String(), u, td.Name())
			}
			named = true
		}
		certs = append(certs, c)
	}
	if !named {
		return nil, fmt.Errorf("no root names trust domain %s (a URI SAN spiffe://%s)", td.Name(), td.Name())
	}
	if !sameRoots(certs, doc.X509Authorities()) {
		return nil, errors.New("the bundle's roots are not the X.509 authorities of its SPIFFE bundle document")
	}
	return certs, nil
}

// keepRoots makes the roots of an applied update the trusted ones, on
// disk first. It reports whether the update's roots are kept in memory
// and on disk: only then may the bundle be acknowledged. Roots the cache
// cannot use leave the trusted ones as they were (logged once for each
// set sent); the rest of the update still applies, as with a CRL it
// cannot verify.
func (c *Cache) keepRoots(td spiffeid.TrustDomain, ders [][]byte, doc *spiffebundle.Bundle) bool {
	saved, changed := c.adoptRoots(td, ders, doc)
	if changed && c.opts.OnRootsChanged != nil {
		c.opts.OnRootsChanged()
	}
	return saved
}

func (c *Cache) adoptRoots(td spiffeid.TrustDomain, ders [][]byte, doc *spiffebundle.Bundle) (saved, changed bool) {
	c.rootsMu.Lock()
	defer c.rootsMu.Unlock()
	certs, err := bundleRoots(td, ders, doc)
	cur := c.roots.Load()
	if err == nil && !cur.same(certs) && !overlaps(cur.certs, certs) {
		// Every phase of a root rotation keeps a root the agent already
		// trusts (add keeps the old, retire the new one added before), so
		// a set sharing none is no rotation: one node (compromised, or of
		// another appliance) must not swap the agent's trust anchors in
		// one update and lock it out of the honest nodes.
		err = fmt.Errorf("none of the %d roots is one the agent trusts now (%s): a rotation adds a root before it retires one", len(certs), fingerprints(cur.certs))
	}
	if err != nil {
		var all []byte
		for _, d := range ders {
			all = binary.BigEndian.AppendUint32(all, uint32(len(d)))
			all = append(all, d...)
		}
		if sum := sha256.Sum256(all); sum != c.rootsRefused {
			c.rootsRefused = sum
			c.log.Warn("trust bundle roots from the appliance not kept; the trusted roots stay as they were and the bundle is not acknowledged",
				"roots", len(ders), "err", err)
		}
		return false, false
	}
	c.rootsRefused = [32]byte{}
	if cur.same(certs) {
		if !c.rootsSaved {
			c.rootsSaved = c.saveRoots(certs)
		}
		return c.rootsSaved, false
	}
	// Trusted in memory even when the file cannot be written: an agent
	// that must dial a node under a new root needs it now; the next
	// update writes the file again.
	c.rootsSaved = c.saveRoots(certs)
	next := &rootSet{certs: certs, kept: true, gen: cur.gen + 1}
	c.roots.Store(next)
	c.rootsChanged(certs)
	c.log.Info("trust bundle roots kept", "roots", fingerprints(certs), "was", fingerprints(cur.certs), "file", c.opts.RootsFile)
	c.warnConfigured(next)
	return c.rootsSaved, true
}

// saveRoots writes the roots (PEM, 0644: they are public) by rename,
// synced: an acknowledged bundle's roots must survive a crash. It reports
// whether they are on disk (true without a file: nothing to keep).
func (c *Cache) saveRoots(certs []*x509.Certificate) bool {
	if c.opts.RootsFile == "" {
		return true
	}
	var b []byte
	for _, r := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	if err := writeSynced(c.opts.RootsFile, b); err != nil {
		c.log.Error("trust bundle roots not persisted; trusted in memory, written again with the next update", "file", c.opts.RootsFile, "err", err)
		return false
	}
	return true
}

// writeSynced replaces file with b (0644) by rename, after an fsync, and
// syncs the directory so that the rename is durable too.
func writeSynced(file string, b []byte) error {
	tmp := file + ".tmp"
	if err := os.MkdirAll(filepath.Dir(tmp), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		_ = f.Close() // the write error is the one to report
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close() // the sync error is the one to report
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, file); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(file))
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		_ = d.Close() // the sync error is the one to report
		return err
	}
	return d.Close()
}

// rootsChanged adapts the CRLs to new trusted roots: a CRL skipped for a
// root the agent did not trust may verify now, and the CRL of a root no
// longer trusted revokes only chains that no longer verify anyway (kept,
// it would be refused as unverifiable at the next start).
func (c *Cache) rootsChanged(roots []*x509.Certificate) {
	c.crlMu.Lock()
	defer c.crlMu.Unlock()
	clear(c.crlSkipped)
	cur := c.crls.Load()
	next := cur.only(roots)
	if next == cur {
		return
	}
	if err := c.saveCRLs(next); err != nil {
		c.log.Error("root CRLs not persisted", "file", c.opts.CRLFile, "err", err)
	}
	c.crls.Store(next)
	c.log.Info("root CRLs of roots no longer trusted dropped", "crls", len(next.der))
}

// warnConfigured tells the operator when root-cert holds none of the
// trusted bundle roots: the agent does not need it while it keeps them,
// but one that starts without them (a new data dir, sigil-agent exec with
// the same file) could not dial any node.
func (c *Cache) warnConfigured(s *rootSet) {
	if !s.kept || len(c.opts.Roots) == 0 {
		return
	}
	for _, r := range c.opts.Roots {
		if slices.ContainsFunc(s.certs, func(k *x509.Certificate) bool { return bytes.Equal(k.Raw, r.Raw) }) {
			return
		}
	}
	c.log.Warn("the configured root-cert holds none of the trust bundle's roots: update root-cert (an agent without kept roots trusts only it)",
		"kept_roots_file", c.opts.RootsFile, "bundle_roots", fingerprints(s.certs), "configured", fingerprints(c.opts.Roots))
}

func fingerprints(certs []*x509.Certificate) string {
	fps := make([]string, len(certs))
	for i, r := range certs {
		fps[i] = rootFingerprint(r)[:16]
	}
	return strings.Join(fps, ",")
}

// ackTarget is an applied bundle an acknowledgement may be due for.
type ackTarget struct {
	seq uint64
	gen uint64 // rootSet.gen when it was applied
}

// bundleApplied records that the bundle of seq was applied with its roots
// kept, and wakes the ack loop.
func (c *Cache) bundleApplied(seq uint64) {
	c.ackMu.Lock()
	c.ackable = ackTarget{seq: seq, gen: c.roots.Load().gen}
	c.ackMu.Unlock()
	select {
	case c.ackKick <- struct{}{}:
	default:
	}
}

// ackDue returns the bundle to acknowledge after last (what the
// appliance took): a higher sequence, or the same or a lower one whose
// roots differ from those acknowledged (a lagging node's older bundle, or
// a cluster restored to an earlier sequence, that the agent then applied).
func (c *Cache) ackDue(last ackTarget) (ackTarget, bool) {
	c.ackMu.Lock()
	defer c.ackMu.Unlock()
	t := c.ackable
	return t, t.seq > last.seq || (t.gen != last.gen && t.seq > 0)
}

// ackLoop acknowledges applied bundles, one call per bundle change (an
// update that leaves the sequence and the roots as they were costs
// nothing), off the sync loop: a node slow to answer must not hold back
// the updates behind it. Bundles applied while a call is in flight or
// waiting to be retried are folded into the latest. The process acks the
// bundle it has again after a restart; the appliance takes a repeat as a
// no-op.
func (c *Cache) ackLoop(ctx context.Context) {
	var last ackTarget
	fails := 0
	oldAppliance := false
	for {
		t, due := c.ackDue(last)
		if !due {
			select {
			case <-ctx.Done():
				return
			case <-c.ackKick:
			}
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := c.app.BundleAck(actx, &api.BundleAckRequest{Sequence: t.seq})
		cancel()
		switch {
		case err == nil:
			last, fails = t, 0
			c.Stats.BundleAcked.Store(t.seq)
			c.log.Debug("trust bundle acknowledged", "bundle_sequence", t.seq)
		case status.Code(err) == codes.Unimplemented:
			// An appliance older than root rotations: retrying would
			// only load it. The next bundle change asks again (it may
			// have been upgraded).
			last, fails = t, 0
			if !oldAppliance {
				oldAppliance = true
				c.log.Info("the appliance does not take trust bundle acknowledgements (a version before root rotations)", "bundle_sequence", t.seq, "err", err)
			}
		default:
			if ctx.Err() != nil {
				return
			}
			wait := c.backoff(fails)
			fails++
			c.log.Warn("trust bundle acknowledgement failed; will retry", "bundle_sequence", t.seq, "err", err, "retry", fails, "wait", wait.Round(time.Millisecond))
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
	}
}
