package state

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

const (
	aliceID = "spiffe://example.org/sigil/admin/alice"
	bobID   = "spiffe://example.org/sigil/admin/bob"
	rootID  = "local:uid=0@" + origin
)

// applyAs applies a command as a given actor, proposed by node-1.
func (a *applier) applyAs(actor, typ string, payload any) ([]byte, error) {
	a.t.Helper()
	cmd, err := NewCommand(typ, actor, t0, payload)
	if err != nil {
		a.t.Fatal(err)
	}
	a.index++
	return a.fsm.Apply(a.index, origin, cmd)
}

func adminIssue(name, role, serial string) AdminIssue {
	return AdminIssue{Name: name, Role: role, Serial: serial, Node: origin, NotAfter: t0.Add(time.Hour)}
}

func TestAdminRolesAndRevocation(t *testing.T) {
	a := newApplier(t)
	must := func(actor, typ string, p any) AdminRecord {
		t.Helper()
		out, err := a.applyAs(actor, typ, p)
		if err != nil {
			t.Fatalf("%s by %s: %v", typ, actor, err)
		}
		var r AdminRecord
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatal(err)
		}
		return r
	}
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
	must(ivy, CmdAdminIssue, adminIssue("bob", RoleAdminIssuer, "b1"))
	// An issuer renewing itself keeps its role.
	if r := must(ivy, CmdAdminIssue, adminIssue("ivy", "", "c2")); r.Role != RoleAdminIssuer {
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
	if r := must(ivy, CmdAdminRevoke, AdminRevoke{Name: "alice"}); !r.RevokedAt.Equal(t0) || r.RevokedBy != ivy || len(r.Certs) != 0 {
		t.Fatalf("revoked alice: %+v", r)
	}
	rec, _, _ = a.fsm.Admin("alice")
	for _, s := range []string{"a1", "a2", "unrecorded"} {
		if rec.Accepts(s) {
			t.Fatalf("revoked alice's certificate %s accepted", s)
		}
	}
	refused(ivy, CmdAdminRevoke, AdminRevoke{Name: "alice"}, "already revoked")
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
	if _, err := a.applyAs(aliceID, CmdEntryCreate, entry("entry-0003", "spiffe://example.org/db", "unix:uid:3")); err != nil {
		t.Fatalf("re-issued alice: %v", err)
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
