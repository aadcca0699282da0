package state

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Root CRLs: the root ceremony revokes node issuing CAs with a CRL signed
// by the root (appliance/ceremony, kind crl). An admin adds it with
// CmdRootCRLAdd; every replica checks that a root of the trust bundle
// signed it, keeps the newest CRL of each root, and refuses every chain
// holding a certificate it lists (CARevoked, which the node's CA consults
// on each handshake). Agents receive the CRLs in their sync stream and
// check the signatures themselves.

// CmdRootCRLAdd stores a root-signed CRL.
const CmdRootCRLAdd = "bundle.root-crl.add"

// RootCRLAdd is CmdRootCRLAdd's payload: the CRL as the ceremony wrote it
// (DER).
type RootCRLAdd struct {
	DER []byte `json:"der"`
}

// RootCRL is a stored root CRL: the newest one (highest CRL number) each
// root signed. Revoked repeats the DER's serials for readers of the state;
// the DER is the authority and is re-checked wherever the state is loaded.
type RootCRL struct {
	Version    int       `json:"v"`
	Root       string    `json:"root"`   // hex SHA-256 of the root certificate (DER)
	Number     string    `json:"number"` // the CRL number, decimal
	ThisUpdate time.Time `json:"this_update"`
	NextUpdate time.Time `json:"next_update"`
	AddedAt    time.Time `json:"added_at"`
	Revoked    []string  `json:"revoked"` // hex serials of the revoked certificates, sorted
	DER        []byte    `json:"der"`
}

// RootCRLVersion is the only stored RootCRL version.
const RootCRLVersion = 1

// RootCRLResult is the response to CmdRootCRLAdd.
type RootCRLResult struct {
	CRL RootCRL `json:"crl"`
	// WithdrawnJWTKeys are the JWT keys removed from the bundle because
	// the CA of the node that published them is revoked.
	WithdrawnJWTKeys []string `json:"withdrawn_jwt_keys,omitempty"`
}

// Bounds: a root CRL lists retired or compromised node CAs, a handful;
// these keep one CRL (and the meta value holding all of them) far inside
// a snapshot frame.
const (
	MaxRootCRLEntries = 1024
	MaxRootCRLDER     = 128 << 10
	// maxCACertDER bounds the issuing CA certificate a JWT key carries.
	maxCACertDER = 8 << 10
	// MaxNodeCAs bounds the node CA records (one per node name that ever
	// showed its CA); the oldest record makes room for a new name.
	MaxNodeCAs = 256
	// maxNodeCAIssuer bounds a recorded CA's issuer name (a root's
	// subject, DER).
	maxNodeCAIssuer = 1024
	// crlClockSkew tolerates a ceremony clock slightly ahead.
	crlClockSkew = 10 * time.Minute
)

// keyRootCRLs holds the stored root CRLs in the meta bucket (JSON
// []RootCRL, sorted by Root).
var keyRootCRLs = []byte("root_crls")

var (
	oidDeltaCRLIndicator = asn1.ObjectIdentifier{2, 5, 29, 27}
	oidIssuingDistPoint  = asn1.ObjectIdentifier{2, 5, 29, 28}
)

// JWTKeyCAVersion is the first command version whose JWT keys must carry
// the publishing node's issuing CA (see checkJWTKeyCA).
const JWTKeyCAVersion = 3

func init() {
	register(CmdRootCRLAdd, byAdmin, applyRootCRLAdd)
	// Snapshots and archives carry the stored CRLs and the node CA records
	// (both checked on load).
	streamMetaKeys[string(keyRootCRLs)] = true
	streamMetaKeys[string(keyNodeCAs)] = true
}

// revokedKey identifies a certificate by its issuer and serial, as a CRL
// names it.
func revokedKey(rawIssuer []byte, serial *big.Int) string {
	return string(rawIssuer) + "\x00" + serial.Text(16)
}

// revokedSet is the replica's in-memory index of every certificate the
// stored root CRLs list.
type revokedSet map[string]struct{}

// parsedRootCRL is a stored CRL checked against its root.
type parsedRootCRL struct {
	crl  *x509.RevocationList
	root *x509.Certificate
	fp   string
}

