package state

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// A root rotation moves the trust domain from its root(s) to a new root
// made in a ceremony, in phases that are each one committed command, so
// that every replica, agent and federated peer sees the same step at the
// same bundle sequence:
//
//   - add: the new root joins the bundle; agents and peers receive it, and
//     workloads trust both. Each node then stages an issuing certificate
//     the new root signed (CmdNodeCAStage).
//   - switch: every member node has one staged; nodes sign with it from
//     the commit on, so new SVIDs chain to the new root.
//   - retire: once nothing the old roots' chains signed can still be
//     valid, the old roots leave the bundle (kept as retired roots, which
//     nothing trusts) with their root CRLs and the JWT keys of their
//     nodes' CAs.
//   - rollback goes one phase back (switched to added; added to no
//     rotation) until retire.
//
// The state machine decides from the state and the command alone. Clocks
// enter only as the command's time (the proposer's) and as lifetimes the
// proposing node computes from its configuration (MaxTTL), which gate the
// phases that would leave SVIDs untrusted. Waiting for agents'
// acknowledgements is the proposing node's check (Force skips it); the
// acknowledgements themselves are state (Agent.BundleAck).

// Root rotation commands.
const (
	CmdRootAdd      = "bundle.root.add"
	CmdRootSwitch   = "bundle.root.switch"
	CmdRootRollback = "bundle.root.rollback"
	CmdRootRetire   = "bundle.root.retire"
	CmdNodeCAStage  = "node.issuing-ca.stage"
	CmdBundleAck    = "agent.bundle.ack"
)

// RootRotationVersion is the first command version with root rotation;
// nodes of earlier versions do not know its commands or fields.
const RootRotationVersion = 9

// Rotation phases (RootRotation.Phase).
const (
	PhaseAdded    = "added"
	PhaseSwitched = "switched"
	// PhaseRetired is a finished rotation: kept so that agents'
	// acknowledgements of the retire are still counted and shown, until
	// the next add replaces it.
	PhaseRetired = "retired"
)

// MaxRoots bounds the bundle's roots; MaxRetiredRoots the retired ones
// kept (the oldest make room).
const (
	MaxRoots        = 4
	MaxRetiredRoots = 16
)

var (
	keyRootRotation = []byte("root_rotation")
	keyRetiredRoots = []byte("retired_roots")
)

// RootRotation is where a root rotation stands.
type RootRotation struct {
	Phase string `json:"phase"`
	// Old are the hex SHA-256 fingerprints of the roots being retired;
	// New the one replacing them.
	Old []string `json:"old"`
	New string   `json:"new"`
	// Sequence is the bundle sequence the last phase committed at, which
	// agents acknowledge; Since is that command's time.
	Sequence uint64    `json:"sequence"`
	Since    time.Time `json:"since"`
	Added    time.Time `json:"added"`
	Switched time.Time `json:"switched,omitzero"`
	// RetireAfter (phase switched) is when everything signed under the
	// old roots has expired: the switch's time plus the longest lifetime
	// a node could sign for (the largest of the proposer's MaxTTL and
	// those the nodes staged with: lifetimes are per-node settings).
	// Retire is refused before it unless forced.
	RetireAfter time.Time `json:"retire_after,omitzero"`
	// NewSignedUntil (after a rollback from switched) is when what was
	// signed under the new root has expired: rolling back further, which
	// removes the new root, is refused before it unless forced.
	NewSignedUntil time.Time `json:"new_signed_until,omitzero"`
	// Staged are the nodes' issuing certificates under the new root, by
	// node.
	Staged []StagedCA `json:"staged,omitempty"`
}

// StagedCA is one node's issuing certificate under the new root.
type StagedCA struct {
	Node     string    `json:"node"`
	Cert     []byte    `json:"cert"` // DER
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	// MaxTTL is the longest lifetime of anything the node signs, by its
	// configuration when it staged (NodeCAStage.MaxTTL).
	MaxTTL time.Duration `json:"max_ttl,omitempty"`
}

// RetiredRoot is a root a rotation retired.
type RetiredRoot struct {
	SHA256    string    `json:"sha256"`
	DER       []byte    `json:"der"`
	RetiredAt time.Time `json:"retired_at"`
}

