// Package ca is a node's certificate authority: the node's issuing CA key
// (in its HSM, used through keystore's crypto.Signer) with the intermediate
// the root ceremony signed for it. It signs X.509-SVIDs (workloads, agents,
// admins, the node's own TLS identity), CRLs and audit checkpoints, and
// verifies the identities of peers, admins and agents against the trust
// roots. Both the roots (SetRoots) and the issuing certificate (Install for
// a renewal, Switch for one under a new root) change while the node runs,
// for a root rotation: every verification reads the roots current when it
// runs, every signing the issuing certificate current when it was prepared.
// It also makes, publishes, rotates and retires the node's JWT signing
// keys (HSM keys of their own) and signs JWT-SVIDs with them (jwt.go).
package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/sigil-appliance/sigil/internal/nodeid"
)

// Authority signs with one node's issuing CA.
type Authority struct {
	td     spiffeid.TrustDomain
	nodeID string
	signer crypto.Signer
	// issuing is the current issuing certificate: Install swaps it while
	// the node runs (a renewal for the same HSM key). A signing holds the
	// one it started with (Prepared), so in-flight signings finish with
	// the old certificate and new ones use the new.
	issuing atomic.Pointer[issuingCA]
	// roots is the trust roots: SetRoots replaces the whole set at once,
	// so a verification sees either the old set or the new, never a mix.
	roots atomic.Pointer[rootSet]
	now   func() time.Time
	// log receives the once-per-certificate warning that SVID lifetimes
	// are cut at the issuing CA's expiry (nil: not logged).
	log atomic.Pointer[slog.Logger]
	// swapMu serializes the check and swap of the issuing certificate
	// (Install, Switch) with those of the roots (SetRoots): each checks
	// against the other, and two unserialized swaps could each pass
	// against what the other was replacing, leaving an issuing
	// certificate that chains to none of the roots.
	swapMu sync.Mutex
	// revoked is consulted on every handshake and signature (nil: no
	// revocation source yet, nothing is revoked).
	revoked atomic.Pointer[RevocationCheck]
	refused refusalLog
	// verified caches chains Classify verified (verified.go).
	verified verifiedChains
	// signed counts ECDSA leaf signatures, one in verifyEvery of which is
	// verified; verifyAll is set once one did not verify (leaf.go).
	signed    atomic.Uint64
	verifyAll atomic.Bool
}

// rootSet is one set of trust roots, never modified once stored: a
// verification holds the set it loaded for as long as it runs.
type rootSet struct {
	certs  []*x509.Certificate
	bundle *x509bundle.Bundle
	// gen counts the sets this authority has had (0 for New's): the
	// verified-chain cache holds verifications of one gen only.
	gen uint64
}

// issuingCA is one issuing certificate as the authority signs with it.
type issuingCA struct {
	cert *x509.Certificate
	// cutWarned is set once a leaf's lifetime was cut at this
	// certificate's expiry and the warning was logged.
	cutWarned atomic.Bool
}