// verifyRootCRL parses a CRL and finds the bundle root that signed it.
// Every error is a refusal that says what is wrong with the CRL.
func verifyRootCRL(der []byte, roots [][]byte) (*parsedRootCRL, error) {
	if len(der) == 0 {
		return nil, refuse("no CRL given")
	}
	if len(der) > MaxRootCRLDER {
		return nil, refuse("CRL of %d bytes; at most %d", len(der), MaxRootCRLDER)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return nil, refuse("not an X.509 CRL: %v", err)
	}
	for _, e := range crl.Extensions {
		switch {
		case e.Id.Equal(oidDeltaCRLIndicator):
			return nil, refuse("delta CRLs are not supported: give the root's complete CRL")
		case e.Id.Equal(oidIssuingDistPoint):
			return nil, refuse("CRLs with an issuing distribution point (a partial scope) are not supported: give the root's complete CRL")
		case e.Critical:
			return nil, refuse("CRL has an unsupported critical extension %s", e.Id)
		}
	}
	if crl.Number == nil || crl.Number.Sign() <= 0 {
		return nil, refuse("CRL has no positive CRL number (the ceremony's crl.number)")
	}
	if len(crl.RevokedCertificateEntries) > MaxRootCRLEntries {
		return nil, refuse("CRL lists %d certificates; at most %d", len(crl.RevokedCertificateEntries), MaxRootCRLEntries)
	}
	for i, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber == nil || e.SerialNumber.Sign() < 0 {
			return nil, refuse("CRL entry %d has no valid serial number", i)
		}
	}
	for _, rd := range roots {
		root, err := x509.ParseCertificate(rd)
		if err != nil {
			continue
		}
		if !bytes.Equal(crl.RawIssuer, root.RawSubject) || crl.CheckSignatureFrom(root) != nil {
			continue
		}
		sum := sha256.Sum256(rd)
		return &parsedRootCRL{crl: crl, root: root, fp: hex.EncodeToString(sum[:])}, nil
	}
	return nil, refuse("CRL issued by %q is not signed by a root of the trust bundle (root CRLs come from the root key ceremony)", truncate(crl.Issuer.String(), 200))
}

