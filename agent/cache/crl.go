package cache

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
)

// Root CRLs revoke node issuing CAs (the root ceremony signs them). The
// appliance sends them in the sync stream; the cache checks each against
// the roots the agent was configured with (never against the bundle the
// node sent, so a node cannot forge one), keeps the newest CRL of each
// root (a node cannot roll a newer one back), persists them beside the
// agent's identity, and refuses every chain that holds a certificate they
// list: appliance nodes (Dial's VerifyChain), its own SVID and the
// workload SVIDs it serves. A node can still withhold a CRL: the agent
// then learns it from the next node it syncs with (see SECURITY.md).

// maxRootCRL bounds one CRL the cache accepts (the appliance's own bound).
const maxRootCRL = 128 << 10

// crlSet is an immutable view of the verified root CRLs.
type crlSet struct {
	// byRoot is the newest CRL of each root, by the root's raw subject.
	byRoot  map[string]*x509.RevocationList
	der     map[string][]byte
	revoked map[string]struct{} // issuer raw subject + serial
}

func revokedKey(rawIssuer []byte, serial *big.Int) string {
	return string(rawIssuer) + "\x00" + serial.Text(16)
}

func (s *crlSet) has(c *x509.Certificate) bool {
	if s == nil || len(s.revoked) == 0 {
		return false
	}
	_, ok := s.revoked[revokedKey(c.RawIssuer, c.SerialNumber)]
	return ok
}

// verifyCRL checks a CRL against the configured roots and returns it with
// the root that signed it.
func verifyCRL(der []byte, roots []*x509.Certificate) (*x509.RevocationList, error) {
	if len(der) > maxRootCRL {
		return nil, fmt.Errorf("root CRL of %d bytes; at most %d", len(der), maxRootCRL)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, fmt.Errorf("root CRL: %w", err)
	}
	if crl.Number == nil || crl.Number.Sign() <= 0 {
		return nil, errors.New("root CRL has no CRL number")
	}
	for _, r := range roots {
		if bytes.Equal(crl.RawIssuer, r.RawSubject) && crl.CheckSignatureFrom(r) == nil {
			return crl, nil
		}
	}
	return nil, fmt.Errorf("CRL issued by %q is not signed by a configured root", crl.Issuer.String())
}

// merge returns the set with the given CRLs added (each replacing an older
// one of its root), whether any certificate became revoked, and an error
// for a CRL that does not verify. Older or equal CRLs are ignored: a node
// that lags (or lies) cannot roll the cache back.
func (s *crlSet) merge(ders [][]byte, roots []*x509.Certificate) (*crlSet, bool, error) {
	next := &crlSet{byRoot: map[string]*x509.RevocationList{}, der: map[string][]byte{}, revoked: map[string]struct{}{}}
	if s != nil {
		for k, v := range s.byRoot {
			next.byRoot[k], next.der[k] = v, s.der[k]
		}
	}
	changed := false
	for _, der := range ders {
		crl, err := verifyCRL(der, roots)
		if err != nil {
			return nil, false, err
		}
		k := string(crl.RawIssuer)
		old := next.byRoot[k]
		if old != nil && crl.Number.Cmp(old.Number) <= 0 {
			continue
		}
		if old != nil {
			// As the appliance does: a revocation is never undone, so a
			// newer CRL must list everything the older one did.
			listed := map[string]bool{}
			for _, e := range crl.RevokedCertificateEntries {
				listed[e.SerialNumber.Text(16)] = true
			}
			for _, e := range old.RevokedCertificateEntries {
				if !listed[e.SerialNumber.Text(16)] {
					return nil, false, fmt.Errorf("root CRL number %s leaves out serial %x, which CRL number %s revoked: a revocation cannot be undone", crl.Number, e.SerialNumber, old.Number)
				}
			}
		}
		next.byRoot[k], next.der[k] = crl, der
		changed = true
	}
	if !changed {
		return s, false, nil
	}
	grew := false
	for _, crl := range next.byRoot {
		for _, e := range crl.RevokedCertificateEntries {
			k := revokedKey(crl.RawIssuer, e.SerialNumber)
			next.revoked[k] = struct{}{}
			if s == nil {
				grew = true
			} else if _, was := s.revoked[k]; !was {
				grew = true
			}
		}
	}
	return next, grew, nil
}

