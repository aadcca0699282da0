package state

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	bolt "go.etcd.io/bbolt"
)

// ---------------------------------------------------------------------------
// Helpers shared by attack_test.go and retention_test.go (prefixed atk so
// they do not collide with other test files of the package).

// atkCA is a software trust chain: a root of spiffe://example.org (the
// ceremony's output shape) and an issuing CA it signed.
type atkCA struct {
	rootKey *ecdsa.PrivateKey
	root    *x509.Certificate
	rootDER []byte
	issKey  *ecdsa.PrivateKey
	iss     *x509.Certificate
	issDER  []byte
}

var atkSerial = big.NewInt(100)
var atkSerialMu sync.Mutex

func atkNextSerial() *big.Int {
	atkSerialMu.Lock()
	defer atkSerialMu.Unlock()
	atkSerial = new(big.Int).Add(atkSerial, big.NewInt(1))
	return atkSerial
}

// atkRootCert makes a self-signed CA with the one URI SAN a bundle root
// needs.
func atkRootCert(t testing.TB, cn string) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: atkNextSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(30 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return k, c, der
}

// atkNewCA makes a root and an issuing CA signed by it.
func atkNewCA(t testing.TB, name string) *atkCA {
	t.Helper()
	ca := &atkCA{}
	ca.rootKey, ca.root, ca.rootDER = atkRootCert(t, name+" root")
	ca.issKey, ca.iss, ca.issDER = atkIssuing(t, ca, name+" issuing", nil)
	return ca
}

// atkIssuing signs an issuing CA certificate with ca's root; mod may
// change the template.
func atkIssuing(t testing.TB, ca *atkCA, cn string, mod func(*x509.Certificate)) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.org/sigil/node/node-1")
	tmpl := &x509.Certificate{SerialNumber: atkNextSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(30 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		URIs: []*url.URL{u}}
	if mod != nil {
		mod(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.root, &k.PublicKey, ca.rootKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return k, c, der
}

// signHead is an Options.SignHead with the software issuing key.
func (ca *atkCA) signHead(digest []byte) ([]byte, []byte, error) {
	sig, err := ecdsa.SignASN1(rand.Reader, ca.issKey, digest)
	return sig, ca.issDER, err
}

// checkpoint builds a checkpoint of (seq, hash) signed by the issuing key.
func (ca *atkCA) checkpoint(t testing.TB, node string, seq uint64, hash string) AuditCheckpoint {
	t.Helper()
	sig, cert, err := ca.signHead(CheckpointDigest(td.Name(), seq, hash))
	if err != nil {
		t.Fatal(err)
	}
	return AuditCheckpoint{Seq: seq, Hash: hash, Node: node, Cert: cert, Signature: sig}
}

// atkApplyAs applies one command with an explicit actor and raft origin at
// the applier's next index.
func atkApplyAs(a *applier, origin, actor, typ string, at time.Time, payload any) ([]byte, error) {
	a.t.Helper()
	cmd := testCommand(a.t, typ, actor, "", at, payload)
	a.index++
	return a.fsm.Apply(a.index, origin, cmd)
}

// atkSnapshot persists a raft snapshot of f.
func atkSnapshot(t testing.TB, f *FSM) []byte {
	t.Helper()
	s, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Release()
	var b bytes.Buffer
	if err := s.Persist(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// atkClone is a new replica restored from a raft snapshot, with an applier
// that continues after the snapshot's index.
func atkClone(t *testing.T, snap []byte) *applier {
	t.Helper()
	f := newFSM(t)
	if err := f.Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}
	return &applier{t: t, fsm: f, index: f.AppliedIndex()}
}

func atkExport(t testing.TB, f *FSM) []byte {
	t.Helper()
	b, err := f.Export()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// atkForge restores base into a scratch replica, edits its bolt file
// directly (no validation), and writes an archive of it: the writer
// computes a valid checksum, so only the semantic checks can catch it.
func atkForge(t *testing.T, base []byte, edit func(tx *bolt.Tx) error) []byte {
	t.Helper()
	f := newFSM(t)
	if err := f.Restore(bytes.NewReader(base)); err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		if err := f.db.Update(edit); err != nil {
			t.Fatalf("forge: %v", err)
		}
	}
	var b bytes.Buffer
	if _, err := f.WriteArchive(&b, "node-1", t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// atkRewriteAudit replaces the audit log in tx with edit(records): when
// renumber is set the records are renumbered from the first one's
// sequence number; prev and hash are recomputed along the whole chain and
// the meta audit head follows, so the log is internally consistent.
func atkRewriteAudit(tx *bolt.Tx, renumber bool, edit func([]AuditRecord) []AuditRecord) error {
	ab := tx.Bucket(bAudit)
	var recs []AuditRecord
	var keys [][]byte
	if err := ab.ForEach(func(k, v []byte) error {
		var r AuditRecord
		if err := decodeStrict(v, &r); err != nil {
			return err
		}
		recs = append(recs, r)
		keys = append(keys, bytes.Clone(k))
		return nil
	}); err != nil {
		return err
	}
	if len(recs) == 0 {
		return errors.New("no audit records")
	}
	first, prev := recs[0].Seq, recs[0].Prev
	for _, k := range keys {
		if err := ab.Delete(k); err != nil {
			return err
		}
	}
	recs = edit(recs)
	for i := range recs {
		r := &recs[i]
		if renumber {
			r.Seq = first + uint64(i)
		}
		r.Prev = prev
		var err error
		if r.Hash, err = recordHash(r); err != nil {
			return err
		}
		prev = r.Hash
		if err := putJSON(ab, u64Key(r.Seq), r); err != nil {
			return err
		}
	}
	last := recs[len(recs)-1]
	return putJSON(tx.Bucket(bMeta), keyAuditHead, AuditHead{Seq: last.Seq, Hash: last.Hash, First: recs[0].Seq})
}

// atkFrame is one frame of a SIGIL-STATE 2 stream.
type atkFrame struct {
	kind       byte
	key, value []byte
}

// atkParseStream splits a state stream into its header line and frames,
// checking the trailer.
func atkParseStream(t testing.TB, b []byte) (header []byte, frames []atkFrame) {
	t.Helper()
	r := bufio.NewReader(bytes.NewReader(b))
	magic, err := r.ReadString('\n')
	if err != nil || magic != streamMagic {
		t.Fatalf("magic %q: %v", magic, err)
	}
	header, err = r.ReadBytes('\n')
	if err != nil {
		t.Fatal(err)
	}
	header = header[:len(header)-1]
	for {
		kind, err := r.ReadByte()
		if err != nil {
			t.Fatal(err)
		}
		if kind == frameEnd {
			break
		}
		chunk := func() []byte {
			n, err := binary.ReadUvarint(r)
			if err != nil {
				t.Fatal(err)
			}
			c := make([]byte, n)
			if _, err := io.ReadFull(r, c); err != nil {
				t.Fatal(err)
			}
			return c
		}
		k := chunk()
		frames = append(frames, atkFrame{kind, k, chunk()})
	}
	rest, _ := io.ReadAll(r)
	body := b[:len(b)-len(rest)]
	sum := sha256.Sum256(body)
	if string(rest) != "sha256 "+hex.EncodeToString(sum[:])+"\n" {
		t.Fatalf("trailer %q does not match", rest)
	}
	return header, frames
}

// atkBuildStream writes a state stream with a correct trailer.
func atkBuildStream(header []byte, frames []atkFrame) []byte {
	var b bytes.Buffer
	b.WriteString(streamMagic)
	b.Write(header)
	b.WriteByte('\n')
	var n [binary.MaxVarintLen64]byte
	for _, f := range frames {
		b.WriteByte(f.kind)
		b.Write(n[:binary.PutUvarint(n[:], uint64(len(f.key)))])
		b.Write(f.key)
		b.Write(n[:binary.PutUvarint(n[:], uint64(len(f.value)))])
		b.Write(f.value)
	}
	b.WriteByte(frameEnd)
	sum := sha256.Sum256(b.Bytes())
	fmt.Fprintf(&b, "sha256 %s\n", hex.EncodeToString(sum[:]))
	return b.Bytes()
}

func atkMustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func atkPKIX(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func atkTokenID(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// ---------------------------------------------------------------------------

const (
	atkAgentA = "spiffe://example.org/sigil/agent/tpm/aaaa"
	atkAgentB = "spiffe://example.org/sigil/agent/tpm/bbbb"
	atkAgentC = "spiffe://example.org/sigil/agent/join_token/cccc"
)

// atkScene is the legitimate history the forgeries are made from.
type atkScene struct {
	ca         *atkCA
	jwtKey     JWTKey
	tokA, tokB string
	archiveOld []byte // before agent B was banned
	archive    []byte // the legitimate archive
	base       []byte // raft snapshot at the archive
	victim     []byte // raft snapshot of the current state (after more changes)
	archHead   uint64
}

func atkBuildScene(t *testing.T) *atkScene {
	s := &atkScene{ca: atkNewCA(t, "scene")}
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{s.ca.rootDER}})
	for i := 1; i <= 5; i++ {
		a.must(CmdEntryCreate, entry(fmt.Sprintf("entry-%04d", i), fmt.Sprintf("spiffe://example.org/svc/%d", i), fmt.Sprintf("unix:uid:%d", 1000+i)))
	}
	a.must(CmdAgentUpsert, &Agent{ID: atkAgentA, AttestationType: "tpm", Facts: map[string]string{"ek": "a"}})
	a.must(CmdAgentUpsert, &Agent{ID: atkAgentB, AttestationType: "tpm", Facts: map[string]string{"ek": "b"}})
	s.jwtKey = JWTKey{KID: "node-1-000000000001", Node: "node-1", PublicKey: atkPKIX(t), NotAfter: t0.Add(24 * time.Hour), CA: atkNodeCADER(t, s.ca, "node-1")}
	a.must(CmdJWTKeyAdd, &s.jwtKey)
	s.tokA, s.tokB = atkTokenID("token-a"), atkTokenID("token-b")
	a.must(CmdTokenCreate, TokenCreate{ID: s.tokA, ExpiresAt: t0.Add(time.Hour)})
	a.must(CmdTokenCreate, TokenCreate{ID: s.tokB, ExpiresAt: t0.Add(time.Hour)})
	a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "cluster.join", Target: "node-2"}, {Action: "cluster.join", Target: "node-3"}, {Action: "admin.cert.issue", Target: "bob"}}})
	var old bytes.Buffer
	if _, err := a.fsm.WriteArchive(&old, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	s.archiveOld = old.Bytes()

	a.must(CmdAgentBan, AgentID{ID: atkAgentB})
	var arch bytes.Buffer
	if _, err := a.fsm.WriteArchive(&arch, "node-1", t0); err != nil {
		t.Fatal(err)
	}
	s.archive = arch.Bytes()
	s.base = atkSnapshot(t, a.fsm)
	s.archHead, _ = a.fsm.AuditHead()

	// Changes after the archive.
	a.must(CmdEntryDelete, EntryID{ID: "entry-0003"})
	a.must(CmdEntryCreate, entry("entry-0006", "spiffe://example.org/svc/6", "unix:uid:1006"))
	if _, err := a.apply(CmdTokenUse, t0.Add(time.Minute), TokenUse{ID: s.tokA, Agent: atkAgentC}); err != nil {
		t.Fatal(err)
	}
	a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "cluster.remove", Target: "node-3"}}})
	s.victim = atkSnapshot(t, a.fsm)
	return s
}

