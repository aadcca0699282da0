package state

import (
	"bufio"
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// Audit segments: the records a prune removes, written by every node to
// its own ExportDir before they leave the state, as JSON lines:
//
//	{"segment": {format, version, trust_domain, node, first, last, prev}}
//	{...record first...}
//	...
//	{...record last...}
//	{"checkpoint": {seq: last, hash, node, cert, signature}}
//
// The records chain from `prev` (the hash before the first record) to the
// last, and the checkpoint is the node's HSM signature over the last one,
// so a segment is verified with the root alone.

// SegmentHeader is a segment's first line.
type SegmentHeader struct {
	Format      string `json:"format"` // "sigil-audit-segment"
	Version     int    `json:"version"`
	TrustDomain string `json:"trust_domain"`
	Node        string `json:"node,omitempty"`
	First       uint64 `json:"first"`
	Last        uint64 `json:"last"`
	Prev        string `json:"prev"`
}

const segmentFormat = "sigil-audit-segment"

type segmentLine struct {
	Segment    *SegmentHeader   `json:"segment,omitempty"`
	Checkpoint *AuditCheckpoint `json:"checkpoint,omitempty"`
}

func segmentName(first, last uint64) string {
	return fmt.Sprintf("audit-%020d-%020d.jsonl", first, last)
}

// exportSegment writes records first..last (in tx) to a segment file.
func (f *FSM) exportSegment(tx *bolt.Tx, first, last uint64) error {
	if f.opts.ExportDir == "" {
		return nil
	}
	if err := os.MkdirAll(f.opts.ExportDir, 0o700); err != nil {
		return err
	}
	final := filepath.Join(f.opts.ExportDir, segmentName(first, last))
	tmp, err := os.CreateTemp(f.opts.ExportDir, ".segment-*")
	if err != nil {
		return err
	}
	// On success the rename has moved the file and tmp is closed: both
	// deferred calls then fail harmlessly. On failure they are cleanup of a
	// file nobody reads, so their errors add nothing to the one returned.
	defer func() { _ = os.Remove(tmp.Name()) }()
	defer func() { _ = tmp.Close() }()
	// bufio.Writer keeps its first error and Flush returns it (checked below).
	w := bufio.NewWriterSize(tmp, 256<<10)
	audit := tx.Bucket(bAudit)
	var firstRec, lastRec AuditRecord
	if _, err := getJSON(audit, u64Key(first), &firstRec); err != nil {
		return err
	}
	if _, err := getJSON(audit, u64Key(last), &lastRec); err != nil {
		return err
	}
	node := f.opts.NodeID
	hdr := SegmentHeader{Format: segmentFormat, Version: 1, TrustDomain: f.td.Name(), Node: node, First: first, Last: last, Prev: firstRec.Prev}
	var cp *AuditCheckpoint
	if f.opts.SignHead != nil {
		sig, cert, err := f.opts.SignHead(CheckpointDigest(f.td.Name(), last, lastRec.Hash))
		if err != nil {
			return fmt.Errorf("sign segment: %w", err)
		}
		cp = &AuditCheckpoint{Seq: last, Hash: lastRec.Hash, Node: node, Cert: cert, Signature: sig}
	}
	hb, err := json.Marshal(segmentLine{Segment: &hdr})
	if err != nil {
		return fmt.Errorf("segment header: %w", err)
	}
	w.Write(hb)
	w.WriteByte('\n')
	c := audit.Cursor()
	for k, v := c.Seek(u64Key(first)); k != nil; k, v = c.Next() {
		if u64FromKey(k) > last {
			break
		}
		w.Write(v)
		w.WriteByte('\n')
	}
	if cp != nil {
		cb, err := json.Marshal(segmentLine{Checkpoint: cp})
		if err != nil {
			return fmt.Errorf("segment checkpoint: %w", err)
		}
		w.Write(cb)
		w.WriteByte('\n')
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return err
	}
	f.log.Info("audit segment exported", "file", final, "from", first, "to", last, "signed", cp != nil)
	return nil
}

// SegmentReport is what verifying a segment found.
type SegmentReport struct {
	Header SegmentHeader
	Signed bool
}

// ReadSegment reads a segment, calling fn for each record, and verifies
// the chain and (when roots are given) the closing checkpoint.
func ReadSegment(r io.Reader, roots []*x509.Certificate, fn func(*AuditRecord) error) (SegmentReport, error) {
	var rep SegmentReport
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	var c chainCheck
	var last AuditRecord
	line := 0
	for sc.Scan() {
		line++
		b := sc.Bytes()
		if line == 1 {
			var sl segmentLine
			if err := decodeStrict(b, &sl); err != nil || sl.Segment == nil || sl.Segment.Format != segmentFormat || sl.Segment.Version != 1 {
				return rep, fmt.Errorf("line 1: not an audit segment header")
			}
			rep.Header = *sl.Segment
			continue
		}
		if bytes.HasPrefix(b, []byte(`{"checkpoint"`)) {
			var sl segmentLine
			if err := decodeStrict(b, &sl); err != nil || sl.Checkpoint == nil {
				return rep, fmt.Errorf("line %d: malformed checkpoint", line)
			}
			cp := sl.Checkpoint
			if cp.Seq != last.Seq || cp.Hash != last.Hash {
				return rep, fmt.Errorf("line %d: checkpoint signs record %d, the segment ends at %d", line, cp.Seq, last.Seq)
			}
			if len(roots) > 0 {
				if err := verifyCheckpoint(rep.Header.TrustDomain, cp, roots, last.Time); err != nil {
					return rep, fmt.Errorf("line %d: %v", line, err)
				}
			}
			rep.Signed = true
			if sc.Scan() {
				return rep, fmt.Errorf("line %d: data after the checkpoint", line+1)
			}
			break
		}
		var rec AuditRecord
		if err := decodeStrict(b, &rec); err != nil {
			return rep, fmt.Errorf("line %d: %v", line, err)
		}
		if c.first == 0 && (rec.Seq != rep.Header.First || rec.Prev != rep.Header.Prev) {
			return rep, fmt.Errorf("line %d: the first record is %d, the header says %d", line, rec.Seq, rep.Header.First)
		}
		if err := c.next(&rec); err != nil {
			return rep, fmt.Errorf("record %d: %v", rec.Seq, err)
		}
		last = rec
		if fn != nil {
			if err := fn(&rec); err != nil {
				return rep, err
			}
		}
	}
	if err := sc.Err(); err != nil {
		return rep, err
	}
	if line == 0 {
		return rep, errors.New("empty segment")
	}
	if last.Seq != rep.Header.Last {
		return rep, fmt.Errorf("the segment ends at record %d, the header says %d", last.Seq, rep.Header.Last)
	}
	if len(roots) > 0 && !rep.Signed {
		return rep, errors.New("the segment has no signed checkpoint")
	}
	return rep, nil
}

// segments lists this node's segment files, oldest first.
func (f *FSM) segments() ([]string, error) {
	if f.opts.ExportDir == "" {
		return nil, nil
	}
	ents, err := os.ReadDir(f.opts.ExportDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "audit-") && strings.HasSuffix(e.Name(), ".jsonl") {
			out = append(out, e.Name())
		}
	}
	slices.Sort(out)
	return out, nil
}

