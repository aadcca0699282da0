package cache

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"math/big"
	"os"
	"slices"
	"strings"
)

// Root CRLs revoke node issuing CAs (the root ceremony signs them). The
// appliance sends them in the sync stream; the cache checks each against
// the roots the agent trusts (Cache.Roots: the bundle roots it kept from
// an earlier update or this one, else its configured ones), keeps the
// newest CRL of each root (a node cannot roll a newer one back), holds
// what it lists under the signing root's key, so that a CRL revokes only
// what that key signed (a root a node slipped into the bundle revokes
// nothing under the honest roots, whatever name it takes), persists them beside the
// agent's identity, and refuses every chain that holds a certificate they
// list: appliance nodes (Dial's VerifyChain), its own SVID and the
// workload SVIDs it serves. A node can still withhold a CRL: the agent
// then learns it from the next node it syncs with (see SECURITY.md).

// maxRootCRL bounds one CRL the cache accepts (the appliance's own bound).
const maxRootCRL = 128 << 10

// maxCRLsPerUpdate bounds the CRLs one update may make the cache check
// (each costs a signature verification): the appliance keeps one CRL per
// root, and a bundle has a handful of roots.
const maxCRLsPerUpdate = 64

// crlSet is an immutable view of the verified root CRLs.
type crlSet struct {
	// byRoot is the newest CRL of each root, keyed as the appliance keys
	// them: by the root's fingerprint (hex SHA-256 of its DER). Two roots
	// may share a subject (a re-keyed root keeps its name), so the
	// issuer's name does not say whose CRL it is; the signature does.
	byRoot map[string]*x509.RevocationList
	der    map[string][]byte
	// signer is the root whose key signed each CRL (one the agent
	// trusted when the CRL was checked), by the same fingerprint.
	signer map[string]*x509.Certificate
	// sums are the SHA-256 of the CRLs held: every update carries them
	// again, and one already held needs no new signature check.
	sums map[[32]byte]bool
	// revoked holds the listed serials under the signing root's key
	// (revokedKey), not under the issuer's name: a CRL revokes only what
	// its own key signed. Keyed by name, a root a node slipped into the
	// bundle with an honest root's name would revoke, with its own CRL,
	// the honest nodes' CAs (TestAttackInjectedRootRevokesHonestNodes);
	// two honest roots sharing a name (a re-keyed root) no longer
	// collide either.
	revoked map[string]struct{}
	// issuers are the signing roots by raw subject: where has looks for
	// the key that may have signed a certificate.
	issuers map[string][]crlSigner
}

// crlSigner is a root that signed a held CRL, with its key's ID.
type crlSigner struct {
	root *x509.Certificate
	key  string
}

// keyID names a root's key: the SHA-256 of its SubjectPublicKeyInfo (a
// root re-issued for the same key has the same).
func keyID(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return string(sum[:])
}

func revokedKey(key string, serial *big.Int) string {
	return key + "\x00" + serial.Text(16)
}

// has reports whether a held CRL lists c, signed by the key that signed
// c. The usual answer (not listed) costs map lookups; a listed serial
// costs a signature check, which ties it to the key.
func (s *crlSet) has(c *x509.Certificate) bool {
	if s == nil || len(s.revoked) == 0 {
		return false
	}
	for _, sg := range s.issuers[string(c.RawIssuer)] {
		if _, ok := s.revoked[revokedKey(sg.key, c.SerialNumber)]; ok && c.CheckSignatureFrom(sg.root) == nil {
			return true
		}
	}
	return false
}

// newCRLSet is an empty set.
func newCRLSet() *crlSet {
	return &crlSet{byRoot: map[string]*x509.RevocationList{}, der: map[string][]byte{}, signer: map[string]*x509.Certificate{},
		sums: map[[32]byte]bool{}, revoked: map[string]struct{}{}, issuers: map[string][]crlSigner{}}
}

