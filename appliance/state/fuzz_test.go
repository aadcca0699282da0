package state

import (
	"bytes"
	"testing"
)

// seeded returns an FSM with an entry and its audit record.
func seeded(t testing.TB) *FSM {
	f := newFSM(t)
	cmd := testCommand(t, CmdEntryCreate, admin, "", t0, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1000"))
	if _, err := f.Apply(1, origin, cmd); err != nil {
		t.Fatal(err)
	}
	return f
}

// FuzzReadArchive: a snapshot archive from outside (sigilctl snapshot
// restore) is verified whole or refused; reading it never changes the
// state it was read by.
func FuzzReadArchive(f *testing.F) {
	var buf bytes.Buffer
	if _, err := seeded(f).WriteArchive(&buf, "node-1", t0); err != nil {
		f.Fatal(err)
	}
	arch := buf.Bytes()
	f.Add(arch)
	f.Add(arch[:len(arch)/2])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fsm := seeded(t)
		before, _ := fsm.Export()
		// Most inputs are refused: what is tested is that none changes the
		// state.
		_, _, _, _ = fsm.ReadArchive(bytes.NewReader(b), t.TempDir())
		if after, _ := fsm.Export(); !bytes.Equal(before, after) {
			t.Fatal("reading an archive changed the state")
		}
	})
}

// FuzzApply: a command the FSM refuses changes nothing, and whatever it
// accepts leaves the audit chain intact.
func FuzzApply(f *testing.F) {
	for _, c := range []struct {
		typ     string
		payload any
	}{
		{CmdEntryCreate, entry("entry-0002", "spiffe://example.org/api", "unix:uid:2")},
		{CmdEntryDelete, map[string]string{"id": "entry-0001"}},
		{CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "x.y", Detail: map[string]string{"reason": "r"}}}}},
	} {
		f.Add(testCommand(f, c.typ, admin, "", t0, c.payload))
	}
	f.Add([]byte(`{"type":"nope"}`))
	f.Fuzz(func(t *testing.T, cmd []byte) {
		fsm := seeded(t)
		before, _ := fsm.Export()
		if _, err := fsm.Apply(2, origin, cmd); err != nil {
			if after, _ := fsm.Export(); !bytes.Equal(before, after) {
				t.Fatalf("refused command changed the state: %v", err)
			}
		}
		if rep := fsm.VerifyAuditLog(nil); !rep.Intact {
			t.Fatalf("audit chain broken at %d: %v", rep.FirstBad, rep.Error)
		}
	})
}