// restoreAt is when the restores are proposed: the archive's tokens are
// still unexpired.
var restoreAt = t0.Add(10 * time.Minute)

// atkTryRestore checks an archive against a fresh copy of the victim: it
// must be refused, by ReadArchive (ErrBadArchive) or by the state.restore
// command (ErrRefused), with want in the reason, and change nothing.
func atkTryRestore(t *testing.T, victim, archive []byte, want string) (stage string) {
	t.Helper()
	v := atkClone(t, victim)
	before := atkExport(t, v.fsm)
	defer func() {
		if after := atkExport(t, v.fsm); !bytes.Equal(before, after) {
			t.Fatalf("refused archive changed the state")
		}
	}()
	p, _, _, err := v.fsm.ReadArchive(bytes.NewReader(archive), t.TempDir())
	if err != nil {
		if !errors.Is(err, ErrBadArchive) || !strings.Contains(err.Error(), want) {
			t.Fatalf("ReadArchive: %v; want ErrBadArchive naming %q", err, want)
		}
		t.Logf("ReadArchive refused: %v", err)
		return "read"
	}
	_, err = v.apply(CmdStateRestore, restoreAt, p)
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), want) {
		t.Fatalf("state.restore: %v; want ErrRefused naming %q", err, want)
	}
	t.Logf("state.restore refused: %v", err)
	return "apply"
}

