package state

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Archive layout (sigilctl snapshot save/restore):
//
//	SIGIL-SNAPSHOT 1\n
//	{meta JSON}\n
//	<state JSON, meta.size bytes>\n
//	sha256 <hex of everything above>\n
//
// The trailer covers the whole archive, so truncation (no trailer) and any
// change (wrong hash) are caught before the state is even parsed.
const archiveMagic = "SIGIL-SNAPSHOT 1\n"

// ArchiveMeta describes an archive.
type ArchiveMeta struct {
	TrustDomain string    `json:"trust_domain"`
	Index       uint64    `json:"index"`
	Created     time.Time `json:"created"`
	Node        string    `json:"node"`
	Size        int       `json:"size"`
	StateSHA256 string    `json:"state_sha256"`
	AuditHead   string    `json:"audit_head"`
}

// ErrBadArchive covers every way an archive can fail its checks.
var ErrBadArchive = errors.New("bad snapshot archive")

// WriteArchive packs exported state.
func (f *FSM) WriteArchive(node string, now time.Time) ([]byte, ArchiveMeta, error) {
	st, err := f.Export()
	if err != nil {
		return nil, ArchiveMeta{}, err
	}
	_, head := f.AuditHead()
	sum := sha256.Sum256(st)
	meta := ArchiveMeta{TrustDomain: f.td.Name(), Index: f.Index(), Created: now.UTC(), Node: node,
		Size: len(st), StateSHA256: hex.EncodeToString(sum[:]), AuditHead: head}
	mb, _ := json.Marshal(meta)
	var b bytes.Buffer
	b.WriteString(archiveMagic)
	b.Write(mb)
	b.WriteByte('\n')
	b.Write(st)
	b.WriteByte('\n')
	all := sha256.Sum256(b.Bytes())
	fmt.Fprintf(&b, "sha256 %s\n", hex.EncodeToString(all[:]))
	return b.Bytes(), meta, nil
}

// ReadArchive verifies an archive and returns its state JSON, its metadata
// and the SHA-256 of the whole archive file (as sha256sum shows it). It checks the checksum, the layout, the trust
// domain and the audit chain; it changes nothing.
func (f *FSM) ReadArchive(archive []byte) ([]byte, ArchiveMeta, string, error) {
	bad := func(format string, a ...any) ([]byte, ArchiveMeta, string, error) {
		return nil, ArchiveMeta{}, "", fmt.Errorf("%w: %s", ErrBadArchive, fmt.Sprintf(format, a...))
	}
	if !bytes.HasPrefix(archive, []byte(archiveMagic)) {
		return bad("not a Sigil snapshot (no %q header)", archiveMagic[:len(archiveMagic)-1])
	}
	body, trailer, ok := cutLastLine(archive)
	if !ok {
		return bad("truncated: no checksum trailer")
	}
	want, found := bytes.CutPrefix(trailer, []byte("sha256 "))
	if !found || len(want) != 64 {
		return bad("truncated or damaged: last line is not a checksum")
	}
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != string(want) {
		return bad("checksum mismatch: the archive was altered or damaged")
	}
	rest := body[len(archiveMagic):]
	metaLine, rest, ok := bytes.Cut(rest, []byte("\n"))
	if !ok {
		return bad("no metadata line")
	}
	var meta ArchiveMeta
	if err := json.Unmarshal(metaLine, &meta); err != nil {
		return bad("metadata: %v", err)
	}
	if len(rest) != meta.Size+1 || rest[meta.Size] != '\n' {
		return bad("state is %d bytes, metadata says %d", len(rest)-1, meta.Size)
	}
	st := rest[:meta.Size]
	ss := sha256.Sum256(st)
	if hex.EncodeToString(ss[:]) != meta.StateSHA256 {
		return bad("state checksum does not match its metadata")
	}
	if meta.TrustDomain != f.td.Name() {
		return bad("archive is of trust domain %q, this appliance serves %q", meta.TrustDomain, f.td.Name())
	}
	if _, err := f.decodeData(st); err != nil {
		return bad("%v", err)
	}
	whole := sha256.Sum256(archive)
	return st, meta, hex.EncodeToString(whole[:]), nil
}

// cutLastLine splits off the final newline-terminated line.
func cutLastLine(b []byte) (body, last []byte, ok bool) {
	if len(b) == 0 || b[len(b)-1] != '\n' {
		return nil, nil, false
	}
	i := bytes.LastIndexByte(b[:len(b)-1], '\n')
	if i < 0 {
		return nil, nil, false
	}
	return b[:i+1], b[i+1 : len(b)-1], true
}
