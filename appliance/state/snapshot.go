package state

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
)

// State stream (raft snapshots and `sigilctl snapshot save` archives):
//
//	SIGIL-STATE 2\n
//	{header JSON}\n
//	frames: kind (1 byte), uvarint key length, key, uvarint value length, value
//	0x00 (end of frames)
//	sha256 <hex of every byte before this line>\n
//
// Values are the stored JSON documents (explicit field names), one frame
// per record of the primary buckets. Indexes are not in the stream: a
// reader rebuilds them, so a crafted stream cannot carry an index that
// disagrees with its data.
const streamMagic = "SIGIL-STATE 2\n"

// StreamVersion is the state stream format this code writes and reads.
const StreamVersion = 2

// Frame kinds.
const (
	frameEnd byte = iota
	frameMeta
	frameEntry
	frameAgent
	frameToken
	frameJWTKey
	frameRevocation
	frameSVID
	frameAudit
	frameJoinRule
	frameJobToken
	frameFederation
)

var frameBuckets = map[byte][]byte{
	frameMeta: bMeta, frameEntry: bEntries, frameAgent: bAgents, frameToken: bTokens,
	frameJWTKey: bJWTKeys, frameRevocation: bRevoked, frameSVID: bSVIDs, frameAudit: bAudit,
	frameJoinRule: bJoinRules, frameJobToken: bJobTokens, frameFederation: bFederations,
}

// streamMetaKeys are the meta values a stream carries; the index and the
// audit head come from the header and the records.
var streamMetaKeys = map[string]bool{
	string(keyPolicy): true, string(keyRoots): true, string(keyBundleSequence): true, string(keyCheckpoint): true,
	string(keyAdmins): true, string(keyVersionFloor): true,
}

// Stream bounds: a frame's key and value, and the header line.
const (
	maxFrameKey   = 1024
	maxFrameValue = 4 << 20
	maxHeader     = 64 << 10
)

// ArchiveMeta is a state stream's header; ReadArchive adds the counts.
type ArchiveMeta struct {
	FormatVersion int       `json:"format_version"`
	TrustDomain   string    `json:"trust_domain"`
	Index         uint64    `json:"index"`
	Created       time.Time `json:"created"`
	Node          string    `json:"node,omitempty"`
	AuditFirst    uint64    `json:"audit_first"`
	AuditHeadSeq  uint64    `json:"audit_head_seq"`
	AuditHead     string    `json:"audit_head"`
	// Counted while reading.
	Entries      int   `json:"entries,omitempty"`
	Agents       int   `json:"agents,omitempty"`
	AuditRecords int   `json:"audit_records,omitempty"`
	Size         int64 `json:"size,omitempty"`
}

// Snapshot is a point-in-time view of the state: a bbolt read transaction
// taken when raft asks, streamed by Persist while commands go on applying.
type Snapshot struct {
	f     *FSM
	tx    *bolt.Tx
	index uint64
	unref func()
}

// Snapshot opens a read transaction; it costs microseconds whatever the
// size of the state.
func (f *FSM) Snapshot() (*Snapshot, error) {
	f.dbMu.RLock()
	if f.db == nil {
		f.dbMu.RUnlock()
		return nil, errors.New("state: closed")
	}
	tx, err := f.db.Begin(false)
	if err != nil {
		f.dbMu.RUnlock()
		return nil, err
	}
	// The read lock on dbMu is held until Release, so a restore cannot
	// close the file under the stream.
	return &Snapshot{f: f, tx: tx, index: f.AppliedIndex(), unref: f.dbMu.RUnlock}, nil
}

// Persist streams the snapshot.
func (s *Snapshot) Persist(w io.Writer) error {
	if s.tx == nil {
		return errors.New("state: snapshot released")
	}
	if rate := s.f.opts.SnapshotRate; rate > 0 {
		w = &pacedWriter{w: w, rate: rate, start: time.Now()}
	}
	_, err := writeStream(w, s.f.td.Name(), s.tx, s.index, "", time.Time{})
	return err
}

// pacedWriter holds a stream to a rate: after each write it sleeps until
// the bytes so far are no ahead of rate.
type pacedWriter struct {
	w     io.Writer
	rate  int64
	start time.Time
	n     int64
}