func TestAttackForgedArchive(t *testing.T) {
	s := atkBuildScene(t)
	attackerRoot := func() []byte { _, _, der := atkRootCert(t, "attacker root"); return der }()

	putEntry := func(e *Entry) func(tx *bolt.Tx) error {
		return func(tx *bolt.Tx) error {
			e.CreatedAt, e.UpdatedAt, e.Revision = t0, t0, 3
			return putJSON(tx.Bucket(bEntries), []byte(e.ID), e)
		}
	}
	adminEntry := entry("entry-evil-admin", "spiffe://example.org/sigil/admin/x", "unix:uid:0")

	cases := []struct {
		name  string
		base  []byte
		edit  func(tx *bolt.Tx) error
		want  string
		stage string // "read" or "apply": where it is caught today
	}{
		{"a admin entry", s.base, putEntry(adminEntry), "reserved for the appliance", ""},
		{"b node entry", s.base, putEntry(entry("entry-evil-node", "spiffe://example.org/sigil/node/node-1", "unix:uid:0")), "reserved for the appliance", ""},
		{"c attacker root", s.base, func(tx *bolt.Tx) error {
			var roots [][]byte
			if _, err := getJSON(tx.Bucket(bMeta), keyRoots, &roots); err != nil {
				return err
			}
			return putJSON(tx.Bucket(bMeta), keyRoots, append(roots, attackerRoot))
		}, "X.509 root 1", ""},
		{"c2 attacker root replaces ours", s.base, func(tx *bolt.Tx) error {
			return putJSON(tx.Bucket(bMeta), keyRoots, [][]byte{attackerRoot})
		}, "not in this appliance's trust bundle", ""},
		{"d attacker JWT key", s.base, func(tx *bolt.Tx) error {
			k := JWTKey{KID: "node-1-attacker0001", Node: "node-1", PublicKey: atkPKIX(t), NotAfter: t0.Add(24 * time.Hour)}
			return putJSON(tx.Bucket(bJWTKeys), []byte(k.KID), k)
		}, "JWT key node-1-attacker0001 is not in this appliance's trust bundle", ""},
		{"d2 our kid, attacker's public key", s.base, func(tx *bolt.Tx) error {
			k := s.jwtKey
			k.PublicKey = atkPKIX(t)
			return putJSON(tx.Bucket(bJWTKeys), []byte(k.KID), k)
		}, "JWT key " + s.jwtKey.KID + " is not in this appliance's trust bundle", ""},
		{"e records deleted, renumbered, chain recomputed", s.base, func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, true, func(r []AuditRecord) []AuditRecord { return slices.Delete(r, 2, 4) })
		}, "history was rewritten", "apply"},
		{"e2 records deleted, chain recomputed, gap left", s.base, func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord { return slices.Delete(r, 2, 4) })
		}, "audit chain breaks at record 5", "read"},
		{"e3 record altered, chain recomputed", s.base, func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord {
				r[1].Actor = "spiffe://example.org/sigil/admin/mallory"
				return r
			})
		}, "history was rewritten", "apply"},
		{"e4 invented record after the current head", s.victim, func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord {
				return append(r, AuditRecord{Seq: r[len(r)-1].Seq + 1, Index: 999, Time: t0, Actor: admin, Origin: "node-1", Action: "entry.create", Target: "spiffe://example.org/backdoor"})
			})
		}, "is past this appliance's head", "apply"},
		{"f unknown agent", s.base, func(tx *bolt.Tx) error {
			ag := Agent{ID: "spiffe://example.org/sigil/agent/tpm/evil", AttestationType: "tpm", JoinedAt: t0, UpdatedAt: t0, Revision: 3}
			return putJSON(tx.Bucket(bAgents), []byte(ag.ID), ag)
		}, "agent spiffe://example.org/sigil/agent/tpm/evil is not known", ""},
		{"h planted join token", s.base, func(tx *bolt.Tx) error {
			tk := JoinToken{ID: atkTokenID("planted"), ExpiresAt: t0.Add(time.Hour), CreatedBy: admin, CreatedAt: t0}
			return putJSON(tx.Bucket(bTokens), []byte(tk.ID), tk)
		}, "join token " + atkTokenID("planted")[:12] + " is not known", ""},
		{"i2 two entries, one registration", s.base, putEntry(entry("entry-0099", "spiffe://example.org/svc/1", "unix:uid:1001")), "register the same thing", "read"},
		{"i3 one registration, selectors reordered", s.base, func(tx *bolt.Tx) error {
			// Two entries registering the same thing, the second with its
			// selectors in another order.
			if err := putEntry(entry("entry-0097", "spiffe://example.org/multi", "unix:gid:1", "unix:uid:1"))(tx); err != nil {
				return err
			}
			return putEntry(entry("entry-0098", "spiffe://example.org/multi", "unix:uid:1", "unix:gid:1"))(tx)
		}, "selectors not in canonical order", "read"},
		{"i4 entry stored under another id", s.base, func(tx *bolt.Tx) error {
			e := entry("entry-0001", "spiffe://example.org/svc/77", "unix:uid:77")
			e.CreatedAt, e.UpdatedAt = t0, t0
			return putJSON(tx.Bucket(bEntries), []byte("entry-zzzz"), e)
		}, "has id", "read"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			forged := atkForge(t, tc.base, tc.edit)
			stage := atkTryRestore(t, s.victim, forged, tc.want)
			if tc.stage != "" && stage != tc.stage {
				t.Errorf("caught at %s, expected at %s", stage, tc.stage)
			}
		})
	}

	// (i) A registration-index lie is not representable: indexes are not in
	// the stream, so lies planted in them do not reach the archive.
	t.Run("i index lies do not reach the archive", func(t *testing.T) {
		clean := atkForge(t, s.base, nil)
		lied := atkForge(t, s.base, func(tx *bolt.Tx) error {
			if err := tx.Bucket(bEntriesByReg).Put([]byte("spiffe://example.org/x\x00spiffe://example.org/sigil/agent/tpm/abc\x00unix:uid:1"), []byte("entry-0001")); err != nil {
				return err
			}
			if err := tx.Bucket(bEntriesByParent).Put(indexKey("spiffe://example.org/sigil/agent/tpm/evil", "entry-0001"), nil); err != nil {
				return err
			}
			if err := tx.Bucket(bEntriesBySPIFFE).Put(indexKey("spiffe://example.org/sigil/admin/x", "entry-0002"), nil); err != nil {
				return err
			}
			return tx.Bucket(bEntriesByReg).Delete([]byte(registrationKey(entry("entry-0002", "spiffe://example.org/svc/2", "unix:uid:1002"))))
		})
		if !bytes.Equal(clean, lied) {
			t.Fatal("index rows reached the archive")
		}
		// Hand-written frames that try to carry an index, the applied
		// index or the audit head, or break the order, are refused.
		hdr, frames := atkParseStream(t, clean)
		withFrame := func(f atkFrame) []atkFrame {
			out := append([]atkFrame(nil), frames...)
			i := slices.IndexFunc(out, func(x atkFrame) bool {
				return x.kind > f.kind || x.kind == f.kind && bytes.Compare(x.key, f.key) > 0
			})
			if i < 0 {
				i = len(out)
			}
			return slices.Insert(out, i, f)
		}
		head := atkMustJSON(t, AuditHead{Seq: 1, Hash: strings.Repeat("0", 64), First: 1})
		for name, c := range map[string]struct {
			frames []atkFrame
			want   string
		}{
			"meta index":         {withFrame(atkFrame{frameMeta, keyIndex, u64Key(1)}), "unknown meta key"},
			"meta audit head":    {withFrame(atkFrame{frameMeta, keyAuditHead, head}), "unknown meta key"},
			"index bucket frame": {append(append([]atkFrame(nil), frames...), atkFrame{frameFederation + 1, []byte("x"), []byte("entry-0001")}), "unknown frame kind"},
			"out of order": {func() []atkFrame {
				out := append([]atkFrame(nil), frames...)
				i := slices.IndexFunc(out, func(x atkFrame) bool { return x.kind == frameEntry })
				out[i], out[i+1] = out[i+1], out[i]
				return out
			}(), "out of order"},
		} {
			stage := atkTryRestore(t, s.victim, atkBuildStream(hdr, c.frames), c.want)
			if stage != "read" {
				t.Errorf("%s: caught at %s", name, stage)
			}
		}
	})

	// (g) A banned agent shown unbanned: a restore never rolls agents back,
	// so the ban stays in force whatever the archive says.
	t.Run("g banned agent shown unbanned", func(t *testing.T) {
		forged := atkForge(t, s.base, func(tx *bolt.Tx) error {
			var ag Agent
			if _, err := getJSON(tx.Bucket(bAgents), []byte(atkAgentB), &ag); err != nil {
				return err
			}
			if !ag.Banned {
				return errors.New("agent B is not banned in the base")
			}
			ag.Banned = false
			return putJSON(tx.Bucket(bAgents), []byte(atkAgentB), ag)
		})
		v := atkClone(t, s.victim)
		before := atkExport(t, v.fsm)
		p, _, _, err := v.fsm.ReadArchive(bytes.NewReader(forged), t.TempDir())
		if err == nil {
			_, err = v.apply(CmdStateRestore, restoreAt, p)
		}
		if err != nil {
			// Refusing it is fine too, as long as nothing changed.
			t.Logf("refused: %v", err)
			if !bytes.Equal(before, atkExport(t, v.fsm)) {
				t.Fatal("refused archive changed the state")
			}
		}
		if ag, ok := v.fsm.Agent(atkAgentB); !ok || !ag.Banned {
			t.Fatalf("agent B after restoring a forged archive: %+v (found %v); the ban must stay", ag, ok)
		}
	})
	t.Run("g older archive before the ban", func(t *testing.T) {
		v := atkClone(t, s.victim)
		p, _, _, err := v.fsm.ReadArchive(bytes.NewReader(s.archiveOld), t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.apply(CmdStateRestore, restoreAt, p); err != nil {
			t.Fatal(err)
		}
		if ag, _ := v.fsm.Agent(atkAgentB); !ag.Banned {
			t.Fatal("restoring an archive from before the ban unbanned the agent")
		}
		// A banned agent still cannot re-attest.
		if _, err := v.apply(CmdAgentUpsert, restoreAt, &Agent{ID: atkAgentB, AttestationType: "tpm"}); !errors.Is(err, ErrRefused) {
			t.Fatalf("banned agent re-attested after the restore: %v", err)
		}
	})

	// The FSM itself refuses crafted payloads that skip ReadArchive.
	t.Run("crafted payloads through Apply", func(t *testing.T) {
		v := atkClone(t, s.victim)
		legit, _, _, err := v.fsm.ReadArchive(bytes.NewReader(s.archive), t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		legitJSON := atkMustJSON(t, legit)
		clone := func() *StateRestore {
			var p StateRestore
			if err := json.Unmarshal(legitJSON, &p); err != nil {
				t.Fatal(err)
			}
			return &p
		}
		before := atkExport(t, v.fsm)
		evilKey := JWTKey{KID: "node-1-attacker0002", Node: "node-1", PublicKey: atkPKIX(t), NotAfter: t0.Add(time.Hour)}
		planted := JoinToken{ID: atkTokenID("planted-2"), ExpiresAt: t0.Add(time.Hour), CreatedBy: admin, CreatedAt: t0}
		for _, c := range []struct {
			name string
			mod  func(p *StateRestore)
			want []string
		}{
			{"a admin entry", func(p *StateRestore) { p.Entries = append(p.Entries, *adminEntry) }, []string{"entry-evil-admin", "reserved"}},
			{"b node entry", func(p *StateRestore) {
				p.Entries = append(p.Entries, *entry("entry-evil-node", "spiffe://example.org/sigil/node/node-2", "unix:uid:0"))
			}, []string{"entry-evil-node", "reserved"}},
			{"c attacker root", func(p *StateRestore) { p.Roots = append(p.Roots, attackerRoot) }, []string{"X.509 root 1", "not in this appliance's trust bundle"}},
			{"d attacker JWT key", func(p *StateRestore) { p.JWTKeys = append(p.JWTKeys, evilKey) }, []string{"JWT key node-1-attacker0002 is not in"}},
			{"f unknown agent", func(p *StateRestore) { p.Agents = append(p.Agents, "spiffe://example.org/sigil/agent/tpm/evil") }, []string{"agent spiffe://example.org/sigil/agent/tpm/evil is not known"}},
			{"h planted token", func(p *StateRestore) { p.Tokens = append(p.Tokens, planted) }, []string{"join token " + planted.ID[:12] + " is not known"}},
			{"forged head hash", func(p *StateRestore) { p.AuditHead = strings.Repeat("ab", 32) }, []string{"history was rewritten"}},
			{"no audit head", func(p *StateRestore) { p.AuditHeadSeq, p.AuditHead = 0, "" }, []string{"no audit log"}},
			{"duplicate entry id", func(p *StateRestore) {
				e := p.Entries[0]
				e.SPIFFEID = "spiffe://example.org/elsewhere"
				p.Entries = append(p.Entries, e)
			}, []string{"appears twice"}},
			{"malformed revocation", func(p *StateRestore) {
				p.Revocations = append(p.Revocations, Revocation{Serial: "zz", Node: "node-1", NotAfter: t0.Add(time.Hour)})
			}, []string{"revocation"}},
			{"everything at once", func(p *StateRestore) {
				p.Entries = append(p.Entries, *adminEntry)
				p.Roots = append(p.Roots, attackerRoot)
				p.JWTKeys = append(p.JWTKeys, evilKey)
				p.Agents = append(p.Agents, "spiffe://example.org/sigil/agent/tpm/evil")
				p.Tokens = append(p.Tokens, planted)
			}, []string{"5 problem(s)", "reserved", "X.509 root 1", "node-1-attacker0002", "tpm/evil", planted.ID[:12]}},
		} {
			p := clone()
			c.mod(p)
			_, err := v.apply(CmdStateRestore, restoreAt, p)
			if !errors.Is(err, ErrRefused) {
				t.Fatalf("%s: %v, want refusal", c.name, err)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%s: refusal %q does not name %q", c.name, err, w)
				}
			}
			if after := atkExport(t, v.fsm); !bytes.Equal(before, after) {
				t.Fatalf("%s: refused restore changed the state", c.name)
			}
		}
		// The unmodified payload is accepted by the same replica.
		if _, err := v.apply(CmdStateRestore, restoreAt, clone()); err != nil {
			t.Fatalf("legitimate payload refused: %v", err)
		}
	})

	// A legitimate older archive restores: entries roll back, nothing else
	// the restore must not touch moves, and the audit log keeps every record
	// with exactly one more on top.
	t.Run("legitimate older archive", func(t *testing.T) {
		v := atkClone(t, s.victim)
		recsBefore := v.fsm.Audit(0, 0)
		headBefore, _ := v.fsm.AuditHead()
		bundleBefore := v.fsm.Bundle()
		agentsBefore := v.fsm.Agents()
		p, meta, sum, err := v.fsm.ReadArchive(bytes.NewReader(s.archive), t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if meta.AuditHeadSeq != s.archHead || meta.Entries != 5 || meta.Agents != 2 {
			t.Fatalf("archive meta %+v", meta)
		}
		if _, err := v.apply(CmdStateRestore, restoreAt, p); err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, e := range v.fsm.Entries() {
			ids = append(ids, e.ID)
		}
		if strings.Join(ids, ",") != "entry-0001,entry-0002,entry-0003,entry-0004,entry-0005" {
			t.Fatalf("entries after restore: %v", ids)
		}
		if got := v.fsm.EntriesBySPIFFEID("spiffe://example.org/svc/3"); len(got) != 1 {
			t.Fatalf("index not rebuilt: %v", got)
		}
		head, _ := v.fsm.AuditHead()
		if head != headBefore+1 {
			t.Fatalf("audit head %d, want %d", head, headBefore+1)
		}
		recs := v.fsm.Audit(0, 0)
		if len(recs) != len(recsBefore)+1 || !slices.EqualFunc(recs[:len(recsBefore)], recsBefore, func(a, b AuditRecord) bool {
			return a.Hash == b.Hash && a.Seq == b.Seq
		}) {
			t.Fatal("the restore changed the audit history")
		}
		last := recs[len(recs)-1]
		if last.Action != CmdStateRestore || last.Detail["archive_sha256"] != sum || last.Detail["entries_added"] != "1" || last.Detail["entries_removed"] != "1" {
			t.Fatalf("restore record %+v", last)
		}
		if rep := v.fsm.VerifyAuditLog([]*x509.Certificate{s.ca.root}); !rep.Intact {
			t.Fatalf("audit after restore: %+v", rep)
		}
		// Tokens: the used one stays used (the archive shows it unused).
		if tk, ok := v.fsm.Token(s.tokA); !ok || tk.UsedBy != atkAgentC {
			t.Fatalf("used token after restore: %+v %v", tk, ok)
		}
		if _, ok := v.fsm.Token(s.tokB); !ok {
			t.Fatal("unused token lost")
		}
		b := v.fsm.Bundle()
		if !slices.EqualFunc(b.Roots, bundleBefore.Roots, bytes.Equal) || len(b.JWTKeys) != len(bundleBefore.JWTKeys) {
			t.Fatal("restore changed the bundle")
		}
		if got := v.fsm.Agents(); len(got) != len(agentsBefore) {
			t.Fatal("restore changed the agents")
		}
		if ag, _ := v.fsm.Agent(atkAgentB); !ag.Banned {
			t.Fatal("ban lost")
		}
		// The forged archives are still refused after the restore.
		forged := atkForge(t, s.base, putEntry(adminEntry))
		if _, _, _, err := v.fsm.ReadArchive(bytes.NewReader(forged), t.TempDir()); !errors.Is(err, ErrBadArchive) {
			t.Fatalf("forged archive after restore: %v", err)
		}
	})
}

func TestAttackForgedActor(t *testing.T) {
	ca := atkNewCA(t, "actor")
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{ca.rootDER}})
	a.must(CmdAgentUpsert, &Agent{ID: atkAgentA, AttestationType: "tpm"})
	a.must(CmdEntryCreate, entry("entry-0001", "spiffe://example.org/web", "unix:uid:1"))
	before := atkExport(t, a.fsm)

	node1 := "spiffe://example.org/sigil/node/node-1"
	node2 := "spiffe://example.org/sigil/node/node-2"
	jwtFor := func(node string) *JWTKey {
		return &JWTKey{KID: "forged-key-" + node, Node: node, PublicKey: atkPKIX(t), NotAfter: t0.Add(time.Hour), CA: atkNodeCADER(t, ca, node)}
	}
	issue := AuditAppend{Events: []AuditEvent{{Action: "svid.x509.issue", Target: "spiffe://example.org/web",
		Detail: map[string]string{"agent": atkAgentA, "serial": "abcd", "expires": t0.Add(time.Hour).Format(time.RFC3339), "node": "node-1"}}}}
	seq, hash := a.fsm.AuditHead()
	cp := ca.checkpoint(t, "node-1", seq, hash)
	newEntry := entry("entry-0002", "spiffe://example.org/api", "unix:uid:2")

	type tc struct {
		name, origin, actor, typ string
		payload                  any
		want                     string
	}
	cases := []tc{
		{"node-2 as node-1", "node-2", node1, CmdAgentUpsert, &Agent{ID: atkAgentB, AttestationType: "tpm"}, "node node-2 proposed a command as " + node1},
		{"node-2 as node-1 publishing a JWT key", "node-2", node1, CmdJWTKeyAdd, jwtFor("node-1"), "node node-2 proposed a command as"},
		{"node-2 publishing node-1's JWT key", "node-2", node2, CmdJWTKeyAdd, jwtFor("node-1"), "a node publishes only its own keys"},
		{"node-2 checkpointing as node-1", "node-2", node2, CmdAuditCheckpoint, cp, "checkpoint for node \"node-1\" proposed by node node-2"},
		{"node-2 as node-1's local admin", "node-2", "local:uid=0@node-1", CmdEntryCreate, newEntry, "another node's local admin"},
		{"empty origin, admin", "", admin, CmdEntryCreate, newEntry, "no authenticated origin"},
		{"empty origin, node", "", node1, CmdAgentUpsert, &Agent{ID: atkAgentB, AttestationType: "tpm"}, "no authenticated origin"},
		{"admin creates an entry as a node", "node-1", node1, CmdEntryCreate, newEntry, "may be proposed only for an admin"},
		{"node bans an agent", "node-1", node1, CmdAgentBan, AgentID{ID: atkAgentA}, "may be proposed only for an admin"},
		{"node creates a token", "node-1", node1, CmdTokenCreate, TokenCreate{ID: atkTokenID("x"), ExpiresAt: t0.Add(time.Hour)}, "may be proposed only for an admin"},
		{"node restores", "node-1", node1, CmdStateRestore, StateRestore{}, "may be proposed only for an admin"},
		{"foreign trust domain admin", "node-1", "spiffe://evil.org/sigil/admin/alice", CmdEntryCreate, newEntry, "is not a node or an admin"},
		{"agent actor", "node-1", atkAgentA, CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "x"}}}, "is not a node or an admin"},
		{"nested admin path", "node-1", "spiffe://example.org/sigil/admin/a/b", CmdEntryCreate, newEntry, "is not a node or an admin"},
		{"local without node", "node-1", "local:uid=0@", CmdEntryCreate, newEntry, "is not a node or an admin"},
		{"workload actor", "node-1", "spiffe://example.org/web", CmdEntryCreate, newEntry, "is not a node or an admin"},
	}
	for _, typ := range []string{CmdIssue, CmdAgentUpsert, CmdJWTKeyAdd, CmdTokenUse, CmdBundleSetRoots, CmdAuditCheckpoint, CmdAuditPrune, CmdJWTKeyRemove} {
		var p any
		switch typ {
		case CmdIssue:
			p = issue
		case CmdAgentUpsert:
			p = &Agent{ID: atkAgentB, AttestationType: "tpm"}
		case CmdJWTKeyAdd:
			p = jwtFor("node-1")
		case CmdTokenUse:
			p = TokenUse{ID: atkTokenID("x"), Agent: atkAgentB}
		case CmdBundleSetRoots:
			p = BundleRoots{Roots: [][]byte{ca.rootDER}}
		case CmdAuditCheckpoint:
			p = cp
		case CmdAuditPrune:
			p = AuditPrune{Before: 2}
		case CmdJWTKeyRemove:
			p = JWTKeyRemove{KID: "x"}
		}
		cases = append(cases,
			tc{"admin proposes " + typ, "node-1", admin, typ, p, "may be proposed only by a node itself"},
			tc{"local admin proposes " + typ, "node-1", "local:uid=0@node-1", typ, p, "may be proposed only by a node itself"})
	}
	for _, action := range []string{CmdAuditCheckpoint, "svid.x509.issue", "svid.jwt.issue", CmdAuditPrune, CmdStateRestore} {
		ev := AuditAppend{Events: []AuditEvent{{Action: "ok.event"}, {Action: action, Target: "x", Detail: map[string]string{"seq": "1", "agent": atkAgentA, "serial": "ff", "expires": t0.Add(time.Hour).Format(time.RFC3339)}}}}
		cases = append(cases,
			tc{"admin appends " + action, "node-1", admin, CmdAudit, ev, "is recorded only by its own command"},
			tc{"node appends " + action, "node-1", node1, CmdAudit, ev, "is recorded only by its own command"})
		if !strings.HasPrefix(action, "svid.") {
			cases = append(cases, tc{"issue carrying " + action, "node-1", node1, CmdIssue, ev, "svid.issue carries svid.* and join.* events only"})
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := atkApplyAs(a, c.origin, c.actor, c.typ, t0, c.payload)
			if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a refusal naming %q", err, c.want)
			}
			if after := atkExport(t, a.fsm); !bytes.Equal(before, after) {
				t.Fatal("a refused command changed the state")
			}
		})
	}
	if _, ok := a.fsm.Agent(atkAgentB); ok {
		t.Fatal("forged agent upsert landed")
	}

	// An admin vouched for by node-2 is accepted and recorded with node-2
	// as its origin; so is node-2's own local admin.
	if _, err := atkApplyAs(a, "node-2", admin, CmdEntryCreate, t0, newEntry); err != nil {
		t.Fatal(err)
	}
	recs := a.fsm.Audit(0, 0)
	if last := recs[len(recs)-1]; last.Action != CmdEntryCreate || last.Actor != admin || last.Origin != "node-2" {
		t.Fatalf("record of an admin change via node-2: %+v", last)
	}
	if _, err := atkApplyAs(a, "node-2", "local:uid=0@node-2", CmdEntryDelete, t0, EntryID{ID: "entry-0002"}); err != nil {
		t.Fatal(err)
	}
	recs = a.fsm.Audit(0, 0)
	if last := recs[len(recs)-1]; last.Actor != "local:uid=0@node-2" || last.Origin != "node-2" {
		t.Fatalf("record of a local admin change: %+v", last)
	}
	// node-2 publishes its own key.
	if _, err := atkApplyAs(a, "node-2", node2, CmdJWTKeyAdd, t0, jwtFor("node-2")); err != nil {
		t.Fatal(err)
	}
	if rep := a.fsm.VerifyAuditLog([]*x509.Certificate{ca.root}); !rep.Intact {
		t.Fatalf("%+v", rep)
	}
}