// index builds revoked and issuers from the CRLs held.
func (s *crlSet) index() {
	for fp, crl := range s.byRoot {
		r := s.signer[fp]
		k := keyID(r)
		if !slices.ContainsFunc(s.issuers[string(r.RawSubject)], func(sg crlSigner) bool { return sg.key == k }) {
			s.issuers[string(r.RawSubject)] = append(s.issuers[string(r.RawSubject)], crlSigner{root: r, key: k})
		}
		for _, e := range crl.RevokedCertificateEntries {
			s.revoked[revokedKey(k, e.SerialNumber)] = struct{}{}
		}
	}
}

func rootFingerprint(root *x509.Certificate) string {
	sum := sha256.Sum256(root.Raw)
	return hex.EncodeToString(sum[:])
}

// verifyCRL checks a CRL against the trusted roots and returns it with
// the root whose key signed it.
func verifyCRL(der []byte, roots []*x509.Certificate) (*x509.RevocationList, *x509.Certificate, error) {
	if len(der) > maxRootCRL {
		return nil, nil, fmt.Errorf("root CRL of %d bytes; at most %d", len(der), maxRootCRL)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, nil, fmt.Errorf("root CRL: %w", err)
	}
	if crl.Number == nil || crl.Number.Sign() <= 0 {
		return nil, nil, fmt.Errorf("root CRL issued by %q has no CRL number", crl.Issuer.String())
	}
	for _, r := range roots {
		if bytes.Equal(crl.RawIssuer, r.RawSubject) && crl.CheckSignatureFrom(r) == nil {
			return crl, r, nil
		}
	}
	return nil, nil, fmt.Errorf("root CRL number %s issued by %q is not signed by a trusted root (a forgery, or a root the agent has not kept yet)", crl.Number, crl.Issuer.String())
}

// merge returns the set with the given CRLs added (each replacing an older
// one of its root), whether any certificate became revoked, and the CRLs
// it skipped, with why. A CRL that does not verify, or that would undo a
// revocation, is skipped and the others still count: one bad CRL must not
// hold back the rest of an update. Older or equal CRLs are ignored
// without a word: every update carries the current ones, and a node that
// lags (or lies) cannot roll the cache back.
func (s *crlSet) merge(ders [][]byte, roots []*x509.Certificate) (next *crlSet, grew bool, skipped []skippedCRL) {
	next = newCRLSet()
	if s != nil {
		for k, v := range s.byRoot {
			next.byRoot[k], next.der[k], next.signer[k] = v, s.der[k], s.signer[k]
		}
		maps.Copy(next.sums, s.sums)
	}
	changed := false
	for _, der := range ders {
		sum := sha256.Sum256(der)
		if next.sums[sum] {
			continue
		}
		crl, root, err := verifyCRL(der, roots)
		if err != nil {
			skipped = append(skipped, skippedCRL{sum: sum, err: err})
			continue
		}
		fp := rootFingerprint(root)
		old := next.byRoot[fp]
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
			var dropped []string
			for _, e := range old.RevokedCertificateEntries {
				if !listed[e.SerialNumber.Text(16)] {
					dropped = append(dropped, e.SerialNumber.Text(16))
				}
			}
			if len(dropped) > 0 {
				skipped = append(skipped, skippedCRL{sum: sum, err: fmt.Errorf("root %s's CRL number %s leaves out serials %s, which its CRL number %s revoked: a revocation cannot be undone",
					fp[:16], crl.Number, strings.Join(dropped, ","), old.Number)})
				continue
			}
		}
		if old != nil {
			delete(next.sums, sha256.Sum256(next.der[fp]))
		}
		next.byRoot[fp], next.der[fp], next.signer[fp], next.sums[sum] = crl, der, root, true
		changed = true
	}
	if !changed {
		return s, false, skipped
	}
	next.index()
	for k := range next.revoked {
		if _, was := s.revokedSet()[k]; !was {
			grew = true
		}
	}
	return next, grew, skipped
}

