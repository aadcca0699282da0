package ctl

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// snapshotResult is what save and restore print: the node's answer (the
// archive's metadata and SHA-256), with the file and the transfer.
type snapshotResult struct {
	*api.SnapshotArchive
	File    string  `json:"file"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

func snapshotCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Back up and restore the replicated state"}
	save := &cobra.Command{Use: "save FILE", Args: cobra.ExactArgs(1),
		Short: "Stream a checksummed snapshot into a new file (never overwrites)",
		Long: "Streams an archive of the state from one read transaction of the node into FILE, created\n" +
			"with mode 0600 (never over an existing file), checks the node's SHA-256 of the stream\n" +
			"against the bytes received and fsyncs the file; on any failure the file is removed.\n" +
			"Progress goes to stderr; --timeout bounds a wait without progress, not the whole save.",
		RunE: func(_ *cobra.Command, args []string) error { return g.snapshotSave(args[0]) }}
	restore := &cobra.Command{Use: "restore FILE", Args: cobra.ExactArgs(1),
		Short: "Replace the state with a snapshot (the node checks it first)",
		Long: "Streams FILE to the node, which spools it, checks it completely (checksum, layout, trust\n" +
			"domain, every record, the audit chain, history) and only then proposes the restore. After\n" +
			"the upload the node has --timeout for its checks: raise it for large archives.",
		RunE: func(_ *cobra.Command, args []string) error { return g.snapshotRestore(args[0]) }}
	cmd.AddCommand(save, restore)
	return cmd
}

func (g *globals) snapshotSave(path string) (err error) {
	f, err := createNew(path)
	if err != nil {
		return err
	}
	saved := false
	defer func() {
		if !saved {
			err = f.abort(err)
		}
	}()
	return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		ctx, touch, done := g.idle(ctx)
		defer done()
		h := sha256.New()
		p := g.progress("snapshot save "+path, 0, touch)
		s, err := c.SnapshotSaveTo(ctx, &progressWriter{w: io.MultiWriter(f, h), p: p})
		if err != nil {
			return nil, fmt.Errorf("snapshot save: %w", streamErr(ctx, err))
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != s.SHA256 {
			return nil, fmt.Errorf("snapshot save: the node's SHA-256 %s is not that of the %d bytes received (%s)", s.SHA256, p.n, got)
		}
		if s.Meta.Size != 0 && s.Meta.Size != p.n {
			return nil, fmt.Errorf("snapshot save: the node wrote %d bytes, %d arrived", s.Meta.Size, p.n)
		}
		if err := f.finish(); err != nil {
			return nil, fmt.Errorf("snapshot save: %w", err)
		}
		saved = true
		return &snapshotResult{SnapshotArchive: s, File: path, Bytes: p.n, Seconds: p.seconds()}, nil
	}, func(w *bufio.Writer, v any) {
		r := v.(*snapshotResult)
		m := r.Meta
		fmt.Fprintf(w, "saved %s: index %d, %d bytes, %d entries, %d agents, %d audit records (%d..%d), sha256 %s, %.1f s\n",
			r.File, m.Index, r.Bytes, m.Entries, m.Agents, m.AuditRecords, m.AuditFirst, m.AuditHeadSeq, r.SHA256, r.Seconds)
	})
}

func (g *globals) snapshotRestore(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		ctx, touch, done := g.idle(ctx)
		defer done()
		h := sha256.New()
		p := g.progress("snapshot restore "+path, st.Size(), touch)
		r := &progressReader{r: io.TeeReader(f, h), p: p, eof: func() {
			touch() // the node's checks start now: they get a whole --timeout
			if p.lines > 0 {
				p.printf("snapshot restore %s: sent %s; the node is checking the archive (--timeout %v)\n", path, size(p.n), g.timeout)
			}
		}}
		s, err := c.SnapshotRestoreFrom(ctx, r)
		if err != nil {
			return nil, fmt.Errorf("snapshot restore: %w", streamErr(ctx, err))
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != s.SHA256 {
			return nil, fmt.Errorf("snapshot restore: the node restored an archive with SHA-256 %s, but %s has %s", s.SHA256, path, got)
		}
		return &snapshotResult{SnapshotArchive: s, File: path, Bytes: p.n, Seconds: p.seconds()}, nil
	}, func(w *bufio.Writer, v any) {
		r := v.(*snapshotResult)
		m := r.Meta
		fmt.Fprintf(w, "restored %s: index %d from node %s, %d entries, %d agents, %d audit records, sha256 %s, %.1f s\n",
			r.File, m.Index, m.Node, m.Entries, m.Agents, m.AuditRecords, r.SHA256, r.Seconds)
	})
}