func TestAttackCheckpointForgery(t *testing.T) {
	ca := atkNewCA(t, "cp")
	roots := []*x509.Certificate{ca.root}
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{ca.rootDER}})
	for i := 0; i < 10; i++ {
		a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "test.event", Target: fmt.Sprint(i)}}})
	}
	seq, hash := a.fsm.AuditHead() // 11
	before := atkExport(t, a.fsm)

	// Forgeries refused at commit.
	other := atkNewCA(t, "other") // same trust domain name, another root
	rogueKey, _, rogueDER := atkIssuing(t, other, "rogue issuing", nil)
	rogueSig, _ := ecdsa.SignASN1(rand.Reader, rogueKey, CheckpointDigest(td.Name(), seq, hash))
	good := ca.checkpoint(t, "node-1", seq, hash)
	wrongSeq := ca.checkpoint(t, "node-1", seq-1, hash)
	wrongSeq.Seq = seq
	badSig := good
	badSig.Signature = append([]byte(nil), good.Signature...)
	badSig.Signature[len(badSig.Signature)-3] ^= 0x40
	for name, c := range map[string]struct {
		cp   AuditCheckpoint
		want string
	}{
		"cert of another root": {AuditCheckpoint{Seq: seq, Hash: hash, Node: "node-1", Cert: rogueDER, Signature: rogueSig}, "does not chain to the root"},
		"root key signs itself": {func() AuditCheckpoint {
			s, _ := ecdsa.SignASN1(rand.Reader, other.rootKey, CheckpointDigest(td.Name(), seq, hash))
			return AuditCheckpoint{Seq: seq, Hash: hash, Node: "node-1", Cert: other.rootDER, Signature: s}
		}(), "does not chain"},
		"signature over another seq": {wrongSeq, "signature does not verify"},
		"corrupted signature":        {badSig, "signature does not verify"},
		"hash not of that record":    {ca.checkpoint(t, "node-1", seq, strings.Repeat("ab", 32)), "no such record"},
		"future record":              {ca.checkpoint(t, "node-1", seq+5, hash), "no such record"},
	} {
		if _, err := a.apply(CmdAuditCheckpoint, t0, c.cp); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want refusal naming %q", name, err, c.want)
		}
	}
	if !bytes.Equal(before, atkExport(t, a.fsm)) {
		t.Fatal("refused checkpoints changed the state")
	}

	// The genuine one is accepted and verifies.
	a.must(CmdAuditCheckpoint, good)
	cpRec, _ := a.fsm.AuditHead() // 12: the checkpoint record
	if a.fsm.LastCheckpoint() != seq {
		t.Fatalf("last checkpoint %d", a.fsm.LastCheckpoint())
	}
	if _, err := a.apply(CmdAuditCheckpoint, t0, good); !errors.Is(err, ErrRefused) {
		t.Fatalf("replayed checkpoint: %v", err)
	}
	for i := 0; i < 5; i++ {
		a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "test.after", Target: fmt.Sprint(i)}}})
	}
	rep := a.fsm.VerifyAuditLog(roots)
	if !rep.Intact || rep.Checkpoints != 1 || rep.LastCheckpoint != seq || rep.From != 1 || rep.To != cpRec+5 {
		t.Fatalf("verify: %+v", rep)
	}
	if rep := a.fsm.VerifyAuditLog([]*x509.Certificate{other.root}); rep.Intact || rep.FirstBad != cpRec {
		t.Fatalf("verify with another root: %+v", rep)
	}
	snap := atkSnapshot(t, a.fsm)

	// A record before the checkpoint rewritten, with the hash chain
	// recomputed after it: the chain is intact, the signature is not.
	t.Run("rewritten history under a checkpoint", func(t *testing.T) {
		v := atkClone(t, snap)
		if err := v.fsm.db.Update(func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord {
				r[4].Target = "rewritten"
				return r
			})
		}); err != nil {
			t.Fatal(err)
		}
		v.fsm.loadHead()
		recs := v.fsm.Audit(0, 0)
		if n, err := VerifyAudit(recs); err != nil {
			t.Fatalf("the forger's chain is broken at %d (%v); the test needs an intact chain", n, err)
		}
		rep := v.fsm.VerifyAuditLog(roots)
		t.Logf("%+v", rep)
		if rep.Intact || rep.FirstBad != seq || !strings.Contains(rep.Error, fmt.Sprintf("checkpoint at record %d", cpRec)) ||
			!strings.Contains(rep.Error, fmt.Sprintf("record %d", seq)) {
			t.Fatalf("rewritten history: %+v", rep)
		}
	})

	// The checkpoint record itself with a corrupted signature.
	t.Run("corrupted checkpoint record", func(t *testing.T) {
		v := atkClone(t, snap)
		if err := v.fsm.db.Update(func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord {
				cr := &r[cpRec-1]
				if cr.Action != CmdAuditCheckpoint {
					t.Fatalf("record %d is %s", cpRec, cr.Action)
				}
				sig, _ := base64.StdEncoding.DecodeString(cr.Detail["signature"])
				sig[len(sig)-2] ^= 0x01
				d := map[string]string{}
				for k, v := range cr.Detail {
					d[k] = v
				}
				d["signature"] = base64.StdEncoding.EncodeToString(sig)
				cr.Detail = d
				return r
			})
		}); err != nil {
			t.Fatal(err)
		}
		v.fsm.loadHead()
		if n, err := VerifyAudit(v.fsm.Audit(0, 0)); err != nil {
			t.Fatalf("chain broken at %d: %v", n, err)
		}
		rep := v.fsm.VerifyAuditLog(roots)
		t.Logf("%+v", rep)
		if rep.Intact || rep.FirstBad != cpRec || !strings.Contains(rep.Error, fmt.Sprintf("checkpoint at record %d", cpRec)) ||
			!strings.Contains(rep.Error, "signature does not verify") {
			t.Fatalf("corrupted checkpoint: %+v", rep)
		}
	})

	// A checkpoint record whose certificate was swapped for one of another
	// root (chain recomputed).
	t.Run("checkpoint record with a rogue certificate", func(t *testing.T) {
		v := atkClone(t, snap)
		if err := v.fsm.db.Update(func(tx *bolt.Tx) error {
			return atkRewriteAudit(tx, false, func(r []AuditRecord) []AuditRecord {
				cr := &r[cpRec-1]
				d := map[string]string{}
				for k, v := range cr.Detail {
					d[k] = v
				}
				d["cert"] = base64.StdEncoding.EncodeToString(rogueDER)
				d["signature"] = base64.StdEncoding.EncodeToString(rogueSig)
				cr.Detail = d
				return r
			})
		}); err != nil {
			t.Fatal(err)
		}
		rep := v.fsm.VerifyAuditLog(roots)
		if rep.Intact || rep.FirstBad != cpRec || !strings.Contains(rep.Error, "does not chain") {
			t.Fatalf("rogue checkpoint: %+v", rep)
		}
	})
}

