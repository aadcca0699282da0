package node_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// A SIGIL-STATE 2 stream, written independently of the state package:
//
//	"SIGIL-STATE 2\n" {header JSON} "\n"
//	frames: kind byte, uvarint key length, key, uvarint value length, value
//	0x00
//	"sha256 <hex of every byte before this line>\n"
const (
	raMagic      = "SIGIL-STATE 2\n"
	raFrameMeta  = 1
	raFrameEntry = 2
)

type raFrame struct {
	kind       byte
	key, value []byte
}

func raParse(t *testing.T, b []byte) (header []byte, frames []raFrame) {
	t.Helper()
	r := bufio.NewReader(bytes.NewReader(b))
	if m, err := r.ReadString('\n'); err != nil || m != raMagic {
		t.Fatalf("not a state stream: %q %v", m, err)
	}
	header, err := r.ReadBytes('\n')
	if err != nil {
		t.Fatal(err)
	}
	header = header[:len(header)-1]
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
	for {
		kind, err := r.ReadByte()
		if err != nil {
			t.Fatal(err)
		}
		if kind == 0 {
			break
		}
		k := chunk()
		frames = append(frames, raFrame{kind, k, chunk()})
	}
	trailer, _ := io.ReadAll(r)
	sum := sha256.Sum256(b[:len(b)-len(trailer)])
	if string(trailer) != "sha256 "+hex.EncodeToString(sum[:])+"\n" {
		t.Fatalf("the saved archive's trailer %q does not match its content", trailer)
	}
	return header, frames
}

func raBuild(header []byte, frames []raFrame) []byte {
	var b bytes.Buffer
	b.WriteString(raMagic)
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
	b.WriteByte(0)
	sum := sha256.Sum256(b.Bytes())
	fmt.Fprintf(&b, "sha256 %s\n", hex.EncodeToString(sum[:]))
	return b.Bytes()
}

// raInsert adds a frame where the stream's order (kind, then key) puts it.
func raInsert(frames []raFrame, f raFrame) []raFrame {
	i := slices.IndexFunc(frames, func(x raFrame) bool {
		return x.kind > f.kind || x.kind == f.kind && bytes.Compare(x.key, f.key) > 0
	})
	if i < 0 {
		i = len(frames)
	}
	return slices.Insert(slices.Clone(frames), i, f)
}

