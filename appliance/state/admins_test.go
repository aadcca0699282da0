package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

const (
	aliceID = "spiffe://example.org/sigil/admin/alice"
	bobID   = "spiffe://example.org/sigil/admin/bob"
	rootID  = "local:uid=0@" + origin
)

// testSerial is the certificate serial of the tests' admin commands that
// name none: a certificate the admin table has no record of.
const testSerial = "7e57"

// testCommand encodes a command as a node of this version writes it: an
// admin certificate's command carries the certificate's serial (serial,
// or testSerial when "").
func testCommand(t testing.TB, typ, actor, serial string, at time.Time, payload any) []byte {
	t.Helper()
	var cmd []byte
	var err error
	if strings.HasPrefix(actor, "spiffe://example.org/sigil/admin/") {
		if serial == "" {
			serial = testSerial
		}
		cmd, err = NewAdminCommand(typ, actor, serial, at, payload)
	} else {
		cmd, err = NewCommand(typ, actor, at, payload)
	}
	if err != nil {
		t.Fatal(err)
	}
	return cmd
}

// applyAs applies a command as a given actor, proposed by node-1; an
// admin acts with a certificate the table has no record of.
func (a *applier) applyAs(actor, typ string, payload any) ([]byte, error) {
	a.t.Helper()
	return a.applyCert(actor, "", t0, typ, payload)
}

// applyCert applies a command of the admin certificate with this serial
// at a time.
func (a *applier) applyCert(actor, serial string, at time.Time, typ string, payload any) ([]byte, error) {
	a.t.Helper()
	a.index++
	return a.fsm.Apply(a.index, origin, testCommand(a.t, typ, actor, serial, at, payload))
}

func adminIssue(name, role, serial string) AdminIssue {
	return AdminIssue{Name: name, Role: role, Serial: serial, Node: origin, NotAfter: t0.Add(time.Hour)}
}