// Payloads.
type (
	// RootAdd adds a new root (DER).
	RootAdd struct {
		Root []byte `json:"root"`
	}
	// RootPhase moves a rotation: Members are the cluster's voting
	// members as the proposing node's raft configuration has them (the
	// state does not know the membership; switch, retire and a rollback
	// past add check them); MaxTTL is the longest lifetime
	// of anything a node signs (SVIDs, agent and admin certificates,
	// JWT-SVIDs); Force skips the lifetime waits and is audited.
	RootPhase struct {
		Members []string      `json:"members,omitempty"`
		MaxTTL  time.Duration `json:"max_ttl"`
		Force   bool          `json:"force,omitempty"`
	}
	// NodeCAStage stages the proposing node's issuing certificate (DER)
	// under the new root, with the longest lifetime of anything that node
	// signs (its own configuration: join.agent-svid-ttl and
	// admin-cert-max-ttl differ between nodes), which the switch and a
	// rollback from switched wait for besides the proposer's.
	NodeCAStage struct {
		Cert   []byte        `json:"cert"`
		MaxTTL time.Duration `json:"max_ttl,omitempty"`
	}
	// BundleAck records that Agent applied the bundle of Sequence.
	BundleAck struct {
		Agent    string `json:"agent"`
		Sequence uint64 `json:"sequence"`
	}
)

// maxPhaseTTL bounds RootPhase.MaxTTL (a year: no SVID lives longer).
const maxPhaseTTL = 366 * 24 * time.Hour

func init() {
	register(CmdRootAdd, byAdmin, applyRootAdd)
	register(CmdRootSwitch, byAdmin, applyRootSwitch)
	register(CmdRootRollback, byAdmin, applyRootRollback)
	register(CmdRootRetire, byAdmin, applyRootRetire)
	register(CmdNodeCAStage, byAdmin, applyNodeCAStage)
	register(CmdBundleAck, byNode, applyBundleAck)
	streamMetaKeys[string(keyRootRotation)] = true
	streamMetaKeys[string(keyRetiredRoots)] = true
}

func (t *txn) needRotationVersion() error {
	if t.c.Version < RootRotationVersion {
		return refuse("%s needs command version %d or later (this command is version %d)", t.c.Type, RootRotationVersion, t.c.Version)
	}
	return nil
}

func readRootRotation(tx *bolt.Tx) (*RootRotation, error) {
	var r RootRotation
	found, err := getJSON(tx.Bucket(bMeta), keyRootRotation, &r)
	if err != nil {
		return nil, refuse("stored root rotation unreadable: %v", err)
	}
	if !found {
		return nil, nil
	}
	return &r, nil
}

func readRetiredRoots(tx *bolt.Tx) ([]RetiredRoot, error) {
	var out []RetiredRoot
	if _, err := getJSON(tx.Bucket(bMeta), keyRetiredRoots, &out); err != nil {
		return nil, refuse("stored retired roots unreadable: %v", err)
	}
	return out, nil
}

// inProgress is a rotation that has not been retired.
func (r *RootRotation) inProgress() bool { return r != nil && r.Phase != PhaseRetired }

func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

func (t *txn) checkPhase(p *RootPhase) error {
	if p.MaxTTL <= 0 || p.MaxTTL > maxPhaseTTL {
		return refuse("%s: max_ttl %s; want more than 0 and at most %s", t.c.Type, p.MaxTTL, maxPhaseTTL)
	}
	if len(p.Members) > MaxNodeCAs {
		return refuse("%s: %d members; at most %d", t.c.Type, len(p.Members), MaxNodeCAs)
	}
	for _, m := range p.Members {
		if len(m) == 0 || len(m) > 64 {
			return refuse("%s: member name of %d bytes", t.c.Type, len(m))
		}
	}
	return nil
}

