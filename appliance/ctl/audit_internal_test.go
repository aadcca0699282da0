package ctl

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// chainOf builds n records that chain from seq first (prev given).
func chainOf(first uint64, prev string, n int) []api.AuditRecord {
	out := make([]api.AuditRecord, n)
	for i := range out {
		r := api.AuditRecord{Seq: first + uint64(i), Actor: "test", Action: "entry.create", Target: fmt.Sprint(i), Prev: prev}
		b, _ := json.Marshal(&r)
		sum := sha256.Sum256(b)
		r.Hash = hex.EncodeToString(sum[:])
		out[i], prev = r, r.Hash
	}
	return out
}

func rehash(r *api.AuditRecord) {
	r.Hash = ""
	b, _ := json.Marshal(r)
	sum := sha256.Sum256(b)
	r.Hash = hex.EncodeToString(sum[:])
}

// The chain check across pages: what VerifyAudit sees in a page, and the
// link between pages that it cannot see.
func TestChainPages(t *testing.T) {
	recs := chainOf(1, "", 10)
	breakAt := func(pages [][]api.AuditRecord, start uint64) (uint64, int, string) {
		c := chain{start: start}
		good := 0
		for _, p := range pages {
			n, err := c.page(p)
			good += n
			if err != nil {
				var ce *chainError
				if !errors.As(err, &ce) {
					t.Fatalf("not a chain error: %v", err)
				}
				if c.n != good {
					t.Fatalf("chain took %d records, %d reported good", c.n, good)
				}
				return ce.Seq, good, err.Error()
			}
		}
		return 0, good, ""
	}
	if bad, _, msg := breakAt([][]api.AuditRecord{recs[:3], recs[3:7], recs[7:]}, 1); bad != 0 {
		t.Fatalf("intact chain broken at %d: %s", bad, msg)
	}

	// A record dropped at a page boundary.
	if bad, good, msg := breakAt([][]api.AuditRecord{recs[:3], recs[4:]}, 1); bad != 5 || good != 3 || !strings.Contains(msg, "record 5 follows record 3") {
		t.Fatalf("gap: %d %d %s", bad, good, msg)
	}
	// A page whose first record was rewritten with a consistent hash but
	// a different prev: only the link between pages shows it.
	forged := append([]api.AuditRecord{}, recs[3:]...)
	forged[0].Prev = strings.Repeat("0", 64)
	rehash(&forged[0])
	if bad, _, msg := breakAt([][]api.AuditRecord{recs[:3], forged[:1]}, 1); bad != 4 || !strings.Contains(msg, "prev hash") {
		t.Fatalf("forged link: %d %s", bad, msg)
	}
	// A record altered inside a page: the good ones before it count.
	altered := append([]api.AuditRecord{}, recs[3:]...)
	altered[2].Actor = "mallory"
	if bad, good, msg := breakAt([][]api.AuditRecord{recs[:3], altered}, 1); bad != 6 || good != 5 || !strings.Contains(msg, "record altered") {
		t.Fatalf("altered: %d %d %s", bad, good, msg)
	}
	// An export must start where it was asked to.
	if bad, _, msg := breakAt([][]api.AuditRecord{recs[2:]}, 1); bad != 3 || !strings.Contains(msg, "start at 3, not at 1") {
		t.Fatalf("late start: %d %s", bad, msg)
	}
}

// The first retained record must be the one the last prune named.
func TestPruneLink(t *testing.T) {
	recs := chainOf(101, strings.Repeat("a", 64), 5)
	prune := func(to uint64, hash string) api.AuditRecord {
		return api.AuditRecord{Seq: 103, Action: "audit.prune", Detail: map[string]string{"from": "1", "to": fmt.Sprint(to), "last_hash": hash}}
	}
	l := pruneLink{first: 101, prev: recs[0].Prev}
	l.see([]api.AuditRecord{recs[0], prune(50, "x"), prune(100, recs[0].Prev)})
	if l.at != 103 || l.problem != "" {
		t.Fatalf("link %+v", l)
	}
	l = pruneLink{first: 101, prev: recs[0].Prev}
	l.see([]api.AuditRecord{prune(100, strings.Repeat("b", 64))})
	if l.at != 103 || !strings.Contains(l.problem, "record 101's prev") {
		t.Fatalf("mismatch %+v", l)
	}
}

// A failed verification names the first bad record on a FAILED line.
func TestVerifyText(t *testing.T) {
	r := &verifyResult{Records: 9, From: 1, To: 9, Pages: 1, FirstBad: 7, Error: "record altered: hash 1234, content hashes to 5678",
		Node: &api.AuditVerify{Intact: false, FirstBad: 7, Error: "record 7: record altered"}}
	var b strings.Builder
	text := func() {
		t.Helper()
		w := bufio.NewWriter(&b)
		r.text(w)
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	text()
	if out := b.String(); !strings.Contains(out, "FAILED: the node's check found record 7 bad: record 7: record altered\n") ||
		!strings.Contains(out, "FAILED: the check here found record 7 bad: record altered") {
		t.Fatalf("failure text:\n%s", out)
	}
	if r.firstBad() != 7 {
		t.Fatal(r.firstBad())
	}
	r = &verifyResult{Intact: true, Records: 9, From: 1, To: 9, Pages: 1, Node: &api.AuditVerify{Intact: true, From: 1, To: 9, Checkpoints: 2, LastCheckpoint: 6}}
	b.Reset()
	text()
	if want := "verified records 1..9 (9 records); 2 checkpoints signed by node HSM keys, last at 6; records after it are protected by the hash chain only\n" +
		"checked here: records 1..9 (9 records, 1 page), hash chain intact\n"; b.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", b.String(), want)
	}
}
