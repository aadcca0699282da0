package jobrun

import (
	"context"
	"crypto/sha256"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/sigil-appliance/sigil/agent/output"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// Files written to --out.
const (
	SVIDFile   = "svid.pem"
	KeyFile    = "svid-key.pem"
	BundleFile = "bundle.pem"
)

// JWTFileName is the file of an audience's JWT-SVID: jwt-<audience>.token,
// every byte of the audience outside [A-Za-z0-9._-] replaced by '_'.
func JWTFileName(aud string) string {
	b := []byte(aud)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			b[i] = '_'
		}
	}
	return "jwt-" + string(b) + ".token"
}

// jwtFileNames maps audiences to their files, refusing two that would
// share one.
func jwtFileNames(auds []string) (map[string]string, error) {
	out := map[string]string{}
	by := map[string]string{}
	for _, a := range auds {
		if a == "" {
			return nil, errors.New("empty JWT audience")
		}
		n := JWTFileName(a)
		if prev, ok := by[n]; ok && prev != a {
			return nil, fmt.Errorf("JWT audiences %q and %q would both be written to %s", prev, a, n)
		}
		by[n], out[a] = a, n
	}
	return out, nil
}

// outFiles keeps the run's SVID, key, bundle and JWT-SVIDs in a directory
// (each file 0600, replaced atomically by output.WritePrivate) and
// removes them at the end.
type outFiles struct {
	dir     string
	created bool // the directory was made for the run: removed at the end
	jwt     map[string]string
	log     *slog.Logger

	lastSVID, lastBundle [32]byte
	jwtRefresh           map[string]time.Time
	written              map[string]bool
}

func newOutFiles(dir string, auds []string, log *slog.Logger) (*outFiles, error) {
	jwt, err := jwtFileNames(auds)
	if err != nil {
		return nil, err
	}
	o := &outFiles{dir: dir, jwt: jwt, log: log, jwtRefresh: map[string]time.Time{}, written: map[string]bool{}}
	switch st, err := os.Stat(dir); {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("--out: %w", err)
		}
		// MkdirAll applies the umask: make the mode exact.
		if err := os.Chmod(dir, 0o700); err != nil {
			return nil, fmt.Errorf("--out: %w", err)
		}
		o.created = true
	case err != nil:
		return nil, fmt.Errorf("--out: %w", err)
	case !st.IsDir():
		return nil, fmt.Errorf("--out %s: not a directory", dir)
	}
	return o, nil
}

func (o *outFiles) write(name string, data []byte) error {
	if err := output.WritePrivate(o.dir, name, data); err != nil {
		return err
	}
	o.written[name] = true
	return nil
}

// update writes what changed: the SVID of entryID and its key, the
// bundle, and JWT-SVIDs past half their life. It returns when the next
// JWT-SVID falls due (zero: none).
func (o *outFiles) updateAt(ctx context.Context, src cacheSource, entryID string) (time.Time, error) {
	snap, _ := src.Current()
	v := snap.SVIDs[entryID]
	if v == nil || snap.Bundle == nil {
		return time.Time{}, fmt.Errorf("the run's SVID (entry %s) is not in the cache", entryID)
	}
	if fp := sha256.Sum256(v.ChainDER); fp != o.lastSVID {
		var chain []byte
		for _, c := range v.Chain {
			chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
		}
		// The key first: a reader that sees the new chain must find its key.
		if err := o.write(KeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: v.KeyDER})); err != nil {
			return time.Time{}, err
		}
		if err := o.write(SVIDFile, chain); err != nil {
			return time.Time{}, err
		}
		o.lastSVID = fp
		o.log.Info("run SVID written", "dir", o.dir, "spiffe_id", v.SPIFFEID, "expires", v.NotAfter)
	}
	h := sha256.New()
	var bundle []byte
	for _, c := range snap.Bundle.X509Authorities() {
		bundle = append(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	h.Write(bundle)
	if fp := [32]byte(h.Sum(nil)); fp != o.lastBundle {
		if err := o.write(BundleFile, bundle); err != nil {
			return time.Time{}, err
		}
		o.lastBundle = fp
	}
	var entry api.Entry
	for _, e := range snap.Entries {
		if e.ID == entryID {
			entry = e
		}
	}
	var next time.Time
	for aud, name := range o.jwt {
		if at := o.jwtRefresh[aud]; !at.IsZero() && time.Now().Before(at) {
			if next.IsZero() || at.Before(next) {
				next = at
			}
			continue
		}
		tok, exp, err := src.JWTSVID(ctx, entry, []string{aud})
		if err != nil {
			return time.Time{}, fmt.Errorf("JWT-SVID for %q: %w", aud, err)
		}
		if err := o.write(name, []byte(tok)); err != nil {
			return time.Time{}, err
		}
		at := time.Now().Add(time.Until(exp) / 2)
		o.jwtRefresh[aud] = at
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	return next, nil
}

func (o *outFiles) update(ctx context.Context, src cacheSource, entryID string) error {
	_, err := o.updateAt(ctx, src, entryID)
	return err
}

// run keeps the files current until ctx ends: on every cache change, at
// each JWT-SVID's half life, and 5 s after a failure.
func (o *outFiles) run(ctx context.Context, src cacheSource, entryID func() string) {
	for {
		_, changed := src.Current()
		wait := time.Hour
		next, err := o.updateAt(ctx, src, entryID())
		switch {
		case err != nil && ctx.Err() == nil:
			o.log.Warn("--out files not updated; will retry", "dir", o.dir, "err", err)
			wait = 5 * time.Second
		case !next.IsZero():
			wait = max(time.Until(next), time.Second)
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(wait):
		}
	}
}

// remove deletes the files written, and the directory if the run made it
// (when it is empty by then).
func (o *outFiles) remove() {
	for name := range o.written {
		if err := os.Remove(filepath.Join(o.dir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Error("--out file not removed", "file", filepath.Join(o.dir, name), "err", err)
		}
	}
	if o.created {
		if err := os.Remove(o.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			o.log.Warn("--out directory not removed", "dir", o.dir, "err", err)
		}
	}
}
