package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

// Entries stored by version 3 commands with selectors no agent produces
// replay as they were applied and survive a raft snapshot; from version 4
// (EntryRulesVersion) the state machine refuses such selectors itself,
// whoever proposed the command.
func TestSelectorRulesByVersion(t *testing.T) {
	a := newApplier(t)
	v3 := func(typ string, p any) error {
		a.index++
		pl, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		cmd, err := json.Marshal(Command{Version: 3, Type: typ, Actor: actorFor(typ), ActorSerial: testSerial, Time: t0, Payload: pl})
		if err != nil {
			t.Fatal(err)
		}
		_, err = a.fsm.Apply(a.index, origin, cmd)
		return err
	}
	for i, sel := range []string{"unix:uid:abc", "foo:bar", "uid:1000", "unix:colour:blue", "unix:sha256:xyz"} {
		if err := v3(CmdEntryCreate, entry("legacy-000"+string(rune('1'+i)), "spiffe://example.org/legacy", sel)); err != nil {
			t.Fatalf("version 3 entry with %s: %v (a log from before the rules must replay as applied)", sel, err)
		}
	}
	if err := v3(CmdEntryCreate, entry("legacy-0009", "spiffe://example.org/two", "unix:uid:1", "unix:uid:2")); err != nil {
		t.Fatalf("version 3 entry with two uids: %v", err)
	}

	// A raft snapshot holding them loads.
	snap, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	b := newFSM(t)
	if err := b.Restore(&buf); err != nil {
		t.Fatalf("snapshot holding entries stored before the selector rules: %v", err)
	}
	if n := len(b.Entries()); n != 6 {
		t.Fatalf("restored %d entries, want 6", n)
	}

	// An archive saved then (sigilctl snapshot save) holds them too.
	var arch bytes.Buffer
	if _, err := a.fsm.WriteArchive(&arch, "node-1", t0); err != nil {
		t.Fatal(err)
	}

	before, _ := a.fsm.Export()
	for sel, want := range map[string]string{
		"unix:uid:abc":     "not a decimal id",
		"foo:bar":          `unknown type "foo"`,
		"uid:1000":         "did you mean unix:uid:1000?",
		"unix:colour:blue": "no unix:colour selector",
		"unix:sha256:xyz":  "not 64 lowercase hex digits",
	} {
		_, err := a.apply(CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/web", sel))
		if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
			t.Errorf("version %d entry with %s: %v, want a refusal containing %q", CommandVersion, sel, err, want)
		}
	}
	if _, err := a.apply(CmdEntryCreate, t0, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1", "unix:uid:2")); err == nil ||
		!strings.Contains(err.Error(), "can never both match") {
		t.Errorf("two uids on one entry: %v", err)
	}
	// Updating a stored legacy entry must bring it within the rules.
	fix := entry("legacy-0001", "spiffe://example.org/legacy", "unix:uid:abc")
	fix.Hint = "h"
	if _, err := a.apply(CmdEntryUpdate, t0, fix); err == nil || !strings.Contains(err.Error(), "not a decimal id") {
		t.Errorf("update keeping an invalid selector: %v", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused entries changed the state")
	}
	fix.Selectors = []Selector{{Type: "unix", Value: "uid:1000"}}
	a.must(CmdEntryUpdate, fix)
	if err := v3(CmdEntryCreate, entry("legacy-0010", "spiffe://example.org/late", "foo:bar")); err == nil {
		t.Fatal("a version 3 command committed after version 4: it would skip the selector rules")
	}

	// Restoring that archive by a version 4 command brings them back as
	// they were stored.
	p, _, _, err := a.fsm.ReadArchive(bytes.NewReader(arch.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	a.must(CmdStateRestore, p)
	if e, ok := a.fsm.Entry("legacy-0001"); !ok || e.Selectors[0].String() != "unix:uid:abc" || len(a.fsm.Entries()) != 6 {
		t.Fatalf("restore of an archive holding entries stored before the rules: %+v, %d entries", e, len(a.fsm.Entries()))
	}
}

// From version 4 an update naming a revision applies only to it.
func TestEntryUpdateRevision(t *testing.T) {
	a := newApplier(t)
	var created Entry
	mustJSON(t, a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1")), &created)
	u := entry("entry-0001", "spiffe://example.org/web", "unix:uid:2")
	u.Revision = created.Revision
	var updated Entry
	mustJSON(t, a.must(CmdEntryUpdate, u), &updated)
	before, _ := a.fsm.Export()
	u.Selectors = []Selector{{Type: "unix", Value: "uid:3"}} // still the first revision: stale
	if _, err := a.apply(CmdEntryUpdate, t0, u); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "changed since it was read") {
		t.Fatalf("stale update: %v", err)
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a stale update changed the state")
	}
	u.Revision = 0 // no revision: replaces whatever is stored
	a.must(CmdEntryUpdate, u)
}

func mustJSON(t *testing.T, b []byte, v any) {
	t.Helper()
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}
