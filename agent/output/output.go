// Package output writes SVIDs to files for workloads that cannot speak the
// Workload API: the chain, its key (0600, owned by the workload's user),
// the bundle and optional JWT-SVIDs, each written atomically (a temporary
// file in the same directory, synced, then renamed) and re-written when
// the SVID rotates or the bundle changes. The path is walked without
// following symlinks and every directory on it must be beyond the reach of
// other workloads (see openOutputDir), so no workload can redirect the
// agent's writes into another's output. After the files changed, an
// output may tell its workload (notify.go): a signal to the process in a
// pid file, or a command run as the workload's user.
package output

import (
	"context"
	"crypto/sha256"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// Config is one output directory.
type Config struct {
	// Dir receives svid.pem, svid_key.pem, bundle.pem and, with
	// jwt-audiences, jwt_svid.token and jwt_bundle.json.
	Dir string `yaml:"dir"`
	// Selectors describe the workload as attestation would ("unix:uid:1000",
	// ...): the output gets the SVID of the first entry they satisfy.
	Selectors []string `yaml:"selectors"`
	// SPIFFEID, when set, picks that identity among the matches.
	SPIFFEID string `yaml:"spiffe-id"`
	// UID and GID own the files (the key is 0600, the rest 0644). A
	// directory the agent creates for the output is the agent's, mode
	// 0750 with group GID: the workload reads, only the agent writes.
	UID int `yaml:"uid"`
	GID int `yaml:"gid"`
	// JWTAudiences, when set, also writes a JWT-SVID for them.
	JWTAudiences []string `yaml:"jwt-audiences"`
	// Notify, when set, tells the workload each time its files changed.
	Notify *Notify `yaml:"notify"`
}

// Validate checks a config before anything is written.
func (c Config) Validate() error {
	if !filepath.IsAbs(c.Dir) {
		return fmt.Errorf("output dir %q: must be an absolute path", c.Dir)
	}
	if len(c.Selectors) == 0 {
		return fmt.Errorf("output %s: needs selectors", c.Dir)
	}
	for _, s := range c.Selectors {
		if strings.Count(s, ":") < 2 {
			return fmt.Errorf("output %s: selector %q: want type:key:value", c.Dir, s)
		}
	}
	if c.UID < 0 || c.GID < 0 {
		return fmt.Errorf("output %s: uid and gid must not be negative", c.Dir)
	}
	if c.Notify != nil {
		return c.Notify.validate(c.Dir)
	}
	return nil
}

// Source is the agent's cache.
type Source interface {
	Current() (*cache.Snapshot, <-chan struct{})
	JWTSVID(ctx context.Context, e api.Entry, audience []string) (string, time.Time, error)
}

// Run keeps one output current until ctx ends. Its notification (if any)
// runs in the same goroutine, after all the files a round wrote are in
// place, so a slow workload only delays its own output. st may be nil.
func Run(ctx context.Context, src Source, c Config, log *slog.Logger, st *Stats) {
	if st == nil {
		st = new(Stats)
	}
	sel := map[string]bool{}
	for _, s := range c.Selectors {
		sel[s] = true
	}
	has := func(want ...string) bool {
		for _, w := range want {
			if !sel[w] {
				return false
			}
		}
		return true
	}
	var lastSVID, lastBundle [32]byte
	var jwtRefresh time.Time
	// changed: files were replaced since the last notification; failed:
	// a write of this round failed, so not all of them are in place yet.
	changed := false
	for {
		snap, next := src.Current()
		wait := time.Hour
		failed := false
		if snap.Bundle != nil {
			entries := snap.Match(has)
			if c.SPIFFEID != "" {
				var keep []api.Entry
				for _, e := range entries {
					if e.SPIFFEID == c.SPIFFEID {
						keep = append(keep, e)
					}
				}
				entries = keep
			}
			if svids := snap.SVIDsFor(entries, time.Now()); len(svids) > 0 {
				v := svids[0]
				if fp := sha256.Sum256(v.ChainDER); fp != lastSVID {
					if err := writeSVID(c, v); err != nil {
						log.Error("output not written", "dir", c.Dir, "err", err)
						wait = 5 * time.Second
						failed = true
					} else {
						lastSVID = fp
						changed = true
						jwtRefresh = time.Time{}
						log.Info("output written", "dir", c.Dir, "spiffe_id", v.SPIFFEID, "expires", v.NotAfter)
					}
				}
				if len(c.JWTAudiences) > 0 && !time.Now().Before(jwtRefresh) {
					e := entries[0]
					for _, x := range entries {
						if x.ID == v.EntryID {
							e = x
						}
					}
					tok, exp, err := src.JWTSVID(ctx, e, c.JWTAudiences)
					if err != nil {
						log.Warn("output JWT-SVID not refreshed", "dir", c.Dir, "err", err)
						wait = 5 * time.Second
					} else if err := writeFile(c, "jwt_svid.token", []byte(tok), 0o600); err != nil {
						log.Error("output not written", "dir", c.Dir, "err", err)
						failed = true
					} else {
						jwtRefresh = time.Now().Add(time.Until(exp) / 2)
						changed = true
					}
				}
				if !jwtRefresh.IsZero() {
					wait = min(wait, max(time.Until(jwtRefresh), time.Second))
				}
			}
			if fp := bundleFP(snap); fp != lastBundle {
				if err := writeBundle(c, snap); err != nil {
					log.Error("output bundle not written", "dir", c.Dir, "err", err)
					failed = true
				} else {
					lastBundle = fp
					changed = true
				}
			}
		}
		if failed {
			wait = min(wait, 5*time.Second)
		} else if changed && c.Notify != nil {
			// A failed notification is not repeated until the files
			// change again: the workload may not be up yet, and a retry
			// loop would hammer whatever the pid file now names.
			changed = false
			notifyOnce(ctx, c, log, st)
		}
		select {
		case <-ctx.Done():
			return
		case <-next:
		case <-time.After(wait):
		}
	}
}

func bundleFP(s *cache.Snapshot) [32]byte {
	h := sha256.New()
	for _, c := range s.Bundle.X509Authorities() {
		h.Write(c.Raw)
	}
	jwks, _ := s.Bundle.JWTBundle().Marshal()
	h.Write(jwks)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

func writeSVID(c Config, v *cache.SVID) error {
	var chain []byte
	for _, cert := range v.Chain {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	// One directory fd for both: the key and its chain land side by side.
	d, err := openOutputDir(c)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }() // O_PATH: d.write reports every failure
	// The key first: a reader that sees the new chain must find its key.
	if err := d.write("svid_key.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: v.KeyDER}), 0o600); err != nil {
		return err
	}
	return d.write("svid.pem", chain, 0o644)
}

func writeBundle(c Config, s *cache.Snapshot) error {
	var b []byte
	for _, cert := range s.Bundle.X509Authorities() {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})...)
	}
	var jwks []byte
	if len(c.JWTAudiences) > 0 {
		var err error
		if jwks, err = s.Bundle.JWTBundle().Marshal(); err != nil {
			return err
		}
	}
	d, err := openOutputDir(c)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }() // O_PATH: d.write reports every failure
	if err := d.write("bundle.pem", b, 0o644); err != nil {
		return err
	}
	if len(c.JWTAudiences) == 0 {
		return nil
	}
	return d.write("jwt_bundle.json", jwks, 0o644)
}