func (p *parsedRootCRL) serials() []string {
	out := make([]string, 0, len(p.crl.RevokedCertificateEntries))
	for _, e := range p.crl.RevokedCertificateEntries {
		out = append(out, e.SerialNumber.Text(16))
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func (p *parsedRootCRL) addTo(set revokedSet) {
	for _, e := range p.crl.RevokedCertificateEntries {
		set[revokedKey(p.crl.RawIssuer, e.SerialNumber)] = struct{}{}
	}
}

// readRootCRLs and readRoots read values that were checked when they were
// written (or loaded): one that no longer decodes is a refusal of the
// command that needs it, the same on every replica, never a reason to stop
// the process (a non-refusal error in Apply stops every replica at once).
func readRootCRLs(tx *bolt.Tx) ([]RootCRL, error) {
	var out []RootCRL
	if _, err := getJSON(tx.Bucket(bMeta), keyRootCRLs, &out); err != nil {
		return nil, refuse("stored root CRLs unreadable: %v", err)
	}
	return out, nil
}

func readRoots(tx *bolt.Tx) ([][]byte, error) {
	var roots [][]byte
	if _, err := getJSON(tx.Bucket(bMeta), keyRoots, &roots); err != nil {
		return nil, refuse("stored roots unreadable: %v", err)
	}
	return roots, nil
}

// checkStoredRootCRLs checks stored root CRLs: form, and (roots non-nil)
// that each is its root's and matches what is recorded with it. A state
// read from a snapshot cannot carry a CRL the root did not sign.
func checkStoredRootCRLs(crls []RootCRL, roots [][]byte) (revokedSet, error) {
	set := revokedSet{}
	seen := map[string]bool{}
	for i, c := range crls {
		if c.Version != RootCRLVersion {
			return nil, fmt.Errorf("root CRL %d: version %d, this node reads %d", i, c.Version, RootCRLVersion)
		}
		if seen[c.Root] || i > 0 && crls[i-1].Root >= c.Root {
			return nil, fmt.Errorf("root CRL %d: roots not unique and sorted", i)
		}
		seen[c.Root] = true
		if roots == nil {
			if _, err := x509.ParseRevocationList(c.DER); err != nil || len(c.DER) > MaxRootCRLDER {
				return nil, fmt.Errorf("root CRL %d: malformed", i)
			}
			continue
		}
		p, err := verifyRootCRL(c.DER, roots)
		if err != nil {
			return nil, fmt.Errorf("root CRL %d: %v", i, err)
		}
		if p.fp != c.Root || p.crl.Number.String() != c.Number || !slices.Equal(p.serials(), c.Revoked) {
			return nil, fmt.Errorf("root CRL %d: what is recorded with it does not match the CRL", i)
		}
		p.addTo(set)
	}
	return set, nil
}

// buildRevokedSet makes the revoked set from the stored CRL records: each
// record's serials under its root's subject (verifyRootCRL made sure the
// CRL's issuer is that subject). It parses no CRL: the records were checked
// against their DER when stored or loaded, so a parser that grew stricter
// since cannot drop a revocation. A record whose root is not among the
// roots (which never happens: roots are set once) falls back to its DER;
// one that does not parse either is skipped and reported in skipped.
func buildRevokedSet(crls []RootCRL, roots [][]byte) (set revokedSet, skipped []string) {
	subjects := map[string][]byte{}
	for _, rd := range roots {
		sum := sha256.Sum256(rd)
		if root, err := x509.ParseCertificate(rd); err == nil {
			subjects[hex.EncodeToString(sum[:])] = root.RawSubject
		}
	}
	set = revokedSet{}
	for i, c := range crls {
		issuer, ok := subjects[c.Root]
		if !ok {
			crl, err := x509.ParseRevocationList(c.DER)
			if err != nil {
				skipped = append(skipped, fmt.Sprintf("root CRL %d (root %.16s): %v", i, c.Root, err))
				continue
			}
			issuer = crl.RawIssuer
		}
		for _, s := range c.Revoked {
			set[string(issuer)+"\x00"+s] = struct{}{}
		}
	}
	return set, skipped
}

// revokedSet is the revoked set as this transaction sees it. It is a pure
// function of the stored CRLs and roots, so the set the caches computed from
// the same stored bytes (the usual case: nothing changed since the last
// command) is reused rather than rebuilt for every command.
func (t *txn) revokedSet() (revokedSet, error) {
	meta := t.tx.Bucket(bMeta)
	rawCRLs, rawRoots := meta.Get(keyRootCRLs), meta.Get(keyRoots)
	if len(rawCRLs) == 0 {
		return revokedSet{}, nil
	}
	if rc := t.f.rootCRLs.Load(); rc != nil && rc.set != nil && bytes.Equal(rc.rawCRLs, rawCRLs) && bytes.Equal(rc.rawRoots, rawRoots) {
		return rc.set, nil
	}
	crls, err := readRootCRLs(t.tx)
	if err != nil {
		return nil, err
	}
	roots, err := readRoots(t.tx)
	if err != nil {
		return nil, err
	}
	set, skipped := buildRevokedSet(crls, roots)
	for _, s := range skipped {
		t.f.log.Error("stored root CRL unreadable: its revocations are not in force", "crl", s)
	}
	return set, nil
}

func applyRootCRLAdd(t *txn, p *RootCRLAdd) (any, []AuditEvent, error) {
	roots, err := readRoots(t.tx)
	if err != nil {
		return nil, nil, err
	}
	pc, err := verifyRootCRL(p.DER, roots)
	if err != nil {
		return nil, nil, err
	}
	crl := pc.crl
	if crl.NextUpdate.IsZero() || !crl.NextUpdate.After(t.c.Time) {
		return nil, nil, refuse("CRL number %s expired at %s (next update); sign a new one", crl.Number, crl.NextUpdate.UTC().Format(time.RFC3339))
	}
	if crl.ThisUpdate.After(t.c.Time.Add(crlClockSkew)) {
		return nil, nil, refuse("CRL number %s is dated %s, in the future", crl.Number, crl.ThisUpdate.UTC().Format(time.RFC3339))
	}
	stored, err := readRootCRLs(t.tx)
	if err != nil {
		return nil, nil, err
	}
	serials := pc.serials()
	i := slices.IndexFunc(stored, func(c RootCRL) bool { return c.Root == pc.fp })
	if i >= 0 {
		old := stored[i]
		oldNum, ok := new(big.Int).SetString(old.Number, 10)
		if !ok {
			return nil, nil, refuse("stored root CRL number %q unreadable", truncate(old.Number, 64))
		}
		if crl.Number.Cmp(oldNum) <= 0 {
			return nil, nil, refuse("CRL number %s is not newer than the stored CRL number %s of this root: an older CRL cannot replace a newer one", crl.Number, old.Number)
		}
		// A revocation is never undone: the CA may be in an attacker's
		// hands, and an operator who forgot a serial in the ceremony
		// script must not re-admit it by accident.
		var dropped []string
		for _, s := range old.Revoked {
			if _, found := slices.BinarySearch(serials, s); !found {
				dropped = append(dropped, s)
			}
		}
		if len(dropped) > 0 {
			return nil, nil, refuse("CRL number %s no longer lists %s, which CRL number %s revoked: a revocation cannot be undone (list every revoked CA in each new CRL)", crl.Number, strings.Join(dropped, ", "), old.Number)
		}
	}
	rec := RootCRL{Version: RootCRLVersion, Root: pc.fp, Number: crl.Number.String(), ThisUpdate: crl.ThisUpdate.UTC(),
		NextUpdate: crl.NextUpdate.UTC(), AddedAt: t.c.Time, Revoked: serials, DER: p.DER}
	if i >= 0 {
		stored[i] = rec
	} else {
		stored = append(stored, rec)
		slices.SortFunc(stored, func(a, b RootCRL) int { return strings.Compare(a.Root, b.Root) })
	}
	if err := putJSON(t.tx.Bucket(bMeta), keyRootCRLs, stored); err != nil {
		return nil, nil, err
	}
	set, err := t.revokedSet()
	if err != nil {
		return nil, nil, err
	}
	withdrawn, err := t.withdrawJWTKeys(set)
	if err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	sum := sha256.Sum256(p.DER)
	res := &RootCRLResult{CRL: rec, WithdrawnJWTKeys: withdrawn}
	res.CRL.DER = nil
	return res, []AuditEvent{{Action: t.c.Type, Target: pc.fp[:16], Detail: map[string]string{
		"root": pc.fp, "number": rec.Number, "crl_sha256": hex.EncodeToString(sum[:]),
		"next_update": rec.NextUpdate.Format(time.RFC3339), "revoked": strings.Join(serials, ","),
		"jwt_keys_withdrawn": strings.Join(withdrawn, ","), "sequence": fmt.Sprint(seq)}}}, nil
}

// withdrawJWTKeys removes from the bundle every JWT key published by a
// node whose issuing CA (the CA the key carries) is revoked: that node's
// HSM may be in an attacker's hands, and so may its JWT keys. A stored key
// that no longer decodes, or whose CA no longer parses (both were checked
// when it was published), is withdrawn too: nothing shows that its CA is
// not the revoked one, and a refusal here would keep the CRL out.
func (t *txn) withdrawJWTKeys(set revokedSet) ([]string, error) {
	keys := t.tx.Bucket(bJWTKeys)
	var kids []string
	err := keys.ForEach(func(k, v []byte) error {
		var j JWTKey
		if err := decodeStrict(v, &j); err != nil {
			t.f.log.Error("stored JWT key unreadable: withdrawn with the revoked CAs' keys", "kid", truncate(string(k), 80), "err", err)
			kids = append(kids, string(k))
			return nil
		}
		if len(j.CA) == 0 {
			return nil
		}
		ca, err := x509.ParseCertificate(j.CA)
		if err != nil {
			t.f.log.Error("stored JWT key's CA certificate unreadable: withdrawn with the revoked CAs' keys", "kid", j.KID, "err", err)
			kids = append(kids, string(k))
			return nil
		}
		if _, revoked := set[revokedKey(ca.RawIssuer, ca.SerialNumber)]; revoked {
			kids = append(kids, string(k))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, k := range kids {
		if err := keys.Delete([]byte(k)); err != nil {
			return nil, err
		}
	}
	return kids, nil
}

// checkJWTKeyCAForm checks the form of the CA certificate a JWT key
// carries (optional: keys published before root CRLs carry none).
func checkJWTKeyCAForm(k *JWTKey) (*x509.Certificate, error) {
	if len(k.CA) == 0 {
		return nil, nil
	}
	if len(k.CA) > maxCACertDER {
		return nil, refuse("JWT key %s: CA certificate of %d bytes; at most %d", k.KID, len(k.CA), maxCACertDER)
	}
	ca, err := x509.ParseCertificate(k.CA)
	if err != nil {
		return nil, refuse("JWT key %s: CA certificate: %v", k.KID, err)
	}
	if !ca.IsCA || ca.Subject.CommonName != k.Node {
		return nil, refuse("JWT key %s: the certificate it carries is not node %s's issuing CA", k.KID, truncate(k.Node, 64))
	}
	return ca, nil
}

// checkJWTKeyCA checks, when a node publishes a JWT key, that the CA it
// carries is the node's, signed by a bundle root, and not revoked.
//
// From command version 3 on (JWTKeyCAVersion), and for every key of a node
// that has shown its CA before (so that a node cannot step back to a
// version 2 command to escape), the CA is required: a key without one
// could never be withdrawn by a CRL. It must then also be a valid chain to
// a bundle root at the command's time, and the key may be published no
// longer than the CA is valid. Version 2 commands without a CA (raft logs
// written before) replay as they were applied. The CA is then recorded as
// the node's (noteNodeCA), which checkOriginCA consults.
func (t *txn) checkJWTKeyCA(k *JWTKey) error {
	prev, err := t.nodeCA(t.origin)
	if err != nil {
		return err
	}
	strict := t.c.Version >= JWTKeyCAVersion || prev != nil
	ca, err := checkJWTKeyCAForm(k)
	if err != nil {
		return err
	}
	if ca == nil {
		if strict {
			return refuse("JWT key %s carries no issuing CA certificate: node %s must publish its keys with its issuing CA, so that a root CRL revoking the CA withdraws them", k.KID, truncate(k.Node, 64))
		}
		return nil
	}
	roots, err := readRoots(t.tx)
	if err != nil {
		return err
	}
	if strict {
		pool := x509.NewCertPool()
		for _, rd := range roots {
			if root, err := x509.ParseCertificate(rd); err == nil {
				pool.AddCert(root)
			}
		}
		if _, err := ca.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: t.c.Time, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return refuse("JWT key %s: node %s's CA certificate is not a valid chain to a root of the trust bundle at %s: %v",
				k.KID, k.Node, t.c.Time.UTC().Format(time.RFC3339), err)
		}
		if k.NotAfter.After(ca.NotAfter) {
			return refuse("JWT key %s: published until %s, after node %s's issuing CA expires (%s): the key may not outlive its CA",
				k.KID, k.NotAfter.UTC().Format(time.RFC3339), k.Node, ca.NotAfter.UTC().Format(time.RFC3339))
		}
	} else {
		signed := false
		for _, rd := range roots {
			if root, err := x509.ParseCertificate(rd); err == nil && ca.CheckSignatureFrom(root) == nil {
				signed = true
				break
			}
		}
		if !signed {
			return refuse("JWT key %s: node %s's CA certificate is not signed by a root of the trust bundle", k.KID, k.Node)
		}
	}
	set, err := t.revokedSet()
	if err != nil {
		return err
	}
	if _, revoked := set[revokedKey(ca.RawIssuer, ca.SerialNumber)]; revoked {
		return refuse("JWT key %s: node %s's issuing CA (serial %x) is revoked by the root's CRL", k.KID, k.Node, ca.SerialNumber)
	}
	if strict {
		return t.noteNodeCA(k.Node, ca)
	}
	return nil
}

// mergeRootCRLs adopts, from a restored archive, root CRLs newer than the
// ones this appliance holds (a restore never drops a revocation: the
// current CRLs stay unless a verified, newer CRL of the same root, listing
// everything they list, replaces them). Archive CRLs that do not verify
// or are older are ignored. It returns how many it adopted.
func (t *txn) mergeRootCRLs(in []RootCRL) (int, error) {
	if len(in) == 0 {
		return 0, nil
	}
	roots, err := readRoots(t.tx)
	if err != nil {
		return 0, err
	}
	stored, err := readRootCRLs(t.tx)
	if err != nil {
		return 0, err
	}
	adopted := 0
	for _, c := range in {
		p, err := verifyRootCRL(c.DER, roots)
		if err != nil {
			continue
		}
		serials := p.serials()
		i := slices.IndexFunc(stored, func(s RootCRL) bool { return s.Root == p.fp })
		if i >= 0 {
			oldNum, _ := new(big.Int).SetString(stored[i].Number, 10)
			if oldNum != nil && p.crl.Number.Cmp(oldNum) <= 0 {
				continue
			}
			keeps := true
			for _, s := range stored[i].Revoked {
				if _, found := slices.BinarySearch(serials, s); !found {
					keeps = false
				}
			}
			if !keeps {
				continue
			}
		}
		rec := RootCRL{Version: RootCRLVersion, Root: p.fp, Number: p.crl.Number.String(), ThisUpdate: p.crl.ThisUpdate.UTC(),
			NextUpdate: p.crl.NextUpdate.UTC(), AddedAt: t.c.Time, Revoked: serials, DER: c.DER}
		if i >= 0 {
			stored[i] = rec
		} else {
			stored = append(stored, rec)
			slices.SortFunc(stored, func(a, b RootCRL) int { return strings.Compare(a.Root, b.Root) })
		}
		adopted++
	}
	if adopted == 0 {
		return 0, nil
	}
	if err := putJSON(t.tx.Bucket(bMeta), keyRootCRLs, stored); err != nil {
		return 0, err
	}
	set, err := t.revokedSet()
	if err != nil {
		return 0, err
	}
	if _, err := t.withdrawJWTKeys(set); err != nil {
		return 0, err
	}
	_, err = t.bumpBundle()
	return adopted, err
}

// rootCRLCache is the replica's view of the stored root CRLs, replaced
// whenever the bundle changes. carried is what the side file held when
// the state was opened. rawCRLs and rawRoots are the stored values set was
// built from (txn.revokedSet reuses it while they are unchanged); grown
// tells watchers that the set gained a revocation.
type rootCRLCache struct {
	crls              []RootCRL
	set               revokedSet
	carried           [][]byte
	rawCRLs, rawRoots []byte
	grown             *crlNotifier
}

// crlNotifier closes its channel each time the revoked set gains an entry.
type crlNotifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func (n *crlNotifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *crlNotifier) notify() {
	n.mu.Lock()
	close(n.ch)
	n.ch = make(chan struct{})
	n.mu.Unlock()
}

// RootCRLsGrown returns a channel closed when the replica's revoked set
// next gains a certificate (a root CRL committed or restored). The node
// then drops its raft connections (raft.Node.ResetConnections): their
// peers were verified at the handshake, against the set before.
func (f *FSM) RootCRLsGrown() <-chan struct{} {
	if rc := f.rootCRLs.Load(); rc != nil {
		return rc.grown.wait()
	}
	// Open loads the cache before it returns: not reached. A nil channel
	// never fires (a closed one would spin the watcher).
	return nil
}

// The state file is rebuilt from raft at every start, so until raft has
// replayed the log a restarted node would know no revocation. The CRLs
// are therefore also kept in a side file beside it, which Open leaves in
// place: the node reads it (CarriedRootCRLs), checks it against its
// configured roots and refuses what it lists from the first handshake.
func (f *FSM) rootCRLFile() string { return filepath.Join(filepath.Dir(f.opts.Path), "root-crls.pem") }

func readCRLFile(path string) [][]byte {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return out
		}
		if blk.Type == "X509 CRL" && len(out) < 64 {
			out = append(out, blk.Bytes)
		}
	}
}

// saveCRLFile replaces the side file when the stored CRLs changed. The
// stored CRLs never shrink, so an empty state (a node just started) never
// overwrites what an earlier run kept.
func (f *FSM) saveCRLFile(crls []RootCRL, prev *rootCRLCache) {
	if len(crls) == 0 || prev != nil && slices.EqualFunc(crls, prev.crls, func(a, b RootCRL) bool { return bytes.Equal(a.DER, b.DER) }) {
		return
	}
	var b []byte
	for _, c := range crls {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: c.DER})...)
	}
	path := f.rootCRLFile()
	tmp := path + ".tmp"
	err := os.WriteFile(tmp, b, 0o600)
	if err == nil {
		if fh, oerr := os.Open(tmp); oerr == nil {
			err = fh.Sync()
			if cerr := fh.Close(); err == nil {
				err = cerr
			}
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		f.log.Error("root CRLs not kept beside the state: after a restart this node refuses revoked CAs only once raft has replayed the log", "file", path, "err", err)
	}
}

