package state

import (
	"encoding/hex"

	bolt "go.etcd.io/bbolt"
)

// AuditScan visits retained audit records in order, one page (auditPage)
// per read transaction, so that no scan pins a transaction or holds more
// than a page: ascending from after+1, or (descending) down from before-1
// (before 0: from the head) to after+1. It stops after max records or when
// fn returns false, and returns the last record visited and whether the
// end of the range was reached.
func (f *FSM) AuditScan(after, before uint64, descending bool, max int, fn func(*AuditRecord) bool) (last uint64, end bool) {
	if max <= 0 {
		return 0, false
	}
	if !descending {
		for visited := 0; ; {
			page := f.Audit(after, min(auditPage, max-visited))
			for i := range page {
				visited++
				after = page[i].Seq
				if !fn(&page[i]) {
					return after, false
				}
			}
			if len(page) == 0 {
				return after, true
			}
			if visited >= max {
				return after, false
			}
		}
	}
	for visited := 0; ; {
		page := f.auditBefore(after, before, min(auditPage, max-visited))
		for i := range page {
			visited++
			before = page[i].Seq
			if !fn(&page[i]) {
				return before, false
			}
		}
		if len(page) == 0 {
			return before, true
		}
		if visited >= max {
			return before, false
		}
	}
}

// auditBefore returns up to limit records with after < Seq < before
// (before 0: no upper bound), newest first.
func (f *FSM) auditBefore(after, before uint64, limit int) []AuditRecord {
	var out []AuditRecord
	if limit <= 0 {
		return nil
	}
	f.read("AuditBefore", func(tx *bolt.Tx) error {
		c := tx.Bucket(bAudit).Cursor()
		var k, v []byte
		if before == 0 {
			k, v = c.Last()
		} else {
			// Seek lands on before itself or the first key after it: the
			// records wanted are below.
			k, _ = c.Seek(u64Key(before))
			if k == nil {
				k, v = c.Last()
			} else {
				k, v = c.Prev()
			}
		}
		for ; k != nil && len(out) < limit; k, v = c.Prev() {
			if len(k) != 8 {
				continue
			}
			seq := u64FromKey(k)
			if seq <= after || (before != 0 && seq >= before) {
				break
			}
			var r AuditRecord
			if err := decodeStrict(v, &r); err != nil {
				f.log.Error("stored audit record unreadable", "key", hex.EncodeToString(k), "err", err)
				return err
			}
			out = append(out, r)
		}
		return nil
	})
	return out
}
