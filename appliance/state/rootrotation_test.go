package state

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

// newRotationPKI is a second root for the crlPKI's trust domain, valid
// longer than the first (as a rotation's new root must be), with the same
// subject name (so that nothing may tell roots apart by name alone), and
// issuing CAs for node-1 and node-2 under it.
func newRotationPKI(t *testing.T) *crlPKI {
	t.Helper()
	p := &crlPKI{nodes: map[string]*x509.Certificate{}}
	p.rootKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "crl test root"}, NotBefore: t0.Add(-time.Hour),
		NotAfter: t0.Add(2 * 365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}, SubjectKeyId: []byte{5, 6, 7, 8}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.rootKey.PublicKey, p.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	p.root, _ = x509.ParseCertificate(der)
	for i, n := range []string{"node-1", "node-2"} {
		p.nodes[n] = p.nodeCA(t, n, int64(2000+i))
	}
	return p
}

// rotationFixture is a state with the first root, both nodes' CAs shown
// and a registered agent.
type rotationFixture struct {
	a        *applier
	old, new *crlPKI
}

func newRotationFixture(t *testing.T) *rotationFixture {
	f := &rotationFixture{a: newApplier(t), old: newCRLPKI(t), new: newRotationPKI(t)}
	f.a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{f.old.root.Raw}})
	for _, n := range []string{"node-1", "node-2"} {
		if _, err := f.as(n, "spiffe://example.org/sigil/node/"+n, t0, CmdNodeCAInstall, NodeCAInstall{Cert: f.old.nodes[n].Raw}); err != nil {
			t.Fatal(err)
		}
	}
	f.a.must(CmdAgentUpsert, AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/join/a1", AttestationType: "join_token",
		ExpiresAt: t0.Add(time.Hour)}})
	return f
}

// as applies a command proposed by node (the raft origin) as actor.
func (f *rotationFixture) as(node, actor string, at time.Time, typ string, payload any) ([]byte, error) {
	f.a.t.Helper()
	f.a.index++
	return f.a.fsm.Apply(f.a.index, node, testCommand(f.a.t, typ, actor, "", at, payload))
}

func (f *rotationFixture) admin(at time.Time, typ string, payload any) ([]byte, error) {
	return f.as(origin, admin, at, typ, payload)
}

func (f *rotationFixture) stage(t *testing.T, node string, c *x509.Certificate) {
	t.Helper()
	if _, err := f.as(node, admin, t0, CmdNodeCAStage, NodeCAStage{Cert: c.Raw}); err != nil {
		t.Fatalf("stage %s: %v", node, err)
	}
}

var members = []string{"node-1", "node-2"}

func wantRefused(t *testing.T, what string, err error, want string) {
	t.Helper()
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
		t.Fatalf("%s: %v, want a refusal containing %q", what, err, want)
	}
}

func (f *rotationFixture) roots() []string {
	var out []string
	for _, d := range f.a.fsm.Bundle().Roots {
		out = append(out, fingerprint(d))
	}
	return out
}

