package ctl_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
	"github.com/sigil-appliance/sigil/appliance/node"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// sigilctl against a real cluster, as an operator would use it: the first
// admin credential through the local socket, then everything over mTLS.
func TestSigilctl(t *testing.T) {
	tr := clustertest.NewTrust(t, "ctl", []string{"node-1", "node-2"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2")
	dir := t.TempDir()
	run, must, stderr := cli(t)

	// Bootstrap: root on node-2 issues the first admin credential.
	key, cert := filepath.Join(dir, "alice.key"), filepath.Join(dir, "alice.pem")
	out := must("--socket", c.ConfigOf("node-2").API.LocalSocket, "admin", "issue", "--name", "alice", "--key-out", key, "--cert-out", cert)
	if !strings.Contains(out, "spiffe://example.org/sigil/admin/alice") {
		t.Fatalf("admin issue: %s", out)
	}
	if st, _ := os.Stat(key); st.Mode().Perm() != 0o600 {
		t.Fatalf("admin key mode %v", st.Mode().Perm())
	}
	if _, err := run("--socket", c.ConfigOf("node-2").API.LocalSocket, "admin", "issue", "--name", "alice", "--key-out", key, "--cert-out", cert); err == nil {
		t.Fatal("admin issue overwrote an existing key")
	}

	mtls := []string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", cert, "--key", key, "--root", tr.RootPath}
	with := func(args ...string) []string { return append(append([]string{}, mtls...), args...) }

	out = must(with("-o", "json", "entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id",
		"spiffe://example.org/sigil/agent/tpm/h1", "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", "--hint", "web", "--force")...)
	var e struct {
		ID       string `json:"id"`
		SPIFFEID string `json:"spiffe_id"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil || e.SPIFFEID != "spiffe://example.org/web" {
		t.Fatalf("entry create json: %v %s", err, out)
	}
	if out := must(with("entry", "list")...); !strings.Contains(out, e.ID) || !strings.Contains(out, "unix:gid:1000,unix:uid:1000") {
		t.Fatalf("entry list:\n%s", out)
	}
	if _, err := run(with("entry", "create", "--spiffe-id", "spiffe://evil.org/x", "--parent-id", "spiffe://example.org/p", "--selector", "unix:uid:1")...); err == nil ||
		!strings.Contains(err.Error(), "not in trust domain") {
		t.Fatalf("bad entry: %v", err)
	}
	if out := must(with("tpm", "ek-ca", "add", tr.RootPath)...); !strings.Contains(out, "trusted") {
		t.Fatalf("ek-ca add: %s", out)
	}
	if out := must(with("token", "create", "--ttl", "10m")...); !strings.Contains(out, "shown once") {
		t.Fatalf("token create: %s", out)
	}
	if out := must(with("cluster", "status")...); !strings.Contains(out, "node-1") || !strings.Contains(out, "node-2") {
		t.Fatalf("cluster status:\n%s", out)
	}
	testSnapshots(t, dir, run, must, stderr, with)
	testAudit(t, dir, run, must, stderr, with)
	if out := must(with("bundle", "show", "--format", "pem")...); !strings.Contains(out, "BEGIN CERTIFICATE") {
		t.Fatalf("bundle: %s", out)
	}
	if out := must(with("audit", "list")...); !strings.Contains(out, "admin.issue") || !strings.Contains(out, "local:uid=") {
		t.Fatalf("audit list lacks the bootstrap credential:\n%s", out)
	}
	if _, err := run(with("svid", "revoke", "deadbeef")...); err == nil || !strings.Contains(err.Error(), "no X.509-SVID with serial deadbeef") {
		t.Fatalf("revoke of an unknown serial: %v", err)
	}
	// No credential, no service.
	if _, err := run("--server", c.ConfigOf("node-1").API.Listen, "--root", tr.RootPath, "entry", "list"); err == nil {
		t.Fatal("entry list without a credential")
	}
}

type (
	runFunc  func(args ...string) (string, error)
	mustFunc func(args ...string) string
)

// cli runs sigilctl in process: run and must return stdout; stderr (the
// progress and notes) of the last command is kept apart.
func cli(t *testing.T) (runFunc, mustFunc, *bytes.Buffer) {
	var stderr bytes.Buffer
	run := func(args ...string) (string, error) {
		var out bytes.Buffer
		stderr.Reset()
		cmd := ctl.NewCommand(&out)
		cmd.SetArgs(args)
		cmd.SetOut(&out)
		cmd.SetErr(&stderr)
		err := cmd.Execute()
		return out.String(), err
	}
	must := func(args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("sigilctl %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
		}
		return out
	}
	return run, must, &stderr
}

func sha256File(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// testSnapshots: save streams into a new 0600 file and reports what the
// node wrote; restore streams it back; neither leaves or takes a bad file.
func testSnapshots(t *testing.T, dir string, run runFunc, must mustFunc, stderr *bytes.Buffer, with func(...string) []string) {
	snap := filepath.Join(dir, "state.snap")
	out := must(with("snapshot", "save", snap)...)
	sum := sha256File(t, snap)
	for _, want := range []string{"saved " + snap, "index ", " bytes", " entries", " audit records", "sha256 " + sum} {
		if !strings.Contains(out, want) {
			t.Fatalf("snapshot save output lacks %q:\n%s", want, out)
		}
	}
	if st, _ := os.Stat(snap); st.Mode().Perm() != 0o600 {
		t.Fatalf("snapshot mode %v", st.Mode().Perm())
	}
	if _, err := run(with("snapshot", "save", snap)...); err == nil {
		t.Fatal("snapshot save overwrote a file")
	}
	if sha256File(t, snap) != sum {
		t.Fatal("a refused save changed the existing file")
	}

	if stderr.Len() != 0 {
		t.Fatalf("a short save printed progress: %s", stderr)
	}

	snap2 := filepath.Join(dir, "state2.snap")
	var saved struct {
		Meta struct {
			Index        uint64 `json:"index"`
			Size         int64  `json:"size"`
			AuditRecords int    `json:"audit_records"`
		}
		SHA256 string
		File   string
		Bytes  int64
	}
	restoreProgress := ctl.SetProgressEvery(0) // a line per chunk
	if err := json.Unmarshal([]byte(must(with("-o", "json", "snapshot", "save", snap2)...)), &saved); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stderr.String(), "snapshot save "+snap2+": ") || !strings.Contains(stderr.String(), " so far, ") {
		t.Fatalf("snapshot save progress: %q", stderr)
	}
	st, _ := os.Stat(snap2)
	if saved.SHA256 != sha256File(t, snap2) || saved.Bytes != st.Size() || saved.Meta.Size != st.Size() || saved.Meta.Index == 0 || saved.Meta.AuditRecords == 0 || saved.File != snap2 {
		t.Fatalf("snapshot save json %+v, file of %d bytes", saved, st.Size())
	}

	// A save that fails leaves no file behind.
	bad := filepath.Join(dir, "unreachable.snap")
	if _, err := run(with("--server", "127.0.0.1:1", "--timeout", "2s", "snapshot", "save", bad)...); err == nil || !strings.Contains(err.Error(), "removed the incomplete") {
		t.Fatalf("snapshot save to nowhere: %v", err)
	}
	if _, err := os.Stat(bad); !os.IsNotExist(err) {
		t.Fatalf("a failed save left %s: %v", bad, err)
	}

	out = must(with("snapshot", "restore", snap)...)
	if !strings.Contains(out, "restored "+snap) || !strings.Contains(out, "from node node-") || !strings.Contains(out, "sha256 "+sum) || !strings.Contains(out, "index ") {
		t.Fatalf("snapshot restore:\n%s", out)
	}
	var restored struct {
		Meta struct {
			Node string `json:"node"`
		}
		SHA256 string
	}
	if err := json.Unmarshal([]byte(must(with("-o", "json", "snapshot", "restore", snap2)...)), &restored); err != nil || restored.SHA256 != saved.SHA256 || restored.Meta.Node == "" {
		t.Fatalf("snapshot restore json: %v %+v", err, restored)
	}
	if !strings.Contains(stderr.String(), "(100%)") || !strings.Contains(stderr.String(), "the node is checking the archive") {
		t.Fatalf("snapshot restore progress: %q", stderr)
	}
	restoreProgress()

	// A damaged archive is refused by the node.
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	damaged := filepath.Join(dir, "damaged.snap")
	if err := os.WriteFile(damaged, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := run(with("snapshot", "restore", damaged)...); err == nil {
		t.Fatal("a damaged archive was restored")
	}
}

// readExport parses audit export's JSON lines.
func readExport(t *testing.T, r *bufio.Scanner) []api.AuditRecord {
	t.Helper()
	var recs []api.AuditRecord
	r.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for r.Scan() {
		var rec api.AuditRecord
		if err := json.Unmarshal(r.Bytes(), &rec); err != nil {
			t.Fatalf("export line %d: %v: %s", len(recs)+1, err, r.Bytes())
		}
		recs = append(recs, rec)
	}
	return recs
}

func testAudit(t *testing.T, dir string, run runFunc, must mustFunc, stderr *bytes.Buffer, with func(...string) []string) {
	// Export to a file: every record from 1, one per line, an intact chain.
	exp := filepath.Join(dir, "audit.jsonl")
	out := must(with("audit", "export", "--out", exp)...)
	f, err := os.Open(exp)
	if err != nil {
		t.Fatal(err)
	}
	recs := readExport(t, bufio.NewScanner(f))
	_ = f.Close() // read only
	if len(recs) < 5 || recs[0].Seq != 1 || recs[0].Prev != "" {
		t.Fatalf("export: %d records from %d", len(recs), recs[0].Seq)
	}
	if bad, err := api.VerifyAudit(recs); err != nil {
		t.Fatalf("exported chain broken at %d: %v", bad, err)
	}
	if want := fmt.Sprintf("exported records 1..%d (%d records) to %s; hash chain intact", len(recs), len(recs), exp); !strings.Contains(out, want) {
		t.Fatalf("export summary %q lacks %q", out, want)
	}
	if st, _ := os.Stat(exp); st.Mode().Perm() != 0o600 {
		t.Fatalf("export mode %v", st.Mode().Perm())
	}
	if _, err := run(with("audit", "export", "--out", exp)...); err == nil {
		t.Fatal("audit export overwrote a file")
	}
	// To stdout, from a sequence number; the summary goes to stderr.
	restoreProgress := ctl.SetProgressEvery(0)
	out = must(with("audit", "export", "--since", "3")...)
	restoreProgress()
	if !strings.Contains(stderr.String(), "audit export: ") || !strings.Contains(stderr.String(), " records, at record ") {
		t.Fatalf("audit export progress: %q", stderr)
	}
	tail := readExport(t, bufio.NewScanner(strings.NewReader(out)))
	if len(tail) < len(recs)-3 || tail[0].Seq != 4 || tail[0].Prev != recs[2].Hash || !strings.Contains(stderr.String(), "exported records 4..") {
		t.Fatalf("export --since 3: %d records from %d; stderr %s", len(tail), tail[0].Seq, stderr)
	}

	// verify: the node's report of the range and checkpoints, and the
	// walk here, in pages.
	defer ctl.SetPageSize(3)()
	out = must(with("audit", "verify")...)
	if !strings.Contains(out, "verified records 1..") || !strings.Contains(out, "hash chain only") || !strings.Contains(out, "hash chain intact") || !strings.Contains(out, " pages)") {
		t.Fatalf("audit verify:\n%s", out)
	}
	var v struct {
		Records int
		Pages   int
		Intact  bool
		Node    api.AuditVerify
	}
	if err := json.Unmarshal([]byte(must(with("-o", "json", "audit", "verify")...)), &v); err != nil || !v.Intact || !v.Node.Intact || v.Pages < 2 || v.Node.From != 1 || v.Node.To < uint64(v.Records) {
		t.Fatalf("audit verify json: %v %+v", err, v)
	}

	// list: one page says it was capped; --all pages to the head.
	out = must(with("audit", "list")...)
	if n := strings.Count(out, "\n"); n != 4 || !strings.Contains(stderr.String(), "output capped at 3 records") {
		t.Fatalf("capped list (%d lines):\n%s\nstderr: %s", n, out, stderr)
	}
	out = must(with("audit", "list", "--all")...)
	if n := strings.Count(out, "\n"); n < len(recs)+1 || !strings.Contains(out, "admin.issue") || stderr.Len() != 0 {
		t.Fatalf("list --all: %d lines for %d records:\n%s\nstderr: %s", n, len(recs), out, stderr)
	}
	var all api.AuditList
	if err := json.Unmarshal([]byte(must(with("-o", "json", "audit", "list", "--all", "--after", "1", "--limit", "4")...)), &all); err != nil ||
		len(all.Records) != 4 || all.Records[0].Seq != 2 || all.Records[3].Seq != 5 || all.Head < 5 {
		t.Fatalf("list --all json: %v %d records, head %d", err, len(all.Records), all.Head)
	}
	if bad, err := api.VerifyAudit(all.Records); err != nil {
		t.Fatalf("list --all chain broken at %d: %v", bad, err)
	}
}

// Audit retention: records pruned to signed segment files on each node are
// still exported (and checked), verify says where they went, and
// verify-segment checks the files offline against the root.
func TestSigilctlAuditSegments(t *testing.T) {
	tr := clustertest.NewTrust(t, "ctlseg", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Audit.Retain.Records = 1000
		cfg.Audit.Retain.Every = node.Duration{Duration: 200 * time.Millisecond}
		cfg.Audit.CheckpointEvery = 250
	}, "node-1")
	run, must, stderr := cli(t)
	with := func(args ...string) []string {
		return append([]string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", c.AdminCert, "--key", c.AdminKey, "--root", tr.RootPath}, args...)
	}
	adm := c.Admin("node-1")
	segDir := filepath.Join(c.ConfigOf("node-1").DataDir, "audit")
	segments := func() []string {
		m, _ := filepath.Glob(filepath.Join(segDir, "audit-*.jsonl"))
		return m
	}
	// Enough records for two prunes, so two segments that must link.
	created := 0
	create := func(n int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, n)
		work := make(chan int)
		for range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range work {
					_, err := adm.EntryCreate(context.Background(), &api.EntryRequest{Entry: api.Entry{
						SPIFFEID: fmt.Sprintf("spiffe://example.org/w/%d", i), ParentID: "spiffe://example.org/sigil/agent/x",
						Selectors: []api.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}}}, Force: true})
					if err != nil {
						errs <- err
					}
				}
			}()
		}
		for i := range n {
			work <- created + i
		}
		close(work)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		created += n
	}
	waitSegments := func(n int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for len(segments()) < n {
			if time.Now().After(deadline) {
				head, _ := c.Node("node-1").State().AuditHead()
				t.Fatalf("%d segments, not %d (audit head %d, first %d)\n%s", len(segments()), n, head, c.Node("node-1").State().AuditFirst(), tailString(c.Log.String(), 3000))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	start := time.Now()
	create(1150)
	t.Logf("1150 entries in %v", time.Since(start))
	waitSegments(1)
	create(150)
	waitSegments(2)
	create(150)
	waitSegments(3)
	segs := segments()

	// Export from 1: the segments' records, then the retained log.
	// Raise retention and restart, so that no prune runs from here on:
	// at the bound the leader keeps pruning (each prune's own record
	// crosses it again), and the node's export can lose a race with a
	// prune (segments listed before it, the retained log read after it).
	c.Stop("node-1")
	c.ConfigOf("node-1").Audit.Retain.Records = 1_000_000
	c.Start("node-1")
	c.WaitLeader(30 * time.Second)
	adm = c.Admin("node-1")
	clustertest.Eventually(t, 30*time.Second, "reads after the restart", func() bool {
		_, err := adm.AuditList(context.Background(), &api.AuditRequest{Limit: 1})
		return err == nil
	})
	exp := filepath.Join(t.TempDir(), "audit.jsonl")
	out := must(with("audit", "export", "--out", exp)...)
	f, err := os.Open(exp)
	if err != nil {
		t.Fatal(err)
	}
	recs := readExport(t, bufio.NewScanner(f))
	_ = f.Close() // read only
	if len(recs) < 1300 || recs[0].Seq != 1 {
		t.Fatalf("export: %d records from %d", len(recs), recs[0].Seq)
	}
	if bad, err := api.VerifyAudit(recs); err != nil {
		t.Fatalf("exported chain broken at %d: %v", bad, err)
	}
	if !strings.Contains(out, "from the node's segment files") {
		t.Fatalf("export summary: %s", out)
	}

	out = must(with("audit", "verify")...)
	if !strings.Contains(out, "checkpoints signed by node HSM keys, last at") || !strings.Contains(out, "were pruned to the nodes' segment files (audit.prune at record") {
		t.Fatalf("audit verify:\n%s", out)
	}
	if out := must(with("audit", "list", "--limit", "1")...); !strings.Contains(stderr.String(), "were pruned from the replicated log") {
		t.Fatalf("list of a pruned log: %s\nstderr: %s", out, stderr)
	}

	// Offline: each file against the root, and the link between them
	// (given in any order).
	out = must(with("audit", "verify-segment", segs[1], segs[0])...)
	if !strings.Contains(out, "2 segment files intact and linked: records 1..") || !strings.Contains(out, "checkpoint signed by node-1 (") {
		t.Fatalf("verify-segment:\n%s", out)
	}
	if _, err := run("audit", "verify-segment", segs[0]); err == nil || !strings.Contains(err.Error(), "--root") {
		t.Fatalf("verify-segment without a root: %v", err)
	}
	// A record altered in the first file: that file fails, naming the
	// record (the link to the second cannot be checked then).
	b, _ := os.ReadFile(segs[0])
	lines := strings.SplitAfter(string(b), "\n")
	var rec api.AuditRecord
	if err := json.Unmarshal([]byte(lines[1]), &rec); err != nil {
		t.Fatal(err)
	}
	lines[1] = strings.Replace(lines[1], `"actor":"`, `"actor":"x`, 1)
	tampered := filepath.Join(t.TempDir(), filepath.Base(segs[0]))
	if err := os.WriteFile(tampered, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = run(with("audit", "verify-segment", tampered, segs[1])...)
	if err == nil || !strings.Contains(out, "FAILED "+tampered+": record "+fmt.Sprint(rec.Seq)+": record altered") {
		t.Fatalf("verify-segment of a tampered file: %v\n%s", err, out)
	}
	// A gap: each file alone is fine, but the third does not continue the
	// first.
	if out, err := run(with("audit", "verify-segment", segs[2])...); err != nil {
		t.Fatalf("verify-segment of the third file: %v\n%s", err, out)
	}
	out, err = run(with("audit", "verify-segment", segs[0], segs[2])...)
	if err == nil || !strings.Contains(out, "FAILED link: "+segs[2]+" starts at record") || !strings.Contains(err.Error(), "1 broken links") {
		t.Fatalf("verify-segment across a gap: %v\n%s", err, out)
	}
}

func tailString(s string, n int) string { return s[max(0, len(s)-n):] }
