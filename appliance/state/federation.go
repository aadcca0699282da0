package state

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	bolt "go.etcd.io/bbolt"
)

// SPIFFE federation: foreign trust domains this appliance trusts. Each
// relationship names the foreign bundle endpoint (the leader fetches it,
// federation.bundle.set commits what changed) and holds the foreign
// bundle; entries that federate with a trust domain hand its bundle to
// their workloads. The state machine is the authority on every bundle it
// stores: a well-formed SPIFFE bundle of exactly that trust domain, never
// ours, bounded, and never going back in sequence, whoever proposes it.
const (
	CmdFederationAdd       = "federation.add"
	CmdFederationDelete    = "federation.delete"
	CmdFederationBundleSet = "federation.bundle.set"
)

// FederationVersion is the first command version with federation
// (relationships, foreign bundles, and entries' federates_with). Nodes of
// earlier versions refused the commands as unknown and the field as
// unknown, so an older command that carries them is refused as they
// refused it.
const FederationVersion = 7

// Federation profiles (how the bundle endpoint authenticates).
const (
	ProfileHTTPSSPIFFE = "https_spiffe"
	ProfileHTTPSWeb    = "https_web"
)

// Bounds of federation's state: a foreign bundle is fetched from a party
// we do not control, so what it may make us store (and send every agent
// that federates with it) is capped.
const (
	MaxFederations          = 64
	MaxFederatedBundle      = 256 << 10
	MaxFederatedAuthorities = 64 // X.509 authorities, and JWT keys, each
	MaxFederatesWith        = 16
	maxEndpointURL          = 2048
	maxEndpointCA           = 64 << 10
	maxFederatedKID         = 128
)

var bFederations = []byte("federations")

type (
	// Federation is a stored federation relationship.
	Federation struct {
		TrustDomain       string `json:"trust_domain"`
		BundleEndpointURL string `json:"bundle_endpoint_url,omitempty"`
		Profile           string `json:"profile,omitempty"`
		EndpointSPIFFEID  string `json:"endpoint_spiffe_id,omitempty"`
		EndpointCA        []byte `json:"endpoint_ca,omitempty"` // PEM, https_web only
		// Bundle is the foreign SPIFFE bundle document as it was received
		// (JSON): agents get these bytes.
		Bundle []byte `json:"bundle,omitempty"`
		// BundleSequence is the document's spiffe_sequence; HasSequence
		// says it had one (0 is a sequence number).
		BundleSequence uint64 `json:"bundle_sequence,omitempty"`
		HasSequence    bool   `json:"has_sequence,omitempty"`
		// BundleChanges counts the bundles stored for this relationship:
		// the order of bundles that carry no sequence of their own.
		BundleChanges   uint64    `json:"bundle_changes,omitempty"`
		RefreshHint     Seconds   `json:"refresh_hint,omitempty"`
		BundleUpdatedAt time.Time `json:"bundle_updated_at,omitzero"`
		CreatedBy       string    `json:"created_by"`
		CreatedAt       time.Time `json:"created_at"`
		Revision        uint64    `json:"revision"`
	}
	// FederationBundleSet sets a foreign bundle. Revision, when nonzero,
	// names the relationship's revision the bundle was fetched for (the
	// leader's fetches): a relationship deleted and added again since, with
	// another endpoint perhaps, does not take a bundle fetched for the old.
	FederationBundleSet struct {
		TrustDomain string `json:"trust_domain"`
		Bundle      []byte `json:"bundle"`
		Revision    uint64 `json:"revision,omitempty"`
		// Force (admins only) replaces the stored bundle whatever its
		// sequence: the way back from a sequence set far ahead.
		Force bool `json:"force,omitempty"`
	}
	// FederationDelete names the relationship to delete.
	FederationDelete struct {
		TrustDomain string `json:"trust_domain"`
	}
)

func init() {
	register(CmdFederationAdd, byAdmin, applyFederationAdd)
	register(CmdFederationDelete, byAdmin, applyFederationDelete)
	register(CmdFederationBundleSet, byAdminOrNode, applyFederationBundleSet)
}

