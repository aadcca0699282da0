package state

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("example.org")
	t0    = time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	admin = "spiffe://example.org/sigil/admin/alice"
)

const origin = "node-1"

var nodeActor = "spiffe://example.org/sigil/node/" + origin

// newFSM opens a state file in a test directory.
func newFSM(t testing.TB) *FSM {
	t.Helper()
	f, err := Open(td, Options{Path: filepath.Join(t.TempDir(), "state.db"), NodeID: origin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	return f
}

// applier feeds commands with increasing raft indexes, proposed by node-1:
// admin commands as admin, node commands as the node itself.
type applier struct {
	t     testing.TB
	fsm   *FSM
	index uint64
}

func newApplier(t *testing.T) *applier { return &applier{t: t, fsm: newFSM(t)} }

func actorFor(typ string) string {
	if handlers[typ].allow == byNode {
		return nodeActor
	}
	return admin
}

func (a *applier) apply(typ string, at time.Time, payload any) ([]byte, error) {
	a.t.Helper()
	cmd := testCommand(a.t, typ, actorFor(typ), "", at, payload)
	a.index++
	return a.fsm.Apply(a.index, origin, cmd)
}

func (a *applier) must(typ string, payload any) []byte {
	a.t.Helper()
	out, err := a.apply(typ, t0, payload)
	if err != nil {
		a.t.Fatalf("%s: %v", typ, err)
	}
	return out
}

func entry(id, spiffeID string, sel ...string) *Entry {
	e := &Entry{ID: id, SPIFFEID: spiffeID, ParentID: "spiffe://example.org/sigil/agent/tpm/abc"}
	for _, s := range sel {
		typ, val, _ := strings.Cut(s, ":")
		e.Selectors = append(e.Selectors, Selector{Type: typ, Value: val})
	}
	return e
}

func TestEntriesAndRefusals(t *testing.T) {
	a := newApplier(t)
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1000"))
	before, _ := a.fsm.Export()

	long := strings.Repeat("x", 65)
	for _, tc := range []struct {
		name, typ string
		payload   any
		want      string
	}{
		{"duplicate id", CmdEntryCreate, entry("entry-0001", "spiffe://example.org/other", "unix:uid:1"), "already exists"},
		{"same registration", CmdEntryCreate, entry("entry-0002", "spiffe://example.org/web", "unix:uid:1000"), "already registers"},
		{"foreign trust domain", CmdEntryCreate, entry("entry-0003", "spiffe://evil.org/web", "unix:uid:1"), "not in trust domain"},
		{"no path", CmdEntryCreate, entry("entry-0004", "spiffe://example.org", "unix:uid:1"), "has no path"},
		{"reserved path", CmdEntryCreate, entry("entry-0005", "spiffe://example.org/sigil/node/x", "unix:uid:1"), "reserved"},
		{"no selectors", CmdEntryCreate, entry("entry-0006", "spiffe://example.org/db"), "no selectors"},
		{"bad selector type", CmdEntryCreate, entry("entry-0007", "spiffe://example.org/db", "Unix:uid:1"), "selector type"},
		{"selector with newline", CmdEntryCreate, entry("entry-0008", "spiffe://example.org/db", "unix:uid:1\nx"), "without newlines"},
		{"ttl too short", CmdEntryCreate, func() *Entry {
			e := entry("entry-0009", "spiffe://example.org/db", "unix:uid:1")
			e.X509TTL = 5
			return e
		}(), "x509_ttl"},
		{"bad dns", CmdEntryCreate, func() *Entry {
			e := entry("entry-0010", "spiffe://example.org/db", "unix:uid:1")
			e.DNSNames = []string{"bad name"}
			return e
		}(), "dns name"},
		{"long hint", CmdEntryCreate, func() *Entry {
			e := entry("entry-0011", "spiffe://example.org/db", "unix:uid:1")
			e.Hint = long
			return e
		}(), "hint"},
		{"bad entry id", CmdEntryCreate, entry("x", "spiffe://example.org/db", "unix:uid:1"), "entry id"},
		{"update missing", CmdEntryUpdate, entry("entry-9999", "spiffe://example.org/db", "unix:uid:1"), "no entry"},
		{"delete missing", CmdEntryDelete, EntryID{ID: "entry-9999"}, "no entry"},
		{"unknown payload field", CmdEntryDelete, map[string]string{"id": "entry-0001", "force": "yes"}, "unknown field"},
		{"parent not an agent", CmdEntryCreate, func() *Entry {
			e := entry("entry-0012", "spiffe://example.org/db", "unix:uid:1")
			e.ParentID = "spiffe://example.org/web"
			return e
		}(), "a parent is an agent"},
		{"unknown command", "entry.teleport", EntryID{ID: "entry-0001"}, "unknown command type"},
		{"ban unknown agent", CmdAgentBan, AgentID{ID: "spiffe://example.org/sigil/agent/x"}, "no agent"},
		{"bad EK hash", CmdEKAllowAdd, EKHash{Hash: "abc"}, "64 hex digits"},
		{"non-CA EK CA", CmdEKCAAdd, EKCAAdd{DER: []byte("junk")}, "EK CA certificate"},
		{"bad PCR", CmdPCRPolicySet, PCRPolicySet{Policy: &PCRPolicy{Bank: "sha256", PCRs: map[string]string{"24": strings.Repeat("0", 64)}}}, "PCR index"},
		{"empty audit", CmdAudit, AuditAppend{}, "no audit events"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := a.apply(tc.typ, t0, tc.payload)
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want refusal containing %q", err, tc.want)
			}
			if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
				t.Fatal("a refused command changed the state")
			}
		})
	}

	// Envelope problems are refused too.
	for name, raw := range map[string]string{
		"malformed":      `{"v":2,"type":`,
		"old version":    `{"v":1,"type":"entry.delete","actor":"` + admin + `","time":"2026-01-01T00:00:00Z","payload":{"id":"entry-0001"}}`,
		"future version": `{"v":4,"type":"entry.delete","actor":"` + admin + `","time":"2026-01-01T00:00:00Z","payload":{}}`,
		"no actor":       `{"v":2,"type":"entry.delete","time":"2026-01-01T00:00:00Z","payload":{"id":"entry-0001"}}`,
		"unknown field":  `{"v":2,"type":"entry.delete","actor":"` + admin + `","time":"2026-01-01T00:00:00Z","payload":{"id":"entry-0001"},"sudo":true}`,
	} {
		if _, err := a.fsm.Apply(99, origin, []byte(raw)); !errors.Is(err, ErrRefused) {
			t.Errorf("%s: %v, want refusal", name, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("a refused envelope changed the state")
	}

	// Update and delete work and are audited.
	e := entry("entry-0001", "spiffe://example.org/web", "unix:uid:1000", "unix:gid:50")
	e.Hint = "web"
	a.must(CmdEntryUpdate, e)
	got, _ := a.fsm.Entry("entry-0001")
	if got.Hint != "web" || len(got.Selectors) != 2 || got.CreatedAt != t0 {
		t.Fatalf("updated entry: %+v", got)
	}
	a.must(CmdEntryDelete, EntryID{ID: "entry-0001"})
	if len(a.fsm.Entries()) != 0 {
		t.Fatal("entry not deleted")
	}
	var actions []string
	for _, r := range a.fsm.Audit(0, 0) {
		actions = append(actions, r.Action)
	}
	if strings.Join(actions, ",") != "entry.create,entry.update,entry.delete" {
		t.Fatalf("audit actions %v", actions)
	}
}

func TestReplicasAgree(t *testing.T) {
	// The same log applied twice gives byte-identical state: nothing in
	// Apply depends on the clock, map order or randomness.
	run := func() []byte {
		a := newApplier(t)
		for i := 0; i < 50; i++ {
			a.must(CmdEntryCreate, entry(fmt.Sprintf("entry-%04d", i), fmt.Sprintf("spiffe://example.org/svc/%d", i), "unix:uid:"+fmt.Sprint(i), "unix:gid:1"))
		}
		a.must(CmdAgentUpsert, &Agent{ID: "spiffe://example.org/sigil/agent/tpm/aa", AttestationType: "tpm", Facts: map[string]string{"ek": "x", "ak": "y"}})
		a.must(CmdTokenCreate, TokenCreate{ID: strings.Repeat("ab", 32), ExpiresAt: t0.Add(time.Hour)})
		b, _ := a.fsm.Export()
		return b
	}
	if !bytes.Equal(run(), run()) {
		t.Fatal("replicas diverge")
	}
}

func TestAuditChainDetectsTampering(t *testing.T) {
	a := newApplier(t)
	for i := 0; i < 5; i++ {
		a.must(CmdEntryCreate, entry(fmt.Sprintf("entry-%04d", i), fmt.Sprintf("spiffe://example.org/s/%d", i), "unix:uid:1"))
	}
	if rep := a.fsm.VerifyAuditLog(nil); !rep.Intact || rep.From != 1 || rep.To != 5 {
		t.Fatalf("intact chain reported %+v", rep)
	}
	recs := a.fsm.Audit(0, 0)
	if len(recs) != 5 || recs[0].Prev != "" || recs[1].Prev != recs[0].Hash {
		t.Fatalf("chain: %+v", recs)
	}
	altered := append([]AuditRecord(nil), recs...)
	altered[2].Target = "spiffe://example.org/evil"
	if n, err := VerifyAudit(altered); err == nil || n != 3 {
		t.Fatalf("altered record 3: got %d, %v", n, err)
	}
	dropped := append(append([]AuditRecord(nil), recs[:1]...), recs[2:]...)
	if n, err := VerifyAudit(dropped); err == nil || n != 3 {
		t.Fatalf("dropped record 2: got %d, %v", n, err)
	}
	// Recomputing one record's hash does not help: the next link breaks.
	rehashed := append([]AuditRecord(nil), recs...)
	rehashed[1].Actor = "spiffe://example.org/sigil/admin/mallory"
	var err error
	if rehashed[1].Hash, err = recordHash(&rehashed[1]); err != nil {
		t.Fatal(err)
	}
	if n, err := VerifyAudit(rehashed); err == nil || n != 3 {
		t.Fatalf("rehashed record 2: got %d, %v", n, err)
	}
}

func TestTokensAndBans(t *testing.T) {
	a := newApplier(t)
	id := strings.Repeat("cd", 32)
	a.must(CmdTokenCreate, TokenCreate{ID: id, ExpiresAt: t0.Add(10 * time.Minute)})
	agent := "spiffe://example.org/sigil/agent/join_token/" + id[:16]
	if _, err := a.apply(CmdTokenUse, t0.Add(time.Minute), TokenUse{ID: id, Agent: agent}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.apply(CmdTokenUse, t0.Add(2*time.Minute), TokenUse{ID: id, Agent: agent}); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("reuse: %v", err)
	}
	late := strings.Repeat("ef", 32)
	a.must(CmdTokenCreate, TokenCreate{ID: late, ExpiresAt: t0.Add(10 * time.Minute)})
	if _, err := a.apply(CmdTokenUse, t0.Add(11*time.Minute), TokenUse{ID: late, Agent: agent}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("expired: %v", err)
	}
	a.must(CmdJoinTokensToggle, JoinTokens{Enabled: false})
	fresh := strings.Repeat("12", 32)
	if _, err := a.apply(CmdTokenUse, t0, TokenUse{ID: fresh, Agent: agent}); err == nil || !strings.Contains(err.Error(), "disabled") {
		t.Fatalf("disabled: %v", err)
	}
	for _, r := range a.fsm.Audit(0, 0) {
		for _, v := range r.Detail {
			if strings.Contains(v, id) {
				t.Fatal("audit holds a full token hash")
			}
		}
	}

	ag := &Agent{ID: "spiffe://example.org/sigil/agent/tpm/bb", AttestationType: "tpm"}
	a.must(CmdAgentUpsert, ag)
	a.must(CmdAgentBan, AgentID{ID: ag.ID})
	if _, err := a.apply(CmdAgentUpsert, t0, ag); err == nil || !strings.Contains(err.Error(), "banned") {
		t.Fatalf("re-attest while banned: %v", err)
	}
	a.must(CmdAgentUnban, AgentID{ID: ag.ID})
	if got, _ := a.fsm.Agent(ag.ID); got.Banned {
		t.Fatal("still banned")
	}
}

func selfSignedRoot(t *testing.T, uri string) []byte {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(uri)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"}, NotBefore: t0, NotAfter: t0.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestBundleRoots(t *testing.T) {
	a := newApplier(t)
	if _, err := a.apply(CmdBundleSetRoots, t0, BundleRoots{Roots: [][]byte{selfSignedRoot(t, "spiffe://other.org")}}); err == nil {
		t.Fatal("root of another trust domain accepted")
	}
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{selfSignedRoot(t, "spiffe://example.org")}})
	if b := a.fsm.Bundle(); b.Sequence != 1 || len(b.Roots) != 1 {
		t.Fatalf("bundle %+v", b)
	}
}