// A checkpoint the FSM accepts at commit must verify later. The audit
// field bound cuts the stored certificate at 4096 base64 characters
// (3072 DER bytes), after applyCheckpoint verified the whole one.
func TestAttackCheckpointOversizedCert(t *testing.T) {
	ca := atkNewCA(t, "big")
	k, _, der := atkIssuing(t, ca, "issuing with many names", func(c *x509.Certificate) {
		for i := 0; i < 60; i++ {
			c.DNSNames = append(c.DNSNames, fmt.Sprintf("n%02d.%s.example.org", i, strings.Repeat("q", 40)))
		}
	})
	if len(der) <= 3072 {
		t.Fatalf("test certificate is only %d bytes", len(der))
	}
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{ca.rootDER}})
	a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "x"}}})
	seq, hash := a.fsm.AuditHead()
	sig, _ := ecdsa.SignASN1(rand.Reader, k, CheckpointDigest(td.Name(), seq, hash))
	_, err := a.apply(CmdAuditCheckpoint, t0, AuditCheckpoint{Seq: seq, Hash: hash, Node: "node-1", Cert: der, Signature: sig})
	if err != nil {
		t.Logf("refused at commit (acceptable): %v", err)
		return
	}
	if rep := a.fsm.VerifyAuditLog([]*x509.Certificate{ca.root}); !rep.Intact {
		t.Fatalf("a checkpoint with a %d-byte certificate was accepted at commit, but its stored record does not verify: %+v", len(der), rep)
	}
}

