package state

import (
	"bytes"
	"strings"
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

// FuzzForeignBundle: whatever a foreign bundle endpoint serves, the state
// machine's rule takes only a bounded bundle of that trust domain that
// names none of ours, and never one behind the stored sequence.
func FuzzForeignBundle(f *testing.F) {
	root := fedCA(f, "other.org")
	stored := fedBundle(f, "other.org", 5, root)
	f.Add(stored)
	f.Add(fedBundle(f, "other.org", 6, root))
	f.Add(fedBundle(f, "other.org", 4, root))
	f.Add(fedBundle(f, "other.org", -1, root))
	f.Add([]byte(`{"keys":[{"use":"jwt-svid","kty":"EC","crv":"P-256","kid":"k","x":"AA","y":"AA"}],"spiffe_sequence":9}`))
	f.Add([]byte(`{}`))
	cur := &Federation{TrustDomain: "other.org", Bundle: stored, BundleSequence: 5, HasSequence: true}
	f.Fuzz(func(t *testing.T, doc []byte) {
		b, err := NextBundle(td, cur, doc)
		if err != nil {
			return
		}
		if len(doc) > MaxFederatedBundle || len(b.X509Authorities()) > MaxFederatedAuthorities || len(b.JWTAuthorities()) > MaxFederatedAuthorities {
			t.Fatalf("accepted an unbounded bundle (%d bytes)", len(doc))
		}
		if seq, ok := b.SequenceNumber(); !ok || seq < 5 {
			t.Fatalf("accepted sequence %d (%v) after 5", seq, ok)
		}
		for _, c := range b.X509Authorities() {
			if !c.IsCA {
				t.Fatal("accepted a non-CA X.509 authority")
			}
			for _, u := range c.URIs {
				if strings.HasPrefix(u.String(), "spiffe://example.org") {
					t.Fatal("accepted an authority naming our trust domain")
				}
			}
		}
	})
}
