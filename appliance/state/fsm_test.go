package state

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/url"
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

// applier feeds commands with increasing raft indexes.
type applier struct {
	t     *testing.T
	fsm   *FSM
	index uint64
}

func newApplier(t *testing.T) *applier { return &applier{t: t, fsm: New(td)} }

func (a *applier) apply(typ string, at time.Time, payload any) ([]byte, error) {
	a.t.Helper()
	cmd, err := NewCommand(typ, admin, at, payload)
	if err != nil {
		a.t.Fatal(err)
	}
	a.index++
	return a.fsm.Apply(a.index, cmd)
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
		{"unknown payload field", CmdEntryDelete, map[string]string{"ID": "entry-0001", "Force": "yes"}, "unknown field"},
		{"unknown command", "entry.teleport", EntryID{ID: "entry-0001"}, "unknown command type"},
		{"ban unknown agent", CmdAgentBan, AgentID{ID: "spiffe://example.org/sigil/agent/x"}, "no agent"},
		{"bad EK hash", CmdEKAllowAdd, EKHash{Hash: "abc"}, "64 hex digits"},
		{"non-CA EK CA", CmdEKCAAdd, EKCAAdd{DER: []byte("junk")}, "EK CA certificate"},
		{"bad PCR", CmdPCRPolicySet, PCRPolicySet{Policy: &PCRPolicy{Bank: "sha256", PCRs: map[string]string{"24": strings.Repeat("0", 64)}}}, "PCR index"},
		{"empty audit", CmdAudit, AuditAppend{}, "no events"},
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
		"malformed":      `{"v":1,"type":`,
		"future version": `{"v":2,"type":"entry.delete","actor":"a","time":"2026-01-01T00:00:00Z","payload":{}}`,
		"no actor":       `{"v":1,"type":"entry.delete","time":"2026-01-01T00:00:00Z","payload":{"ID":"entry-0001"}}`,
		"unknown field":  `{"v":1,"type":"entry.delete","actor":"a","time":"2026-01-01T00:00:00Z","payload":{"ID":"entry-0001"},"sudo":true}`,
	} {
		if _, err := a.fsm.Apply(99, []byte(raw)); !errors.Is(err, ErrRefused) {
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
	if n, err := a.fsm.VerifyAuditLog(); err != nil {
		t.Fatalf("intact chain reported broken at %d: %v", n, err)
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
	rehashed[1].Hash = recordHash(&rehashed[1])
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
	arch, meta, err := a.fsm.WriteArchive("node-1", t0)
	if err != nil {
		t.Fatal(err)
	}
	if meta.Index != 10 {
		t.Fatalf("meta index %d", meta.Index)
	}

	// A second appliance of the same trust domain restores it through a
	// command, and the restore is audited on top of the restored chain.
	b := newApplier(t)
	b.must(CmdEntryCreate, entry("entry-zzzz", "spiffe://example.org/lost", "unix:uid:9"))
	st, _, sum, err := b.fsm.ReadArchive(arch)
	if err != nil {
		t.Fatal(err)
	}
	b.must(CmdStateRestore, StateRestore{State: st, Archive: sum})
	if len(b.fsm.Entries()) != 10 {
		t.Fatalf("%d entries after restore", len(b.fsm.Entries()))
	}
	recs := b.fsm.Audit(0, 0)
	if last := recs[len(recs)-1]; last.Action != CmdStateRestore || last.Detail["archive_sha256"] != sum || len(recs) != 11 {
		t.Fatalf("restore audit: %+v (%d records)", last, len(recs))
	}
	if _, err := b.fsm.VerifyAuditLog(); err != nil {
		t.Fatal(err)
	}

	// Damaged archives are refused before anything is parsed or replaced.
	before, _ := b.fsm.Export()
	flip := append([]byte(nil), arch...)
	flip[len(arch)/2] ^= 0x20
	badTD := func() []byte {
		o := New(spiffeid.RequireTrustDomainFromString("other.org"))
		x, _, _ := o.WriteArchive("n", t0)
		return x
	}()
	// An archive whose checksum is recomputed after editing the audit log
	// still fails: the audit chain does not verify.
	forged := func() []byte {
		s := strings.Replace(string(st), `"actor":"`+admin, `"actor":"spiffe://example.org/sigil/admin/mallory`, 1)
		ss := sha256.Sum256([]byte(s))
		var m ArchiveMeta
		json.Unmarshal([]byte(strings.SplitN(string(arch), "\n", 3)[1]), &m)
		m.Size, m.StateSHA256 = len(s), hex.EncodeToString(ss[:])
		mb, _ := json.Marshal(m)
		body := archiveMagic + string(mb) + "\n" + s + "\n"
		all := sha256.Sum256([]byte(body))
		return []byte(body + "sha256 " + hex.EncodeToString(all[:]) + "\n")
	}()
	cases := map[string][]byte{
		"empty":             nil,
		"not an archive":    []byte("hello\n"),
		"truncated header":  arch[:10],
		"truncated middle":  arch[:len(arch)/2],
		"missing last byte": arch[:len(arch)-1],
		"no trailer":        arch[:bytes.LastIndex(arch[:len(arch)-1], []byte("\n"))+1],
		"flipped byte":      flip,
		"other domain":      badTD,
		"forged audit":      forged,
	}
	for name, c := range cases {
		_, _, _, err := b.fsm.ReadArchive(c)
		t.Logf("%s: %v", name, err)
		if !errors.Is(err, ErrBadArchive) {
			t.Errorf("%s: %v, want ErrBadArchive", name, err)
		}
	}
	// The FSM refuses forged state even if a caller skips ReadArchive.
	if _, err := b.apply(CmdStateRestore, t0, StateRestore{State: []byte(strings.SplitN(string(forged), "\n", 4)[2]), Archive: "x"}); !errors.Is(err, ErrRefused) {
		t.Fatalf("forged restore command: %v", err)
	}
	if after, _ := b.fsm.Export(); !bytes.Equal(before, after) {
		t.Fatal("refused archives changed the state")
	}

	// Raft snapshots round-trip too.
	snap, _ := a.fsm.Snapshot()
	var buf bytes.Buffer
	snap.Persist(&buf)
	c := New(td)
	if err := c.Restore(&buf); err != nil {
		t.Fatal(err)
	}
	x, _ := a.fsm.Export()
	y, _ := c.Export()
	if !bytes.Equal(x, y) {
		t.Fatal("snapshot restore differs")
	}
	if err := c.Restore(strings.NewReader(`{"trust_domain":"example.org"`)); err == nil {
		t.Fatal("truncated raft snapshot accepted")
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
	snap.Persist(&buf)
	b := &applier{t: t, fsm: New(td), index: a.index}
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