// TestRootRotationPhases runs a rotation through the state machine: add,
// stage, switch, retire, with every out-of-order phase, early retire and
// bad certificate refused without a change, acknowledgements recorded
// once per phase and kept across a renewal, and the retired root gone
// from the bundle with its CRLs and its CAs' JWT keys.
func TestRootRotationPhases(t *testing.T) {
	f := newRotationFixture(t)
	oldFP, newFP := fingerprint(f.old.root.Raw), fingerprint(f.new.root.Raw)
	ttl := RootPhase{Members: members, MaxTTL: time.Hour}
	at := func(d time.Duration) time.Time { return t0.Add(d) }

	// Before add: nothing but add is possible.
	_, err := f.admin(at(0), CmdRootSwitch, ttl)
	wantRefused(t, "switch before add", err, "switch follows add: no rotation")
	_, err = f.admin(at(0), CmdRootRetire, ttl)
	wantRefused(t, "retire before add", err, "retire follows switch")
	_, err = f.admin(at(0), CmdRootRollback, ttl)
	wantRefused(t, "rollback before add", err, "no rotation")
	_, err = f.as("node-1", admin, t0, CmdNodeCAStage, NodeCAStage{Cert: f.new.nodes["node-1"].Raw})
	wantRefused(t, "stage before add", err, "phase added")
	_, err = f.as(origin, nodeActor, t0, CmdBundleAck, BundleAck{Agent: "spiffe://example.org/sigil/agent/join/a1", Sequence: 1})
	wantRefused(t, "ack with no rotation", err, "no root rotation")

	// Roots that are not a rotation's new root.
	shortLived := newCRLPKI(t) // expires with the old root
	for name, tc := range map[string]struct {
		der  []byte
		want string
	}{
		"the old root again":       {f.old.root.Raw, "already in the trust bundle"},
		"a root expiring no later": {shortLived.root.Raw, "no later than"},
		"an issuing CA":            {f.new.nodes["node-1"].Raw, "not a self-signed CA"},
		"junk":                     {[]byte("junk"), "root 0"},
	} {
		_, err := f.admin(at(0), CmdRootAdd, RootAdd{Root: tc.der})
		wantRefused(t, name, err, tc.want)
	}
	if _, err := f.as(origin, admin, at(0), CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	if r := f.roots(); !slices.Equal(r, []string{oldFP, newFP}) {
		t.Fatalf("bundle roots after add: %v", r)
	}
	rot := f.a.fsm.RootRotation()
	if rot.Phase != PhaseAdded || rot.New != newFP || !slices.Equal(rot.Old, []string{oldFP}) || rot.Sequence != f.a.fsm.Bundle().Sequence {
		t.Fatalf("rotation after add: %+v", rot)
	}
	_, err = f.admin(at(0), CmdRootAdd, RootAdd{Root: newRotationPKI(t).root.Raw})
	wantRefused(t, "a second add", err, "in progress")

	// Staging: only a node's own CA under the new root.
	for name, tc := range map[string]struct {
		node string
		cert *x509.Certificate
		want string
	}{
		"under the old root":   {"node-1", f.old.nodeCA(t, "node-1", 77), "not a valid chain to the new root"},
		"another node's":       {"node-1", f.new.nodes["node-2"], "not an issuing CA of node node-1"},
		"from another root":    {"node-1", newRotationPKI(t).nodes["node-1"], "not a valid chain to the new root"},
		"outside its validity": {"node-1", expiredCA(t, f.new, "node-1"), "not a valid chain to the new root"},
	} {
		_, err := f.as(tc.node, admin, t0, CmdNodeCAStage, NodeCAStage{Cert: tc.cert.Raw})
		wantRefused(t, name, err, tc.want)
	}
	// A certificate under the new root is staged, not installed.
	_, err = f.as("node-1", admin, t0, CmdNodeCAInstall, NodeCAInstall{Cert: f.new.nodes["node-1"].Raw})
	wantRefused(t, "install under the new root before the switch", err, "stage it")
	f.stage(t, "node-1", f.new.nodes["node-1"])
	_, err = f.admin(at(time.Minute), CmdRootSwitch, ttl)
	wantRefused(t, "switch with node-2 not staged", err, "node-2")
	f.stage(t, "node-2", f.new.nodes["node-2"])

	// Acknowledgements: the add's sequence, once; kept across a renewal.
	agent := "spiffe://example.org/sigil/agent/join/a1"
	ack := func(seq uint64) error {
		_, err := f.as(origin, nodeActor, t0, CmdBundleAck, BundleAck{Agent: agent, Sequence: seq})
		return err
	}
	if err := ack(rot.Sequence - 1); !errors.Is(err, ErrRefused) {
		t.Fatalf("ack of a sequence before the add: %v", err)
	}
	if err := ack(rot.Sequence + 5); !errors.Is(err, ErrRefused) {
		t.Fatalf("ack of a sequence ahead of the bundle: %v", err)
	}
	if pending, n := f.a.fsm.PendingAcks(rot.Sequence, t0, 10); n != 1 || pending[0].ID != agent {
		t.Fatalf("pending before the ack: %d %+v", n, pending)
	}
	if err := ack(rot.Sequence); err != nil {
		t.Fatal(err)
	}
	wantRefused(t, "a repeated ack", ack(rot.Sequence), "already acknowledged")
	f.a.must(CmdAgentUpsert, AgentUpsert{Agent: Agent{ID: agent, AttestationType: "join_token", ExpiresAt: t0.Add(2 * time.Hour), BundleAck: 999}})
	if _, n := f.a.fsm.PendingAcks(rot.Sequence, t0, 10); n != 0 {
		t.Fatalf("the ack was lost in a renewal: %d pending", n)
	}
	for _, ag := range f.a.fsm.Agents() {
		if ag.BundleAck != rot.Sequence {
			t.Fatalf("a renewal's command set the acknowledged sequence: %d", ag.BundleAck)
		}
	}

	if _, err := f.admin(at(time.Minute), CmdRootSwitch, ttl); err != nil {
		t.Fatal(err)
	}
	rot = f.a.fsm.RootRotation()
	if rot.Phase != PhaseSwitched || !rot.RetireAfter.Equal(at(time.Minute+time.Hour)) {
		t.Fatalf("rotation after switch: %+v", rot)
	}
	// After the switch the old root's CAs are not installed again.
	_, err = f.as("node-1", admin, t0, CmdNodeCAInstall, NodeCAInstall{Cert: f.old.nodeCA(t, "node-1", 78).Raw})
	wantRefused(t, "install under the old root after the switch", err, "switched away")

	// Retire: not before the nodes sign under the new root, not before
	// the old root's last SVID has expired.
	_, err = f.admin(at(2*time.Hour), CmdRootRetire, ttl)
	wantRefused(t, "retire with no node under the new root", err, "node-1, node-2")
	for _, n := range members {
		if _, err := f.as(n, "spiffe://example.org/sigil/node/"+n, t0, CmdNodeCAInstall, NodeCAInstall{Cert: f.new.nodes[n].Raw}); err != nil {
			t.Fatalf("%s shows its new CA: %v", n, err)
		}
	}
	for _, r := range f.a.fsm.NodeCAs() {
		if r.Root != newFP {
			t.Fatalf("node CA record after the switch: %+v", r)
		}
	}
	_, err = f.admin(at(30*time.Minute), CmdRootRetire, ttl)
	wantRefused(t, "retire before the old root's SVIDs expired", err, "may be valid until")

	// A JWT key of node-2's old CA, and a root CRL of the old root, go
	// with it; node-1's new key stays.
	if _, err := f.as("node-2", "spiffe://example.org/sigil/node/node-2", t0, CmdJWTKeyAdd, f.old.jwtKey(t, "node-2-oldoldold", "node-2", f.old.nodes["node-2"].Raw)); err == nil {
		t.Fatal("a JWT key under the old CA after the node showed its new one was accepted")
	}
	f.a.must(CmdJWTKeyAdd, f.new.jwtKey(t, "node-1-newnewnew", "node-1", f.new.nodes["node-1"].Raw))
	before := f.a.fsm.Bundle().Sequence
	if _, err := f.admin(at(2*time.Hour), CmdRootRetire, ttl); err != nil {
		t.Fatal(err)
	}
	b := f.a.fsm.Bundle()
	if r := f.roots(); !slices.Equal(r, []string{newFP}) || b.Sequence <= before {
		t.Fatalf("bundle after retire: roots %v sequence %d", r, b.Sequence)
	}
	for _, k := range b.JWTKeys {
		if bytes.Contains(k.CA, f.old.root.RawSubject) && k.Node == "node-2" {
			t.Fatalf("old CA's JWT key left: %s", k.KID)
		}
	}
	if rr := f.a.fsm.RetiredRoots(); len(rr) != 1 || rr[0].SHA256 != oldFP {
		t.Fatalf("retired roots: %+v", rr)
	}
	// Final: no rollback, no second retire; a retired root does not come
	// back; the next rotation may start.
	_, err = f.admin(at(3*time.Hour), CmdRootRollback, ttl)
	wantRefused(t, "rollback after retire", err, "final")
	_, err = f.admin(at(3*time.Hour), CmdRootRetire, ttl)
	wantRefused(t, "a second retire", err, "retire follows switch")
	_, err = f.admin(at(3*time.Hour), CmdRootAdd, RootAdd{Root: f.old.root.Raw})
	wantRefused(t, "the retired root back", err, "no later than") // it also expires earlier
	audited := map[string]bool{}
	for _, r := range f.a.fsm.Audit(0, 0) {
		audited[r.Action] = true
	}
	for _, c := range []string{CmdRootAdd, CmdNodeCAStage, CmdRootSwitch, CmdRootRetire} {
		if !audited[c] {
			t.Errorf("%s not audited", c)
		}
	}
}

func expiredCA(t *testing.T, p *crlPKI, node string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org")
	ct := &x509.Certificate{SerialNumber: big.NewInt(99), Subject: pkix.Name{CommonName: node}, NotBefore: t0.Add(-48 * time.Hour),
		NotAfter: t0.Add(-24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
	d, err := x509.CreateCertificate(rand.Reader, ct, p.root, &k.PublicKey, p.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(d)
	return c
}

// TestRootRotationRollback: from switched back to added (nodes sign
// under the old root again; the new root stays while what it signed may
// be valid), then to no rotation, which removes the new root, its CRLs
// and its staged certificates; a version 8 command of the new kinds is
// refused; the state reloads from a snapshot mid-rotation.
func TestRootRotationRollback(t *testing.T) {
	f := newRotationFixture(t)
	oldFP, newFP := fingerprint(f.old.root.Raw), fingerprint(f.new.root.Raw)
	ttl := RootPhase{Members: members, MaxTTL: time.Hour}
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	f.stage(t, "node-1", f.new.nodes["node-1"])
	f.stage(t, "node-2", f.new.nodes["node-2"])
	if _, err := f.admin(t0.Add(time.Minute), CmdRootSwitch, ttl); err != nil {
		t.Fatal(err)
	}

	// A snapshot taken mid-rotation restores it.
	g := newFSM(t)
	snapshotRoundTrip(t, f.a.fsm, g)
	if r := g.RootRotation(); r == nil || r.Phase != PhaseSwitched || len(r.Staged) != 2 {
		t.Fatalf("rotation after a snapshot round trip: %+v", r)
	}

	if _, err := f.admin(t0.Add(10*time.Minute), CmdRootRollback, ttl); err != nil {
		t.Fatal(err)
	}
	rot := f.a.fsm.RootRotation()
	if rot.Phase != PhaseAdded || !rot.NewSignedUntil.Equal(t0.Add(70*time.Minute)) {
		t.Fatalf("after rollback from switched: %+v", rot)
	}
	// Old-root CAs install again.
	if _, err := f.as("node-1", admin, t0, CmdNodeCAInstall, NodeCAInstall{Cert: f.old.nodeCA(t, "node-1", 79).Raw}); err != nil {
		t.Fatalf("install under the old root after rolling back: %v", err)
	}
	_, err := f.admin(t0.Add(20*time.Minute), CmdRootRollback, ttl)
	wantRefused(t, "removing the new root while its SVIDs may be valid", err, "may be valid until")
	if _, err := f.admin(t0.Add(20*time.Minute), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour, Force: true}); err != nil {
		t.Fatal(err)
	}
	if r := f.roots(); !slices.Equal(r, []string{oldFP}) {
		t.Fatalf("roots after rollback from added: %v (new %s)", r, newFP)
	}
	if f.a.fsm.RootRotation() != nil {
		t.Fatal("a rotation rolled back past add is still recorded")
	}
	forced := false
	for _, r := range f.a.fsm.Audit(0, 0) {
		if r.Action == CmdRootRollback && r.Detail["forced"] == "true" && r.Detail["to"] == "none" {
			forced = true
		}
	}
	if !forced {
		t.Error("the forced rollback is not audited as forced")
	}

	// The new kinds do not exist in version 8.
	fresh := newApplier(t)
	fresh.index++
	if _, err := fresh.fsm.Apply(fresh.index, origin, commandOfVersion(t, 8, CmdBundleAck, nodeActor, t0, BundleAck{Agent: "spiffe://example.org/sigil/agent/join/a1", Sequence: 1})); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "needs command version 9") {
		t.Fatalf("version 8 bundle ack: %v", err)
	}
}

// snapshotRoundTrip persists from's raft snapshot and restores it into to.
func snapshotRoundTrip(t *testing.T, from, to *FSM) {
	t.Helper()
	snap, err := from.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	if err := to.Restore(&buf); err != nil {
		t.Fatal(err)
	}
}

// TestAttackRootRotationCraftedCommands: commands a compromised node or a
// forged log entry could carry are refused and change nothing: a node
// (not an admin) adding a root or moving a phase; a node staging a
// certificate naming another node; an acknowledgement for an agent that
// does not exist; a root of another trust domain; a phase with a lifetime
// out of bounds; a retired root added back as new.
func TestAttackRootRotationCraftedCommands(t *testing.T) {
	f := newRotationFixture(t)
	ttl := RootPhase{Members: members, MaxTTL: time.Hour}
	nodeAs := "spiffe://example.org/sigil/node/node-1"
	state := func() string {
		b, err := f.a.fsm.Export()
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	before := state()
	// Another trust domain's root.
	other := newRotationPKI(t)
	u, _ := url.Parse("spiffe://other.test")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "other"}, NotBefore: t0.Add(-time.Hour),
		NotAfter: t0.Add(3 * 365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	otherDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &other.rootKey.PublicKey, other.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		node, actor string
		typ         string
		payload     any
		want        string
	}{
		"a node adding a root":     {"node-1", nodeAs, CmdRootAdd, RootAdd{Root: f.new.root.Raw}, "admin"},
		"a node switching":         {"node-1", nodeAs, CmdRootSwitch, ttl, "admin"},
		"a root of another domain": {"node-1", admin, CmdRootAdd, RootAdd{Root: otherDER}, "not a root of spiffe://example.org"},
		"an admin acknowledging":   {"node-1", admin, CmdBundleAck, BundleAck{Agent: "spiffe://example.org/sigil/agent/join/a1", Sequence: 2}, ""},
	} {
		_, err := f.as(tc.node, tc.actor, t0, tc.typ, tc.payload)
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal containing %q", name, err, tc.want)
		}
	}
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	mid := state()
	for name, tc := range map[string]struct {
		node    string
		typ     string
		payload any
		want    string
	}{
		"node-2 staging node-1's certificate": {"node-2", CmdNodeCAStage, NodeCAStage{Cert: f.new.nodes["node-1"].Raw}, "not an issuing CA of node node-2"},
		"an unknown agent's ack":              {"node-1", CmdBundleAck, BundleAck{Agent: "spiffe://example.org/sigil/agent/join/ghost", Sequence: f.a.fsm.Bundle().Sequence}, "not registered"},
		"a switch with no lifetime":           {"node-1", CmdRootSwitch, RootPhase{Members: members}, "max_ttl"},
		"a switch with a lifetime of years":   {"node-1", CmdRootSwitch, RootPhase{Members: members, MaxTTL: 5 * 365 * 24 * time.Hour}, "max_ttl"},
		"a switch naming no members":          {"node-1", CmdRootSwitch, RootPhase{MaxTTL: time.Hour}, "no member"},
	} {
		actor := admin
		if tc.typ == CmdBundleAck {
			actor = "spiffe://example.org/sigil/node/" + tc.node
		}
		_, err := f.as(tc.node, actor, t0, tc.typ, tc.payload)
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a refusal containing %q", name, err, tc.want)
		}
	}
	if state() != mid {
		t.Fatal("refused rotation commands changed the state")
	}
	if before == mid {
		t.Fatal("the add changed nothing: the comparisons above prove nothing")
	}
}