func applyRootAdd(t *txn, p *RootAdd) (any, []AuditEvent, error) {
	if err := t.needRotationVersion(); err != nil {
		return nil, nil, err
	}
	cur, err := readRootRotation(t.tx)
	if err != nil {
		return nil, nil, err
	}
	if cur.inProgress() {
		return nil, nil, refuse("a root rotation is in progress (phase %s, new root %.16s): finish it (retire) or roll it back first", cur.Phase, cur.New)
	}
	if len(p.Root) == 0 || len(p.Root) > maxCACertDER {
		return nil, nil, refuse("new root of %d bytes; want 1 to %d", len(p.Root), maxCACertDER)
	}
	fp, err := checkRoot(t.f.td, 0, p.Root)
	if err != nil {
		return nil, nil, err
	}
	root, _ := x509.ParseCertificate(p.Root)
	if t.c.Time.Before(root.NotBefore) || !t.c.Time.Before(root.NotAfter) {
		return nil, nil, refuse("new root %.16s is valid from %s to %s, not at %s", fp,
			root.NotBefore.UTC().Format(time.RFC3339), root.NotAfter.UTC().Format(time.RFC3339), t.c.Time.UTC().Format(time.RFC3339))
	}
	roots, err := readRoots(t.tx)
	if err != nil {
		return nil, nil, err
	}
	if len(roots) == 0 {
		return nil, nil, refuse("the trust bundle has no roots yet; a new cluster's first leader sets them")
	}
	var old []string
	for _, d := range roots {
		ofp := fingerprint(d)
		if ofp == fp {
			return nil, nil, refuse("root %.16s is already in the trust bundle", fp)
		}
		if o, err := x509.ParseCertificate(d); err == nil && !root.NotAfter.After(o.NotAfter) {
			return nil, nil, refuse("new root %.16s expires %s, no later than root %.16s (%s): rotating to it gains nothing", fp,
				root.NotAfter.UTC().Format(time.RFC3339), ofp, o.NotAfter.UTC().Format(time.RFC3339))
		}
		old = append(old, ofp)
	}
	if len(roots) >= MaxRoots {
		return nil, nil, refuse("the trust bundle holds %d roots; at most %d", len(roots), MaxRoots)
	}
	retired, err := readRetiredRoots(t.tx)
	if err != nil {
		return nil, nil, err
	}
	if slices.ContainsFunc(retired, func(r RetiredRoot) bool { return r.SHA256 == fp }) {
		return nil, nil, refuse("root %.16s was retired by an earlier rotation; a retired root does not come back", fp)
	}
	if err := putJSON(t.tx.Bucket(bMeta), keyRoots, append(roots, p.Root)); err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	rot := RootRotation{Phase: PhaseAdded, Old: old, New: fp, Sequence: seq, Since: t.c.Time, Added: t.c.Time}
	if err := putJSON(t.tx.Bucket(bMeta), keyRootRotation, rot); err != nil {
		return nil, nil, err
	}
	return &rot, []AuditEvent{{Action: t.c.Type, Detail: map[string]string{
		"new_root": fp, "old_roots": strings.Join(old, ","), "subject": truncate(root.Subject.String(), 200),
		"not_after": root.NotAfter.UTC().Format(time.RFC3339), "sequence": fmt.Sprint(seq)}}}, nil
}

