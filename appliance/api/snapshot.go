package api

import (
	"bytes"
	"context"
	"errors"
	"io"
)

// SnapshotChunk is one piece of an archive stream. The last chunk of a
// save carries the archive's metadata and SHA-256.
type SnapshotChunk struct {
	Data   []byte       `json:",omitempty"`
	Meta   *ArchiveMeta `json:",omitempty"`
	SHA256 string       `json:",omitempty"`
}

// SnapshotChunkSize is how much archive one message carries: archives of a
// large state stream in pieces well under the message limit.
const SnapshotChunkSize = 512 << 10

// SnapshotSaveTo streams an archive of the state into w and returns its
// metadata and SHA-256.
func (c *AdminClient) SnapshotSaveTo(ctx context.Context, w io.Writer) (*SnapshotArchive, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cs, err := c.snapshotSaveStream(ctx, &Empty{})
	if err != nil {
		return nil, err
	}
	out := &SnapshotArchive{}
	for {
		var ch SnapshotChunk
		if err := cs.RecvMsg(&ch); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, err
		}
		if len(ch.Data) > 0 {
			if _, err := w.Write(ch.Data); err != nil {
				return nil, err
			}
		}
		if ch.Meta != nil {
			out.Meta, out.SHA256 = *ch.Meta, ch.SHA256
		}
	}
	if out.SHA256 == "" {
		return nil, errors.New("snapshot stream ended without its checksum")
	}
	return out, nil
}

// SnapshotSave fetches a whole archive into memory (small states, tests).
func (c *AdminClient) SnapshotSave(ctx context.Context, _ *Empty) (*SnapshotArchive, error) {
	var b bytes.Buffer
	out, err := c.SnapshotSaveTo(ctx, &b)
	if err != nil {
		return nil, err
	}
	out.Archive = b.Bytes()
	return out, nil
}

// SnapshotRestoreFrom streams an archive from r to the node, which checks
// it completely before it proposes the restore.
func (c *AdminClient) SnapshotRestoreFrom(ctx context.Context, r io.Reader) (*SnapshotArchive, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cs, err := c.snapshotRestoreStream(ctx)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, SnapshotChunkSize)
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if err := cs.SendMsg(&SnapshotChunk{Data: buf[:n]}); err != nil {
				if errors.Is(err, io.EOF) {
					break // the server answered early; RecvMsg has why
				}
				return nil, err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return nil, rerr
		}
	}
	if err := cs.CloseSend(); err != nil {
		return nil, err
	}
	out := new(SnapshotArchive)
	if err := cs.RecvMsg(out); err != nil {
		return nil, err
	}
	return out, nil
}

// SnapshotRestore sends an archive held in memory.
func (c *AdminClient) SnapshotRestore(ctx context.Context, r *SnapshotArchive) (*SnapshotArchive, error) {
	return c.SnapshotRestoreFrom(ctx, bytes.NewReader(r.Archive))
}

// AuditExport streams every audit record after r.After, from the node's
// exported segments and then its retained log, calling fn per page.
func (c *AdminClient) AuditExport(ctx context.Context, r *AuditRequest, fn func(*AuditList) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cs, err := c.auditExportStream(ctx, r)
	if err != nil {
		return err
	}
	for {
		var page AuditList
		if err := cs.RecvMsg(&page); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := fn(&page); err != nil {
			return err
		}
	}
}
