package state

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// atkFill appends n audit records in commands of at most
// MaxEventsPerCommand events.
func atkFill(a *applier, n int, tag string) {
	a.t.Helper()
	for done := 0; done < n; {
		k := min(MaxEventsPerCommand, n-done)
		evs := make([]AuditEvent, k)
		for i := range evs {
			evs[i] = AuditEvent{Action: "test.event", Target: fmt.Sprintf("spiffe://example.org/%s/%d", tag, done+i), Detail: map[string]string{"n": fmt.Sprint(done + i)}}
		}
		a.must(CmdAudit, AuditAppend{Events: evs})
		done += k
	}
}

func atkSegments(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	slices.Sort(out)
	return out
}

func TestAuditPruneExportVerify(t *testing.T) {
	ca := atkNewCA(t, "retention")
	other := atkNewCA(t, "other")
	roots := []*x509.Certificate{ca.root}
	dir := t.TempDir()
	exportDir := filepath.Join(dir, "segments")
	f, err := Open(td, Options{Path: filepath.Join(dir, "state.db"), NodeID: "node-1", ExportDir: exportDir, SignHead: ca.signHead})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	a := &applier{t: t, fsm: f}
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{ca.rootDER}}) // record 1
	atkFill(a, 2999, "w")
	if head, _ := f.AuditHead(); head != 3000 {
		t.Fatalf("head %d", head)
	}
	recsBefore := f.Audit(0, 0)

	// A second replica whose export directory cannot be written (its
	// parent is a file): it prunes all the same, and counts the failure.
	blocker := filepath.Join(dir, "not-a-directory")
	if err := os.WriteFile(blocker, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	g, err := Open(td, Options{Path: filepath.Join(dir, "replica", "state.db"), NodeID: "node-2", ExportDir: filepath.Join(blocker, "segments"), SignHead: ca.signHead})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Error(err)
		}
	})
	if err := g.Restore(bytes.NewReader(atkSnapshot(t, f))); err != nil {
		t.Fatal(err)
	}

	// Prune below 1001 on both replicas, at the same raft index.
	cmd, err := NewCommand(CmdAuditPrune, nodeActor, t0, AuditPrune{Before: 1001})
	if err != nil {
		t.Fatal(err)
	}
	a.index++
	for _, r := range []*FSM{f, g} {
		if _, err := r.Apply(a.index, origin, cmd); err != nil {
			t.Fatalf("prune: %v", err)
		}
	}
	if f.ExportFailures() != 0 || g.ExportFailures() != 1 {
		t.Fatalf("export failures: %d and %d, want 0 and 1", f.ExportFailures(), g.ExportFailures())
	}
	if g.AuditFirst() != 1001 {
		t.Fatalf("replica without export kept records from %d", g.AuditFirst())
	}
	if !bytes.Equal(atkExport(t, f), atkExport(t, g)) {
		t.Fatal("a failed export made the replicas diverge")
	}

	a.must(CmdAuditPrune, AuditPrune{Before: 2001})
	head, _ := f.AuditHead()
	if head != 3002 || f.AuditFirst() != 2001 {
		t.Fatalf("after prunes: head %d, first %d", head, f.AuditFirst())
	}
	segs := atkSegments(t, exportDir)
	want := []string{segmentName(1, 1000), segmentName(1001, 2000)}
	if !slices.Equal(segs, want) {
		t.Fatalf("segments %v, want %v", segs, want)
	}
	recs := f.Audit(0, 0)
	for _, r := range recs[len(recs)-2:] {
		if r.Action != CmdAuditPrune {
			t.Fatalf("record %d is %s", r.Seq, r.Action)
		}
	}
	if d := recs[len(recs)-1].Detail; d["from"] != "1001" || d["to"] != "2000" || d["last_hash"] != recsBefore[1999].Hash {
		t.Fatalf("prune record %+v", d)
	}

	// Each segment verifies against the root, holds its records intact,
	// and fails with another root or one byte changed.
	for i, name := range segs {
		path := filepath.Join(exportDir, name)
		raw, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var got []AuditRecord
		rep, err := ReadSegment(bytes.NewReader(raw), roots, func(r *AuditRecord) error { got = append(got, *r); return nil })
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		lo := uint64(i*1000 + 1)
		if !rep.Signed || rep.Header.First != lo || rep.Header.Last != lo+999 || rep.Header.TrustDomain != "example.org" {
			t.Fatalf("%s: %+v", name, rep)
		}
		if len(got) != 1000 || !slices.EqualFunc(got, recsBefore[lo-1:lo+999], func(x, y AuditRecord) bool { return x.Hash == y.Hash && x.Seq == y.Seq }) {
			t.Fatalf("%s: records differ from the log's", name)
		}
		if want := recsBefore[lo-1].Prev; rep.Header.Prev != want {
			t.Fatalf("%s: prev %q, want %q", name, rep.Header.Prev, want)
		}
		if _, err := ReadSegment(bytes.NewReader(raw), []*x509.Certificate{other.root}, nil); err == nil || !strings.Contains(err.Error(), "does not chain") {
			t.Fatalf("%s with another root: %v", name, err)
		}
		lines := bytes.SplitAfter(raw, []byte("\n"))
		for _, c := range []struct {
			what string
			edit func() []byte
			want string
		}{
			{"byte of a record flipped", func() []byte {
				b := bytes.Clone(raw)
				off := len(bytes.Join(lines[:11], nil)) // record 10 of the segment
				j := bytes.Index(b[off:], []byte(`"target":"spiffe://example.org/w/`)) + off + len(`"target":"spiffe://example.org/w/`)
				b[j] ^= 0x01 // a digit becomes another digit
				return b
			}, "record altered"},
			{"record dropped", func() []byte {
				return bytes.Join(slices.Delete(slices.Clone(lines), 500, 501), nil)
			}, "follows"},
			{"checkpoint dropped", func() []byte {
				return bytes.Join(lines[:len(lines)-2], nil)
			}, "no signed checkpoint"},
			{"checkpoint signature flipped", func() []byte {
				b := bytes.Clone(raw)
				j := bytes.LastIndex(b, []byte(`"signature":"`)) + len(`"signature":"`) + 20
				if b[j] == 'A' {
					b[j] = 'B'
				} else {
					b[j] = 'A'
				}
				return b
			}, "signature does not verify"},
		} {
			_, err := ReadSegment(bytes.NewReader(c.edit()), roots, nil)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s, %s: %v, want an error naming %q", name, c.what, err, c.want)
			}
		}
	}

	// The whole history, from the segments and then the retained log.
	var all []AuditRecord
	if err := f.ExportAudit(0, func(r *AuditRecord) error { all = append(all, *r); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(all) != int(head) {
		t.Fatalf("export: %d records, want %d", len(all), head)
	}
	for i, r := range all {
		if r.Seq != uint64(i+1) {
			t.Fatalf("export: record %d at position %d", r.Seq, i)
		}
	}
	if n, err := VerifyAudit(all); err != nil {
		t.Fatalf("exported history breaks at %d: %v", n, err)
	}
	var tail []AuditRecord
	if err := f.ExportAudit(1500, func(r *AuditRecord) error { tail = append(tail, *r); return nil }); err != nil || len(tail) != int(head)-1500 || tail[0].Seq != 1501 {
		t.Fatalf("export after 1500: %d records, %v", len(tail), err)
	}
	if rep := f.VerifyAuditLog(roots); !rep.Intact || rep.From != 2001 || rep.To != head {
		t.Fatalf("verify after prune: %+v", rep)
	}

	// Refused prunes change nothing and write no segment.
	before := atkExport(t, f)
	for _, c := range []struct {
		before uint64
		want   string
	}{
		{2001, "already pruned"},
		{5, "already pruned"},
		{0, "already pruned"},
		{head + 1, "would remove the chain head"},
	} {
		if _, err := a.apply(CmdAuditPrune, t0, AuditPrune{Before: c.before}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("prune below %d: %v, want refusal naming %q", c.before, err, c.want)
		}
	}
	if !bytes.Equal(before, atkExport(t, f)) || len(atkSegments(t, exportDir)) != 2 {
		t.Fatal("refused prunes changed something")
	}

	// More than MaxPrunePerCommand at once is refused; exactly that many is
	// not.
	atkFill(a, MaxPrunePerCommand, "x")
	head, _ = f.AuditHead()
	first := f.AuditFirst()
	before = atkExport(t, f)
	if _, err := a.apply(CmdAuditPrune, t0, AuditPrune{Before: first + MaxPrunePerCommand + 1}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "at most") {
		t.Fatalf("prune of %d records: %v", MaxPrunePerCommand+1, err)
	}
	if !bytes.Equal(before, atkExport(t, f)) || len(atkSegments(t, exportDir)) != 2 {
		t.Fatal("refused prune changed something")
	}
	a.must(CmdAuditPrune, AuditPrune{Before: first + MaxPrunePerCommand})
	if got := f.AuditFirst(); got != first+MaxPrunePerCommand {
		t.Fatalf("first after the big prune: %d", got)
	}
	if rep := f.VerifyAuditLog(roots); !rep.Intact || rep.From != first+MaxPrunePerCommand || rep.To != head+1 {
		t.Fatalf("verify after the big prune: %+v", rep)
	}
	if n := len(atkSegments(t, exportDir)); n != 3 {
		t.Fatalf("%d segments", n)
	}

	// A missing segment is reported, not skipped.
	if err := os.Remove(filepath.Join(exportDir, segmentName(1001, 2000))); err != nil {
		t.Fatal(err)
	}
	err = f.ExportAudit(0, func(*AuditRecord) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("export with a segment missing: %v", err)
	}
	t.Logf("missing segment: %v", err)
}

// Options.NodeID is "named in the segments it exports": the segment header
// says which node wrote it (the closing checkpoint names it too).
func TestAuditPruneSegmentNamesNode(t *testing.T) {
	ca := atkNewCA(t, "seg")
	dir := t.TempDir()
	f, err := Open(td, Options{Path: filepath.Join(dir, "state.db"), NodeID: "node-1", ExportDir: filepath.Join(dir, "seg"), SignHead: ca.signHead})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	a := &applier{t: t, fsm: f}
	atkFill(a, 10, "w")
	a.must(CmdAuditPrune, AuditPrune{Before: 6})
	fh, err := os.Open(filepath.Join(dir, "seg", segmentName(1, 5)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = fh.Close() }() // read-only
	rep, err := ReadSegment(fh, []*x509.Certificate{ca.root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Header.Node != "node-1" {
		t.Fatalf("segment header names node %q, want node-1 (exportSegment never sets SegmentHeader.Node)", rep.Header.Node)
	}
}