// CarriedRootCRLs are the root CRLs (DER) an earlier run of this node kept
// beside the state file; unverified: the caller checks them against its
// roots.
func (f *FSM) CarriedRootCRLs() [][]byte {
	if rc := f.rootCRLs.Load(); rc != nil {
		return rc.carried
	}
	return nil
}

// loadRootCRLs refreshes the cached CRLs and revoked set from the file.
func (f *FSM) loadRootCRLs() error {
	var crls []RootCRL
	var roots [][]byte
	var rawCRLs, rawRoots []byte
	err := f.view(func(tx *bolt.Tx) error {
		var err error
		if crls, err = readRootCRLs(tx); err != nil {
			return err
		}
		if roots, err = readRoots(tx); err != nil {
			return err
		}
		meta := tx.Bucket(bMeta)
		rawCRLs, rawRoots = bytes.Clone(meta.Get(keyRootCRLs)), bytes.Clone(meta.Get(keyRoots))
		return nil
	})
	if err != nil {
		return err
	}
	set, skipped := buildRevokedSet(crls, roots)
	for _, s := range skipped {
		f.log.Error("stored root CRL unreadable: its revocations are not in force", "crl", s)
	}
	prev := f.rootCRLs.Load()
	next := &rootCRLCache{crls: crls, set: set, rawCRLs: rawCRLs, rawRoots: rawRoots}
	if prev == nil {
		next.carried = readCRLFile(f.rootCRLFile())
		next.grown = &crlNotifier{ch: make(chan struct{})}
	} else {
		next.carried, next.grown = prev.carried, prev.grown
	}
	f.saveCRLFile(crls, prev)
	f.rootCRLs.Store(next)
	if prev != nil && setGrew(prev.set, set) {
		next.grown.notify()
	}
	return nil
}