func (p *pacedWriter) Write(b []byte) (int, error) {
	n, err := p.w.Write(b)
	p.n += int64(n)
	if ahead := time.Duration(float64(p.n)/float64(p.rate)*float64(time.Second)) - time.Since(p.start); ahead > time.Millisecond {
		time.Sleep(ahead)
	}
	return n, err
}

// Release ends the read transaction.
func (s *Snapshot) Release() {
	if s.tx != nil {
		s.tx.Rollback()
		s.tx = nil
		s.unref()
	}
}

// hashWriter writes through a buffer and hashes what it writes.
type hashWriter struct {
	w *bufio.Writer
	h hash.Hash
	n int64
}

// put writes each of ps. A write error sticks in the bufio.Writer: every
// later write and the Flush that ends the stream return it.
func (hw *hashWriter) put(ps ...[]byte) {
	for _, p := range ps {
		hw.h.Write(p)
		hw.n += int64(len(p))
		hw.w.Write(p)
	}
}

func writeStream(w io.Writer, td string, tx *bolt.Tx, index uint64, node string, created time.Time) (ArchiveMeta, error) {
	hw := &hashWriter{w: bufio.NewWriterSize(w, 256<<10), h: sha256.New()}
	meta := tx.Bucket(bMeta)
	var head AuditHead
	if _, err := getJSON(meta, keyAuditHead, &head); err != nil {
		return ArchiveMeta{}, err
	}
	if index == 0 {
		index = getU64(meta, keyIndex)
	}
	hdr := ArchiveMeta{FormatVersion: StreamVersion, TrustDomain: td, Index: index, Created: created.UTC(), Node: node,
		AuditFirst: max(head.First, 1), AuditHeadSeq: head.Seq, AuditHead: head.Hash}
	hb, err := json.Marshal(hdr)
	if err != nil {
		return hdr, err
	}
	hw.put([]byte(streamMagic), hb, []byte{'\n'})
	var lenBuf [binary.MaxVarintLen64]byte
	frame := func(kind byte, k, v []byte) error {
		// A frame the reader would refuse must fail the snapshot here,
		// not later on every replica that installs it.
		if len(k) > maxFrameKey || len(v) > maxFrameValue {
			return fmt.Errorf("state: %s record %q of %d bytes exceeds the snapshot frame limit", frameBuckets[kind], truncate(string(k), 64), len(v))
		}
		hw.put([]byte{kind}, lenBuf[:binary.PutUvarint(lenBuf[:], uint64(len(k)))], k)
		hw.put(lenBuf[:binary.PutUvarint(lenBuf[:], uint64(len(v)))], v)
		// Stop at the first failed write rather than frame the rest.
		_, err := hw.w.Write(nil)
		return err
	}
	for kind := frameMeta; kind <= frameFederation; kind++ {
		err := tx.Bucket(frameBuckets[kind]).ForEach(func(k, v []byte) error {
			if kind == frameMeta && !streamMetaKeys[string(k)] {
				return nil
			}
			switch kind {
			case frameEntry:
				hdr.Entries++
			case frameAgent:
				hdr.Agents++
			case frameAudit:
				hdr.AuditRecords++
			}
			return frame(kind, k, v)
		})
		if err != nil {
			return hdr, err
		}
	}
	hw.put([]byte{frameEnd})
	sum := hw.h.Sum(nil)
	if _, err := fmt.Fprintf(hw.w, "sha256 %s\n", hex.EncodeToString(sum)); err != nil {
		return hdr, err
	}
	hdr.Size = hw.n + int64(len("sha256 \n")+64)
	return hdr, hw.w.Flush()
}

// ErrBadArchive covers every way a state stream can fail its checks.
var ErrBadArchive = errors.New("bad snapshot archive")

func badStream(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadArchive, fmt.Sprintf(format, a...))
}

// hashReader hashes what is read through it.
type hashReader struct {
	r *bufio.Reader
	h hash.Hash
	n int64
}

func (hr *hashReader) Read(p []byte) (int, error) {
	n, err := hr.r.Read(p)
	hr.h.Write(p[:n])
	hr.n += int64(n)
	return n, err
}

func (hr *hashReader) ReadByte() (byte, error) {
	b, err := hr.r.ReadByte()
	if err == nil {
		hr.h.Write([]byte{b})
		hr.n++
	}
	return b, err
}

