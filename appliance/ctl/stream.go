package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"
)

// Progress lines: a long transfer reports on stderr every progressEvery,
// or every progressBytes, whichever comes first; one that ends within
// progressEvery prints none. (Variables for tests.)
var (
	progressEvery       = 2 * time.Second
	progressBytes int64 = 64 << 20
)

// request bounds one request by --timeout.
func (g *globals) request(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, g.timeout)
}

// errNoProgress is the cause of a stream's end when it stalled.
var errNoProgress = errors.New("no progress")

// idle bounds a stream by progress rather than by total time: the context
// ends when touch has not been called for --timeout. done releases it.
func (g *globals) idle(parent context.Context) (ctx context.Context, touch func(), done func()) {
	ctx, cancel := context.WithCancelCause(parent)
	d := g.timeout
	t := time.AfterFunc(d, func() { cancel(fmt.Errorf("%w for %v (--timeout)", errNoProgress, d)) })
	return ctx, func() { t.Reset(d) }, func() { t.Stop(); cancel(nil) }
}

// streamErr explains a stream's failure by why its context ended, when it
// did: a stall or an interrupt reads better than gRPC's "context canceled".
func streamErr(ctx context.Context, err error) error {
	if err == nil || ctx.Err() == nil {
		return err
	}
	cause := context.Cause(ctx)
	switch {
	case errors.Is(cause, errNoProgress):
		return cause
	case errors.Is(cause, context.Canceled):
		return errors.New("interrupted")
	}
	return err
}

// progress reports a long transfer on stderr.
type progress struct {
	w     io.Writer
	label string
	total int64  // bytes expected (0: unknown)
	touch func() // called on every step (the idle watchdog)
	start time.Time
	last  time.Time
	n     int64 // bytes so far
	lastN int64
	lines int
}

func (g *globals) progress(label string, total int64, touch func()) *progress {
	now := time.Now()
	return &progress{w: g.errOut, label: label, total: total, touch: touch, start: now, last: now}
}

// add counts n more bytes and prints a line when one is due.
func (p *progress) add(n int) {
	if n == 0 {
		return
	}
	p.n += int64(n)
	if p.touch != nil {
		p.touch()
	}
	now := time.Now()
	if now.Sub(p.start) < progressEvery || now.Sub(p.last) < progressEvery && p.n-p.lastN < progressBytes {
		return
	}
	p.last, p.lastN = now, p.n
	p.lines++
	secs := now.Sub(p.start).Seconds()
	rate := float64(p.n) / secs
	if p.total > 0 {
		p.printf("%s: %s of %s (%d%%), %.0f s, %s/s\n", p.label, size(p.n), size(p.total), p.n*100/p.total, secs, size(int64(rate)))
		return
	}
	p.printf("%s: %s so far, %.0f s, %s/s\n", p.label, size(p.n), secs, size(int64(rate)))
}

// printf writes a progress line; like g.note, it ignores a failed write
// (stderr is not the transfer).
func (p *progress) printf(format string, args ...any) {
	_, _ = fmt.Fprintf(p.w, format, args...)
}

func (p *progress) seconds() float64 { return time.Since(p.start).Seconds() }

// progressWriter counts what is written through it.
type progressWriter struct {
	w io.Writer
	p *progress
}

func (pw *progressWriter) Write(b []byte) (int, error) {
	n, err := pw.w.Write(b)
	pw.p.add(n)
	return n, err
}

// progressReader counts what is read through it and calls eof once, at
// the end of the input.
type progressReader struct {
	r   io.Reader
	p   *progress
	eof func()
}

func (pr *progressReader) Read(b []byte) (int, error) {
	n, err := pr.r.Read(b)
	pr.p.add(n)
	if err == io.EOF && pr.eof != nil {
		pr.eof()
		pr.eof = nil
	}
	return n, err
}

// size is a byte count for people.
func size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// newFile creates path for output: mode 0600, never over an existing file.
// finish syncs and closes it (and its directory entry); abort, after any
// failure, closes and removes it. Exactly one of them must be called.
type newFile struct {
	*os.File
	path string
}

func createNew(path string) (*newFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, err
	}
	return &newFile{File: f, path: path}, nil
}

func (f *newFile) finish() error {
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	// The name, too, must survive a crash.
	if d, err := os.Open(filepath.Dir(f.path)); err == nil {
		err = d.Sync()
		_ = d.Close() // read only: Sync reports
		if err != nil {
			return err
		}
	}
	return nil
}

// abort removes the file and says so in err.
func (f *newFile) abort(err error) error {
	// Already failing, and closed already when finish's Close failed; the
	// file is removed next.
	_ = f.Close()
	if rerr := os.Remove(f.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return fmt.Errorf("%w (and %s could not be removed: %v)", err, f.path, rerr)
	}
	return fmt.Errorf("%w (removed the incomplete %s)", err, f.path)
}