// skippedCRL is a CRL merge did not adopt, by its SHA-256.
type skippedCRL struct {
	sum [32]byte
	err error
}

func (s *crlSet) revokedSet() map[string]struct{} {
	if s == nil {
		return nil
	}
	return s.revoked
}

// only returns the set without the CRLs of roots not among roots (s
// itself when it has none).
func (s *crlSet) only(roots []*x509.Certificate) *crlSet {
	if s == nil {
		return nil
	}
	keep := map[string]bool{}
	for _, r := range roots {
		keep[rootFingerprint(r)] = true
	}
	if !slices.ContainsFunc(slices.Collect(maps.Keys(s.byRoot)), func(fp string) bool { return !keep[fp] }) {
		return s
	}
	next := newCRLSet()
	for fp, crl := range s.byRoot {
		if !keep[fp] {
			continue
		}
		next.byRoot[fp], next.der[fp], next.signer[fp], next.sums[sha256.Sum256(s.der[fp])] = crl, s.der[fp], s.signer[fp], true
	}
	next.index()
	return next
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
		next, _, skipped := set.merge([][]byte{der}, c.Roots())
		for _, sk := range skipped {
			c.log.Error("stored root CRL ignored", "file", c.opts.CRLFile, "crl_sha256", hex.EncodeToString(sk.sum[:8]), "err", sk.err)
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
	// A revocation must survive a crash: a restarted agent must not trust
	// the revoked node again before it syncs.
	return writeSynced(c.opts.CRLFile, b)
}

// addCRLs verifies and adopts the CRLs of a sync update; it reports
// whether a certificate became revoked. A CRL it cannot adopt is logged
// (once per CRL: every update carries it again) and skipped; the update
// itself goes on.
func (c *Cache) addCRLs(ders [][]byte) bool {
	if len(ders) == 0 {
		return false
	}
	roots := c.Roots()
	if len(roots) == 0 {
		c.log.Warn("root CRLs received but no roots are trusted to check them; ignored")
		return false
	}
	c.crlMu.Lock()
	defer c.crlMu.Unlock()
	// A CRL skipped before is skipped again without a new signature
	// check: revocations only grow, so what did not verify or would undo
	// a revocation stays that way until the trusted roots change
	// (rootsChanged forgets them).
	ders = slices.DeleteFunc(slices.Clone(ders), func(der []byte) bool { return c.crlSkipped[sha256.Sum256(der)] })
	if len(ders) > maxCRLsPerUpdate {
		// Not remembered as skipped: the next update may order them
		// otherwise.
		c.log.Warn("root CRLs from the appliance beyond the first ones not checked", "crls", len(ders), "max", maxCRLsPerUpdate)
		ders = ders[:maxCRLsPerUpdate]
	}
	cur := c.crls.Load()
	next, grew, skipped := cur.merge(ders, roots)
	for _, sk := range skipped {
		if len(c.crlSkipped) >= maxSkippedCRLs {
			clear(c.crlSkipped)
		}
		c.crlSkipped[sk.sum] = true
		c.log.Warn("root CRL from the appliance ignored; the rest of the update is applied", "crl_sha256", hex.EncodeToString(sk.sum[:8]), "err", sk.err)
	}
	if next == cur {
		return false
	}
	if err := c.saveCRLs(next); err != nil {
		// Still enforced in memory; the next update writes it again.
		c.log.Error("root CRLs not persisted", "file", c.opts.CRLFile, "err", err)
	}
	c.crls.Store(next)
	c.log.Warn("root CRLs updated", "crls", len(next.der), "revoked", len(next.revoked), "newly_revoked", grew)
	return grew
}

// maxSkippedCRLs bounds the memory of skipped CRLs (a node could send a
// new bogus one in every update).
const maxSkippedCRLs = 256

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