// Whatever entry.create accepts must survive a raft snapshot: followers
// and restarting nodes install the state from one.
func TestAttackOversizedEntrySnapshot(t *testing.T) {
	a := newApplier(t)
	e := entry("entry-big1", "spiffe://example.org/big", "unix:uid:1")
	l := strings.Repeat("a", 60)
	for i := 0; i < 6000; i++ {
		e.DNSNames = append(e.DNSNames, fmt.Sprintf("h%04d.%s.%s.%s", i, l, l, l))
	}
	cmd, _ := NewCommand(CmdEntryCreate, admin, t0, e)
	if _, err := a.apply(CmdEntryCreate, t0, e); err != nil {
		t.Logf("refused at commit (acceptable): %v", err)
		return
	}
	snap := atkSnapshot(t, a.fsm)
	if err := newFSM(t).Restore(bytes.NewReader(snap)); err != nil {
		t.Fatalf("entry.create accepted a %d-byte command (limit %d), but no replica can install the resulting snapshot: %v", len(cmd), MaxCommandSize, err)
	}
}

// slowWriter takes 1 ms per write and holds its first write until the
// applies are done (or a timeout: then commits were blocked).
type slowWriter struct {
	first   chan struct{}
	release <-chan struct{}
	once    sync.Once
	buf     bytes.Buffer
	writes  int
}