// applyNodeCAStage checks a node's certificate under the new root as
// applyNodeCAInstall checks a renewal, but against the new root alone, and
// keeps it as the node's staged CA; the node signs with it at the switch.
func applyNodeCAStage(t *txn, p *NodeCAStage) (any, []AuditEvent, error) {
	if err := t.needRotationVersion(); err != nil {
		return nil, nil, err
	}
	rot, err := readRootRotation(t.tx)
	if err != nil {
		return nil, nil, err
	}
	if rot == nil || rot.Phase != PhaseAdded {
		phase := "none"
		if rot != nil {
			phase = rot.Phase
		}
		return nil, nil, refuse("an issuing certificate under a new root is staged while a rotation is in phase added (now: %s)", phase)
	}
	if len(p.Cert) == 0 || len(p.Cert) > maxCACertDER {
		return nil, nil, refuse("issuing CA certificate of %d bytes; want 1 to %d", len(p.Cert), maxCACertDER)
	}
	if p.MaxTTL < 0 || p.MaxTTL > maxPhaseTTL {
		return nil, nil, refuse("%s: max_ttl %s; want at most %s", t.c.Type, p.MaxTTL, maxPhaseTTL)
	}
	ca, err := x509.ParseCertificate(p.Cert)
	if err != nil {
		return nil, nil, refuse("issuing CA certificate: %v", err)
	}
	if !ca.IsCA || ca.Subject.CommonName != t.origin {
		return nil, nil, refuse("the certificate (subject %q) is not an issuing CA of node %s, which proposed it", truncate(ca.Subject.CommonName, 64), t.origin)
	}
	if len(ca.RawIssuer) > maxNodeCAIssuer {
		return nil, nil, refuse("issuing CA issuer name of %d bytes; at most %d", len(ca.RawIssuer), maxNodeCAIssuer)
	}
	newRoot, err := t.rootByFingerprint(rot.New)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(newRoot)
	if _, err := ca.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: t.c.Time, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, refuse("node %s's certificate is not a valid chain to the new root %.16s at %s: %v",
			t.origin, rot.New, t.c.Time.UTC().Format(time.RFC3339), err)
	}
	set, err := t.revokedSet()
	if err != nil {
		return nil, nil, err
	}
	if _, revoked := set[revokedKey(ca.RawIssuer, ca.SerialNumber)]; revoked {
		return nil, nil, refuse("node %s's certificate (serial %x) is revoked by the root's CRL", t.origin, ca.SerialNumber)
	}
	s := StagedCA{Node: t.origin, Cert: p.Cert, Serial: ca.SerialNumber.Text(16), NotAfter: ca.NotAfter.UTC(), MaxTTL: p.MaxTTL}
	prev := ""
	i, found := slices.BinarySearchFunc(rot.Staged, t.origin, func(c StagedCA, n string) int { return strings.Compare(c.Node, n) })
	switch {
	case found && rot.Staged[i].Serial == s.Serial && bytes.Equal(rot.Staged[i].Cert, s.Cert) && rot.Staged[i].MaxTTL == s.MaxTTL:
		return rot, nil, nil // staged before: nothing changes
	case found:
		prev = rot.Staged[i].Serial
		rot.Staged[i] = s
	default:
		if len(rot.Staged) >= MaxNodeCAs {
			return nil, nil, refuse("%d nodes have staged certificates; at most %d", len(rot.Staged), MaxNodeCAs)
		}
		rot.Staged = slices.Insert(rot.Staged, i, s)
	}
	if err := putJSON(t.tx.Bucket(bMeta), keyRootRotation, rot); err != nil {
		return nil, nil, err
	}
	return rot, []AuditEvent{{Action: t.c.Type, Target: t.origin, Detail: map[string]string{
		"node": t.origin, "serial": s.Serial, "replaces_staged_serial": prev, "new_root": rot.New,
		"not_after": s.NotAfter.Format(time.RFC3339), "max_ttl": s.MaxTTL.String()}}}, nil
}

func (t *txn) rootByFingerprint(fp string) (*x509.Certificate, error) {
	roots, err := readRoots(t.tx)
	if err != nil {
		return nil, err
	}
	for _, d := range roots {
		if fingerprint(d) == fp {
			return x509.ParseCertificate(d)
		}
	}
	return nil, refuse("root %.16s is not in the trust bundle", fp)
}

// checkInstallPhase keeps a node's installed CA on the side of the
// rotation the cluster is on: before the switch a certificate under the
// new root is staged, not installed (its node would sign under a root
// agents may not trust yet), and after it one under an old root would
// take the node back.
func (t *txn) checkInstallPhase(ca *x509.Certificate) error {
	if t.c.Version < RootRotationVersion {
		return nil
	}
	rot, err := readRootRotation(t.tx)
	if err != nil || !rot.inProgress() {
		return err
	}
	root, err := t.signingRoot(ca)
	if err != nil {
		return err
	}
	switch {
	case rot.Phase == PhaseAdded && root == rot.New:
		return refuse("node %s's certificate chains to the new root %.16s, which nodes sign under only after the switch: stage it (sigilctl node issuing-cert install stages it while the rotation is in phase added)", t.origin, rot.New)
	case rot.Phase == PhaseSwitched && slices.Contains(rot.Old, root):
		return refuse("node %s's certificate chains to root %.16s, which the rotation has switched away from: roll the rotation back first", t.origin, root)
	}
	return nil
}

// signingRoot is the fingerprint of the bundle root that signed ca ("":
// none does; the caller has checked the chain where it must).
func (t *txn) signingRoot(ca *x509.Certificate) (string, error) {
	roots, err := readRoots(t.tx)
	if err != nil {
		return "", err
	}
	for _, d := range roots {
		r, err := x509.ParseCertificate(d)
		if err != nil {
			continue
		}
		if bytes.Equal(ca.RawIssuer, r.RawSubject) && ca.CheckSignatureFrom(r) == nil {
			return fingerprint(d), nil
		}
	}
	return "", nil
}