func TestSnapshotArchive(t *testing.T) {
	a := newApplier(t)
	for i := 0; i < 10; i++ {
		a.must(CmdEntryCreate, entry(fmt.Sprintf("entry-%04d", i), fmt.Sprintf("spiffe://example.org/s/%d", i), "unix:uid:1"))
	}
	var arch bytes.Buffer
	meta, err := a.fsm.WriteArchive(&arch, "node-1", t0)
	if err != nil {
		t.Fatal(err)
	}
	if meta.Index != 10 || meta.AuditHeadSeq != 10 {
		t.Fatalf("meta %+v", meta)
	}
	// Changes after the save, then a restore rolls the entries back and
	// keeps the history, with the restore recorded on top.
	a.must(CmdEntryDelete, EntryID{ID: "entry-0003"})
	a.must(CmdEntryCreate, entry("entry-zzzz", "spiffe://example.org/later", "unix:uid:9"))
	p, rmeta, sum, err := a.fsm.ReadArchive(bytes.NewReader(arch.Bytes()), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if rmeta.Entries != 10 || rmeta.AuditRecords != 10 {
		t.Fatalf("read meta %+v", rmeta)
	}
	a.must(CmdStateRestore, p)
	if got := a.fsm.Entries(); len(got) != 10 || got[3].ID != "entry-0003" {
		t.Fatalf("%d entries after restore", len(got))
	}
	recs := a.fsm.Audit(0, 0)
	last := recs[len(recs)-1]
	if last.Action != CmdStateRestore || last.Detail["archive_sha256"] != sum || len(recs) != 13 ||
		last.Detail["entries_added"] != "1" || last.Detail["entries_removed"] != "1" {
		t.Fatalf("restore audit: %+v (%d records)", last, len(recs))
	}
	if rep := a.fsm.VerifyAuditLog(nil); !rep.Intact {
		t.Fatal(rep.Error)
	}

	// Damaged archives are refused before anything is parsed or replaced.
	before, _ := a.fsm.Export()
	b := arch.Bytes()
	flip := append([]byte(nil), b...)
	flip[len(b)/2] ^= 0x20
	badTD := func() []byte {
		o, err := Open(spiffeid.RequireTrustDomainFromString("other.org"), Options{Path: filepath.Join(t.TempDir(), "o.db")})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = o.Close() }() // a scratch state
		var x bytes.Buffer
		if _, err := o.WriteArchive(&x, "n", t0); err != nil {
			t.Fatal(err)
		}
		return x.Bytes()
	}()
	cases := map[string][]byte{
		"empty":             nil,
		"not an archive":    []byte("hello\n"),
		"truncated header":  b[:10],
		"truncated middle":  b[:len(b)/2],
		"missing last byte": b[:len(b)-1],
		"no trailer":        b[:bytes.LastIndex(b[:len(b)-1], []byte("\n"))+1],
		"flipped byte":      flip,
		"other domain":      badTD,
		"trailing data":     append(append([]byte(nil), b...), 'x'),
	}
	for name, c := range cases {
		_, _, _, err := a.fsm.ReadArchive(bytes.NewReader(c), t.TempDir())
		t.Logf("%s: %v", name, err)
		if !errors.Is(err, ErrBadArchive) {
			t.Errorf("%s: %v, want ErrBadArchive", name, err)
		}
	}
	if after, _ := a.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused archives changed the state")
	}

	// Raft snapshots round-trip too.
	snap, _ := a.fsm.Snapshot()
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	c := newFSM(t)
	if err := c.Restore(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	x, _ := a.fsm.Export()
	y, _ := c.Export()
	if !bytes.Equal(x, y) {
		t.Fatal("snapshot restore differs")
	}
	if c.AppliedIndex() != a.index {
		t.Fatalf("restored applied index %d, want %d", c.AppliedIndex(), a.index)
	}
	for name, bad := range map[string][]byte{"truncated": buf.Bytes()[:buf.Len()/2], "flipped": func() []byte {
		f := append([]byte(nil), buf.Bytes()...)
		f[len(f)-100] ^= 1
		return f
	}()} {
		if err := c.Restore(bytes.NewReader(bad)); err == nil {
			t.Fatalf("%s raft snapshot accepted", name)
		}
	}
	if z, _ := c.Export(); !bytes.Equal(x, z) {
		t.Fatal("failed raft restore changed the state")
	}
}

