// Package attestor identifies the local process at the other end of a
// Workload API connection. Who the caller is comes from the kernel (the
// socket's peer credentials and a pidfd taken at connect time), never from
// the request; what it is (binary, hash, groups, systemd unit, container)
// is read from /proc while that pidfd proves the process is still the one
// that connected.
package attestor

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Selectors is the set of "type:value" facts about a caller, e.g.
// "unix:uid:1000", "systemd:unit:web.service".
type Selectors map[string]struct{}

// Has reports whether every one of want is present.
func (s Selectors) Has(want ...string) bool {
	for _, w := range want {
		if _, ok := s[w]; !ok {
			return false
		}
	}
	return true
}

// List returns the selectors sorted, for logs.
func (s Selectors) List() []string {
	out := make([]string, 0, len(s))
	for k := range s {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// Attestor reads a caller's selectors from /proc. It caches binary hashes
// by file identity (device, inode, size, change time), so a busy workload
// is not re-hashed on every call while a replaced binary always is.
type Attestor struct {
	proc string

	mu     sync.Mutex
	hashes map[fileKey]string
}

type fileKey struct {
	dev, ino    uint64
	size        int64
	ctime, mtim syscall.Timespec
}

const maxHashCache = 4096

// New returns an attestor reading the given proc mount ("" means /proc).
func New(proc string) *Attestor {
	if proc == "" {
		proc = "/proc"
	}
	return &Attestor{proc: proc, hashes: map[fileKey]string{}}
}

// ErrGone means the caller exited (or its pid now names another process)
// before attestation finished: nothing read about it can be trusted.
var ErrGone = errors.New("caller process exited during attestation")

// Attest returns the caller's selectors. The uid and gid are those the
// kernel recorded when the caller connected.
func (a *Attestor) Attest(ctx context.Context, c *Caller) (Selectors, error) {
	if err := c.alive(); err != nil {
		return nil, err
	}
	pid := int(c.PID)
	s := Selectors{}
	add := func(typ, val string) { s[typ+":"+val] = struct{}{} }
	add("unix", "uid:"+strconv.FormatUint(uint64(c.UID), 10))
	add("unix", "gid:"+strconv.FormatUint(uint64(c.GID), 10))
	if u, err := user.LookupId(strconv.FormatUint(uint64(c.UID), 10)); err == nil {
		add("unix", "user:"+u.Username)
	}
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(c.GID), 10)); err == nil {
		add("unix", "group:"+g.Name)
	}
	dir := filepath.Join(a.proc, strconv.Itoa(pid))
	groups, err := supplementaryGroups(filepath.Join(dir, "status"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: %w", pid, err)
	}
	for _, gid := range groups {
		add("unix", "supplementary_gid:"+gid)
		if g, err := user.LookupGroupId(gid); err == nil {
			add("unix", "supplementary_group:"+g.Name)
		}
	}
	path, err := os.Readlink(filepath.Join(dir, "exe"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: binary path: %w", pid, err)
	}
	add("unix", "path:"+path)
	sum, err := a.binaryHash(ctx, filepath.Join(dir, "exe"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: binary hash: %w", pid, err)
	}
	add("unix", "sha256:"+sum)
	cg, err := os.ReadFile(filepath.Join(dir, "cgroup"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: cgroup: %w", pid, err)
	}
	if unit := SystemdUnit(cg); unit != "" {
		add("systemd", "unit:"+unit)
	}
	if id := ContainerID(cg); id != "" {
		add("container", "id:"+id)
	}
	// Everything above was read through the pid; it describes the caller
	// only if the caller still holds that pid now.
	if err := c.alive(); err != nil {
		return nil, err
	}
	return s, nil
}

// binaryHash hashes the executable through /proc/PID/exe, which opens the
// file the process runs even if its path was since replaced.
func (a *Attestor) binaryHash(ctx context.Context, exe string) (string, error) {
	f, err := os.Open(exe)
	if err != nil {
		return "", err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return "", errors.New("no file identity")
	}
	k := fileKey{dev: sys.Dev, ino: sys.Ino, size: sys.Size, ctime: sys.Ctim, mtim: sys.Mtim}
	a.mu.Lock()
	sum, ok := a.hashes[k]
	a.mu.Unlock()
	if ok {
		return sum, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, ctxReader{ctx, f}); err != nil {
		return "", err
	}
	sum = hex.EncodeToString(h.Sum(nil))
	a.mu.Lock()
	if len(a.hashes) >= maxHashCache {
		clear(a.hashes)
	}
	a.hashes[k] = sum
	a.mu.Unlock()
	return sum, nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func supplementaryGroups(status string) ([]string, error) {
	f, err := os.Open(status)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Groups:"); ok {
			return strings.Fields(v), nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return nil, errors.New("no Groups line in " + status)
}

// SystemdUnit returns the deepest .service or .scope in the unified
// cgroup path ("" when the process is not in one).
func SystemdUnit(cgroup []byte) string {
	p := unifiedPath(cgroup)
	parts := strings.Split(p, "/")
	for i := len(parts) - 1; i >= 0; i-- {
		if strings.HasSuffix(parts[i], ".service") || strings.HasSuffix(parts[i], ".scope") {
			return parts[i]
		}
	}
	return ""
}

// Container runtimes name cgroups after the 64-hex container id:
// docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
// libpod-<id>.scope, /docker/<id>, kubepods/.../<id>.
var containerRe = regexp.MustCompile(`(?:^|[/-])([0-9a-f]{64})(?:\.scope)?(?:/|$)`)

// ContainerID returns the container id found in the cgroup paths, if any.
func ContainerID(cgroup []byte) string {
	for line := range bytes.SplitSeq(cgroup, []byte("\n")) {
		_, path, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		_, path, _ = bytes.Cut(path, []byte(":"))
		if m := containerRe.FindSubmatch(path); m != nil {
			return string(m[1])
		}
	}
	return ""
}

// unifiedPath is the cgroup v2 path (the "0::" line), or on v1 hosts the
// name=systemd hierarchy.
func unifiedPath(cgroup []byte) string {
	var v1 string
	for line := range strings.SplitSeq(string(cgroup), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok && p != "/" {
			return p
		}
		if _, p, ok := strings.Cut(line, ":name=systemd:"); ok {
			v1 = p
		}
	}
	return v1
}