func TestAdminRolesAndRevocation(t *testing.T) {
	a := newApplier(t)
	mustCert := func(actor, serial, typ string, p any) AdminRecord {
		t.Helper()
		out, err := a.applyCert(actor, serial, t0, typ, p)
		if err != nil {
			t.Fatalf("%s by %s: %v", typ, actor, err)
		}
		var r AdminRecord
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	must := func(actor, typ string, p any) AdminRecord { t.Helper(); return mustCert(actor, "", typ, p) }
	refused := func(actor, typ string, p any, want string) {
		t.Helper()
		before, _ := a.fsm.Export()
		if _, err := a.applyAs(actor, typ, p); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("%s by %s: %v, want a refusal with %q", typ, actor, err, want)
		}
		if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
			t.Fatalf("refused %s changed the state", typ)
		}
	}

	// Root on a node may issue any name and role.
	if r := must(rootID, CmdAdminIssue, adminIssue("alice", "", "a1")); r.Role != RoleAdmin || len(r.Certs) != 1 {
		t.Fatalf("alice: %+v", r)
	}
	// A plain admin renews itself, nothing more.
	must(aliceID, CmdAdminIssue, adminIssue("alice", "", "a2"))
	refused(aliceID, CmdAdminIssue, adminIssue("bob", "", "b1"), "only for its own name")
	refused(aliceID, CmdAdminIssue, adminIssue("alice", RoleAdminIssuer, "a3"), "may not give itself role admin-issuer")
	refused(aliceID, CmdAdminRevoke, AdminRevoke{Name: "bob"}, "may revoke only its own name")
	// An admin the state has no record of (a certificate made outside
	// the API) is a plain admin.
	refused("spiffe://example.org/sigil/admin/carol", CmdAdminIssue, adminIssue("bob", "", "b1"), "only for its own name")
	// An issuer may issue and revoke any name.
	must(rootID, CmdAdminIssue, adminIssue("ivy", RoleAdminIssuer, "c1"))
	ivy := "spiffe://example.org/sigil/admin/ivy"
	mustCert(ivy, "c1", CmdAdminIssue, adminIssue("bob", RoleAdminIssuer, "b1"))
	// An issuer renewing itself keeps its role.
	if r := mustCert(ivy, "c1", CmdAdminIssue, adminIssue("ivy", "", "c2")); r.Role != RoleAdminIssuer {
		t.Fatalf("ivy renewed as %s", r.Role)
	}
	// Bad input.
	refused(rootID, CmdAdminIssue, adminIssue("Bad/Name", "", "d1"), "admin name")
	refused(rootID, CmdAdminIssue, adminIssue("dave", "root", "d1"), "admin role")
	refused(rootID, CmdAdminIssue, adminIssue("dave", "", "xyz"), "serial")
	refused(rootID, CmdAdminIssue, adminIssue("alice", "", "a1"), "already recorded")
	other := adminIssue("dave", "", "d1")
	other.Node = "node-2"
	refused(rootID, CmdAdminIssue, other, "a node records only what it signed")
	refused(nodeActor, CmdAdminRevoke, AdminRevoke{Name: "alice"}, "only for an admin")

	// Revocation: every certificate of the name so far is refused, also
	// ones the state never recorded; later ones are accepted.
	rec, ok, err := a.fsm.Admin("alice")
	if err != nil || !ok || !rec.Accepts("a1") || !rec.Accepts("unrecorded") {
		t.Fatalf("alice before revocation: %+v %v %v", rec, ok, err)
	}
	if r := mustCert(ivy, "c2", CmdAdminRevoke, AdminRevoke{Name: "alice"}); !r.RevokedAt.Equal(t0) || r.RevokedBy != ivy || len(r.Certs) != 0 {
		t.Fatalf("revoked alice: %+v", r)
	}
	rec, _, _ = a.fsm.Admin("alice")
	for _, s := range []string{"a1", "a2", "unrecorded"} {
		if rec.Accepts(s) {
			t.Fatalf("revoked alice's certificate %s accepted", s)
		}
	}
	if _, err := a.applyCert(ivy, "c2", t0, CmdAdminRevoke, AdminRevoke{Name: "alice"}); err == nil || !strings.Contains(err.Error(), "already revoked") {
		t.Fatalf("alice revoked twice: %v", err)
	}
	must(rootID, CmdAdminIssue, adminIssue("alice", "", "a9"))
	if rec, _, _ = a.fsm.Admin("alice"); !rec.Accepts("a9") || rec.Accepts("a1") {
		t.Fatalf("alice re-issued: %+v", rec)
	}
	// A name never issued can be revoked (a certificate made outside
	// the API), and one may revoke itself.
	must(rootID, CmdAdminRevoke, AdminRevoke{Name: "test-admin"})
	must(bobID, CmdAdminRevoke, AdminRevoke{Name: "bob"})
	if rec, ok, _ := a.fsm.Admin("test-admin"); !ok || rec.Accepts("anything") {
		t.Fatalf("test-admin: %+v", rec)
	}

	// The table survives a raft snapshot, checked on the way in.
	snap, err := a.fsm.Export()
	if err != nil {
		t.Fatal(err)
	}
	b := newFSM(t)
	if err := b.Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}
	want, _ := a.fsm.Admins()
	got, err := b.Admins()
	wj, _ := json.Marshal(want)
	gj, _ := json.Marshal(got)
	if err != nil || !bytes.Equal(wj, gj) || len(got) != 4 {
		t.Fatalf("restored admin table:\n got %s\nwant %s (%v)", gj, wj, err)
	}

	// Audit: one record per change, none for refusals.
	n := map[string]int{}
	for _, r := range a.fsm.Audit(0, 0) {
		n[r.Action]++
	}
	if n[CmdAdminIssue] != 6 || n[CmdAdminRevoke] != 3 {
		t.Fatalf("audit actions %v", n)
	}
}