// The registration index follows updates, deletes and restores.
func TestRegistrationIndex(t *testing.T) {
	a := newApplier(t)
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/a", "unix:uid:1"))
	// Updating entry-0001 away from uid:1 frees that registration.
	a.must(CmdEntryUpdate, entry("entry-0001", "spiffe://example.org/a", "unix:uid:2"))
	a.must(CmdEntryCreate, entry("entry-0002", "spiffe://example.org/a", "unix:uid:1"))
	if _, err := a.apply(CmdEntryCreate, t0, entry("entry-0003", "spiffe://example.org/a", "unix:uid:2")); err == nil {
		t.Fatal("duplicate of the updated registration accepted")
	}
	a.must(CmdEntryDelete, EntryID{ID: "entry-0002"})
	a.must(CmdEntryCreate, entry("entry-0004", "spiffe://example.org/a", "unix:uid:1"))
	// After a raft snapshot restore the index is rebuilt from the entries.
	snap, _ := a.fsm.Snapshot()
	var buf bytes.Buffer
	if err := snap.Persist(&buf); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	b := &applier{t: t, fsm: newFSM(t), index: a.index}
	if err := b.fsm.Restore(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := b.apply(CmdEntryCreate, t0, entry("entry-0005", "spiffe://example.org/a", "unix:uid:1")); err == nil {
		t.Fatal("duplicate accepted after restore")
	}
}

func TestConfigChangedIgnoresAudit(t *testing.T) {
	a := newApplier(t)
	cfg, any := a.fsm.ConfigChanged(), a.fsm.Changed()
	a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "x"}}})
	select {
	case <-cfg:
		t.Fatal("an audit record woke config watchers")
	default:
	}
	select {
	case <-any:
	default:
		t.Fatal("Changed did not fire")
	}
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/a", "unix:uid:1"))
	select {
	case <-cfg:
	default:
		t.Fatal("an entry change did not wake config watchers")
	}
}