// readStream parses a state stream into a fresh bolt file at path and
// checks it completely: layout, trust domain, every value's format, entry
// validation, the audit chain, and the trailing checksum. On any error the
// file is removed. It returns the header with counts and the SHA-256 of
// the whole stream.
func (f *FSM) readStream(r io.Reader, path string) (*bolt.DB, ArchiveMeta, string, error) {
	var hdr ArchiveMeta
	fail := func(err error) (*bolt.DB, ArchiveMeta, string, error) {
		_ = os.Remove(path) // best effort: the stream's error is what the caller needs
		return nil, hdr, "", err
	}
	whole := sha256.New()
	hr := &hashReader{r: bufio.NewReaderSize(io.TeeReader(r, whole), 256<<10), h: sha256.New()}
	magic := make([]byte, len(streamMagic))
	if _, err := io.ReadFull(hr, magic); err != nil || string(magic) != streamMagic {
		return fail(badStream("not a Sigil state stream (no %q header)", streamMagic[:len(streamMagic)-1]))
	}
	line, err := readLine(hr, maxHeader)
	if err != nil {
		return fail(badStream("header: %v", err))
	}
	if err := decodeStrict(line, &hdr); err != nil {
		return fail(badStream("header: %v", err))
	}
	if hdr.FormatVersion != StreamVersion {
		return fail(badStream("format version %d; this node reads %d", hdr.FormatVersion, StreamVersion))
	}
	if hdr.TrustDomain != f.td.Name() {
		return fail(badStream("archive is of trust domain %q, this appliance serves %q", hdr.TrustDomain, f.td.Name()))
	}
	// A file left at path by an earlier attempt must not be opened as if
	// it were fresh.
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("state: remove stale %s: %w", path, err))
	}
	db, err := createDB(path)
	if err != nil {
		return fail(err)
	}
	ld := &loader{f: f, db: db, hdr: &hdr}
	closeFail := func(err error) (*bolt.DB, ArchiveMeta, string, error) {
		if ld.tx != nil {
			ld.tx.Rollback()
		}
		_ = db.Close() // the file is removed next: the stream's error is the one to report
		return fail(err)
	}
	for {
		kind, err := hr.ReadByte()
		if err != nil {
			return closeFail(badStream("truncated: %v", err))
		}
		if kind == frameEnd {
			break
		}
		if _, ok := frameBuckets[kind]; !ok {
			return closeFail(badStream("unknown frame kind %d", kind))
		}
		k, err := readChunk(hr, maxFrameKey)
		if err != nil {
			return closeFail(badStream("frame key: %v", err))
		}
		v, err := readChunk(hr, maxFrameValue)
		if err != nil {
			return closeFail(badStream("frame value: %v", err))
		}
		if err := ld.add(kind, k, v); err != nil {
			return closeFail(badStream("%v", err))
		}
	}
	want := hex.EncodeToString(hr.h.Sum(nil))
	trailer, err := readLine(hr.r, 80)
	if err != nil {
		return closeFail(badStream("truncated: no checksum trailer"))
	}
	if got, ok := bytes.CutPrefix(trailer, []byte("sha256 ")); !ok || string(got) != want {
		return closeFail(badStream("checksum mismatch: the archive was altered or damaged"))
	}
	if _, err := hr.r.ReadByte(); err != io.EOF {
		return closeFail(badStream("trailing data after the checksum"))
	}
	if err := ld.finish(); err != nil {
		return closeFail(badStream("%v", err))
	}
	hdr.Size = hr.n + int64(len(trailer)) + 1
	// The archive's name is the SHA-256 of the whole file, as sha256sum
	// shows it.
	return db, hdr, hex.EncodeToString(whole.Sum(nil)), nil
}

func readLine(r io.ByteReader, limit int) ([]byte, error) {
	var b []byte
	for {
		c, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		if c == '\n' {
			return b, nil
		}
		if len(b) >= limit {
			return nil, fmt.Errorf("line longer than %d bytes", limit)
		}
		b = append(b, c)
	}
}

func readChunk(r *hashReader, limit int) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return nil, err
	}
	if n > uint64(limit) {
		return nil, fmt.Errorf("%d bytes, at most %d", n, limit)
	}
	b := make([]byte, n)
	_, err = io.ReadFull(r, b)
	return b, err
}