// writeFile replaces Dir/name atomically (see outDir.write).
func writeFile(c Config, name string, data []byte, mode os.FileMode) error {
	d, err := openOutputDir(c)
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }() // O_PATH: d.write reports every failure
	return d.write(name, data, mode)
}

// WritePrivate replaces dir/name atomically with data, mode 0600 and
// owned by the calling user, walking dir under the same rules as an
// output's directory (no symlinks, no component another user could swap).
// It is for sigil-agent exec --out (package agent/jobrun), which runs as
// the job's own user; dir must exist (a missing one would be made 0750).
func WritePrivate(dir, name string, data []byte) error {
	return writeFile(Config{Dir: dir, UID: os.Geteuid(), GID: os.Getegid()}, name, data, 0o600)
}

// notifyOnce runs c's notification, logging and counting the outcome.
func notifyOnce(ctx context.Context, c Config, log *slog.Logger, st *Stats) {
	what := "command " + strings.Join(c.Notify.Command, " ")
	if c.Notify.Signal != "" {
		what = c.Notify.Signal + " to the pid in " + c.Notify.PIDFile
	}
	st.Notifications.Add(1)
	if err := notify(ctx, c); err != nil {
		st.NotifyFailures.Add(1)
		log.Error("output notification failed", "dir", c.Dir, "notify", what, "err", err)
		return
	}
	log.Info("output notified", "dir", c.Dir, "notify", what)
}
