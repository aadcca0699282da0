package state

import (
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Audit field bounds, applied by the FSM to every record it appends, so no
// caller (an anonymous one least of all) decides how large the log grows
// per event.
const (
	maxActor       = 256
	maxTarget      = 512
	maxDetailKeys  = 32
	maxDetailKey   = 64
	maxDetailValue = 1024
	// MaxReason is the length a refusal reason is cut to.
	MaxReason = 256
	// MaxAudiences and MaxAudienceBytes bound one JWT-SVID request.
	MaxAudiences     = 8
	MaxAudienceBytes = 2048
)

// maxCheckpointCert and maxCheckpointSig bound a checkpoint's issuing
// certificate and signature (DER), so their base64 fits the detail bounds.
const (
	maxCheckpointCert = 3072
	maxCheckpointSig  = 768
)

// detailLimit is the bound of one detail value.
func detailLimit(key string) int {
	switch key {
	case "reason":
		return MaxReason
	case "audience":
		return MaxAudienceBytes + MaxAudiences // the audiences and their separators
	case "cert":
		return 4096 // base64 of maxCheckpointCert
	case "signature":
		return 1024 // base64 of maxCheckpointSig
	}
	return maxDetailValue
}

// boundEvent applies the field bounds.
func boundEvent(e AuditEvent) AuditEvent {
	out := AuditEvent{Action: e.Action, Target: truncate(e.Target, maxTarget)}
	if len(e.Detail) == 0 {
		return out
	}
	keys := make([]string, 0, len(e.Detail))
	for k := range e.Detail {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out.Detail = make(map[string]string, min(len(keys), maxDetailKeys+1))
	for i, k := range keys {
		if i == maxDetailKeys {
			out.Detail["detail_dropped"] = strconv.Itoa(len(keys) - i)
			break
		}
		out.Detail[truncate(k, maxDetailKey)] = truncate(e.Detail[k], detailLimit(k))
	}
	return out
}

// appendAudit chains a new record onto the log in this transaction.
func (t *txn) appendAudit(e AuditEvent) error {
	e = boundEvent(e)
	if t.head == nil {
		// Loaded once per command, after the handler ran (a prune moves
		// First), and written back once when the command commits.
		t.head = new(AuditHead)
		if _, err := getJSON(t.tx.Bucket(bMeta), keyAuditHead, t.head); err != nil {
			return err
		}
		if t.head.First == 0 {
			t.head.First = 1
		}
	}
	h := t.head
	r := &AuditRecord{Seq: h.Seq + 1, Index: t.index, Time: t.c.Time.UTC(), Actor: truncate(t.c.Actor, maxActor),
		Origin: t.origin, Action: e.Action, Target: e.Target, Detail: e.Detail, Prev: h.Hash}
	var err error
	if r.Hash, err = recordHash(r); err != nil {
		return fmt.Errorf("audit record %d: %w", r.Seq, err)
	}
	if err := putJSON(t.tx.Bucket(bAudit), u64Key(r.Seq), r); err != nil {
		return err
	}
	h.Seq, h.Hash = r.Seq, r.Hash
	if e.Action == "svid.x509.issue" {
		return t.recordSVID(e, r.Seq)
	}
	return nil
}

// recordHash is the SHA-256 of the record's JSON with Hash empty. JSON of a
// struct with sorted map keys is the same bytes on every node.
// It fails only for a record JSON cannot carry (a time outside years
// 0-9999).
func recordHash(r *AuditRecord) (string, error) {
	c := *r
	c.Hash = ""
	b, err := json.Marshal(&c)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}

// chainCheck verifies records one at a time, in order.
type chainCheck struct {
	prev  string
	seq   uint64
	first uint64
}

// next checks r against the record before it. The first record checked
// may start anywhere (the log is pruned); its Prev is taken as given.
func (c *chainCheck) next(r *AuditRecord) error {
	if c.first == 0 {
		c.first, c.prev, c.seq = r.Seq, r.Prev, r.Seq-1
		if r.Seq == 0 {
			return errors.New("sequence 0")
		}
		if r.Seq == 1 && r.Prev != "" {
			return fmt.Errorf("the first record has a prev hash %.16s", r.Prev)
		}
	}
	if r.Seq != c.seq+1 {
		return fmt.Errorf("sequence %d follows %d", r.Seq, c.seq)
	}
	if r.Prev != c.prev {
		return fmt.Errorf("prev hash %.16s does not match the record before (%.16s)", r.Prev, c.prev)
	}
	h, err := recordHash(r)
	if err != nil {
		return fmt.Errorf("record unhashable: %w", err)
	}
	if h != r.Hash {
		return fmt.Errorf("record altered: hash %.16s, content hashes to %.16s", r.Hash, h)
	}
	c.prev, c.seq = r.Hash, r.Seq
	return nil
}

// VerifyAudit walks a list of records (as fetched by an auditor) and
// reports the first break. A nil error means the chain is intact.
func VerifyAudit(recs []AuditRecord) (firstBad uint64, err error) {
	var c chainCheck
	for i := range recs {
		if err := c.next(&recs[i]); err != nil {
			return recs[i].Seq, err
		}
	}
	return 0, nil
}

// auditPage is how many records one read transaction serves: long reads
// do not pin a transaction (and the file's old pages) for their whole
// duration.
const auditPage = 1024

// Audit returns up to limit records with Seq > after (limit <= 0: up to
// MaxAuditList).
func (f *FSM) Audit(after uint64, limit int) []AuditRecord {
	if limit <= 0 || limit > MaxAuditList {
		limit = MaxAuditList
	}
	var out []AuditRecord
	f.read("Audit", func(tx *bolt.Tx) error {
		c := tx.Bucket(bAudit).Cursor()
		for k, v := c.Seek(u64Key(after + 1)); k != nil && len(out) < limit; k, v = c.Next() {
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

// MaxAuditList bounds one page of audit records served at once.
const MaxAuditList = 10000

// EachAudit calls fn for every retained record with Seq > after, in pages
// of separate read transactions; it stops at fn's first error.
func (f *FSM) EachAudit(after uint64, fn func(*AuditRecord) error) error {
	for {
		page := f.Audit(after, auditPage)
		for i := range page {
			if err := fn(&page[i]); err != nil {
				return err
			}
			after = page[i].Seq
		}
		if len(page) < auditPage {
			return nil
		}
	}
}

// AuditHead is the sequence number and hash of the newest record.
func (f *FSM) AuditHead() (uint64, string) {
	if h := f.head.Load(); h != nil {
		return h.Seq, h.Hash
	}
	return 0, ""
}

// AuditFirst is the first retained record's sequence number.
func (f *FSM) AuditFirst() uint64 {
	if h := f.head.Load(); h != nil && h.First > 0 {
		return h.First
	}
	return 1
}

// LastCheckpoint is the sequence number of the newest signed checkpoint.
func (f *FSM) LastCheckpoint() uint64 { return f.checkpoint.Load() }

// AuditReport is what verifying the stored audit log found.
type AuditReport struct {
	From        uint64 `json:"from"` // first record verified (the first retained)
	To          uint64 `json:"to"`   // last record verified
	Checkpoints int    `json:"checkpoints"`
	// LastCheckpoint is the newest checkpoint's sequence number: records
	// after it are protected by the hash chain only.
	LastCheckpoint uint64 `json:"last_checkpoint"`
	Intact         bool   `json:"intact"`
	FirstBad       uint64 `json:"first_bad,omitempty"`
	Error          string `json:"error,omitempty"`
}

// VerifyAuditLog checks the whole retained chain and every checkpoint
// signature against roots, streaming.
func (f *FSM) VerifyAuditLog(roots []*x509.Certificate) AuditReport {
	var rep AuditReport
	var c chainCheck
	err := f.EachAudit(0, func(r *AuditRecord) error {
		if err := c.next(r); err != nil {
			rep.FirstBad = r.Seq
			return err
		}
		if rep.From == 0 {
			rep.From = r.Seq
		}
		rep.To = r.Seq
		if r.Action != CmdAuditCheckpoint {
			return nil
		}
		cp, err := checkpointFromRecord(r)
		if err == nil {
			err = verifyCheckpoint(f.td.Name(), cp, roots, r.Time)
		}
		if err != nil {
			rep.FirstBad = r.Seq
			return fmt.Errorf("checkpoint at record %d: %v", r.Seq, err)
		}
		if cp.Seq >= rep.From && cp.Seq <= r.Seq {
			if got, ok := f.recordHashAt(cp.Seq); !ok || got != cp.Hash {
				rep.FirstBad = cp.Seq
				return fmt.Errorf("record %d does not match the hash that the checkpoint at record %d signed", cp.Seq, r.Seq)
			}
		}
		rep.Checkpoints++
		rep.LastCheckpoint = cp.Seq
		return nil
	})
	if err == nil {
		if seq, hash := f.AuditHead(); rep.To != seq || c.prev != hash {
			rep.FirstBad = rep.To + 1
			err = fmt.Errorf("the log ends at record %d (%.16s) but the chain head is %d (%.16s)", rep.To, c.prev, seq, hash)
		}
	}
	if err != nil {
		rep.Error = err.Error()
		return rep
	}
	rep.Intact = true
	return rep
}

func (f *FSM) recordHashAt(seq uint64) (string, bool) {
	var r AuditRecord
	var ok bool
	if !f.read("recordHashAt", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bAudit), u64Key(seq), &r)
		return err
	}) {
		return "", false
	}
	return r.Hash, ok
}

func checkpointFromRecord(r *AuditRecord) (*AuditCheckpoint, error) {
	seq, err := strconv.ParseUint(r.Detail["seq"], 10, 64)
	if err != nil {
		return nil, fmt.Errorf("seq: %v", err)
	}
	cert, err := base64.StdEncoding.DecodeString(r.Detail["cert"])
	if err != nil {
		return nil, fmt.Errorf("cert: %v", err)
	}
	sig, err := base64.StdEncoding.DecodeString(r.Detail["signature"])
	if err != nil {
		return nil, fmt.Errorf("signature: %v", err)
	}
	return &AuditCheckpoint{Seq: seq, Hash: r.Detail["hash"], Node: r.Detail["node"], Cert: cert, Signature: sig}, nil
}

// verifyCheckpoint checks that the certificate chains to one of roots (as
// of the checkpoint's time) and signed the digest of (seq, hash).
func verifyCheckpoint(td string, cp *AuditCheckpoint, roots []*x509.Certificate, at time.Time) error {
	if len(cp.Hash) != 64 {
		return errors.New("malformed head hash")
	}
	cert, err := x509.ParseCertificate(cp.Cert)
	if err != nil {
		return fmt.Errorf("certificate: %v", err)
	}
	if len(roots) == 0 {
		return errors.New("no roots to verify against")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: at, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("certificate of %s does not chain to the root: %v", cp.Node, err)
	}
	digest := CheckpointDigest(td, cp.Seq, cp.Hash)
	switch pub := cert.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, cp.Signature) {
			return errors.New("signature does not verify")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, 0x5 /* crypto.SHA256 */, digest, cp.Signature); err != nil {
			return errors.New("signature does not verify")
		}
	default:
		return fmt.Errorf("unsupported key type %T", pub)
	}
	return nil
}

// roots reads the bundle roots in a transaction.
func (t *txn) roots() ([]*x509.Certificate, error) {
	var ders [][]byte
	if _, err := getJSON(t.tx.Bucket(bMeta), keyRoots, &ders); err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for _, d := range ders {
		c, err := x509.ParseCertificate(d)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}

// applyCheckpoint records a node's signature over an audit head it has.
// The signature is checked here, so a checkpoint in the log is one that
// verified when it was committed.
func applyCheckpoint(t *txn, p *AuditCheckpoint) (any, []AuditEvent, error) {
	if p.Node != t.origin {
		return nil, nil, refuse("checkpoint for node %q proposed by node %s", truncate(p.Node, 64), t.origin)
	}
	// The record keeps the certificate and signature whole (base64 within
	// the detail bounds), so what verified here verifies again later.
	if len(p.Cert) > maxCheckpointCert || len(p.Signature) > maxCheckpointSig {
		return nil, nil, refuse("checkpoint certificate (%d bytes) or signature (%d bytes) too large; at most %d and %d",
			len(p.Cert), len(p.Signature), maxCheckpointCert, maxCheckpointSig)
	}
	meta := t.tx.Bucket(bMeta)
	last := getU64(meta, keyCheckpoint)
	if p.Seq <= last {
		return nil, nil, refuse("checkpoint at %d is not after the last one (%d)", p.Seq, last)
	}
	var r AuditRecord
	ok, err := getJSON(t.tx.Bucket(bAudit), u64Key(p.Seq), &r)
	if err != nil {
		return nil, nil, err
	}
	if !ok || r.Hash != p.Hash {
		return nil, nil, refuse("checkpoint of record %d: no such record with hash %.16s", p.Seq, p.Hash)
	}
	roots, err := t.roots()
	if err != nil {
		return nil, nil, err
	}
	if err := verifyCheckpoint(t.f.td.Name(), p, roots, t.c.Time); err != nil {
		return nil, nil, refuse("checkpoint of record %d: %v", p.Seq, err)
	}
	if err := t.noteCheckpointCA(p.Node, p.Cert); err != nil { // crl.go
		return nil, nil, err
	}
	if err := putU64(meta, keyCheckpoint, p.Seq); err != nil {
		return nil, nil, err
	}
	return nil, []AuditEvent{checkpointEvent(p)}, nil
}

func checkpointEvent(p *AuditCheckpoint) AuditEvent {
	return AuditEvent{Action: CmdAuditCheckpoint, Target: strconv.FormatUint(p.Seq, 10), Detail: map[string]string{
		"seq": strconv.FormatUint(p.Seq, 10), "hash": p.Hash, "node": p.Node,
		"cert":      base64.StdEncoding.EncodeToString(p.Cert),
		"signature": base64.StdEncoding.EncodeToString(p.Signature)}}
}

// MaxPrunePerCommand bounds the records one prune removes, so one command's
// cost does not depend on how far behind retention is.
const MaxPrunePerCommand = 50000

// applyAuditPrune drops the oldest records below p.Before, after exporting
// them to a segment file on this node. The chain stays verifiable from the
// first retained record: its Prev is the last pruned record's hash, and the
// prune record names both.
func applyAuditPrune(t *txn, p *AuditPrune) (any, []AuditEvent, error) {
	meta := t.tx.Bucket(bMeta)
	var h AuditHead
	if _, err := getJSON(meta, keyAuditHead, &h); err != nil {
		return nil, nil, err
	}
	first := max(h.First, 1)
	switch {
	case p.Before <= first:
		return nil, nil, refuse("prune below %d: records before %d are already pruned", p.Before, first)
	case p.Before > h.Seq:
		return nil, nil, refuse("prune below %d would remove the chain head (%d)", p.Before, h.Seq)
	case p.Before-first > MaxPrunePerCommand:
		return nil, nil, refuse("prune of %d records; at most %d per command", p.Before-first, MaxPrunePerCommand)
	}
	audit := t.tx.Bucket(bAudit)
	var lastHash string
	if v := audit.Get(u64Key(p.Before)); v != nil {
		var r AuditRecord
		if err := decodeStrict(v, &r); err != nil {
			return nil, nil, err
		}
		lastHash = r.Prev
	}
	// Each node keeps its own copy; a failure here is this node's alone
	// (the others export the same records) and must not make replicas
	// diverge, so it is logged and counted, not refused.
	if err := t.f.exportSegment(t.tx, first, p.Before-1); err != nil {
		t.f.log.Error("audit segment export failed; these records remain only on other nodes' segments", "from", first, "to", p.Before-1, "err", err)
		t.f.exportFailures.Add(1)
	}
	for s := first; s < p.Before; s++ {
		if err := audit.Delete(u64Key(s)); err != nil {
			return nil, nil, err
		}
	}
	h.First = p.Before
	if err := putJSON(meta, keyAuditHead, h); err != nil {
		return nil, nil, err
	}
	return nil, []AuditEvent{{Action: CmdAuditPrune, Target: fmt.Sprintf("%d-%d", first, p.Before-1), Detail: map[string]string{
		"from": strconv.FormatUint(first, 10), "to": strconv.FormatUint(p.Before-1, 10), "last_hash": lastHash}}}, nil
}

// IssuedSVID looks up an unexpired X.509-SVID by serial (lowercase hex
// without leading zeros).
func (f *FSM) IssuedSVID(serial string) (IssuedSVID, bool) {
	var s IssuedSVID
	var ok bool
	if !f.read("IssuedSVID", func(tx *bolt.Tx) error {
		var err error
		ok, err = getJSON(tx.Bucket(bSVIDs), []byte(serial), &s)
		return err
	}) {
		return IssuedSVID{}, false
	}
	return s, ok
}

// FirstAuditAtOrAfter is the sequence number of the first retained record
// stamped at or after t, looking at no more than limit records (it returns
// the record after the last one looked at when all were older).
func (f *FSM) FirstAuditAtOrAfter(t time.Time, limit int) uint64 {
	var seq uint64
	f.read("FirstAuditAtOrAfter", func(tx *bolt.Tx) error {
		c := tx.Bucket(bAudit).Cursor()
		n := 0
		for k, v := c.First(); k != nil; k, v = c.Next() {
			var r struct {
				Seq  uint64    `json:"seq"`
				Time time.Time `json:"time"`
			}
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if !r.Time.Before(t) || n == limit {
				seq = r.Seq
				return nil
			}
			seq = r.Seq + 1
			n++
		}
		return nil
	})
	return seq
}