// setGrew reports whether next holds a certificate that prev does not.
func setGrew(prev, next revokedSet) bool {
	for k := range next {
		if _, ok := prev[k]; !ok {
			return true
		}
	}
	return false
}

// CARevoked reports whether a stored root CRL lists the certificate (by
// issuer and serial). It is a map lookup on the cached set: the node's CA
// calls it for every certificate of every chain it verifies.
func (f *FSM) CARevoked(c *x509.Certificate) bool {
	rc := f.rootCRLs.Load()
	if rc == nil || len(rc.set) == 0 {
		return false
	}
	_, revoked := rc.set[revokedKey(c.RawIssuer, c.SerialNumber)]
	return revoked
}

// RootCRLs returns the stored root CRLs (with their DER).
func (f *FSM) RootCRLs() []RootCRL {
	rc := f.rootCRLs.Load()
	if rc == nil {
		return nil
	}
	return slices.Clone(rc.crls)
}

// verifyStoredRootCRLs checks, once a snapshot is loaded, that every root
// CRL it carries is signed by one of its roots and matches its record.
func verifyStoredRootCRLs(tx *bolt.Tx) error {
	crls, err := readRootCRLs(tx)
	if err != nil || len(crls) == 0 {
		return err
	}
	roots, err := readRoots(tx)
	if err != nil {
		return err
	}
	_, err = checkStoredRootCRLs(crls, roots)
	return err
}

