package state

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
)

// appendAudit chains a new record onto the log (called with f.mu held).
func (f *FSM) appendAudit(index uint64, t time.Time, actor string, e AuditEvent) {
	prev := ""
	var seq uint64 = 1
	if n := len(f.d.Audit); n > 0 {
		prev = f.d.Audit[n-1].Hash
		seq = f.d.Audit[n-1].Seq + 1
	}
	r := &AuditRecord{Seq: seq, Index: index, Time: t.UTC(), Actor: actor, Action: e.Action, Target: e.Target, Detail: e.Detail, Prev: prev}
	r.Hash = recordHash(r)
	f.d.Audit = append(f.d.Audit, r)
}

// recordHash is the SHA-256 of the record's JSON with Hash empty. JSON of a
// struct with sorted map keys is the same bytes on every node.
func recordHash(r *AuditRecord) string {
	c := *r
	c.Hash = ""
	b, _ := json.Marshal(&c)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// verifyChain checks every record's hash and link; on a break it returns
// the sequence number of the first bad record.
func verifyChain(recs []*AuditRecord) (uint64, error) {
	prev := ""
	var seq uint64
	for _, r := range recs {
		if r.Seq != seq+1 {
			return r.Seq, fmt.Errorf("sequence %d follows %d", r.Seq, seq)
		}
		if r.Prev != prev {
			return r.Seq, fmt.Errorf("prev hash %.16s does not match the record before (%.16s)", r.Prev, prev)
		}
		if h := recordHash(r); h != r.Hash {
			return r.Seq, fmt.Errorf("record altered: hash %.16s, content hashes to %.16s", r.Hash, h)
		}
		prev, seq = r.Hash, r.Seq
	}
	return 0, nil
}

// VerifyAudit walks a list of records (as fetched by an auditor) and
// reports the first break. A nil error means the chain is intact.
func VerifyAudit(recs []AuditRecord) (firstBad uint64, err error) {
	ptrs := make([]*AuditRecord, len(recs))
	for i := range recs {
		ptrs[i] = &recs[i]
	}
	return verifyChain(ptrs)
}

// Audit returns up to limit records with Seq > after (limit <= 0: all).
func (f *FSM) Audit(after uint64, limit int) []AuditRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []AuditRecord
	for _, r := range f.d.Audit {
		if r.Seq <= after {
			continue
		}
		out = append(out, clone(*r))
		if limit > 0 && len(out) >= limit {
			break
		}
	}
	return out
}

// AuditHead is the sequence number and hash of the newest record.
func (f *FSM) AuditHead() (uint64, string) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if n := len(f.d.Audit); n > 0 {
		return f.d.Audit[n-1].Seq, f.d.Audit[n-1].Hash
	}
	return 0, ""
}

// VerifyAuditLog checks the whole stored chain.
func (f *FSM) VerifyAuditLog() (uint64, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return verifyChain(f.d.Audit)
}