// refusalLog logs refusals of revoked chains, at most one line a second
// (with the number left out), so a client retrying with a revoked
// certificate cannot flood the log.
type refusalLog struct {
	log        atomic.Pointer[slog.Logger]
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

func (r *refusalLog) note(now time.Time, err error) {
	l := r.log.Load()
	if l == nil {
		return
	}
	r.mu.Lock()
	if now.Sub(r.last) < time.Second {
		r.suppressed++
		r.mu.Unlock()
		return
	}
	n := r.suppressed
	r.last, r.suppressed = now, 0
	r.mu.Unlock()
	l.Warn("certificate chain refused: revoked by a root CRL", "err", err.Error(), "refusals_not_logged", n)
}

// RevocationCheck reports whether a certificate is revoked by a CRL its
// issuer signed (the replicated root CRLs: the node's state answers). It
// runs for every certificate of every chain verified, so it must be cheap
// (a map lookup).
type RevocationCheck func(*x509.Certificate) bool

// SetRevocationCheck makes Classify refuse any chain that holds a revoked
// certificate (a node issuing CA the root revoked), and makes this
// authority sign nothing once its own issuing CA is revoked. Refusals are
// logged to log (rate-limited; nil: not logged). Set it before the node
// serves; it may be replaced at any time.
func (a *Authority) SetRevocationCheck(fn RevocationCheck, log *slog.Logger) {
	a.refused.log.Store(log)
	if fn == nil {
		a.revoked.Store(nil)
		return
	}
	a.revoked.Store(&fn)
}

func (a *Authority) isRevoked(c *x509.Certificate) bool {
	fn := a.revoked.Load()
	return fn != nil && (*fn)(c)
}

// ErrRevoked marks a chain refused because a certificate in it is revoked.
var ErrRevoked = errors.New("revoked")

// checkRevoked refuses verified chains in which any certificate is revoked.
// Every chain is checked, not just one: a revoked issuing CA must not pass
// because another path to the root exists.
func (a *Authority) checkRevoked(chains [][]*x509.Certificate) error {
	fn := a.revoked.Load()
	if fn == nil {
		return nil
	}
	for _, ch := range chains {
		for _, c := range ch {
			if (*fn)(c) {
				err := fmt.Errorf("%w: certificate %q (serial %x, issued by %q) is on its issuer's CRL", ErrRevoked, c.Subject.String(), c.SerialNumber, c.Issuer.String())
				a.refused.note(a.now(), fmt.Errorf("%s: %w", ch[0].URIs, err))
				return err
			}
		}
	}
	return nil
}

// Revoked reports whether this node's own issuing CA is revoked.
func (a *Authority) Revoked() bool { return a.isRevoked(a.Issuing()) }

// SetLogger sets where the authority logs what an operator must act on
// (SVID lifetimes cut at the issuing CA's expiry: the CA needs renewing).
func (a *Authority) SetLogger(log *slog.Logger) { a.log.Store(log) }

// New checks that the pieces belong together before anything is signed
// (CheckIssuing): the signer holds the key of the intermediate, the
// intermediate is this node's, a CA of the trust domain, chains to a root
// and is valid now.
func New(td spiffeid.TrustDomain, nodeID string, signer crypto.Signer, issuing *x509.Certificate, roots []*x509.Certificate, now func() time.Time) (*Authority, error) {
	if now == nil {
		now = time.Now
	}
	if err := nodeid.Check(nodeID); err != nil {
		return nil, err
	}
	if err := CheckIssuing(td, nodeID, signer, issuing, roots, now()); err != nil {
		return nil, err
	}
	a := &Authority{td: td, nodeID: nodeID, signer: signer, now: now}
	a.roots.Store(newRootSet(td, slices.Clone(roots), 0))
	a.issuing.Store(&issuingCA{cert: issuing})
	return a, nil
}

// newRootSet keeps certs itself, so callers pass a copy: their own
// callers' slices may change afterwards, and a stored set may not.
func newRootSet(td spiffeid.TrustDomain, certs []*x509.Certificate, gen uint64) *rootSet {
	return &rootSet{certs: certs, bundle: x509bundle.FromX509Authorities(td, certs), gen: gen}
}

// SetRoots makes roots the trust roots from now on, for every verification
// that starts after it returns: Classify (and the TLS configs of
// NodeIdentity, which verify through it at each handshake, so running
// listeners and dialers follow), PeerFromState, CheckRenewal, CheckNext and
// Bundle. Chains verified against the previous roots are not reused; a
// verification already running when it is called may still finish against
// them.
//
// Each root must be a self-signed CA certificate, valid now, and, when it
// names a trust domain (URI SAN), of this one. A set under which this
// node's current issuing certificate would not chain is refused: the node
// would go on signing under a root it no longer trusts, and refuse in raft
// and API handshakes every peer still under that root, its own chains
// too. To move to a set without the current issuing certificate's root,
// Switch to a certificate under a root of the new set first.
func (a *Authority) SetRoots(roots []*x509.Certificate) error {
	if len(roots) == 0 {
		return errors.New("refusing an empty set of root certificates: nothing would verify")
	}
	// Checked and stored: one copy, whatever the caller does with roots.
	roots = slices.Clone(roots)
	now := a.now()
	for i, r := range roots {
		if err := checkRoot(a.td, r, now); err != nil {
			return fmt.Errorf("root %d: %w", i, err)
		}
	}
	a.swapMu.Lock()
	defer a.swapMu.Unlock()
	cur := a.Issuing()
	// The question is whether the set holds the current certificate's
	// root, not whether the certificate is valid today: an issuing
	// certificate that has expired (the node signs nothing that verifies
	// anyway) must not also stop the node from taking the roots under
	// which its replacement chains. Hence the time clamped into its
	// validity.
	at := now
	if at.Before(cur.NotBefore) {
		at = cur.NotBefore
	} else if at.After(cur.NotAfter) {
		at = cur.NotAfter
	}
	if err := chainsToRoots(cur, roots, at); err != nil {
		return fmt.Errorf("refusing roots under which this node's current issuing CA certificate (serial %x) would not chain, "+
			"which would lock the node out (switch to an issuing certificate under one of the new roots first): %w", cur.SerialNumber, err)
	}
	next := newRootSet(a.td, roots, a.roots.Load().gen+1)
	a.roots.Store(next)
	// After the store: a verification still running under the old set
	// then finds the cache at the new gen and cannot store its answer.
	a.verified.reset(next.gen)
	return nil
}

// checkRoot is what a trust root must be for SetRoots.
func checkRoot(td spiffeid.TrustDomain, r *x509.Certificate, now time.Time) error {
	if r == nil {
		return errors.New("no certificate")
	}
	if !r.IsCA {
		return fmt.Errorf("%q (serial %x) is not a CA certificate", r.Subject.String(), r.SerialNumber)
	}
	if !bytes.Equal(r.RawIssuer, r.RawSubject) || r.CheckSignatureFrom(r) != nil {
		return fmt.Errorf("%q (serial %x) is not self-signed", r.Subject.String(), r.SerialNumber)
	}
	if now.Before(r.NotBefore) || now.After(r.NotAfter) {
		return fmt.Errorf("%q (serial %x) is not valid now: valid from %s to %s", r.Subject.String(), r.SerialNumber,
			r.NotBefore.UTC().Format(time.RFC3339), r.NotAfter.UTC().Format(time.RFC3339))
	}
	// As CheckIssuing does for issuing certificates: a root naming
	// another trust domain was made for another appliance.
	for _, u := range r.URIs {
		if u.String() != td.IDString() {
			return fmt.Errorf("%q (serial %x) is a root of %s, this node serves trust domain %s", r.Subject.String(), r.SerialNumber, u, td)
		}
	}
	return nil
}

// Roots is a copy of the current trust roots.
func (a *Authority) Roots() []*x509.Certificate { return slices.Clone(a.roots.Load().certs) }

// ChainsTo reports whether c, an issuing certificate, verifies now with
// root as the only root: which of the roots a node's issuing certificate
// is under (ChainsTo(a.Issuing(), root): the root this node signs under).
// root need not be one of this authority's roots.
func (a *Authority) ChainsTo(c, root *x509.Certificate) bool {
	if c == nil || root == nil {
		return false
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	_, err := c.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: a.now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

// CheckIssuing is what an issuing certificate must be before a node signs
// with it, at start-up (New) and when one is installed while the node runs
// (CheckRenewal, CheckNext): its key is the HSM key signer holds (and the
// HSM key signs for it), it names nodeID, it is a CA of td (its URI SAN and
// name constraint, when present, name td), and it chains to one of roots
// at now (so it is valid now, and within the root's validity).
func CheckIssuing(td spiffeid.TrustDomain, nodeID string, signer crypto.Signer, issuing *x509.Certificate, roots []*x509.Certificate, now time.Time) error {
	if k, ok := signer.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(issuing.PublicKey) {
		return errors.New("the HSM key is not the key of the issuing CA certificate")
	}
	if err := proveKey(signer, issuing); err != nil {
		return err
	}
	if issuing.Subject.CommonName != nodeID {
		return fmt.Errorf("issuing CA certificate is for node %q, this is node %q", issuing.Subject.CommonName, nodeID)
	}
	if !issuing.IsCA {
		return errors.New("issuing CA certificate is not a CA")
	}
	// The ceremony writes the trust domain's ID as the only URI SAN and
	// limits URIs below to it; a certificate saying another trust domain
	// was made for another appliance, whatever root signed it.
	for _, u := range issuing.URIs {
		if u.String() != td.IDString() {
			return fmt.Errorf("issuing CA certificate is for %s, this node serves trust domain %s", u, td)
		}
	}
	for _, d := range issuing.PermittedURIDomains {
		if d != td.Name() {
			return fmt.Errorf("issuing CA certificate is constrained to URIs in %q, this node serves trust domain %s", d, td)
		}
	}
	if len(roots) == 0 {
		return errors.New("no root certificates")
	}
	return chainsToRoots(issuing, roots, now)
}

// chainsToRoots is CheckIssuing's chain check alone (no HSM signature):
// issuing verifies to one of roots at now, and does not outlive all of
// them.
func chainsToRoots(issuing *x509.Certificate, roots []*x509.Certificate, now time.Time) error {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	chains, err := issuing.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("issuing CA certificate does not chain to the root: %w", err)
	}
	// x509 checks each certificate's validity at now only; one that
	// outlives every root it chains to would turn invalid under the SVIDs
	// it signed (the ceremony refuses to make one). One root lasting long
	// enough is enough: a root re-issued for the same key (reissue-root)
	// extends the chain.
	var last time.Time
	for _, ch := range chains {
		if r := ch[len(ch)-1]; r.NotAfter.After(last) {
			last = r.NotAfter
		}
	}
	if issuing.NotAfter.After(last) {
		return fmt.Errorf("issuing CA certificate expires %s, after the root that signed it (%s)",
			issuing.NotAfter.UTC().Format(time.RFC3339), last.UTC().Format(time.RFC3339))
	}
	return nil
}

// CheckNext checks an issuing certificate under a new root before it is
// staged for a root rotation's switch (and again at Switch): everything New
// checks, against this authority's HSM key and current roots (which by
// then hold the new root), and that no root CRL revokes it. Unlike
// CheckRenewal it may expire before the current certificate: it chains to
// another root, whose lifetime is its own.
func (a *Authority) CheckNext(c *x509.Certificate) error {
	if err := CheckIssuing(a.td, a.nodeID, a.signer, c, a.roots.Load().certs, a.now()); err != nil {
		return err
	}
	if a.isRevoked(c) {
		return fmt.Errorf("%w: issuing CA certificate (serial %x) is on the root's CRL", ErrRevoked, c.SerialNumber)
	}
	return nil
}

// CheckRenewal checks a renewed issuing certificate before anything
// changes: everything CheckNext checks, and that it expires later than
// the current one (installing one that expires sooner is a mistake an
// operator makes with the wrong file, and it would shorten every SVID).
// The same certificate again is refused too: there is nothing to do.
func (a *Authority) CheckRenewal(c *x509.Certificate) error {
	if err := a.CheckNext(c); err != nil {
		return err
	}
	cur := a.Issuing()
	if c.Equal(cur) {
		return fmt.Errorf("issuing CA certificate (serial %x) is the one this node signs with already", c.SerialNumber)
	}
	if !c.NotAfter.After(cur.NotAfter) {
		return fmt.Errorf("issuing CA certificate (serial %x) expires %s, not later than the current one (serial %x, %s)",
			c.SerialNumber, c.NotAfter.UTC().Format(time.RFC3339), cur.SerialNumber, cur.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// Install makes c the issuing certificate from now on, after CheckRenewal
// (again: a CRL may have committed since the caller checked), and returns
// the one it replaces. Signings prepared before finish with the old one.
func (a *Authority) Install(c *x509.Certificate) (*x509.Certificate, error) {
	return a.swapIssuing(c, a.CheckRenewal)
}

// Switch is Install for a root rotation's switch: c, the certificate
// staged under the new root (or, rolling back, the previous one under the
// old root), is checked with CheckNext instead of CheckRenewal, so it may
// expire before the one it replaces.
func (a *Authority) Switch(c *x509.Certificate) (*x509.Certificate, error) {
	return a.swapIssuing(c, a.CheckNext)
}

// swapIssuing checks c and makes it the issuing certificate, with no
// SetRoots in between: the roots it was checked against are still the
// roots when it takes over.
func (a *Authority) swapIssuing(c *x509.Certificate, check func(*x509.Certificate) error) (*x509.Certificate, error) {
	a.swapMu.Lock()
	defer a.swapMu.Unlock()
	if err := check(c); err != nil {
		return nil, err
	}
	old := a.issuing.Swap(&issuingCA{cert: c})
	return old.cert, nil
}

// proveKey signs a test digest with signer and verifies it with the issuing
// certificate's key: the public key an HSM reports is a separate object
// from its private key, and leaves signed with ECDSA keys are not verified
// one by one (leaf.go), so the private key is shown to be the
// certificate's once, before anything is signed.
func proveKey(signer crypto.Signer, issuing *x509.Certificate) error {
	digest := sha256.Sum256([]byte("sigil issuing key proof"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("the HSM key does not sign: %w", err)
	}
	var ok bool
	switch k := issuing.PublicKey.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, digest[:], sig)
	case *rsa.PublicKey:
		ok = rsa.VerifyPKCS1v15(k, crypto.SHA256, digest[:], sig) == nil
	default:
		return fmt.Errorf("issuing key type %T is not supported (ECDSA or RSA)", issuing.PublicKey)
	}
	if !ok {
		return errors.New("the HSM key's signature does not verify with the issuing CA certificate's key")
	}
	return nil
}

// TrustDomain served by this authority.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// NodeID of this node.
func (a *Authority) NodeID() string { return a.nodeID }

// Issuing is the node's intermediate certificate.
func (a *Authority) Issuing() *x509.Certificate { return a.issuing.Load().cert }

// Bundle is the X.509 trust bundle of the current roots. A later SetRoots
// does not change a bundle already returned.
func (a *Authority) Bundle() *x509bundle.Bundle { return a.roots.Load().bundle }

// NodeSPIFFEID is spiffe://<td>/sigil/node/<id>.
func NodeSPIFFEID(td spiffeid.TrustDomain, nodeID string) spiffeid.ID {
	return spiffeid.RequireFromPath(td, "/sigil/node/"+nodeID)
}

// Leaf is what a leaf certificate says; Sign fills in the rest.
type Leaf struct {
	ID        spiffeid.ID
	PublicKey crypto.PublicKey
	TTL       time.Duration
	DNSNames  []string
	// IPAddresses are IP SANs; an IPv4 address is encoded in 4 bytes
	// whatever form it is given in, as x509 does.
	IPAddresses []net.IP
	Subject     pkix.Name
}

// Reserved paths: everything at or under /sigil names the appliance's own
// principals, which Classify turns into roles. Only the methods for each
// role sign them, each only its own prefix, so a workload registration (or
// a bug on the path that signs workload SVIDs) can never mint a node, an
// admin or an agent.
const (
	reservedPath = "/sigil"
	agentPrefix  = "/sigil/agent/"
	adminPrefix  = "/sigil/admin/"
	nodePrefix   = "/sigil/node/"
)

// Reserved reports whether a SPIFFE ID path is the appliance's own
// (/sigil or under /sigil/), which Sign refuses.
func Reserved(path string) bool {
	return path == reservedPath || strings.HasPrefix(path, reservedPath+"/")
}

// Sign issues a workload's leaf X.509-SVID: exactly one URI SAN, not a CA,
// digitalSignature (+ keyEncipherment for RSA), serverAuth and clientAuth,
// never past the issuing CA's expiry. It returns leaf + intermediate. It
// refuses the reserved paths (/sigil and under): agents, admins and nodes
// have their own methods.
func (a *Authority) Sign(l Leaf) ([]*x509.Certificate, error) {
	p, err := a.Prepare(l)
	if err != nil {
		return nil, err
	}
	return p.Sign()
}

// SignAgent issues an agent's own SVID: only IDs under /sigil/agent/.
func (a *Authority) SignAgent(l Leaf) ([]*x509.Certificate, error) {
	if err := a.member(l.ID); err != nil {
		return nil, err
	}
	if p := l.ID.Path(); !strings.HasPrefix(p, agentPrefix) || len(p) == len(agentPrefix) {
		return nil, fmt.Errorf("cannot sign %s as an agent: agent IDs are under %s", l.ID, agentPrefix)
	}
	return a.sign(l)
}

// SignAdmin issues an admin credential: only /sigil/admin/<name>, one path
// segment.
func (a *Authority) SignAdmin(l Leaf) ([]*x509.Certificate, error) {
	if err := a.member(l.ID); err != nil {
		return nil, err
	}
	p := l.ID.Path()
	name := strings.TrimPrefix(p, adminPrefix)
	if !strings.HasPrefix(p, adminPrefix) || name == "" || strings.Contains(name, "/") {
		return nil, fmt.Errorf("cannot sign %s as an admin: admin IDs are %s<name>", l.ID, adminPrefix)
	}
	return a.sign(l)
}

// SignNode issues this node's own identity, /sigil/node/<this node's ID>:
// a node's issuing CA never signs another node's identity (Classify would
// refuse it anyway).
func (a *Authority) SignNode(l Leaf) ([]*x509.Certificate, error) {
	if want := NodeSPIFFEID(a.td, a.nodeID); l.ID != want {
		return nil, fmt.Errorf("cannot sign %s as a node identity: this issuing CA signs only %s", l.ID, want)
	}
	return a.sign(l)
}

func (a *Authority) member(id spiffeid.ID) error {
	if !id.MemberOf(a.td) || id.Path() == "" {
		return fmt.Errorf("cannot sign %s: not an ID with a path in %s", id, a.td)
	}
	return nil
}

// Prepared is a certificate whose serial number and validity are fixed
// but which is not signed yet: what an audit record of its issuance says
// is known before the HSM signs, so the record can commit while it signs.
type Prepared struct {
	a *Authority
	// iss is the issuing certificate current at Prepare: the one that
	// signs, even if a renewal is installed meanwhile.
	iss                 *issuingCA
	leaf                Leaf
	serial              *big.Int
	notBefore, notAfter time.Time
}

// Serial is the certificate's serial number, in hex as the audit has it.
func (p *Prepared) Serial() string { return p.serial.Text(16) }

// NotAfter is when the certificate expires.
func (p *Prepared) NotAfter() time.Time { return p.notAfter }

// Prepare checks a workload SVID as Sign does and fixes its serial and
// validity; Sign on the result signs it.
func (a *Authority) Prepare(l Leaf) (*Prepared, error) {
	if err := a.member(l.ID); err != nil {
		return nil, err
	}
	if Reserved(l.ID.Path()) {
		return nil, fmt.Errorf("cannot sign %s as a workload: paths at or under %s are reserved for the appliance", l.ID, reservedPath)
	}
	return a.prepare(l)
}

// prepare fixes serial and validity; callers have checked the ID.
func (a *Authority) prepare(l Leaf) (*Prepared, error) {
	iss := a.issuing.Load()
	if err := a.usable(l.ID, iss.cert); err != nil {
		return nil, err
	}
	now := a.now()
	notAfter := now.Add(l.TTL)
	if notAfter.After(iss.cert.NotAfter) {
		notAfter = iss.cert.NotAfter
		a.warnCut(iss, l.TTL)
	}
	if !notAfter.After(now) {
		return nil, errors.New("the issuing CA has expired")
	}
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	return &Prepared{a: a, iss: iss, leaf: l, serial: sn.Add(sn, big.NewInt(1)), notBefore: now.Add(-30 * time.Second), notAfter: notAfter}, nil
}

// warnCut logs, once per issuing certificate, that leaves are being cut
// at its expiry: from then on every SVID is shorter than asked, and they
// all expire together with the CA unless it is renewed
// (NodeIssuingCertInstall).
func (a *Authority) warnCut(iss *issuingCA, ttl time.Duration) {
	l := a.log.Load()
	if l == nil || iss.cutWarned.Swap(true) {
		return
	}
	l.Warn("SVID lifetimes are being cut at the issuing CA's expiry: renew this node's issuing certificate (sigilctl node issuing-cert install)",
		"issuing_serial", iss.cert.SerialNumber.Text(16), "issuing_not_after", iss.cert.NotAfter.UTC(), "ttl_asked", ttl.String())
}

// usable refuses to sign with a revoked issuing CA: whatever it signed
// would be refused everywhere, and a revoked CA that still signs is the
// compromise the revocation answers.
func (a *Authority) usable(id spiffeid.ID, issuing *x509.Certificate) error {
	if a.isRevoked(issuing) {
		return fmt.Errorf("sign %s: %w: this node's issuing CA (serial %x) is on the root's CRL", id, ErrRevoked, issuing.SerialNumber)
	}
	return nil
}

// sign makes the certificate; callers have checked the ID.
func (a *Authority) sign(l Leaf) ([]*x509.Certificate, error) {
	p, err := a.prepare(l)
	if err != nil {
		return nil, err
	}
	return p.Sign()
}

// Sign signs the prepared certificate and returns it with the issuing CA
// certificate. The issuing CA is checked again: it may have been revoked
// since Prepare.
func (p *Prepared) Sign() ([]*x509.Certificate, error) {
	a, l, issuing := p.a, p.leaf, p.iss.cert
	if err := a.usable(l.ID, issuing); err != nil {
		return nil, err
	}
	ku := x509.KeyUsageDigitalSignature
	if _, ok := l.PublicKey.(*rsa.PublicKey); ok {
		ku |= x509.KeyUsageKeyEncipherment
	}
	var der []byte
	if _, ok := a.signer.Public().(*ecdsa.PublicKey); ok {
		// leaf.go: no verification after signing for ECDSA issuing keys.
		subject, err := asn1.Marshal(l.Subject.ToRDNSequence())
		if err != nil {
			return nil, fmt.Errorf("sign %s: subject: %w", l.ID, err)
		}
		verify := a.verifyAll.Load() || a.signed.Add(1)%verifyEvery == 1
		der, err = signLeaf(&leafTemplate{serial: p.serial, notBefore: p.notBefore, notAfter: p.notAfter,
			subject: subject, publicKey: l.PublicKey, keyUsage: ku, uris: []*url.URL{l.ID.URL()}, dnsNames: l.DNSNames, ipAddresses: l.IPAddresses},
			issuing, a.signer, verify)
		if errors.Is(err, errBadSignature) {
			// From now on every signature is checked: a wrong one is
			// refused, never sent (the caller logs this error).
			a.verifyAll.Store(true)
		}
		if err != nil {
			return nil, fmt.Errorf("sign %s: %w", l.ID, err)
		}
	} else {
		tmpl := &x509.Certificate{
			SerialNumber:          p.serial,
			Subject:               l.Subject,
			NotBefore:             p.notBefore,
			NotAfter:              p.notAfter,
			KeyUsage:              ku,
			ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			BasicConstraintsValid: true,
			URIs:                  []*url.URL{l.ID.URL()},
			DNSNames:              l.DNSNames,
			IPAddresses:           l.IPAddresses,
		}
		var err error
		if der, err = x509.CreateCertificate(rand.Reader, tmpl, issuing, l.PublicKey, a.signer); err != nil {
			return nil, fmt.Errorf("sign %s: %w", l.ID, err)
		}
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf, issuing}, nil
}

// Role is what a verified peer is to this appliance.
type Role int

const (
	RoleNone Role = iota
	RoleNode
	RoleAdmin
	RoleAgent
)

func (r Role) String() string {
	return [...]string{"none", "node", "admin", "agent"}[r]
}

// Peer is a verified TLS peer.
type Peer struct {
	ID   spiffeid.ID
	Role Role
	// Name is the node ID, admin name or agent path after the role prefix.
	Name string
}

// Classify verifies a presented chain (leaf first) against the roots and
// says who it is. A node certificate must be issued by that node's own
// issuing CA, so one node's CA cannot mint another node's identity. A
// chain holding a revoked certificate (SetRevocationCheck) is refused,
// whatever role it claims.
func (a *Authority) Classify(raw [][]byte) (Peer, error) {
	return a.classify(raw, nil)
}

// ClassifyCerts is Classify for certificates a TLS handshake has parsed.
// A verification it caches holds these very certificates: the cache then
// costs a connected agent no second parsed copy of its leaf (a node
// holding a fleet keeps both for as long as each agent is connected).
func (a *Authority) ClassifyCerts(certs []*x509.Certificate) (Peer, error) {
	raw := make([][]byte, len(certs))
	for i, c := range certs {
		raw[i] = c.Raw
	}
	return a.classify(raw, certs)
}

// classify verifies raw, or parsed when it is not nil (the same chain,
// parsed).
func (a *Authority) classify(raw [][]byte, parsed []*x509.Certificate) (Peer, error) {
	// Verified chains are cached (verified.go); the CRLs are consulted on
	// every call. x509svid verifies at the wall clock's time, so the cache
	// is consulted at it too.
	//
	// One load of the roots: the verification and the cache entry it
	// makes are of the same set, whatever SetRoots does meanwhile.
	key, now, rs := chainKey(raw), time.Now(), a.roots.Load()
	var id spiffeid.ID
	var chains [][]*x509.Certificate
	if v, ok := a.verified.get(key, rs.gen, now); ok {
		id, chains = v.id, v.chains
	} else {
		var err error
		if parsed != nil {
			id, chains, err = x509svid.Verify(parsed, rs.bundle)
		} else {
			id, chains, err = x509svid.ParseAndVerify(raw, rs.bundle)
		}
		if err != nil {
			return Peer{}, err
		}
		a.verified.put(key, rs.gen, id, chains, now)
	}
	if err := a.checkRevoked(chains); err != nil {
		return Peer{}, fmt.Errorf("%s: %w", id, err)
	}
	p := Peer{ID: id}
	switch path := id.Path(); {
	case strings.HasPrefix(path, "/sigil/node/"):
		p.Role, p.Name = RoleNode, strings.TrimPrefix(path, "/sigil/node/")
		if err := nodeid.Check(p.Name); err != nil {
			return Peer{}, err
		}
		ok := false
		for _, ch := range chains {
			ok = ok || len(ch) > 1 && ch[1].Subject.CommonName == p.Name
		}
		if !ok {
			return Peer{}, fmt.Errorf("%s was not issued by node %s's own issuing CA", id, p.Name)
		}
	case strings.HasPrefix(path, "/sigil/admin/"):
		p.Role, p.Name = RoleAdmin, strings.TrimPrefix(path, "/sigil/admin/")
	case strings.HasPrefix(path, "/sigil/agent/"):
		p.Role, p.Name = RoleAgent, strings.TrimPrefix(path, "/sigil/agent/")
	default:
		return Peer{}, fmt.Errorf("%s is not a Sigil node, admin or agent", id)
	}
	return p, nil
}

// NodeIdentity keeps this node's TLS certificate fresh: a key made in
// memory per certificate (it protects transport sessions, not identities,
// and dies with the process) certified by the HSM-held issuing CA.
type NodeIdentity struct {
	a   *Authority
	ttl time.Duration

	mu   sync.Mutex
	cert *tls.Certificate
}

// NewNodeIdentity issues the first certificate at once.
func NewNodeIdentity(a *Authority, ttl time.Duration) (*NodeIdentity, error) {
	n := &NodeIdentity{a: a, ttl: ttl}
	if _, err := n.rotate(); err != nil {
		return nil, err
	}
	return n, nil
}

func (n *NodeIdentity) rotate() (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	chain, err := n.a.SignNode(Leaf{ID: NodeSPIFFEID(n.a.td, n.a.nodeID), PublicKey: &key.PublicKey, TTL: n.ttl,
		Subject: pkix.Name{CommonName: n.a.nodeID}})
	if err != nil {
		return nil, err
	}
	c := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	n.mu.Lock()
	n.cert = c
	n.mu.Unlock()
	return c, nil
}

// Renew issues a new certificate now: after the issuing CA was renewed,
// so that peers see the new chain at their next handshake.
func (n *NodeIdentity) Renew() error {
	_, err := n.rotate()
	return err
}

// Certificate returns the current certificate, renewing it past half life.
func (n *NodeIdentity) Certificate() (*tls.Certificate, error) {
	n.mu.Lock()
	c := n.cert
	n.mu.Unlock()
	if half := c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore) / 2); n.a.now().After(half) {
		if nc, err := n.rotate(); err == nil {
			return nc, nil
		}
		// Keep serving the old certificate until it expires.
	}
	return c, nil
}

// TLSConfig is a mutual-TLS config for node-to-node and API traffic. Every
// peer must present a chain to the roots; allow decides which roles may
// connect (the caller authorizes per request beyond that). The chain is
// verified by Classify at each handshake, against the roots current then,
// and the certificate presented is the current one (Renew after Switch):
// a config made once follows root rotations.
func (n *NodeIdentity) TLSConfig(allow ...Role) *tls.Config {
	verify := func(cs tls.ConnectionState) error {
		p, err := n.a.ClassifyCerts(cs.PeerCertificates)
		if err != nil {
			return err
		}
		for _, r := range allow {
			if p.Role == r {
				return nil
			}
		}
		return fmt.Errorf("%s (%s) may not connect here", p.ID, p.Role)
	}
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		ClientAuth:           tls.RequireAnyClientCert, // verified in VerifyConnection against the roots of the moment
		InsecureSkipVerify:   true,                     // ditto for servers: SPIFFE IDs, not host names
		GetCertificate:       func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return n.Certificate() },
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return n.Certificate() },
		VerifyConnection:     verify,
	}
}