// A change that concerns one agent (its entries, its renewal, its ban)
// wakes that agent's watchers only; a policy or bundle change wakes every
// agent's. A fleet's sync streams are not all woken by one agent renewing.
func TestAgentChangedWakesOnlyThatAgent(t *testing.T) {
	a := newApplier(t)
	const agentA, agentB = "spiffe://example.org/sigil/agent/tpm/abc", "spiffe://example.org/sigil/agent/tpm/def"
	woke := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
	step := func(what string, wantA, wantB bool, apply func()) {
		t.Helper()
		wa, wb := a.fsm.AgentChanged(agentA), a.fsm.AgentChanged(agentB)
		apply()
		if woke(wa) != wantA || woke(wb) != wantB {
			t.Fatalf("%s: agent A woken %v (want %v), agent B woken %v (want %v)", what, woke(wa), wantA, woke(wb), wantB)
		}
	}
	step("agent A joins", true, false, func() { a.must(CmdAgentUpsert, &Agent{ID: agentA, AttestationType: "test"}) })
	step("agent B joins", false, true, func() { a.must(CmdAgentUpsert, &Agent{ID: agentB, AttestationType: "test"}) })
	step("an entry for A", true, false, func() { a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/a", "unix:uid:1")) })
	step("an audit record", false, false, func() { a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "x"}}}) })
	moved := entry("entry-0001", "spiffe://example.org/a", "unix:uid:1")
	moved.ParentID = agentB
	step("the entry moved from A to B", true, true, func() { a.must(CmdEntryUpdate, moved) })
	step("B banned", false, true, func() { a.must(CmdAgentBan, AgentID{ID: agentB}) })
	step("a policy change", true, true, func() { a.must(CmdJoinTokensToggle, JoinTokens{Enabled: false}) })
}