func (w *slowWriter) Write(p []byte) (int, error) {
	w.once.Do(func() {
		close(w.first)
		select {
		case <-w.release:
		case <-time.After(60 * time.Second):
		}
	})
	time.Sleep(time.Millisecond)
	w.writes++
	return w.buf.Write(p)
}

func TestSnapshotWhileApplying(t *testing.T) {
	const records = 50000
	fill := func(a *applier) {
		for n := 0; n < records; {
			k := min(MaxEventsPerCommand, records-n)
			evs := make([]AuditEvent, k)
			for i := range evs {
				evs[i] = AuditEvent{Action: "svid.refuse", Target: fmt.Sprintf("spiffe://example.org/w/%d", n+i), Detail: map[string]string{"reason": "filler"}}
			}
			a.must(CmdAudit, AuditAppend{Events: evs})
			n += k
		}
		for i := 0; i < 20; i++ {
			a.must(CmdEntryCreate, entry(fmt.Sprintf("entry-%04d", i), fmt.Sprintf("spiffe://example.org/s/%d", i), "unix:uid:1"))
		}
	}
	a := newApplier(t)
	fill(a)
	ref := newApplier(t) // the same commands, and no more
	fill(ref)

	snap, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Release()
	appliesDone := make(chan struct{})
	w := &slowWriter{first: make(chan struct{}), release: appliesDone}
	persistDone := make(chan error, 1)
	var persistEnd time.Time
	go func() {
		err := snap.Persist(w)
		persistEnd = time.Now()
		persistDone <- err
	}()
	<-w.first // the stream is being written

	var appliedEnd time.Time
	applyErr := make(chan error, 1)
	go func() {
		defer close(appliesDone)
		for i := 0; i < 200; i++ {
			var err error
			switch i % 4 {
			case 0:
				_, err = a.apply(CmdEntryCreate, t0, entry(fmt.Sprintf("entry-late-%04d", i), fmt.Sprintf("spiffe://example.org/late/%d", i), "unix:uid:2"))
			case 1:
				_, err = a.apply(CmdEntryDelete, t0, EntryID{ID: fmt.Sprintf("entry-late-%04d", i-1)})
			default:
				_, err = a.apply(CmdAudit, t0, AuditAppend{Events: []AuditEvent{{Action: "late.event", Target: fmt.Sprint(i)}}})
			}
			if err != nil {
				applyErr <- err
				return
			}
		}
		appliedEnd = time.Now()
	}()
	select {
	case <-appliesDone:
	case <-time.After(30 * time.Second):
		t.Fatal("200 commits did not finish in 30s while a snapshot was being persisted: the snapshot blocks commits")
	}
	select {
	case err := <-applyErr:
		t.Fatal(err)
	default:
	}
	if err := <-persistDone; err != nil {
		t.Fatal(err)
	}
	if !appliedEnd.Before(persistEnd) {
		t.Fatalf("applies ended %v, persist ended %v", appliedEnd, persistEnd)
	}
	t.Logf("snapshot of %d bytes in %d writes; commits finished %v before it", w.buf.Len(), w.writes, persistEnd.Sub(appliedEnd))

	// The stream is the state at the Snapshot call.
	c := newFSM(t)
	if err := c.Restore(bytes.NewReader(w.buf.Bytes())); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(atkExport(t, c), atkExport(t, ref.fsm)) {
		t.Fatal("the persisted snapshot is not the state at the Snapshot call")
	}
	if c.AppliedIndex() != ref.index {
		t.Fatalf("restored index %d, want %d", c.AppliedIndex(), ref.index)
	}
	if h, _ := a.fsm.AuditHead(); h <= records+20 {
		t.Fatalf("head %d: the applies did not land", h)
	}
}