// ExportAudit calls fn for every record with Seq > since: first from this
// node's segment files (records already pruned), then from the retained
// log. Each segment's chain is checked as it is read, and the records are
// delivered contiguously or not at all: a prune that runs meanwhile moves
// records into a new segment, which is then read too.
func (f *FSM) ExportAudit(since uint64, fn func(*AuditRecord) error) error {
	next := since + 1
	deliver := func(r *AuditRecord) error {
		if r.Seq < next {
			return nil
		}
		if r.Seq != next {
			return fmt.Errorf("record %d where %d was expected (a segment is missing)", r.Seq, next)
		}
		next++
		return fn(r)
	}
	for attempt := 0; ; attempt++ {
		if err := f.exportSegments(next, deliver); err != nil {
			return err
		}
		first := f.AuditFirst()
		if next >= first {
			break
		}
		if attempt == 3 {
			return fmt.Errorf("records %d to %d are neither retained nor in this node's segments", next, first-1)
		}
	}
	return f.EachAudit(next-1, func(r *AuditRecord) error {
		if r.Seq != next {
			return fmt.Errorf("records %d to %d were pruned while they were exported; export again from %d", next, r.Seq-1, next-1)
		}
		return deliver(r)
	})
}

// exportSegments reads, in order, this node's segment files that hold
// records from next on.
func (f *FSM) exportSegments(next uint64, deliver func(*AuditRecord) error) error {
	names, err := f.segments()
	if err != nil {
		return err
	}
	for _, name := range names {
		parts := strings.Split(strings.TrimSuffix(strings.TrimPrefix(name, "audit-"), ".jsonl"), "-")
		if len(parts) != 2 {
			continue
		}
		last, err := strconv.ParseUint(parts[1], 10, 64)
		if err != nil || last < next {
			continue
		}
		fh, err := os.Open(filepath.Join(f.opts.ExportDir, name))
		if err != nil {
			return err
		}
		_, err = ReadSegment(fh, nil, func(r *AuditRecord) error {
			if r.Seq < next {
				return nil
			}
			err := deliver(r)
			next = r.Seq + 1
			return err
		})
		_ = fh.Close() // read-only, fully read: a close error loses nothing
		if err != nil {
			return fmt.Errorf("segment %s: %w", name, err)
		}
	}
	return nil
}