func TestAdminCertBound(t *testing.T) {
	a := newApplier(t)
	for i := range MaxAdminCerts {
		if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("alice", "", "a"+strings.Repeat("1", i+1))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("alice", "", "b1")); err == nil || !strings.Contains(err.Error(), "unexpired certificates") {
		t.Fatalf("certificate %d: %v", MaxAdminCerts+1, err)
	}
	// Expired ones make room.
	cmd, _ := NewCommand(CmdAdminIssue, rootID, t0.Add(2*time.Hour), AdminIssue{Name: "alice", Serial: "b1", Node: origin, NotAfter: t0.Add(3 * time.Hour)})
	a.index++
	if _, err := a.fsm.Apply(a.index, origin, cmd); err != nil {
		t.Fatal(err)
	}
	if rec, _, _ := a.fsm.Admin("alice"); len(rec.Certs) != 1 {
		t.Fatalf("expired certificates kept: %d", len(rec.Certs))
	}
}

// Entries had an "admin" flag that was stored and never enforced. Raft
// logs and snapshots that carry it still apply (the flag is dropped);
// any other unknown field is still refused.
func TestEntryLegacyAdminFlag(t *testing.T) {
	a := newApplier(t)
	raw := `{"id":"entry-0001","spiffe_id":"spiffe://example.org/web","parent_id":"spiffe://example.org/sigil/agent/tpm/abc",` +
		`"selectors":[{"type":"unix","value":"uid:1000"}],"admin":true,"created_at":"0001-01-01T00:00:00Z","updated_at":"0001-01-01T00:00:00Z","revision":0}`
	a.must(CmdEntryCreate, json.RawMessage(raw))
	e, ok := a.fsm.Entry("entry-0001")
	if !ok {
		t.Fatal("entry with the old admin flag was not applied")
	}
	b, _ := json.Marshal(e)
	if strings.Contains(string(b), `"admin"`) {
		t.Fatalf("the admin flag is still stored: %s", b)
	}
	bad := strings.Replace(raw, `"admin":true`, `"admins":true`, 1)
	bad = strings.Replace(bad, "entry-0001", "entry-0002", 1)
	if _, err := a.apply(CmdEntryCreate, t0, json.RawMessage(bad)); err == nil || !strings.Contains(err.Error(), `unknown field "admins"`) {
		t.Fatalf("unknown entry field: %v", err)
	}
	var e2 Entry
	if err := decodeStrict([]byte(raw), &e2); err != nil || e2.SPIFFEID != "spiffe://example.org/web" {
		t.Fatalf("stored record with the old flag: %v %+v", err, e2)
	}
}