// TLSConfigAllowAnonymous is TLSConfig for a listener that also admits
// clients without a certificate (agents joining); such a connection has no
// role, and the server must authorize every request by role.
func (n *NodeIdentity) TLSConfigAllowAnonymous(allow ...Role) *tls.Config {
	c := n.TLSConfig(allow...)
	verify := c.VerifyConnection
	c.ClientAuth = tls.RequestClientCert
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 && !cs.DidResume {
			return nil
		}
		return verify(cs)
	}
	return c
}

// PeerFromState classifies the peer of an established TLS connection.
func (a *Authority) PeerFromState(cs tls.ConnectionState) (Peer, error) {
	return a.ClassifyCerts(cs.PeerCertificates)
}

// SignCheckpoint signs an audit checkpoint digest (state.CheckpointDigest:
// a SHA-256 over a domain-separated encoding of the chain head) with the
// HSM-held issuing key: ECDSA (ASN.1 DER) or RSA PKCS #1 v1.5, as the
// key's crypto.Signer does with crypto.SHA256. Verify with
// VerifyCheckpoint and the issuing certificate. Pass only checkpoint
// digests: the key signs whatever 32 bytes it is given.
func (a *Authority) SignCheckpoint(digest []byte) ([]byte, error) {
	if len(digest) != crypto.SHA256.Size() {
		return nil, fmt.Errorf("checkpoint digest is %d bytes, want a SHA-256 (%d)", len(digest), crypto.SHA256.Size())
	}
	if a.Revoked() {
		return nil, fmt.Errorf("sign audit checkpoint: %w: this node's issuing CA is on the root's CRL", ErrRevoked)
	}
	sig, err := a.signer.Sign(rand.Reader, digest, crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("sign audit checkpoint: %w", err)
	}
	return sig, nil
}

// VerifyCheckpoint checks a SignCheckpoint signature over digest with the
// public key of the issuing CA certificate that made it.
func VerifyCheckpoint(issuing *x509.Certificate, digest, sig []byte) error {
	switch k := issuing.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(k, digest, sig) {
			return errors.New("checkpoint signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		return rsa.VerifyPKCS1v15(k, crypto.SHA256, digest, sig)
	default:
		return fmt.Errorf("checkpoint key type %T is not supported", issuing.PublicKey)
	}
}

// CRL signs a revocation list of this issuing CA's revoked serials.
func (a *Authority) CRL(number uint64, serials []*big.Int, nextUpdate time.Duration) ([]byte, error) {
	now := a.now()
	tmpl := &x509.RevocationList{Number: new(big.Int).SetUint64(number), ThisUpdate: now.Add(-time.Minute), NextUpdate: now.Add(nextUpdate)}
	for _, s := range serials {
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: s, RevocationTime: now})
	}
	return x509.CreateRevocationList(rand.Reader, tmpl, a.Issuing(), a.signer)
}