// CheckForeignTrustDomain checks a trust domain name a relationship or an
// entry names: a canonical trust domain name that is not ours.
func CheckForeignTrustDomain(own spiffeid.TrustDomain, name string) (spiffeid.TrustDomain, error) {
	td, err := spiffeid.TrustDomainFromString(name)
	switch {
	case err != nil || strings.Contains(name, "/"):
		return spiffeid.TrustDomain{}, fmt.Errorf("trust domain %q: not a trust domain name", truncate(name, 128))
	case td.Name() != name:
		return spiffeid.TrustDomain{}, fmt.Errorf("trust domain %q: write it as %s", truncate(name, 128), td.Name())
	case td == own:
		return spiffeid.TrustDomain{}, fmt.Errorf("trust domain %s is this appliance's own: it does not federate with itself", name)
	}
	return td, nil
}

// CheckFederation checks a relationship's configuration (not its bundle):
// the admin API runs it before proposing, the FSM again as the authority.
func CheckFederation(own spiffeid.TrustDomain, f *Federation) error {
	td, err := CheckForeignTrustDomain(own, f.TrustDomain)
	if err != nil {
		return refuse("%v", err)
	}
	if f.BundleEndpointURL == "" {
		if f.Profile != "" || f.EndpointSPIFFEID != "" || len(f.EndpointCA) > 0 {
			return refuse("federation %s: a profile, endpoint SPIFFE ID or endpoint CA without a bundle endpoint URL", td)
		}
		return nil
	}
	if len(f.BundleEndpointURL) > maxEndpointURL {
		return refuse("federation %s: bundle endpoint URL of %d bytes; at most %d", td, len(f.BundleEndpointURL), maxEndpointURL)
	}
	u, err := url.Parse(f.BundleEndpointURL)
	switch {
	case err != nil:
		return refuse("federation %s: bundle endpoint URL %q: %v", td, truncate(f.BundleEndpointURL, 128), err)
	case u.Scheme != "https" || u.Host == "" || u.Hostname() == "":
		return refuse("federation %s: bundle endpoint URL %q: want https://host[:port]/path", td, truncate(f.BundleEndpointURL, 128))
	case u.User != nil || u.Fragment != "":
		return refuse("federation %s: bundle endpoint URL %q: no user info or fragment", td, truncate(f.BundleEndpointURL, 128))
	}
	switch f.Profile {
	case ProfileHTTPSSPIFFE:
		id, err := spiffeid.FromString(f.EndpointSPIFFEID)
		if err != nil {
			return refuse("federation %s: endpoint SPIFFE ID %q: %v", td, truncate(f.EndpointSPIFFEID, 128), err)
		}
		// The endpoint's certificate is checked against the foreign bundle:
		// only that trust domain's own IDs can be verified by it.
		if !id.MemberOf(td) {
			return refuse("federation %s: endpoint SPIFFE ID %s is not in trust domain %s", td, id, td)
		}
		if len(f.EndpointCA) > 0 {
			return refuse("federation %s: an endpoint CA is for the %s profile; %s checks the endpoint against the foreign bundle", td, ProfileHTTPSWeb, ProfileHTTPSSPIFFE)
		}
	case ProfileHTTPSWeb:
		if f.EndpointSPIFFEID != "" {
			return refuse("federation %s: an endpoint SPIFFE ID is for the %s profile", td, ProfileHTTPSSPIFFE)
		}
		if len(f.EndpointCA) > 0 {
			if _, err := ParseEndpointCA(f.EndpointCA); err != nil {
				return refuse("federation %s: %v", td, err)
			}
		}
	default:
		return refuse("federation %s: profile %q: want %s or %s", td, truncate(f.Profile, 32), ProfileHTTPSSPIFFE, ProfileHTTPSWeb)
	}
	return nil
}