// A revoked admin's command that reaches the log after the revocation
// (through a replica that had not applied it yet) is refused at commit;
// once the name holds a certificate issued since, its commands apply
// again (which certificate made them is checked at the API).
func TestRevokedAdminCommandsRefusedAtCommit(t *testing.T) {
	a := newApplier(t)
	if _, err := a.applyAs(aliceID, CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyAs(rootID, CmdAdminRevoke, AdminRevoke{Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	before, _ := a.fsm.Export()
	for _, c := range []struct {
		typ string
		p   any
	}{
		{CmdEntryCreate, entry("entry-0002", "spiffe://example.org/db", "unix:uid:2")},
		{CmdEntryDelete, EntryID{ID: "entry-0001"}},
		{CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "cluster.join", Target: "node-9"}}}},
		{CmdAdminIssue, adminIssue("alice", "", "a5")},
		{CmdAdminRevoke, AdminRevoke{Name: "alice"}},
	} {
		if _, err := a.applyAs(aliceID, c.typ, c.p); err == nil || !strings.Contains(err.Error(), AdminRevokedMarker) {
			t.Fatalf("%s by revoked alice: %v", c.typ, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a revoked admin's command changed the state")
	}
	// Other admins are unaffected; alice re-issued acts again.
	if _, err := a.applyAs(bobID, CmdEntryDelete, EntryID{ID: "entry-0001"}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("alice", "", "a6")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyCert(aliceID, "a6", t0, CmdEntryCreate, entry("entry-0003", "spiffe://example.org/db", "unix:uid:3")); err != nil {
		t.Fatalf("re-issued alice: %v", err)
	}
	// The certificates of the name from before the revocation stay
	// refused (finding: a lagging replica let the old one through, and the
	// name's new certificate made its command pass at commit).
	before, _ = a.fsm.Export()
	if _, err := a.applyAs(aliceID, CmdEntryCreate, entry("entry-0004", "spiffe://example.org/old", "unix:uid:4")); err == nil || !strings.Contains(err.Error(), AdminRevokedMarker) {
		t.Fatalf("alice's certificate from before the revocation, after her re-issue: %v", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a revoked certificate's command changed the state")
	}
}

// A restore of an archive taken before a revocation (or with the admin
// table edited) does not revive the revoked name: the admin table is
// never rolled back.
func TestRestoreKeepsAdminRevocations(t *testing.T) {
	a := newApplier(t)
	if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("alice", RoleAdminIssuer, "a1")); err != nil {
		t.Fatal(err)
	}
	var archive bytes.Buffer
	if _, err := a.fsm.WriteArchive(&archive, origin, t0); err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyAs(rootID, CmdAdminRevoke, AdminRevoke{Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	p, _, _, err := a.fsm.ReadArchive(bytes.NewReader(archive.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyAs(rootID, CmdStateRestore, p); err != nil {
		t.Fatal(err)
	}
	if rec, _, _ := a.fsm.Admin("alice"); rec.RevokedAt.IsZero() || rec.Accepts("a1") || rec.Role != RoleAdminIssuer {
		t.Fatalf("alice after restoring an archive from before her revocation: %+v", rec)
	}
	// A table that breaks the rules is refused when the archive is read.
	bad := bytes.Replace(archive.Bytes(), []byte(`"role":"admin-issuer"`), []byte(`"role":"admin-issuex"`), 1)
	if _, _, _, err := a.fsm.ReadArchive(bytes.NewReader(bad), t.TempDir()); err == nil || !strings.Contains(err.Error(), "admin table") {
		t.Fatalf("archive with a forged admin role: %v", err)
	}
}

// A role belongs to the certificate it was issued with, not to the name:
// re-issuing a name with another role changes nothing for the name's
// older certificates, and a certificate the table has no record of is a
// plain admin.
func TestAdminRoleByCertificate(t *testing.T) {
	a := newApplier(t)
	opsID := "spiffe://example.org/sigil/admin/ops"
	for _, c := range []struct{ role, serial string }{{RoleAdmin, "c1"}, {RoleAdminIssuer, "c2"}} {
		if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("ops", c.role, c.serial)); err != nil {
			t.Fatal(err)
		}
	}
	admins, _ := a.fsm.Admins()
	for serial, want := range map[string]string{"c1": RoleAdmin, "c2": RoleAdminIssuer, "c9": RoleAdmin} {
		if got := AdminCertRole(admins, "ops", serial); got != want {
			t.Errorf("ops certificate %s: role %s, want %s", serial, got, want)
		}
	}
	before, _ := a.fsm.Export()
	for _, serial := range []string{"c1", "c9"} {
		if _, err := a.applyCert(opsID, serial, t0, CmdAdminIssue, adminIssue("bob", RoleAdminIssuer, "b"+serial)); err == nil || !strings.Contains(err.Error(), "only for its own name") {
			t.Fatalf("ops certificate %s issuing bob: %v", serial, err)
		}
		if _, err := a.applyCert(opsID, serial, t0, CmdAdminRevoke, AdminRevoke{Name: "carol"}); err == nil || !strings.Contains(err.Error(), "may revoke only its own name") {
			t.Fatalf("ops certificate %s revoking carol: %v", serial, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused commands changed the state")
	}
	if _, err := a.applyCert(opsID, "c2", t0, CmdAdminIssue, adminIssue("bob", RoleAdminIssuer, "b1")); err != nil {
		t.Fatalf("ops issuer certificate issuing bob: %v", err)
	}
	// A plain certificate renews itself as a plain admin, also when it
	// asks for no role (the name's last issuance was an issuer's).
	if _, err := a.applyCert(opsID, "c1", t0, CmdAdminIssue, adminIssue("ops", RoleAdmin, "c3")); err != nil {
		t.Fatalf("ops plain certificate renewing itself: %v", err)
	}
	if _, err := a.applyAs(rootID, CmdAdminIssue, adminIssue("ops", RoleAdminIssuer, "c4")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.applyCert(opsID, "c1", t0, CmdAdminIssue, adminIssue("ops", "", "c5")); err != nil {
		t.Fatalf("ops plain certificate renewing itself without a role: %v", err)
	}
	admins, _ = a.fsm.Admins()
	if got := AdminCertRole(admins, "ops", "c5"); got != RoleAdmin {
		t.Fatalf("renewal of a plain certificate got role %s", got)
	}
	// An issuer certificate renewing itself without a role stays one.
	if _, err := a.applyCert(opsID, "c4", t0, CmdAdminIssue, adminIssue("ops", "", "c6")); err != nil {
		t.Fatal(err)
	}
	admins, _ = a.fsm.Admins()
	if got := AdminCertRole(admins, "ops", "c6"); got != RoleAdminIssuer {
		t.Fatalf("renewal of an issuer certificate got role %s", got)
	}
}

// v2Command encodes a command as a version 2 node wrote it.
func v2Command(t *testing.T, typ, actor, serial string, at time.Time, payload any) []byte {
	t.Helper()
	p, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(Command{Version: 2, Type: typ, Actor: actor, ActorSerial: serial, Time: at, Payload: p})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Raft logs written before version 3 replay exactly as they were applied:
// roles by name, revocation by name, no forgetting; fields that version 2
// nodes refused as unknown are refused in version 2 commands. Version 3
// commands must name an admin's certificate, and only an admin's.
func TestCommandVersions(t *testing.T) {
	a := newApplier(t)
	apply := func(cmd []byte) error {
		a.index++
		_, err := a.fsm.Apply(a.index, origin, cmd)
		return err
	}
	v2 := func(actor, typ string, at time.Time, p any) error { return apply(v2Command(t, typ, actor, "", at, p)) }
	opsID := "spiffe://example.org/sigil/admin/ops"
	for _, c := range []struct{ role, serial string }{{RoleAdmin, "c1"}, {RoleAdminIssuer, "c2"}} {
		if err := v2(rootID, CmdAdminIssue, t0, adminIssue("ops", c.role, c.serial)); err != nil {
			t.Fatal(err)
		}
	}
	// Version 2: the name's role, whichever certificate.
	if err := v2(opsID, CmdAdminIssue, t0, adminIssue("bob", RoleAdminIssuer, "b1")); err != nil {
		t.Fatalf("version 2 issuance by the issuer name: %v", err)
	}
	// Version 2: a revoked name re-issued acts again, whichever certificate.
	if err := v2(rootID, CmdAdminRevoke, t0, AdminRevoke{Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	if err := v2(rootID, CmdAdminIssue, t0, adminIssue("alice", "", "a2")); err != nil {
		t.Fatal(err)
	}
	if err := v2(aliceID, CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); err != nil {
		t.Fatalf("version 2 command of re-issued alice: %v", err)
	}
	// Version 2: nothing is forgotten, however old.
	late := t0.Add(365 * 24 * time.Hour)
	if err := v2(rootID, CmdAdminRevoke, late, AdminRevoke{Name: "carol"}); err != nil {
		t.Fatal(err)
	}
	if admins, _ := a.fsm.Admins(); len(admins) != 4 {
		t.Fatalf("version 2 command forgot admin records: %d left", len(admins))
	}

	before, _ := a.fsm.Export()
	upsert := AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/x", AttestationType: "join_token", SerialNumber: "a2"}, ExpectSerial: "a1"}
	for name, cmd := range map[string][]byte{
		"version 2 with actor_serial":    v2Command(t, CmdEntryDelete, aliceID, "a2", t0, EntryID{ID: "entry-0001"}),
		"version 2 with expect_serial":   v2Command(t, CmdAgentUpsert, nodeActor, "", t0, upsert),
		"version 3 admin without serial": must(NewCommand(CmdEntryDelete, aliceID, t0, EntryID{ID: "entry-0001"})),
		"version 3 malformed serial":     must(NewAdminCommand(CmdEntryDelete, aliceID, "0a2", t0, EntryID{ID: "entry-0001"})),
		"version 3 node with serial":     must(NewAdminCommand(CmdAgentUpsert, nodeActor, "a2", t0, upsert)),
		"version 3 root with serial":     must(NewAdminCommand(CmdEntryDelete, rootID, "a2", t0, EntryID{ID: "entry-0001"})),
	} {
		if err := apply(cmd); !errors.Is(err, ErrRefused) {
			t.Errorf("%s: %v, want a refusal", name, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused commands changed the state")
	}
	// The same log under version 3: by certificate.
	if _, err := a.applyCert(opsID, "c1", t0, CmdAdminIssue, adminIssue("dave", RoleAdmin, "d1")); err == nil {
		t.Fatal("version 3: ops's plain certificate issued dave")
	}
	if _, err := a.applyCert(aliceID, "a1", t0, CmdEntryDelete, EntryID{ID: "entry-0001"}); err == nil || !strings.Contains(err.Error(), AdminRevokedMarker) {
		t.Fatalf("version 3: alice's certificate from before her revocation: %v", err)
	}
	if _, err := a.applyCert(aliceID, "a2", t0, CmdEntryDelete, EntryID{ID: "entry-0001"}); err != nil {
		t.Fatalf("version 3: alice's certificate issued since: %v", err)
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// Admin names were a lifetime cap (MaxAdmins records, never removed). A
// record that decides nothing any more (no unexpired recorded
// certificate, and a revocation, if any, older than every certificate it
// revoked can be) is forgotten at the next admin change: thousands of
// names over time fit, and a revocation still counts while it can matter.
func TestAdminTableForgetsOldNames(t *testing.T) {
	a := newApplier(t)
	const names = 3 * MaxAdmins
	step := 30 * time.Minute
	at := t0
	largest := 0
	for i := range names {
		at = t0.Add(time.Duration(i) * step)
		name := fmt.Sprintf("admin-%04d", i)
		p := AdminIssue{Name: name, Serial: fmt.Sprintf("%x", 0x1000+i), Node: origin, NotAfter: at.Add(time.Hour)}
		if _, err := a.applyCert(rootID, "", at, CmdAdminIssue, p); err != nil {
			t.Fatalf("name %d of %d: %v", i+1, names, err)
		}
		if i%2 == 0 { // every other name is revoked, the others expire
			if _, err := a.applyCert(rootID, "", at, CmdAdminRevoke, AdminRevoke{Name: name}); err != nil {
				t.Fatal(err)
			}
		}
		admins, _ := a.fsm.Admins()
		largest = max(largest, len(admins))
	}
	wantMax := int(adminForgetAfter/(2*step)) + 4
	t.Logf("%d names over %v: at most %d records at once (bound %d)", names, at.Sub(t0), largest, MaxAdmins)
	if largest > wantMax {
		t.Fatalf("%d records at once, want at most %d", largest, wantMax)
	}
	// A revocation younger than adminForgetAfter still refuses the name's
	// older certificates, even unrecorded ones; the one before it is gone.
	recent := fmt.Sprintf("admin-%04d", names-2)
	id := "spiffe://example.org/sigil/admin/" + recent
	if _, err := a.applyCert(id, "5eed", at, CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")); err == nil || !strings.Contains(err.Error(), AdminRevokedMarker) {
		t.Fatalf("certificate of %s, revoked %v ago: %v", recent, step, err)
	}
	if _, ok, _ := a.fsm.Admin(fmt.Sprintf("admin-%04d", 0)); ok {
		t.Fatal("the first name's record was kept")
	}
	// Exactly at the boundary: kept until adminForgetAfter has passed.
	b := newApplier(t)
	if _, err := b.applyCert(rootID, "", t0, CmdAdminRevoke, AdminRevoke{Name: "zed"}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.applyCert(rootID, "", t0.Add(adminForgetAfter-time.Second), CmdAdminRevoke, AdminRevoke{Name: "yan"}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := b.fsm.Admin("zed"); !ok {
		t.Fatal("revocation forgotten before adminForgetAfter")
	}
	if _, err := b.applyCert(rootID, "", t0.Add(adminForgetAfter), CmdAdminRevoke, AdminRevoke{Name: "xia"}); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := b.fsm.Admin("zed"); ok {
		t.Fatal("revocation kept after adminForgetAfter")
	}
}

// Two renewals of the same agent certificate at the same moment both
// passed the node's check: the upsert now names the certificate it
// replaces and the state machine swaps it only if it is still current.
func TestAgentRenewExpectSerial(t *testing.T) {
	a := newApplier(t)
	agentID := "spiffe://example.org/sigil/agent/join_token/x"
	up := func(serial, expect string) AgentUpsert {
		return AgentUpsert{Agent: Agent{ID: agentID, AttestationType: "join_token", SerialNumber: serial, ExpiresAt: t0.Add(time.Hour)}, ExpectSerial: expect}
	}
	if _, err := a.apply(CmdAgentUpsert, t0, up("b1", "b0")); err == nil || !strings.Contains(err.Error(), "current certificate is none") {
		t.Fatalf("renewal of an unknown agent: %v", err)
	}
	a.must(CmdAgentUpsert, up("b1", "")) // the join
	a.must(CmdAgentUpsert, up("b2", "b1"))
	before, _ := a.fsm.Export()
	for _, c := range []struct{ serial, expect, want string }{
		// The concurrent renewal of b1, once b1's grace (TestAgentRenewGrace)
		// is over.
		{"b3", "b1", "current certificate is b2"},
		{"b4", "XYZ", "expect_serial"},
	} {
		if _, err := a.apply(CmdAgentUpsert, t0.Add(RenewGrace), up(c.serial, c.expect)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("renewal of %s: %v, want a refusal with %q", c.expect, err, c.want)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a refused renewal changed the state")
	}
	if ag, _ := a.fsm.Agent(agentID); ag.SerialNumber != "b2" {
		t.Fatalf("agent serial %s, want b2", ag.SerialNumber)
	}
	// The stored record does not keep the expected serial.
	if bytes.Contains(before, []byte("expect_serial")) {
		t.Fatal("expect_serial is stored")
	}
	// A join replaces any certificate.
	a.must(CmdAgentUpsert, up("b5", ""))
}

// A renewal whose answer was lost (the node was killed between commit and
// reply) leaves the agent holding the certificate it replaced: that one
// may renew again within RenewGrace, once per lost answer, without the
// grace growing. The certificate the lost renewal issued is then dead: a
// copy of it that does exist (a clone that renewed beside the agent) is
// refused at its next renewal, which exposes the clone.
func TestAgentRenewGrace(t *testing.T) {
	a := newApplier(t)
	agentID := "spiffe://example.org/sigil/agent/join_token/g"
	up := func(serial, expect string) AgentUpsert {
		return AgentUpsert{Agent: Agent{ID: agentID, AttestationType: "join_token", SerialNumber: serial, ExpiresAt: t0.Add(time.Hour)}, ExpectSerial: expect}
	}
	renew := func(at time.Duration, serial, expect string) error {
		_, err := a.apply(CmdAgentUpsert, t0.Add(at), up(serial, expect))
		return err
	}
	record := func() Agent { ag, _ := a.fsm.Agent(agentID); return ag }
	a.must(CmdAgentUpsert, up("c1", ""))
	if ag := record(); ag.PreviousSerial != "" || !ag.PreviousUntil.IsZero() {
		t.Fatalf("a join left a grace: %+v", ag)
	}
	if err := renew(0, "c2", "c1"); err != nil {
		t.Fatal(err)
	}
	if ag := record(); ag.SerialNumber != "c2" || ag.PreviousSerial != "c1" || !ag.PreviousUntil.Equal(t0.Add(RenewGrace)) {
		t.Fatalf("after renewing c1: %+v", ag)
	}
	// c2's answer was lost: c1 renews again, and the grace stays c1's.
	if err := renew(time.Minute, "c3", "c1"); err != nil {
		t.Fatalf("renewal of the replaced certificate within its grace: %v", err)
	}
	if ag := record(); ag.SerialNumber != "c3" || ag.PreviousSerial != "c1" || !ag.PreviousUntil.Equal(t0.Add(RenewGrace)) {
		t.Fatalf("after renewing c1 again: %+v", ag)
	}
	recs := a.fsm.Audit(0, 100)
	last := recs[len(recs)-1]
	if last.Detail["replaced_undelivered"] != "c2" || last.Detail["renewed_again"] != "c1" {
		t.Fatalf("audit of the repeated renewal: %v", last.Detail)
	}
	before, _ := a.fsm.Export()
	for _, c := range []struct {
		at             time.Duration
		serial, expect string
	}{
		{2 * time.Minute, "c4", "c2"}, // the lost answer's certificate, held after all
		{RenewGrace, "c4", "c1"},      // the grace is over
	} {
		if err := renew(c.at, c.serial, c.expect); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "current certificate is c3") {
			t.Fatalf("renewal of %s at +%v: %v, want a refusal", c.expect, c.at, err)
		}
	}
	// A version 4 command (a node not yet upgraded wrote it) replays as
	// then: no grace.
	a.index++
	if _, err := a.fsm.Apply(a.index, origin, commandOfVersion(t, 4, CmdAgentUpsert, nodeActor, t0.Add(time.Minute), up("c4", "c1"))); !errors.Is(err, ErrRefused) {
		t.Fatalf("version 4 renewal of the replaced certificate: %v, want a refusal", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a refused renewal changed the state")
	}
	// Renewing the current certificate moves the grace to it.
	if err := renew(3*time.Minute, "c5", "c3"); err != nil {
		t.Fatal(err)
	}
	if ag := record(); ag.PreviousSerial != "c3" || !ag.PreviousUntil.Equal(t0.Add(3*time.Minute+RenewGrace)) {
		t.Fatalf("after renewing c3: %+v", ag)
	}
	if err := renew(4*time.Minute, "c6", "c1"); !errors.Is(err, ErrRefused) {
		t.Fatalf("c1 after c3 renewed: %v, want a refusal", err)
	}
	// A command cannot set the grace itself.
	forged := up("c7", "c5")
	forged.PreviousSerial, forged.PreviousUntil = "c1", t0.Add(24*time.Hour)
	a.index++
	if _, err := a.fsm.Apply(a.index, origin, testCommand(t, CmdAgentUpsert, nodeActor, "", t0.Add(5*time.Minute), forged)); err != nil {
		t.Fatal(err)
	}
	if ag := record(); ag.PreviousSerial != "c5" || !ag.PreviousUntil.Equal(t0.Add(5*time.Minute+RenewGrace)) {
		t.Fatalf("after a renewal carrying its own grace: %+v", ag)
	}
	// A ban ends the grace: unbanned, only the current certificate renews.
	if _, err := a.apply(CmdAgentBan, t0.Add(6*time.Minute), AgentID{ID: agentID}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.apply(CmdAgentUnban, t0.Add(6*time.Minute), AgentID{ID: agentID}); err != nil {
		t.Fatal(err)
	}
	if err := renew(7*time.Minute, "c8", "c5"); !errors.Is(err, ErrRefused) {
		t.Fatalf("c5 after a ban and unban, within its grace: %v, want a refusal", err)
	}
	if err := renew(7*time.Minute, "c8", "c7"); err != nil {
		t.Fatalf("the current certificate after a ban and unban: %v", err)
	}
}