// loader writes a stream's records into a bolt file in large
// transactions, checking each and rebuilding the indexes.
type loader struct {
	f     *FSM
	db    *bolt.DB
	hdr   *ArchiveMeta
	tx    *bolt.Tx
	n     int
	chain chainCheck
	kind  byte
	last  []byte
	// feds counts relationships (bucket stats miss the batch's writes)
	feds int
}

const loaderBatch = 20000

func (l *loader) add(kind byte, k, v []byte) error {
	if kind < l.kind || kind == l.kind && l.last != nil && bytes.Compare(k, l.last) <= 0 {
		return fmt.Errorf("frames out of order at kind %d", kind)
	}
	l.kind, l.last = kind, k
	if l.tx == nil {
		tx, err := l.db.Begin(true)
		if err != nil {
			return err
		}
		l.tx = tx
		tx.Bucket(bAudit).FillPercent = 1.0
	}
	if err := l.check(kind, k, v); err != nil {
		return err
	}
	if err := l.tx.Bucket(frameBuckets[kind]).Put(k, v); err != nil {
		return err
	}
	if l.n++; l.n%loaderBatch == 0 {
		if err := l.tx.Commit(); err != nil {
			return err
		}
		l.tx = nil
	}
	return nil
}

// check validates one record and writes its index rows.
func (l *loader) check(kind byte, k, v []byte) error {
	tx := l.tx
	switch kind {
	case frameMeta:
		if !streamMetaKeys[string(k)] {
			return fmt.Errorf("unknown meta key %q", truncate(string(k), 64))
		}
		switch string(k) {
		case string(keyPolicy):
			var p JoinPolicy
			if err := decodeStrict(v, &p); err != nil {
				return fmt.Errorf("policy: %v", err)
			}
			if err := checkPolicy(&p); err != nil {
				return fmt.Errorf("policy: %v", err)
			}
		case string(keyAdmins):
			var admins []AdminRecord
			if err := decodeStrict(v, &admins); err != nil {
				return fmt.Errorf("admin table: %v", err)
			}
			if err := checkAdmins(admins); err != nil {
				return fmt.Errorf("admin table: %v", err)
			}
		case string(keyRoots):
			var roots [][]byte
			if err := decodeStrict(v, &roots); err != nil {
				return fmt.Errorf("roots: %v", err)
			}
			for i, d := range roots {
				if _, err := checkRoot(l.f.td, i, d); err != nil {
					return err
				}
			}
		case string(keyRootCRLs):
			// Signatures are checked in finish, when the roots are in.
			var crls []RootCRL
			if err := decodeStrict(v, &crls); err != nil {
				return fmt.Errorf("root CRLs: %v", err)
			}
			if _, err := checkStoredRootCRLs(crls, nil); err != nil {
				return err
			}
		case string(keyRootRotation):
			var r RootRotation
			if err := decodeStrict(v, &r); err != nil {
				return fmt.Errorf("root rotation: %v", err)
			}
			if err := checkRootRotation(&r); err != nil {
				return err
			}
		case string(keyRetiredRoots):
			var rs []RetiredRoot
			if err := decodeStrict(v, &rs); err != nil {
				return fmt.Errorf("retired roots: %v", err)
			}
			if err := checkRetiredRoots(rs); err != nil {
				return err
			}
		case string(keyNodeCAs):
			var recs []NodeCA
			if err := decodeStrict(v, &recs); err != nil {
				return fmt.Errorf("node CA records: %v", err)
			}
			if err := checkNodeCAs(recs); err != nil {
				return err
			}
		default:
			if len(v) != 8 {
				return fmt.Errorf("meta %s: want 8 bytes", k)
			}
		}
	case frameEntry:
		var e Entry
		if err := decodeStrict(v, &e); err != nil {
			return fmt.Errorf("entry %q: %v", truncate(string(k), 64), err)
		}
		if e.ID != string(k) {
			return fmt.Errorf("entry stored under %q has id %q", truncate(string(k), 64), truncate(e.ID, 64))
		}
		if !slices.IsSortedFunc(e.Selectors, compareSelectors) {
			return fmt.Errorf("entry %s: selectors not in canonical order", truncate(e.ID, 64))
		}
		// Entries are loaded as they were stored: one a version 3 command
		// stored with selectors no agent produces is still part of the
		// state (validateEntry, strict false).
		if err := validateEntry(l.f.td, &e, false); err != nil {
			return fmt.Errorf("entry %s: %v", e.ID, err)
		}
		if dup := tx.Bucket(bEntriesByReg).Get([]byte(registrationKey(&e))); dup != nil {
			return fmt.Errorf("entries %s and %s register the same thing", dup, e.ID)
		}
		l.hdr.Entries++
		return putEntryIndexes(tx, &e)
	case frameAgent:
		var a Agent
		if err := decodeStrict(v, &a); err != nil {
			return fmt.Errorf("agent %q: %v", truncate(string(k), 128), err)
		}
		if a.ID != string(k) || !validAgentID(l.f.td, a.ID) {
			return fmt.Errorf("agent %q: not an agent ID of %s", truncate(string(k), 128), l.f.td.Name())
		}
		l.hdr.Agents++
		return indexJobAgent(tx, l.f.td, &a)
	case frameJoinRule:
		return loadJoinRuleFrame(k, v)
	case frameJobToken:
		return loadJobTokenFrame(tx, k, v)
	case frameFederation:
		if l.feds++; l.feds > MaxFederations {
			return fmt.Errorf("more than %d federation relationships", MaxFederations)
		}
		return loadFederationFrame(l.f.td, k, v)
	case frameToken:
		var t JoinToken
		if err := decodeStrict(v, &t); err != nil || t.ID != string(k) || !hexHashRE.MatchString(t.ID) {
			return fmt.Errorf("token %q: malformed", truncate(string(k), 64))
		}
		if err := indexToken(tx, &t); err != nil {
			return err
		}
	case frameJWTKey:
		var j JWTKey
		if err := decodeStrict(v, &j); err != nil || j.KID != string(k) {
			return fmt.Errorf("JWT key %q: malformed", truncate(string(k), 64))
		}
		if err := checkJWTKey(&j); err != nil {
			return err
		}
	case frameRevocation:
		var r Revocation
		if err := decodeStrict(v, &r); err != nil || !bytes.Equal(revocationKey(r.Node, r.Serial), k) || !serialRE.MatchString(r.Serial) {
			return fmt.Errorf("revocation %q: malformed", truncate(string(k), 64))
		}
	case frameSVID:
		var s IssuedSVID
		if err := decodeStrict(v, &s); err != nil || s.Serial != string(k) || !serialRE.MatchString(s.Serial) {
			return fmt.Errorf("issued SVID %q: malformed", truncate(string(k), 64))
		}
		return tx.Bucket(bSVIDsByExpiry).Put(expiryKey(s.NotAfter, s.Serial), nil)
	case frameAudit:
		var r AuditRecord
		if err := decodeStrict(v, &r); err != nil {
			return fmt.Errorf("audit record: %v", err)
		}
		if len(k) != 8 || binary.BigEndian.Uint64(k) != r.Seq {
			return fmt.Errorf("audit record %d stored under another key", r.Seq)
		}
		if l.chain.first == 0 && r.Seq != l.hdr.AuditFirst {
			return fmt.Errorf("audit log starts at %d, header says %d", r.Seq, l.hdr.AuditFirst)
		}
		if err := l.chain.next(&r); err != nil {
			return fmt.Errorf("audit chain breaks at record %d: %v", r.Seq, err)
		}
		l.hdr.AuditRecords++
	}
	return nil
}