// ParseEndpointCA parses an https_web endpoint's roots (PEM CA
// certificates).
func ParseEndpointCA(pemData []byte) ([]*x509.Certificate, error) {
	if len(pemData) > maxEndpointCA {
		return nil, fmt.Errorf("endpoint CA of %d bytes; at most %d", len(pemData), maxEndpointCA)
	}
	var certs []*x509.Certificate
	rest := pemData
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("endpoint CA: PEM block %q, want CERTIFICATE", truncate(blk.Type, 32))
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("endpoint CA: %v", err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("endpoint CA %q is not a CA certificate", c.Subject)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 || len(bytes.TrimSpace(rest)) > 0 {
		return nil, fmt.Errorf("endpoint CA: want PEM CA certificates and nothing else")
	}
	return certs, nil
}

// ParseForeignBundle checks a foreign SPIFFE bundle document for trust
// domain name: well-formed, bounded, with CA certificates as X.509
// authorities and JWT keys of the types SVIDs are signed with.
//
// It is part of the state machine's verdict, replayed from raft logs: it
// reads no clock (a foreign root's validity is the workloads' to check),
// and a go-spiffe upgrade that changes what spiffebundle.Parse accepts
// needs a new command version with the old verdict kept for the old.
func ParseForeignBundle(own spiffeid.TrustDomain, name string, doc []byte) (*spiffebundle.Bundle, error) {
	td, err := CheckForeignTrustDomain(own, name)
	if err != nil {
		return nil, err
	}
	if len(doc) > MaxFederatedBundle {
		return nil, fmt.Errorf("bundle of %s: %d bytes; at most %d", td, len(doc), MaxFederatedBundle)
	}
	b, err := spiffebundle.Parse(td, doc)
	if err != nil {
		return nil, fmt.Errorf("bundle of %s: %v", td, err)
	}
	x5, jwts := b.X509Authorities(), b.JWTAuthorities()
	switch {
	case len(x5) == 0 && len(jwts) == 0:
		return nil, fmt.Errorf("bundle of %s has no X.509 authorities and no JWT keys", td)
	case len(x5) > MaxFederatedAuthorities || len(jwts) > MaxFederatedAuthorities:
		return nil, fmt.Errorf("bundle of %s: %d X.509 authorities and %d JWT keys; at most %d of each", td, len(x5), len(jwts), MaxFederatedAuthorities)
	}
	for i, c := range x5 {
		if !c.IsCA {
			return nil, fmt.Errorf("bundle of %s: X.509 authority %d (%s) is not a CA certificate", td, i, c.Subject)
		}
		// A bundle claiming our trust domain's roots (a SPIFFE ID of ours in
		// a root) is another trust domain's attempt to speak for ours.
		// A root naming a third trust domain is refused too: agents drop
		// such a bundle (keeping the last they had), and the appliance
		// must not report as current a bundle its agents never use.
		for _, u := range c.URIs {
			id, err := spiffeid.FromURI(u)
			switch {
			case err != nil:
			case id.TrustDomain() == own:
				return nil, fmt.Errorf("bundle of %s: X.509 authority %d (%s) names trust domain %s, this appliance's own", td, i, c.Subject, own)
			case id.TrustDomain() != td:
				return nil, fmt.Errorf("bundle of %s: X.509 authority %d (%s) names trust domain %s, not %s", td, i, c.Subject, id.TrustDomain(), td)
			}
		}
	}
	for kid, k := range jwts {
		if kid == "" || len(kid) > maxFederatedKID {
			return nil, fmt.Errorf("bundle of %s: JWT key id %q: want 1-%d characters", td, truncate(kid, 64), maxFederatedKID)
		}
		if err := checkJWTKeyType(k); err != nil {
			return nil, fmt.Errorf("bundle of %s: JWT key %s: %v", td, truncate(kid, 64), err)
		}
	}
	return b, nil
}

// NextBundle decides whether doc may replace a relationship's stored
// bundle: sequences move forward only, an equal sequence with other
// content is refused, and a bundle without a sequence replaces only
// different content (and never a sequenced one). It is the state
// machine's rule; the leader asks it before proposing a fetched bundle.
func NextBundle(own spiffeid.TrustDomain, cur *Federation, doc []byte) (*spiffebundle.Bundle, error) {
	b, err := ParseForeignBundle(own, cur.TrustDomain, doc)
	if err != nil {
		return nil, err
	}
	if len(cur.Bundle) == 0 {
		return b, nil
	}
	old, err := spiffebundle.Parse(b.TrustDomain(), cur.Bundle)
	if err != nil {
		return nil, fmt.Errorf("stored bundle of %s does not parse: %v", cur.TrustDomain, err)
	}
	seq, hasSeq := b.SequenceNumber()
	switch {
	case cur.HasSequence && !hasSeq:
		return nil, fmt.Errorf("%w: bundle of %s has no sequence number; the stored one has %d (a bundle without one could be any older bundle)", ErrBundleRollback, cur.TrustDomain, cur.BundleSequence)
	case hasSeq && cur.HasSequence && seq < cur.BundleSequence:
		return nil, fmt.Errorf("%w: bundle of %s: sequence %d is older than the stored %d (a rollback)", ErrBundleRollback, cur.TrustDomain, seq, cur.BundleSequence)
	case old.Equal(b):
		return nil, fmt.Errorf("%w: federation with %s already holds this bundle", ErrBundleUnchanged, cur.TrustDomain)
	case hasSeq && cur.HasSequence && seq == cur.BundleSequence && !sameKeys(old, b):
		// Only the refresh hint may change under one sequence number: it
		// says nothing about whom to trust.
		return nil, fmt.Errorf("%w: bundle of %s: sequence %d is the stored bundle's, with other keys", ErrBundleRollback, cur.TrustDomain, seq)
	}
	return b, nil
}

// SameTrust reports whether b trusts what the stored bundle document does:
// the same authorities, keys and sequence (the refresh hint aside).
func SameTrust(b *spiffebundle.Bundle, stored []byte) bool {
	if len(stored) == 0 {
		return false
	}
	old, err := spiffebundle.Parse(b.TrustDomain(), stored)
	if err != nil || !sameKeys(old, b) {
		return false
	}
	s1, ok1 := old.SequenceNumber()
	s2, ok2 := b.SequenceNumber()
	return ok1 == ok2 && s1 == s2
}

// sameKeys: two bundles hold the same X.509 authorities and JWT keys.
func sameKeys(a, b *spiffebundle.Bundle) bool {
	return a.X509Bundle().Equal(b.X509Bundle()) && a.JWTBundle().Equal(b.JWTBundle())
}

// ErrBundleUnchanged: a bundle set to what is stored (the leader's
// fetches that found nothing new are not proposed).
var ErrBundleUnchanged = errors.New("bundle unchanged")

// ErrBundleRollback: a bundle whose sequence would go back (or that
// drops it, or reuses it for other content).
var ErrBundleRollback = errors.New("sequence does not move forward")

// storeBundle puts a checked bundle into a relationship.
func (t *txn) storeBundle(f *Federation, b *spiffebundle.Bundle, doc []byte) {
	seq, hasSeq := b.SequenceNumber()
	hint, _ := b.RefreshHint()
	f.Bundle, f.BundleSequence, f.HasSequence = bytes.Clone(doc), seq, hasSeq
	f.RefreshHint = Seconds(hint / time.Second)
	f.BundleChanges++
	f.BundleUpdatedAt = t.c.Time
}

func (t *txn) checkFederationVersion() error {
	if t.c.Version < FederationVersion {
		return refuse("%s is a command of version %d, not %d", t.c.Type, FederationVersion, t.c.Version)
	}
	return nil
}

func (t *txn) federation(name string) (*Federation, error) {
	return getOne[Federation](t.tx.Bucket(bFederations), name)
}

func federationAudit(action string, f *Federation) AuditEvent {
	d := map[string]string{}
	if f.BundleEndpointURL != "" {
		d["endpoint"], d["profile"] = truncate(f.BundleEndpointURL, maxDetailValue), f.Profile
	}
	if f.EndpointSPIFFEID != "" {
		d["endpoint_spiffe_id"] = truncate(f.EndpointSPIFFEID, maxDetailValue)
	}
	if len(f.EndpointCA) > 0 {
		d["endpoint_ca_sha256"] = hashHex(string(f.EndpointCA))[:16]
	}
	if len(f.Bundle) > 0 {
		d["bundle_sha256"] = hashHex(string(f.Bundle))[:16]
		d["bundle_changes"] = strconv.FormatUint(f.BundleChanges, 10)
		if f.HasSequence {
			d["bundle_sequence"] = strconv.FormatUint(f.BundleSequence, 10)
		}
	}
	return AuditEvent{Action: action, Target: f.TrustDomain, Detail: d}
}

func applyFederationAdd(t *txn, f *Federation) (any, []AuditEvent, error) {
	if err := t.checkFederationVersion(); err != nil {
		return nil, nil, err
	}
	if err := CheckFederation(t.f.td, f); err != nil {
		return nil, nil, err
	}
	feds := t.tx.Bucket(bFederations)
	if feds.Get([]byte(f.TrustDomain)) != nil {
		return nil, nil, refuse("federation with %s exists: delete it first", f.TrustDomain)
	}
	if n := feds.Stats().KeyN; n >= MaxFederations {
		return nil, nil, refuse("%d federation relationships: at most %d", n, MaxFederations)
	}
	doc := f.Bundle
	f.Bundle, f.BundleSequence, f.HasSequence, f.BundleChanges, f.RefreshHint, f.BundleUpdatedAt = nil, 0, false, 0, 0, time.Time{}
	if len(doc) > 0 {
		b, err := ParseForeignBundle(t.f.td, f.TrustDomain, doc)
		if err != nil {
			return nil, nil, refuse("%v", err)
		}
		t.storeBundle(f, b, doc)
	}
	f.CreatedBy, f.CreatedAt, f.Revision = truncate(t.c.Actor, maxActor), t.c.Time, t.index
	t.federationChanged = true
	return f, []AuditEvent{federationAudit(t.c.Type, f)}, putJSON(feds, []byte(f.TrustDomain), f)
}

func applyFederationDelete(t *txn, p *FederationDelete) (any, []AuditEvent, error) {
	if err := t.checkFederationVersion(); err != nil {
		return nil, nil, err
	}
	f, err := t.federation(p.TrustDomain)
	if err != nil {
		return nil, nil, err
	}
	if f == nil {
		return nil, nil, refuse("no federation with %q", truncate(p.TrustDomain, 128))
	}
	// Entries that federate with it keep the name: their workloads stop
	// receiving its bundle now, and get it again only if an admin adds
	// the relationship again.
	t.federationChanged = true
	return nil, []AuditEvent{federationAudit(t.c.Type, f)}, t.tx.Bucket(bFederations).Delete([]byte(f.TrustDomain))
}

func applyFederationBundleSet(t *txn, p *FederationBundleSet) (any, []AuditEvent, error) {
	if err := t.checkFederationVersion(); err != nil {
		return nil, nil, err
	}
	f, err := t.federation(p.TrustDomain)
	if err != nil {
		return nil, nil, err
	}
	if f == nil {
		return nil, nil, refuse("no federation with %q: add it first", truncate(p.TrustDomain, 128))
	}
	if p.Revision != 0 && p.Revision != f.Revision {
		return nil, nil, refuse("federation with %s changed since its bundle was fetched (revision %d, fetched for %d)", f.TrustDomain, f.Revision, p.Revision)
	}
	if kind, _ := t.f.actorKind(t.c.Actor); p.Force && kind == "node" {
		return nil, nil, refuse("federation with %s: only an admin forces a bundle", f.TrustDomain)
	}
	var b *spiffebundle.Bundle
	if p.Force {
		// The sequence rule is what a subverted endpoint could turn
		// against us (a sequence far ahead refuses every later bundle):
		// an admin may set a checked bundle regardless, and the audit
		// record says so.
		b, err = ParseForeignBundle(t.f.td, f.TrustDomain, p.Bundle)
		if err == nil && len(f.Bundle) > 0 {
			if old, perr := spiffebundle.Parse(b.TrustDomain(), f.Bundle); perr == nil && old.Equal(b) {
				err = fmt.Errorf("%w: federation with %s already holds this bundle", ErrBundleUnchanged, f.TrustDomain)
			}
		}
	} else {
		b, err = NextBundle(t.f.td, f, p.Bundle)
	}
	if err != nil {
		return nil, nil, refuse("%v", err)
	}
	replaced := f.BundleSequence
	t.storeBundle(f, b, p.Bundle)
	t.federationChanged = true
	ev := federationAudit(t.c.Type, f)
	if p.Force {
		ev.Detail["forced"] = "true"
		ev.Detail["replaced_sequence"] = strconv.FormatUint(replaced, 10)
	}
	return f, []AuditEvent{ev}, putJSON(t.tx.Bucket(bFederations), []byte(f.TrustDomain), f)
}

// checkFederatesWith checks an entry's federates_with: its command's
// version, and (strict: a create or update) that each names a
// relationship.
func (t *txn) checkFederatesWith(e *Entry) error {
	if len(e.FederatesWith) == 0 {
		return nil
	}
	if t.c.Version < FederationVersion {
		return refuse("entry %s: federates_with is a field of version %d commands, not of version %d", truncate(e.ID, 64), FederationVersion, t.c.Version)
	}
	if err := checkEntryFederatesWith(t.f.td, e); err != nil {
		return err
	}
	slices.Sort(e.FederatesWith)
	for _, name := range e.FederatesWith {
		if t.tx.Bucket(bFederations).Get([]byte(name)) == nil {
			return refuse("entry %s federates with %q, which is not a federation relationship (add it first: sigilctl federation add)", truncate(e.ID, 64), truncate(name, 128))
		}
	}
	return nil
}

// checkEntryFederatesWith checks the form of an entry's federates_with.
func checkEntryFederatesWith(own spiffeid.TrustDomain, e *Entry) error {
	if len(e.FederatesWith) > MaxFederatesWith {
		return refuse("entry %s federates with %d trust domains; at most %d", truncate(e.ID, 64), len(e.FederatesWith), MaxFederatesWith)
	}
	seen := map[string]bool{}
	for _, name := range e.FederatesWith {
		if _, err := CheckForeignTrustDomain(own, name); err != nil {
			return refuse("entry %s: federates_with: %v", truncate(e.ID, 64), err)
		}
		if seen[name] {
			return refuse("entry %s: federates_with names %s twice", truncate(e.ID, 64), name)
		}
		seen[name] = true
	}
	return nil
}

// checkStoredFederation checks a relationship as a snapshot or a restore
// holds it: what federation.add and federation.bundle.set would have
// accepted.
func checkStoredFederation(own spiffeid.TrustDomain, f *Federation) error {
	if err := CheckFederation(own, f); err != nil {
		return err
	}
	if len(f.Bundle) == 0 {
		if f.HasSequence || f.BundleSequence != 0 {
			return fmt.Errorf("federation %s: a sequence without a bundle", f.TrustDomain)
		}
		return nil
	}
	b, err := ParseForeignBundle(own, f.TrustDomain, f.Bundle)
	if err != nil {
		return err
	}
	if seq, ok := b.SequenceNumber(); ok != f.HasSequence || seq != f.BundleSequence {
		return fmt.Errorf("federation %s: the stored sequence is not its bundle's", f.TrustDomain)
	}
	return nil
}

// loadFederationFrame checks a snapshot's relationship.
func loadFederationFrame(own spiffeid.TrustDomain, k, v []byte) error {
	var f Federation
	if err := decodeStrict(v, &f); err != nil || f.TrustDomain != string(k) {
		return fmt.Errorf("federation %q: malformed", truncate(string(k), 128))
	}
	return checkStoredFederation(own, &f)
}

// replaceFederations makes the archive's relationships the state's (a
// restore). A foreign bundle never goes back: where this appliance holds
// a bundle for a trust domain the archive also names, the archive's
// bundle is taken only if it is ahead in sequence (NextBundle), else the
// current one stays. It says whether anything changed.
func (t *txn) replaceFederations(feds []Federation) (bool, error) {
	old := map[string]Federation{}
	for _, f := range t.f.federationsIn(t.tx) {
		old[f.TrustDomain] = f
	}
	if err := t.tx.DeleteBucket(bFederations); err != nil {
		return false, err
	}
	b, err := t.tx.CreateBucket(bFederations)
	if err != nil {
		return false, err
	}
	changed := len(old) != len(feds)
	for _, f := range feds {
		o, had := old[f.TrustDomain]
		if had && len(o.Bundle) > 0 {
			if nb, err := NextBundle(t.f.td, &o, f.Bundle); len(f.Bundle) > 0 && err == nil {
				o.BundleChanges = max(o.BundleChanges, f.BundleChanges)
				t.storeBundle(&o, nb, f.Bundle)
			}
			f.Bundle, f.BundleSequence, f.HasSequence, f.BundleChanges, f.RefreshHint, f.BundleUpdatedAt =
				o.Bundle, o.BundleSequence, o.HasSequence, o.BundleChanges, o.RefreshHint, o.BundleUpdatedAt
		}
		if !had || o.BundleEndpointURL != f.BundleEndpointURL || o.Profile != f.Profile || o.EndpointSPIFFEID != f.EndpointSPIFFEID ||
			!bytes.Equal(o.EndpointCA, f.EndpointCA) || !bytes.Equal(o.Bundle, f.Bundle) {
			changed = true
		}
		f.CreatedBy, f.CreatedAt, f.Revision = truncate(t.c.Actor, maxActor), t.c.Time, t.index
		if err := putJSON(b, []byte(f.TrustDomain), f); err != nil {
			return false, err
		}
	}
	// A restore wakes every agent anyway (configChanged, no agent named);
	// this also tells the fetchers their relationships were replaced.
	t.federationChanged = t.federationChanged || changed
	return changed, nil
}

func (f *FSM) federationsIn(tx *bolt.Tx) []Federation {
	var out []Federation
	_ = tx.Bucket(bFederations).ForEach(func(k, v []byte) error {
		var r Federation
		if err := decodeStrict(v, &r); err != nil {
			f.log.Error("stored federation unreadable", "trust_domain", string(k), "err", err)
			return nil
		}
		out = append(out, r)
		return nil
	})
	return out
}

// Federations returns every federation relationship, by trust domain.
func (f *FSM) Federations() []Federation {
	var out []Federation
	f.read("Federations", func(tx *bolt.Tx) error {
		out = f.federationsIn(tx)
		return nil
	})
	return out
}

// Federation returns one relationship.
func (f *FSM) Federation(name string) (Federation, bool) {
	var r Federation
	var ok bool
	if !f.read("Federation", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bFederations), []byte(name), &r)
		return err
	}) {
		return Federation{}, false
	}
	return r, ok
}

// FederatedBundles returns the stored bundles of the named trust domains
// (those with a relationship and a bundle), by name.
func (f *FSM) FederatedBundles(names []string) map[string][]byte {
	if len(names) == 0 {
		return nil
	}
	out := map[string][]byte{}
	f.read("FederatedBundles", func(tx *bolt.Tx) error {
		for _, n := range names {
			var r Federation
			if ok, err := getJSON(tx.Bucket(bFederations), []byte(n), &r); err == nil && ok && len(r.Bundle) > 0 {
				out[n] = r.Bundle
			}
		}
		return nil
	})
	if len(out) == 0 {
		return nil
	}
	return out
}
