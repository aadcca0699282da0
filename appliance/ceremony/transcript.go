package ceremony

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Record is one line of a ceremony transcript. Records are hash-chained
// across ceremonies: Prev is the SHA-256 of the previous line as written, so
// a removed, reordered or edited line breaks the chain at that point.
type Record struct {
	Seq      int       `json:"seq"`
	Time     time.Time `json:"time"`
	Ceremony string    `json:"ceremony"` // random ID of this run
	Kind     string    `json:"kind"`
	Step     string    `json:"step"`
	Detail   []Field   `json:"detail,omitempty"`
	Prev     string    `json:"prev"`
}

// Field is one named fact of a step. An ordered list rather than a map, so
// the witnesses' screen and the file show facts in the same order.
type Field struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Transcript prints each step for the witnesses as it happens and appends
// the same records to the transcript file when the ceremony succeeds. A
// refused or failed ceremony leaves the file as it was: witnesses note
// failures from the screen.
type Transcript struct {
	out      io.Writer
	path     string
	id       string
	kind     string
	seq      int
	prev     string
	pending  [][]byte
	now      func() time.Time
	firstSeq int
}

func newTranscript(out io.Writer, path, kind string, now func() time.Time) (*Transcript, error) {
	seq, prev, err := readTranscript(path)
	if err != nil {
		return nil, err
	}
	id := make([]byte, 8)
	rand.Read(id)
	return &Transcript{out: out, path: path, id: hex.EncodeToString(id), kind: kind, seq: seq, prev: prev, now: now, firstSeq: seq + 1}, nil
}

// Step records one step.
func (t *Transcript) Step(step string, detail ...Field) {
	t.seq++
	r := Record{Seq: t.seq, Time: t.now().UTC(), Ceremony: t.id, Kind: t.kind, Step: step, Detail: detail, Prev: t.prev}
	line, _ := json.Marshal(r)
	sum := sha256.Sum256(line)
	t.prev = hex.EncodeToString(sum[:])
	t.pending = append(t.pending, line)

	var b strings.Builder
	fmt.Fprintf(&b, "[%d] %s", r.Seq, step)
	for _, f := range detail {
		fmt.Fprintf(&b, "\n      %-22s %s", f.Name+":", f.Value)
	}
	// The console echo is for the operator to follow; the record is the
	// file Commit writes, so a failed echo stops nothing.
	_, _ = fmt.Fprintln(t.out, b.String())
}

// Commit appends the pending records and syncs the file.
func (t *Transcript) Commit() error {
	f, err := os.OpenFile(t.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return err
	}
	for _, line := range t.pending {
		if _, err := f.Write(append(line, '\n')); err != nil {
			_ = f.Close() // the write error is the one to report
			return err
		}
	}
	if err := f.Sync(); err != nil {
		_ = f.Close() // the sync error is the one to report
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	_, _ = fmt.Fprintf(t.out, "transcript: records %d-%d appended to %s (chain head %s)\n", t.firstSeq, t.seq, t.path, t.prev)
	t.pending = nil
	return nil
}

// readTranscript verifies an existing transcript's chain and returns its
// last sequence number and line hash; a missing file is an empty chain.
func readTranscript(path string) (seq int, prev string, err error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, "", nil
	}
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = f.Close() }() // read-only
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Bytes()
		var r Record
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&r); err != nil {
			return 0, "", fmt.Errorf("%s line %d is not a transcript record: %v", path, n, err)
		}
		if r.Prev != prev {
			return 0, "", fmt.Errorf("%s line %d: hash chain broken (prev %q, want %q): the transcript was altered", path, n, r.Prev, prev)
		}
		if r.Seq != seq+1 {
			return 0, "", fmt.Errorf("%s line %d: sequence %d follows %d", path, n, r.Seq, seq)
		}
		seq = r.Seq
		sum := sha256.Sum256(line)
		prev = hex.EncodeToString(sum[:])
	}
	if err := sc.Err(); err != nil {
		return 0, "", fmt.Errorf("%s: %v", path, err)
	}
	return seq, prev, nil
}

// VerifyTranscript checks a transcript file's hash chain and returns how
// many records it holds.
func VerifyTranscript(path string) (int, error) {
	if _, err := os.Stat(path); err != nil {
		return 0, err
	}
	seq, _, err := readTranscript(path)
	return seq, err
}

func checkTranscript(path string) error {
	if st, err := os.Stat(path); err == nil && !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if _, _, err := readTranscript(path); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err == nil {
		_ = f.Close() // opened only to learn it is writable: nothing written
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	dir := path[:max(strings.LastIndexByte(path, '/'), 0)]
	if dir == "" {
		dir = "."
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("directory %s does not exist", dir)
	}
	return nil
}