// readRootCRLDER lists the stored root CRLs' DER, for the bundle.
func readRootCRLDER(tx *bolt.Tx) ([][]byte, error) {
	crls, err := readRootCRLs(tx)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for _, c := range crls {
		out = append(out, c.DER)
	}
	return out, nil
}

// Node CAs: a root CRL names certificates, raft names nodes. To refuse the
// commands of a node whose issuing CA is revoked, in log order and the same
// on every replica, the state records for each node the issuing CA it last
// showed: with a JWT key (version 3 and later, checked in checkJWTKeyCA)
// or with an audit checkpoint it signed (proof that it holds the CA's key).
// A node that has shown no CA yet is not covered here; the TLS handshake
// (ca.Authority.Classify, with raft's connections dropped when the revoked
// set grows) still refuses it.

// keyNodeCAs holds the records in the meta bucket (JSON []NodeCA, sorted
// by Node).
var keyNodeCAs = []byte("node_cas")

// NodeCA is the issuing CA a node last showed the state machine.
type NodeCA struct {
	Node string `json:"node"`
	// Issuer and Serial name the CA certificate as a root CRL does: the
	// issuer's name (DER) and the serial in hex.
	Issuer []byte `json:"issuer"`
	Serial string `json:"serial"`
	// Index is the raft index of the command that showed it.
	Index uint64 `json:"index"`
	// NotAfter is the CA certificate's expiry (zero in records written
	// before it was kept, until the node shows its CA again): the expiry
	// metric of every node's issuing CA.
	NotAfter time.Time `json:"not_after,omitzero"`
	// Root is the hex SHA-256 of the bundle root that signed the CA
	// (recorded by version 9 commands: a root rotation's retire waits
	// until every member's CA is the new root's).
	Root string `json:"root,omitempty"`
}