func (r *RootRotation) staged(node string) *StagedCA {
	i, found := slices.BinarySearchFunc(r.Staged, node, func(c StagedCA, n string) int { return strings.Compare(c.Node, n) })
	if !found {
		return nil
	}
	return &r.Staged[i]
}

// phaseCommand checks what every phase command needs (its version, its
// payload's bounds) and reads the rotation it moves.
func (t *txn) phaseCommand(p *RootPhase) (*RootRotation, error) {
	if err := t.needRotationVersion(); err != nil {
		return nil, err
	}
	if err := t.checkPhase(p); err != nil {
		return nil, err
	}
	return readRootRotation(t.tx)
}

// forcedDetail adds "forced" to an audit detail when the phase was forced.
func forcedDetail(d map[string]string, p *RootPhase) map[string]string {
	if p.Force {
		d["forced"] = "true"
	}
	return d
}

func applyRootSwitch(t *txn, p *RootPhase) (any, []AuditEvent, error) {
	rot, err := t.phaseCommand(p)
	if err != nil {
		return nil, nil, err
	}
	if rot == nil || rot.Phase != PhaseAdded {
		return nil, nil, refuse("switch follows add: %s", phaseNow(rot))
	}
	if len(p.Members) == 0 {
		return nil, nil, refuse("switch names no member nodes")
	}
	// A staged certificate a root CRL revoked since it was staged is not
	// valid either: its node could not sign with it (CheckNext refuses
	// it) and would go on under the old root after the switch.
	set, err := t.revokedSet()
	if err != nil {
		return nil, nil, err
	}
	var missing []string
	for _, m := range p.Members {
		s := rot.staged(m)
		if s == nil || !t.c.Time.Before(s.NotAfter) {
			missing = append(missing, m)
			continue
		}
		if c, err := x509.ParseCertificate(s.Cert); err != nil {
			missing = append(missing, m)
		} else if _, revoked := set[revokedKey(c.RawIssuer, c.SerialNumber)]; revoked {
			missing = append(missing, m+" (staged certificate revoked)")
		}
	}
	if len(missing) > 0 {
		return nil, nil, refuse("nodes with no valid issuing certificate under the new root staged: %s (sigilctl node issuing-cert install on each)", strings.Join(missing, ", "))
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	rot.Phase, rot.Sequence, rot.Since, rot.Switched = PhaseSwitched, seq, t.c.Time, t.c.Time
	rot.RetireAfter = t.c.Time.Add(rot.signedLife(p))
	rot.NewSignedUntil = time.Time{}
	if err := putJSON(t.tx.Bucket(bMeta), keyRootRotation, rot); err != nil {
		return nil, nil, err
	}
	return rot, []AuditEvent{{Action: t.c.Type, Detail: forcedDetail(map[string]string{
		"new_root": rot.New, "old_roots": strings.Join(rot.Old, ","), "members": strings.Join(p.Members, ","),
		"retire_after": rot.RetireAfter.UTC().Format(time.RFC3339), "sequence": fmt.Sprint(seq)}, p)}}, nil
}

// signedLife is the longest lifetime of anything a node may have signed:
// the proposer's MaxTTL and every staging node's own.
func (r *RootRotation) signedLife(p *RootPhase) time.Duration {
	life := p.MaxTTL
	for _, s := range r.Staged {
		life = max(life, s.MaxTTL)
	}
	return life
}

func phaseNow(rot *RootRotation) string {
	if rot == nil {
		return "no rotation is in progress"
	}
	return "the rotation is in phase " + rot.Phase
}

func applyRootRollback(t *txn, p *RootPhase) (any, []AuditEvent, error) {
	rot, err := t.phaseCommand(p)
	if err != nil {
		return nil, nil, err
	}
	if !rot.inProgress() {
		return nil, nil, refuse("rollback: %s (a retired rotation is final)", phaseNow(rot))
	}
	from := rot.Phase
	var withdrawn []string
	switch rot.Phase {
	case PhaseSwitched:
		// Nodes sign under the old root again from this commit; what they
		// signed under the new root stays valid while it is a root.
		seq, err := t.bumpBundle()
		if err != nil {
			return nil, nil, err
		}
		rot.Phase, rot.Sequence, rot.Since = PhaseAdded, seq, t.c.Time
		rot.Switched, rot.RetireAfter = time.Time{}, time.Time{}
		rot.NewSignedUntil = t.c.Time.Add(rot.signedLife(p))
		if err := putJSON(t.tx.Bucket(bMeta), keyRootRotation, rot); err != nil {
			return nil, nil, err
		}
	case PhaseAdded:
		if !p.Force && t.c.Time.Before(rot.NewSignedUntil) {
			return nil, nil, refuse("SVIDs signed under the new root %.16s may be valid until %s: removing it before then would break them (or force it)",
				rot.New, rot.NewSignedUntil.UTC().Format(time.RFC3339))
		}
		// As retire waits for every member under the new root, removing
		// the new root waits for every member back under an old one: a
		// node still signing under it (down at the rollback from
		// switched, or unable to swap back) would sign under a root
		// nothing trusts, and a CRL of the new root that revoked it would
		// go with the root. Force does not skip it.
		if len(p.Members) == 0 {
			return nil, nil, refuse("rollback names no member nodes")
		}
		recs, err := readNodeCAs(t.tx)
		if err != nil {
			return nil, nil, err
		}
		var still []string
		for _, m := range p.Members {
			i, found := slices.BinarySearchFunc(recs, m, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
			if found && recs[i].Root == rot.New {
				still = append(still, m)
			}
		}
		if len(still) > 0 {
			return nil, nil, refuse("nodes still signing under the new root %.16s, which the rollback would remove: %s (they go back to the old root on their own; a node that cannot must be removed from the cluster first)",
				rot.New, strings.Join(still, ", "))
		}
		newRoot, err := t.rootByFingerprint(rot.New)
		if err != nil {
			return nil, nil, err
		}
		roots, err := readRoots(t.tx)
		if err != nil {
			return nil, nil, err
		}
		roots = slices.DeleteFunc(roots, func(d []byte) bool { return fingerprint(d) == rot.New })
		if len(roots) == 0 {
			return nil, nil, refuse("rollback would leave the bundle without roots")
		}
		if err := putJSON(t.tx.Bucket(bMeta), keyRoots, roots); err != nil {
			return nil, nil, err
		}
		if err := t.dropRootCRLs([]string{rot.New}); err != nil {
			return nil, nil, err
		}
		// What the new root's CAs published (after a switch) chains to
		// nothing trusted now, and no CRL could withdraw it any more.
		if withdrawn, err = t.withdrawJWTKeysUnder([]*x509.Certificate{newRoot}); err != nil {
			return nil, nil, err
		}
		if _, err := t.bumpBundle(); err != nil {
			return nil, nil, err
		}
		if err := t.tx.Bucket(bMeta).Delete(keyRootRotation); err != nil {
			return nil, nil, err
		}
	}
	to := "none"
	if from == PhaseSwitched {
		to = PhaseAdded
	}
	detail := map[string]string{"new_root": rot.New, "from": from, "to": to}
	if to == "none" {
		detail["withdrawn_jwt_keys"] = strings.Join(withdrawn, ",")
	}
	return rot, []AuditEvent{{Action: t.c.Type, Detail: forcedDetail(detail, p)}}, nil
}

func applyRootRetire(t *txn, p *RootPhase) (any, []AuditEvent, error) {
	rot, err := t.phaseCommand(p)
	if err != nil {
		return nil, nil, err
	}
	if rot == nil || rot.Phase != PhaseSwitched {
		return nil, nil, refuse("retire follows switch: %s", phaseNow(rot))
	}
	if len(p.Members) == 0 {
		return nil, nil, refuse("retire names no member nodes")
	}
	if !p.Force && t.c.Time.Before(rot.RetireAfter) {
		return nil, nil, refuse("what the old root's chain signed may be valid until %s (the switch at %s plus the longest lifetime a node signs for): retire after that (or force it)",
			rot.RetireAfter.UTC().Format(time.RFC3339), rot.Switched.UTC().Format(time.RFC3339))
	}
	newRoot, err := t.rootByFingerprint(rot.New)
	if err != nil {
		return nil, nil, err
	}
	// Every member must sign under the new root: the state records the CA
	// each node shows, and a node whose CA chains only to a retired root
	// would be refused by every peer.
	recs, err := readNodeCAs(t.tx)
	if err != nil {
		return nil, nil, err
	}
	var behind []string
	for _, m := range p.Members {
		i, found := slices.BinarySearchFunc(recs, m, func(r NodeCA, n string) int { return strings.Compare(r.Node, n) })
		if !found || recs[i].Root != rot.New || !bytes.Equal(recs[i].Issuer, newRoot.RawSubject) {
			behind = append(behind, m)
		}
	}
	if len(behind) > 0 {
		return nil, nil, refuse("nodes not yet signing under the new root %.16s: %s", rot.New, strings.Join(behind, ", "))
	}
	roots, err := readRoots(t.tx)
	if err != nil {
		return nil, nil, err
	}
	retired, err := readRetiredRoots(t.tx)
	if err != nil {
		return nil, nil, err
	}
	var keep [][]byte
	var gone []*x509.Certificate
	for _, d := range roots {
		if fp := fingerprint(d); slices.Contains(rot.Old, fp) {
			retired = append(retired, RetiredRoot{SHA256: fp, DER: d, RetiredAt: t.c.Time})
			if c, err := x509.ParseCertificate(d); err == nil {
				gone = append(gone, c)
			}
			continue
		}
		keep = append(keep, d)
	}
	if len(keep) == 0 {
		return nil, nil, refuse("retire would leave the bundle without roots")
	}
	if n := len(retired) - MaxRetiredRoots; n > 0 {
		retired = retired[n:]
	}
	meta := t.tx.Bucket(bMeta)
	if err := putJSON(meta, keyRoots, keep); err != nil {
		return nil, nil, err
	}
	if err := putJSON(meta, keyRetiredRoots, retired); err != nil {
		return nil, nil, err
	}
	if err := t.dropRootCRLs(rot.Old); err != nil {
		return nil, nil, err
	}
	kids, err := t.withdrawJWTKeysUnder(gone)
	if err != nil {
		return nil, nil, err
	}
	seq, err := t.bumpBundle()
	if err != nil {
		return nil, nil, err
	}
	rot.Phase, rot.Sequence, rot.Since, rot.Staged = PhaseRetired, seq, t.c.Time, nil
	if err := putJSON(meta, keyRootRotation, rot); err != nil {
		return nil, nil, err
	}
	return rot, []AuditEvent{{Action: t.c.Type, Detail: forcedDetail(map[string]string{
		"retired_roots": strings.Join(rot.Old, ","), "root": rot.New, "withdrawn_jwt_keys": strings.Join(kids, ","),
		"sequence": fmt.Sprint(seq)}, p)}}, nil
}

// dropRootCRLs removes the stored CRLs of roots leaving the bundle: what
// they revoked chains to nothing trusted any more.
func (t *txn) dropRootCRLs(fps []string) error {
	crls, err := readRootCRLs(t.tx)
	if err != nil {
		return err
	}
	n := len(crls)
	crls = slices.DeleteFunc(crls, func(c RootCRL) bool { return slices.Contains(fps, c.Root) })
	if len(crls) == n {
		return nil
	}
	return putJSON(t.tx.Bucket(bMeta), keyRootCRLs, crls)
}

// withdrawJWTKeysUnder removes the JWT keys whose node CA one of roots
// signed: nothing trusts their chain once the roots are retired.
func (t *txn) withdrawJWTKeysUnder(roots []*x509.Certificate) ([]string, error) {
	keys := t.tx.Bucket(bJWTKeys)
	var kids []string
	err := keys.ForEach(func(k, v []byte) error {
		var j JWTKey
		if err := decodeStrict(v, &j); err != nil || len(j.CA) == 0 {
			return nil
		}
		ca, err := x509.ParseCertificate(j.CA)
		if err != nil {
			return nil
		}
		for _, r := range roots {
			if bytes.Equal(ca.RawIssuer, r.RawSubject) && ca.CheckSignatureFrom(r) == nil {
				kids = append(kids, string(k))
				return nil
			}
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

// applyBundleAck records an agent's acknowledgement of the bundle
// sequence a rotation waits for. Only the first acknowledgement of each
// phase changes anything: acknowledgements of sequences before the
// phase's, or after the bundle's, and repeats are refused without a
// change, so one agent costs at most one commit per phase.
func applyBundleAck(t *txn, p *BundleAck) (any, []AuditEvent, error) {
	if err := t.needRotationVersion(); err != nil {
		return nil, nil, err
	}
	rot, err := readRootRotation(t.tx)
	if err != nil {
		return nil, nil, err
	}
	if rot == nil {
		return nil, nil, refuse("no root rotation waits for acknowledgements")
	}
	if seq := getU64(t.tx.Bucket(bMeta), keyBundleSequence); p.Sequence > seq || p.Sequence < rot.Sequence {
		return nil, nil, refuse("acknowledged bundle sequence %d: the rotation waits for %d to %d", p.Sequence, rot.Sequence, seq)
	}
	a, err := t.agent(p.Agent)
	if err != nil {
		return nil, nil, err
	}
	if a == nil {
		return nil, nil, refuse("agent %s is not registered", truncate(p.Agent, 128))
	}
	if a.BundleAck >= p.Sequence {
		return nil, nil, refuse("agent %s already acknowledged %d", a.ID, a.BundleAck)
	}
	a.BundleAck = p.Sequence
	return nil, nil, putJSON(t.tx.Bucket(bAgents), []byte(a.ID), a)
}

// RootRotation returns where the root rotation stands (nil: none ever).
func (f *FSM) RootRotation() *RootRotation {
	var r *RootRotation
	f.read("RootRotation", func(tx *bolt.Tx) error {
		var err error
		r, err = readRootRotation(tx)
		return err
	})
	return r
}

// RetiredRoots returns the roots earlier rotations retired.
func (f *FSM) RetiredRoots() []RetiredRoot {
	var out []RetiredRoot
	f.read("RetiredRoots", func(tx *bolt.Tx) error {
		var err error
		out, err = readRetiredRoots(tx)
		return err
	})
	return out
}

// PendingAcks returns the agents (not banned, not expired at now) whose
// acknowledged bundle sequence is below seq, at most limit of them (in ID
// order), and how many there are.
func (f *FSM) PendingAcks(seq uint64, now time.Time, limit int) ([]Agent, int) {
	var out []Agent
	n := 0
	f.read("PendingAcks", func(tx *bolt.Tx) error {
		return tx.Bucket(bAgents).ForEach(func(k, v []byte) error {
			var a Agent
			if err := decodeStrict(v, &a); err != nil {
				return nil
			}
			if a.Banned || a.BundleAck >= seq || !a.ExpiresAt.IsZero() && !now.Before(a.ExpiresAt) {
				return nil
			}
			n++
			if len(out) < limit {
				out = append(out, a)
			}
			return nil
		})
	})
	return out, n
}

// checkRootRotation checks a stored rotation's form (a snapshot being
// loaded).
func checkRootRotation(r *RootRotation) error {
	switch r.Phase {
	case PhaseAdded, PhaseSwitched, PhaseRetired:
	default:
		return fmt.Errorf("root rotation: phase %q", truncate(r.Phase, 32))
	}
	if !hexHashRE.MatchString(r.New) || len(r.Old) == 0 || len(r.Old) > MaxRoots {
		return fmt.Errorf("root rotation: roots malformed")
	}
	for _, o := range r.Old {
		if !hexHashRE.MatchString(o) {
			return fmt.Errorf("root rotation: old root %q malformed", truncate(o, 80))
		}
	}
	if len(r.Staged) > MaxNodeCAs {
		return fmt.Errorf("root rotation: %d staged certificates; at most %d", len(r.Staged), MaxNodeCAs)
	}
	for i, s := range r.Staged {
		if i > 0 && r.Staged[i-1].Node >= s.Node {
			return fmt.Errorf("root rotation: staged certificates not sorted and unique")
		}
		if len(s.Cert) > maxCACertDER {
			return fmt.Errorf("root rotation: staged certificate of node %s too large", truncate(s.Node, 64))
		}
		if s.Node == "" || len(s.Node) > 64 || s.MaxTTL < 0 || s.MaxTTL > maxPhaseTTL {
			return fmt.Errorf("root rotation: staged certificate of node %s: malformed node name or max_ttl", truncate(s.Node, 64))
		}
		if _, err := x509.ParseCertificate(s.Cert); err != nil {
			return fmt.Errorf("root rotation: staged certificate of node %s: %v", truncate(s.Node, 64), err)
		}
	}
	return nil
}

func checkRetiredRoots(rs []RetiredRoot) error {
	if len(rs) > MaxRetiredRoots {
		return fmt.Errorf("retired roots: %d; at most %d", len(rs), MaxRetiredRoots)
	}
	for _, r := range rs {
		if len(r.DER) > maxCACertDER || fingerprint(r.DER) != r.SHA256 {
			return fmt.Errorf("retired root %.16s: certificate does not match its fingerprint", r.SHA256)
		}
	}
	return nil
}