// raAttackerRoot is a well-formed root of the same trust domain that the
// appliance never trusted.
func raAttackerRoot(t *testing.T) []byte {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://example.org")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(666), Subject: pkix.Name{CommonName: "attacker root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// raView is what must not change on a node: the entries, the audit head
// and the whole exported state.
type raView struct {
	entries []string
	head    uint64
	export  []byte
}

func raSee(t *testing.T, c *clustertest.Cluster, id string) raView {
	t.Helper()
	ctx := context.Background()
	l, err := c.Admin(id).EntryList(ctx, &api.EntryListRequest{}) // linearizable: the replica is current
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	var v raView
	for _, e := range l.Entries {
		v.entries = append(v.entries, e.ID+"="+e.SPIFFEID)
	}
	slices.Sort(v.entries)
	a, err := c.Admin(id).AuditList(ctx, &api.AuditRequest{Limit: 1})
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	v.head = a.Head
	if v.export, err = c.Node(id).State().Export(); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestAttackForgedArchiveRestore(t *testing.T) {
	tr := clustertest.NewTrust(t, "ra", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		// No background checkpoint may move the audit head mid-test.
		cfg.Audit.CheckpointInterval = node.Duration{Duration: 24 * time.Hour}
		cfg.Audit.CheckpointEvery = 10_000_000
	}, "node-1", "node-2", "node-3")
	ctx := context.Background()
	adm := c.Admin("node-2")
	for i := 0; i < 5; i++ {
		if _, err := adm.EntryCreate(ctx, entryFor(i)); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := adm.SnapshotSave(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.EntryCreate(ctx, entryFor(99)); err != nil {
		t.Fatal(err)
	}
	header, frames := raParse(t, snap.Archive)

	// Settle: every node has the same state, and it holds still.
	var before map[string]raView
	clustertest.Eventually(t, 30*time.Second, "replicas to agree and settle", func() bool {
		v1 := map[string]raView{}
		for _, id := range c.Running() {
			v1[id] = raSee(t, c, id)
		}
		time.Sleep(300 * time.Millisecond)
		for _, id := range c.Running() {
			v2 := raSee(t, c, id)
			if !bytes.Equal(v2.export, v1[id].export) || !bytes.Equal(v2.export, v1["node-1"].export) {
				return false
			}
		}
		before = v1
		return true
	})
	if n := len(before["node-1"].entries); n != 6 {
		t.Fatalf("%d entries before the attack", n)
	}
	unchanged := func(what string) {
		t.Helper()
		for _, id := range c.Running() {
			now := raSee(t, c, id)
			b := before[id]
			if !slices.Equal(now.entries, b.entries) {
				t.Fatalf("%s changed the entries on %s: %v", what, id, now.entries)
			}
			if now.head != b.head {
				t.Fatalf("%s moved the audit head on %s: %d -> %d", what, id, b.head, now.head)
			}
			if !bytes.Equal(now.export, b.export) {
				t.Fatalf("%s changed the state of %s", what, id)
			}
		}
	}

	// 1. An admin entry for spiffe://example.org/sigil/admin/x, checksum
	// recomputed: caught by the archive checks.
	evil := state.Entry{ID: "0000aaaa-forged-admin-x", SPIFFEID: "spiffe://example.org/sigil/admin/x",
		ParentID: "spiffe://example.org/sigil/agent/tpm/host-a", Selectors: []state.Selector{{Type: "unix", Value: "uid:0"}},
		CreatedAt: time.Now().UTC(), UpdatedAt: time.Now().UTC(), Revision: 3}
	ev, _ := json.Marshal(evil)
	forgedEntry := raBuild(header, raInsert(frames, raFrame{raFrameEntry, []byte(evil.ID), ev}))
	_, err = c.Admin("node-3").SnapshotRestore(ctx, &api.SnapshotArchive{Archive: forgedEntry})
	t.Logf("admin entry: %v", err)
	if code := status.Code(err); code != codes.InvalidArgument && code != codes.FailedPrecondition {
		t.Fatalf("forged admin entry: %v, want InvalidArgument or FailedPrecondition", err)
	}
	if !strings.Contains(status.Convert(err).Message(), "/sigil/admin/x") || !strings.Contains(status.Convert(err).Message(), "reserved") {
		t.Fatalf("refusal does not name the problem: %v", err)
	}
	unchanged("the forged admin entry")

	// 2. An attacker's root added to the archive's bundle: a well-formed
	// archive, refused by the state machine on every replica.
	attacker := raAttackerRoot(t)
	i := slices.IndexFunc(frames, func(f raFrame) bool { return f.kind == raFrameMeta && string(f.key) == "roots" })
	if i < 0 {
		t.Fatal("the archive has no roots")
	}
	var roots [][]byte
	if err := json.Unmarshal(frames[i].value, &roots); err != nil || len(roots) != 1 {
		t.Fatalf("roots frame: %d roots, %v", len(roots), err)
	}
	rootFrames := slices.Clone(frames)
	rootFrames[i].value, _ = json.Marshal(append(roots, attacker))
	forgedRoot := raBuild(header, rootFrames)
	_, err = c.Admin("node-1").SnapshotRestore(ctx, &api.SnapshotArchive{Archive: forgedRoot})
	t.Logf("attacker root: %v", err)
	if code := status.Code(err); code != codes.InvalidArgument && code != codes.FailedPrecondition {
		t.Fatalf("forged root: %v, want InvalidArgument or FailedPrecondition", err)
	}
	if msg := status.Convert(err).Message(); !strings.Contains(msg, "X.509 root 1") || !strings.Contains(msg, "trust bundle") {
		t.Fatalf("refusal does not name the problem: %v", err)
	}
	unchanged("the forged root")
	if b := c.Node("node-2").State().Bundle(); len(b.Roots) != 1 || !bytes.Equal(b.Roots[0], roots[0]) {
		t.Fatal("the bundle changed")
	}

	// Both refusals are in the node logs, with their reasons.
	logs := c.Log.String()
	for _, want := range []string{"snapshot restore refused", "reserved for the appliance", "admin request refused", "X.509 root 1"} {
		if !strings.Contains(logs, want) {
			t.Errorf("node log lacks %q", want)
		}
	}

	// The same archive unforged still restores (the forgeries alone were
	// refused), on every node.
	if _, err := c.Admin("node-3").SnapshotRestore(ctx, &api.SnapshotArchive{Archive: snap.Archive}); err != nil {
		t.Fatal(err)
	}
	for _, id := range c.Running() {
		v := raSee(t, c, id)
		if len(v.entries) != 5 || v.head != before[id].head+1 {
			t.Fatalf("%s after the genuine restore: %d entries, head %d (was %d)", id, len(v.entries), v.head, before[id].head)
		}
	}
	if v, err := adm.AuditVerify(ctx, &api.Empty{}); err != nil || !v.Intact {
		t.Fatalf("audit: %+v %v", v, err)
	}
}