func readNodeCAs(tx *bolt.Tx) ([]NodeCA, error) {
	var out []NodeCA
	if _, err := getJSON(tx.Bucket(bMeta), keyNodeCAs, &out); err != nil {
		return nil, refuse("stored node CA records unreadable: %v", err)
	}
	return out, nil
}

// checkNodeCAs checks the records' form (a snapshot or archive being loaded).
func checkNodeCAs(recs []NodeCA) error {
	if len(recs) > MaxNodeCAs {
		return fmt.Errorf("node CA records: %d; at most %d", len(recs), MaxNodeCAs)
	}
	for i, r := range recs {
		if r.Node == "" || len(r.Node) > 64 || i > 0 && recs[i-1].Node >= r.Node {
			return fmt.Errorf("node CA record %d: node names not valid, unique and sorted", i)
		}
		if len(r.Issuer) == 0 || len(r.Issuer) > maxNodeCAIssuer || !serialRE.MatchString(r.Serial) {
			return fmt.Errorf("node CA record %d (node %s): malformed issuer or serial", i, r.Node)
		}
		if r.Root != "" && !hexHashRE.MatchString(r.Root) {
			return fmt.Errorf("node CA record %d (node %s): malformed root fingerprint", i, r.Node)
		}
	}
	return nil
}