// finish commits the last batch and checks what only the whole stream
// shows: the audit head matches the header.
func (l *loader) finish() error {
	if l.tx == nil {
		tx, err := l.db.Begin(true)
		if err != nil {
			return err
		}
		l.tx = tx
	}
	tx := l.tx
	l.tx = nil
	if l.chain.seq != l.hdr.AuditHeadSeq || l.chain.prev != l.hdr.AuditHead {
		tx.Rollback()
		return fmt.Errorf("audit head is %d:%.16s, header says %d:%.16s", l.chain.seq, l.chain.prev, l.hdr.AuditHeadSeq, l.hdr.AuditHead)
	}
	meta := tx.Bucket(bMeta)
	h := AuditHead{Seq: l.chain.seq, Hash: l.chain.prev, First: l.hdr.AuditFirst}
	// A state always has history (its roots were recorded), and what the
	// meta values claim about it must be inside it.
	if h.Seq == 0 && (h.First > 1 || l.hdr.Entries+l.hdr.Agents > 0) || h.Seq > 0 && (h.First < 1 || h.First > h.Seq) {
		tx.Rollback()
		return fmt.Errorf("audit log %d..%d: a state without its history", h.First, h.Seq)
	}
	if cp := getU64(meta, keyCheckpoint); cp > h.Seq {
		tx.Rollback()
		return fmt.Errorf("last checkpoint %d is past the audit head %d", cp, h.Seq)
	}
	if err := verifyStoredRootCRLs(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := putJSON(meta, keyAuditHead, h); err != nil {
		tx.Rollback()
		return err
	}
	if err := putU64(meta, keyIndex, l.hdr.Index); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// checkPolicy validates a stored join policy as the commands would have.
func checkPolicy(p *JoinPolicy) error {
	if len(p.EKCAs) > MaxEKCAs || len(p.EKAllow) > MaxEKAllowlist {
		return fmt.Errorf("%d EK CAs and %d allowlisted EKs; at most %d and %d", len(p.EKCAs), len(p.EKAllow), MaxEKCAs, MaxEKAllowlist)
	}
	for _, ca := range p.EKCAs {
		got, err := checkEKCA(ca.DER)
		if err != nil {
			return err
		}
		if got.ID != ca.ID {
			return fmt.Errorf("EK CA %s: id does not match its certificate", truncate(ca.ID, 64))
		}
	}
	for _, h := range p.EKAllow {
		if !hexHashRE.MatchString(h) {
			return fmt.Errorf("EK allowlist hash %q malformed", truncate(h, 80))
		}
	}
	return checkPCRPolicy(p.PCRPolicy)
}

// Restore replaces the state with a raft snapshot. The stream is read into
// a new file and checked completely before it replaces anything.
func (f *FSM) Restore(r io.Reader) error {
	tmp := f.opts.Path + ".restore"
	db, hdr, _, err := f.readStream(r, tmp)
	if err != nil {
		return err
	}
	if err := db.Close(); err != nil {
		_ = os.Remove(tmp) // nothing was replaced: best-effort cleanup
		return fmt.Errorf("state: close restored file: %w", err)
	}
	f.dbMu.Lock()
	// The old file stays open (and in use) until the new one is in place
	// and open: a failure here leaves the state as it was.
	if err := os.Rename(tmp, f.opts.Path); err != nil {
		f.dbMu.Unlock()
		_ = os.Remove(tmp) // nothing was replaced: best-effort cleanup
		return fmt.Errorf("state: install restored file: %w", err)
	}
	db, err = createDB(f.opts.Path)
	if err != nil {
		f.dbMu.Unlock()
		panic(fmt.Sprintf("state: the restored file does not open (the old one was replaced): %v", err))
	}
	old := f.db
	f.db = db
	f.dbMu.Unlock()
	if old != nil {
		// Its file was renamed over: a close error leaks at most a mapping,
		// and the restored state is in place either way.
		if err := old.Close(); err != nil {
			f.log.Warn("closing the replaced state file", "err", err)
		}
	}
	if err := f.loadCaches(); err != nil {
		return err
	}
	f.applied.Store(hdr.Index)
	f.log.Info("state restored from snapshot", "index", hdr.Index, "entries", hdr.Entries, "agents", hdr.Agents,
		"audit_records", hdr.AuditRecords, "bytes", hdr.Size)
	f.mu.Lock()
	close(f.watch)
	f.watch = make(chan struct{})
	close(f.cfgWatch)
	close(f.fedWatch)
	f.fedWatch = make(chan struct{})
	f.cfgWatch = make(chan struct{})
	f.wakeAllAgentsLocked()
	f.mu.Unlock()
	return nil
}

// Export is the state as a stream with a fixed header time (the same
// bytes on replicas with the same state; tests compare them).
func (f *FSM) Export() ([]byte, error) {
	var b bytes.Buffer
	err := f.view(func(tx *bolt.Tx) error {
		_, err := writeStream(&b, f.td.Name(), tx, 0, "", time.Time{})
		return err
	})
	return b.Bytes(), err
}

// WriteArchive streams the state to w as an archive (sigilctl snapshot
// save), from one read transaction.
func (f *FSM) WriteArchive(w io.Writer, node string, now time.Time) (ArchiveMeta, error) {
	var meta ArchiveMeta
	err := f.view(func(tx *bolt.Tx) error {
		var err error
		meta, err = writeStream(w, f.td.Name(), tx, f.AppliedIndex(), node, now)
		return err
	})
	return meta, err
}