func TestBoundedAuditFields(t *testing.T) {
	a := newApplier(t)
	detail100 := map[string]string{}
	for i := 0; i < 100; i++ {
		detail100[fmt.Sprintf("key%03d", i)] = strings.Repeat("v", 2000)
	}
	var auds []string
	for i := 0; i < 20; i++ {
		auds = append(auds, fmt.Sprintf("%02d", i)+strings.Repeat("a", 298))
	}
	longKeys := map[string]string{}
	for i := 0; i < 40; i++ {
		longKeys[fmt.Sprintf("%02d", i)+strings.Repeat("k", 200)] = strings.Repeat("w", 5000)
	}
	longKeys["cert"] = strings.Repeat("c", 10000)
	longKeys["audience"] = strings.Join(auds, ",")
	longKeys["reason"] = strings.Repeat("r", 10000)
	events := []AuditEvent{
		{Action: "svid.refuse", Detail: map[string]string{"reason": strings.Repeat("é", 5000)}}, // 10 KB, 2-byte runes
		{Action: "svid.refuse", Detail: detail100},
		{Action: "svid.refuse", Target: strings.Repeat("t", 5*1024)},
		{Action: "svid.jwt.refuse", Detail: map[string]string{"audience": strings.Join(auds, ",")}},
		{Action: "svid.refuse", Target: strings.Repeat("t", 5*1024), Detail: longKeys}, // everything at once
	}
	a.must(CmdAudit, AuditAppend{Events: events})
	recs := a.fsm.Audit(0, 0)
	if len(recs) != len(events) {
		t.Fatalf("%d records", len(recs))
	}
	for _, r := range recs {
		raw := atkMustJSON(t, r)
		t.Logf("record %d: %d bytes, %d detail keys, target %d bytes", r.Seq, len(raw), len(r.Detail), len(r.Target))
		if len(raw) >= 40<<10 {
			t.Errorf("record %d is %d bytes", r.Seq, len(raw))
		}
		if len(r.Target) > maxTarget {
			t.Errorf("record %d: target %d bytes", r.Seq, len(r.Target))
		}
		if len(r.Detail) > maxDetailKeys+1 {
			t.Errorf("record %d: %d detail keys", r.Seq, len(r.Detail))
		}
		for k, v := range r.Detail {
			if len(k) > maxDetailKey || len(v) > detailLimit(k) {
				t.Errorf("record %d: detail %q (%d bytes) = %d bytes", r.Seq, k, len(k), len(v))
			}
			if !utf8.ValidString(k) || !utf8.ValidString(v) {
				t.Errorf("record %d: detail %q cut inside a rune", r.Seq, k)
			}
		}
	}
	if r := recs[0].Detail["reason"]; len(r) > MaxReason || !strings.HasSuffix(r, "…") {
		t.Errorf("reason %d bytes", len(r))
	}
	if r := recs[1]; len(r.Detail) != maxDetailKeys+1 || r.Detail["detail_dropped"] != "68" {
		t.Errorf("100 detail keys stored as %d (dropped %q)", len(r.Detail), r.Detail["detail_dropped"])
	}
	if r := recs[2]; len(r.Target) > maxTarget || !strings.HasSuffix(r.Target, "…") {
		t.Errorf("target %d bytes", len(r.Target))
	}
	if aud := recs[3].Detail["audience"]; len(aud) > MaxAudienceBytes+MaxAudiences {
		t.Errorf("audience %d bytes", len(aud))
	}
	if rep := a.fsm.VerifyAuditLog(nil); !rep.Intact {
		t.Fatal(rep.Error)
	}

	// Worst case for the encoded size: every byte escaped by JSON. The
	// bounds are in bytes of the field, so the record grows by the
	// escaping; it must still fit a snapshot frame.
	esc := map[string]string{}
	for i := 0; i < 40; i++ {
		esc[fmt.Sprintf("%02d", i)+strings.Repeat("<", 200)] = strings.Repeat("\x01", 5000)
	}
	esc["cert"] = strings.Repeat("<", 10000)
	a.must(CmdAudit, AuditAppend{Events: []AuditEvent{{Action: "svid.refuse", Target: strings.Repeat(">", 5000), Detail: esc}}})
	recs = a.fsm.Audit(0, 0)
	raw := atkMustJSON(t, recs[len(recs)-1])
	t.Logf("worst-case escaped record: %d bytes (the field bounds alone suggest ~40 KB)", len(raw))
	if len(raw) >= maxFrameValue {
		t.Errorf("an audit record of %d bytes does not fit a snapshot frame (%d)", len(raw), maxFrameValue)
	}
	snap := atkSnapshot(t, a.fsm)
	if err := newFSM(t).Restore(bytes.NewReader(snap)); err != nil {
		t.Fatal(err)
	}

	// Too many events in one command.
	before := atkExport(t, a.fsm)
	many := make([]AuditEvent, MaxEventsPerCommand+1)
	for i := range many {
		many[i] = AuditEvent{Action: "x"}
	}
	for _, typ := range []string{CmdAudit, CmdIssue} {
		if _, err := a.apply(typ, t0, AuditAppend{Events: many}); !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "at most") {
			t.Errorf("%s with %d events: %v", typ, len(many), err)
		}
	}
	if !bytes.Equal(before, atkExport(t, a.fsm)) {
		t.Fatal("refused commands changed the state")
	}
	// Exactly the maximum is fine.
	a.must(CmdAudit, AuditAppend{Events: many[:MaxEventsPerCommand]})
}