// nodeCA is the record of a node (nil: it has shown no CA).
func (t *txn) nodeCA(node string) (*NodeCA, error) {
	if node == "" {
		return nil, nil
	}
	recs, err := readNodeCAs(t.tx)
	if err != nil {
		return nil, err
	}
	i, found := slices.BinarySearchFunc(recs, node, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
	if !found {
		return nil, nil
	}
	return &recs[i], nil
}

// noteNodeCA records ca (checked by the caller: the node's, a chain to a
// root, not revoked) as node's issuing CA. When the table is full the
// record shown longest ago makes room.
func (t *txn) noteNodeCA(node string, ca *x509.Certificate) error {
	if len(ca.RawIssuer) > maxNodeCAIssuer {
		return refuse("node %s's issuing CA has an issuer name of %d bytes; at most %d", truncate(node, 64), len(ca.RawIssuer), maxNodeCAIssuer)
	}
	if err := t.checkInstallPhase(ca); err != nil {
		return err
	}
	recs, err := readNodeCAs(t.tx)
	if err != nil {
		return err
	}
	rec := NodeCA{Node: node, Issuer: ca.RawIssuer, Serial: ca.SerialNumber.Text(16), Index: t.index, NotAfter: ca.NotAfter.UTC()}
	if t.c.Version >= RootRotationVersion {
		if rec.Root, err = t.signingRoot(ca); err != nil {
			return err
		}
	}
	i, found := slices.BinarySearchFunc(recs, node, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
	switch {
	case found && bytes.Equal(recs[i].Issuer, rec.Issuer) && recs[i].Serial == rec.Serial && !recs[i].NotAfter.IsZero() && (rec.Root == "" || recs[i].Root == rec.Root):
		return nil // shown before: the record stays as it was
	case found && bytes.Equal(recs[i].Issuer, rec.Issuer) && recs[i].Serial == rec.Serial && !recs[i].NotAfter.IsZero():
		recs[i].Root = rec.Root // an older record learns its root; its index stays
	case found && bytes.Equal(recs[i].Issuer, rec.Issuer) && recs[i].Serial == rec.Serial:
		recs[i].NotAfter, recs[i].Root = rec.NotAfter, rec.Root // an older record learns the expiry; its index stays
	case found:
		recs[i] = rec
	default:
		if len(recs) >= MaxNodeCAs {
			oldest := 0
			for j := range recs {
				if recs[j].Index < recs[oldest].Index {
					oldest = j
				}
			}
			recs = slices.Delete(recs, oldest, oldest+1)
			i, _ = slices.BinarySearchFunc(recs, node, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
		}
		recs = slices.Insert(recs, i, rec)
	}
	return putJSON(t.tx.Bucket(bMeta), keyNodeCAs, recs)
}

// noteCheckpointCA records the issuing CA a verified checkpoint carries
// (version 3 commands; the signature proved the node holds its key), and
// refuses a checkpoint signed with a revoked CA. A certificate that is not
// the node's own CA is not recorded.
func (t *txn) noteCheckpointCA(node string, der []byte) error {
	if t.c.Version < JWTKeyCAVersion {
		return nil
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return refuse("checkpoint certificate: %v", err)
	}
	set, err := t.revokedSet()
	if err != nil {
		return err
	}
	if _, revoked := set[revokedKey(ca.RawIssuer, ca.SerialNumber)]; revoked {
		return refuse("checkpoint signed by node %s's issuing CA (serial %x), which the root's CRL revokes", truncate(node, 64), ca.SerialNumber)
	}
	if !ca.IsCA || ca.Subject.CommonName != node {
		return nil
	}
	return t.noteNodeCA(node, ca)
}

// checkOriginCA refuses every command proposed by a node whose recorded
// issuing CA (NodeCA) a stored root CRL revokes: such a node may be in an
// attacker's hands, and the TLS handshake that would refuse it now may
// have been made before the CRL. The check is in log order, so it cuts the
// node off exactly at the CRL's index on every replica, whatever
// connections it still has. Only a JWT key or a checkpoint showing another
// CA of the node's (their handlers refuse a revoked one) gets through: a
// node whose CA was rotated before the old one was revoked.
func (t *txn) checkOriginCA() error {
	if len(t.tx.Bucket(bMeta).Get(keyRootCRLs)) == 0 {
		return nil // nothing is revoked
	}
	rec, err := t.nodeCA(t.origin)
	if err != nil || rec == nil {
		return err
	}
	set, err := t.revokedSet()
	if err != nil {
		return err
	}
	if _, revoked := set[string(rec.Issuer)+"\x00"+rec.Serial]; !revoked {
		return nil
	}
	switch {
	case t.c.Type == CmdJWTKeyAdd:
		return nil // checkJWTKeyCA: the CA is required, and refused if revoked
	case t.c.Type == CmdNodeCAInstall:
		return nil // applyNodeCAInstall refuses a revoked CA
	case t.c.Type == CmdAuditCheckpoint && t.c.Version >= JWTKeyCAVersion:
		return nil // noteCheckpointCA refuses a revoked CA
	}
	return refuse("%s by %s refused: node %s, which proposed it, has an issuing CA (serial %s, shown at index %d) that the root's CRL revokes; remove the node from the cluster",
		t.c.Type, truncate(t.c.Actor, 128), t.origin, rec.Serial, rec.Index)
}

// NodeCARevoked returns the issuing CA recorded for node (ok: there is a
// record) and whether a stored root CRL revokes it: a node checks whether
// its commands are refused because of a CA it has since replaced.
func (f *FSM) NodeCARevoked(node string) (rec NodeCA, revoked, ok bool) {
	var recs []NodeCA
	if err := f.view(func(tx *bolt.Tx) error {
		var err error
		recs, err = readNodeCAs(tx)
		return err
	}); err != nil {
		return NodeCA{}, false, false
	}
	i, found := slices.BinarySearchFunc(recs, node, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
	if !found {
		return NodeCA{}, false, false
	}
	rec = recs[i]
	if rc := f.rootCRLs.Load(); rc != nil {
		_, revoked = rc.set[string(rec.Issuer)+"\x00"+rec.Serial]
	}
	return rec, revoked, true
}