func (s *crlSet) ders() [][]byte {
	if s == nil {
		return nil
	}
	keys := make([]string, 0, len(s.der))
	for k := range s.der {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([][]byte, 0, len(keys))
	for _, k := range keys {
		out = append(out, s.der[k])
	}
	return out
}

// loadCRLs reads the persisted CRLs; each is verified again (the file is
// not trusted more than the appliance).
func (c *Cache) loadCRLs() {
	if c.opts.CRLFile == "" {
		return
	}
	b, err := os.ReadFile(c.opts.CRLFile)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		c.log.Error("stored root CRLs unreadable; relying on the appliance to send them again", "file", c.opts.CRLFile, "err", err)
		return
	}
	var ders [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type == "X509 CRL" {
			ders = append(ders, blk.Bytes)
		}
	}
	var set *crlSet
	for _, der := range ders {
		next, _, err := set.merge([][]byte{der}, c.opts.Roots)
		if err != nil {
			c.log.Error("stored root CRL ignored", "file", c.opts.CRLFile, "err", err)
			continue
		}
		set = next
	}
	c.crls.Store(set)
	if set != nil {
		c.log.Info("root CRLs loaded", "file", c.opts.CRLFile, "crls", len(set.der), "revoked", len(set.revoked))
	}
}

// saveCRLs writes the CRLs (PEM, 0644: they are public) by rename.
func (c *Cache) saveCRLs(set *crlSet) error {
	if c.opts.CRLFile == "" {
		return nil
	}
	var b []byte
	for _, der := range set.ders() {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})...)
	}
	tmp := c.opts.CRLFile + ".tmp"
	if err := os.MkdirAll(filepath.Dir(tmp), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	// A revocation must survive a crash: a restarted agent must not trust
	// the revoked node again before it syncs.
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, c.opts.CRLFile)
}

// addCRLs verifies and adopts the CRLs of a sync update; it reports
// whether a certificate became revoked.
func (c *Cache) addCRLs(ders [][]byte) (bool, error) {
	if len(ders) == 0 {
		return false, nil
	}
	if len(c.opts.Roots) == 0 {
		c.log.Warn("root CRLs received but no roots are configured to check them; ignored")
		return false, nil
	}
	c.crlMu.Lock()
	defer c.crlMu.Unlock()
	cur := c.crls.Load()
	next, grew, err := cur.merge(ders, c.opts.Roots)
	if err != nil {
		return false, err
	}
	if next == cur {
		return false, nil
	}
	if err := c.saveCRLs(next); err != nil {
		// Still enforced in memory; the next update writes it again.
		c.log.Error("root CRLs not persisted", "file", c.opts.CRLFile, "err", err)
	}
	c.crls.Store(next)
	c.log.Warn("root CRLs updated", "crls", len(next.der), "revoked", len(next.revoked), "newly_revoked", grew)
	return grew, nil
}

// CheckChain refuses chains (as Dial's VerifyChain gets them) that hold a
// certificate a root CRL revoked: an appliance node whose issuing CA the
// root revoked, or an SVID that CA signed.
func (c *Cache) CheckChain(chains [][]*x509.Certificate) error {
	set := c.crls.Load()
	for _, ch := range chains {
		for _, cert := range ch {
			if set.has(cert) {
				return fmt.Errorf("certificate %q (serial %x, issued by %q) is revoked by the root's CRL", cert.Subject.String(), cert.SerialNumber, cert.Issuer.String())
			}
		}
	}
	return nil
}

// Revoked reports whether a chain (leaf first) holds a revoked
// certificate.
func (c *Cache) Revoked(chain []*x509.Certificate) bool {
	set := c.crls.Load()
	return slices.ContainsFunc(chain, set.has)
}

// RootCRLs returns the verified root CRLs (DER), for Workload API
// responses that carry CRLs.
func (c *Cache) RootCRLs() [][]byte { return c.crls.Load().ders() }
