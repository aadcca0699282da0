// Package callerid identifies the local process at the other end of a
// Workload API connection. Who the caller is comes from the kernel (the
// socket's peer credentials and a pidfd taken at connect time), never from
// the request; what it is (binary, hash, groups, systemd unit, container)
// is read from /proc while that pidfd proves the process is still the one
// that connected.
package callerid

import (
	"bufio"
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
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
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
	// hashing bounds the binaries hashed at once: any local user can make
	// the agent hash a new file per connection (touch changes the key).
	hashing chan struct{}
}

type fileKey struct {
	dev, ino    uint64
	size        int64
	ctime, mtim syscall.Timespec
}

const maxHashCache = 4096

// MaxHashedBinary is the largest executable hashed for unix:sha256. A
// sparse file of any apparent size costs no disk, so without a bound one
// caller could keep a core busy per connection; larger binaries get no
// unix:sha256 selector (the others still hold).
const MaxHashedBinary = 256 << 20

// maxConcurrentHashes bounds the cores hashing can take.
const maxConcurrentHashes = 2

// New returns an attestor reading the given proc mount ("" means /proc).
func New(proc string) *Attestor {
	if proc == "" {
		proc = "/proc"
	}
	return &Attestor{proc: proc, hashes: map[fileKey]string{}, hashing: make(chan struct{}, maxConcurrentHashes)}
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
	// The exe link reads as a path in the caller's mount namespace, where
	// anyone with a user namespace can mount any file over any path. The
	// path is given only for callers in the host's mount namespace (pid
	// 1's: the agent's own is a private copy when systemd sandboxes it) or
	// the agent's, which only root sets up. Checked before and after the
	// read: an unprivileged process cannot move back into either once it
	// has left it.
	pathNS, err := a.pathNamespaces()
	if err != nil {
		return nil, err
	}
	before, err := nsID(filepath.Join(dir, "ns", "mnt"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: mount namespace: %w", pid, err)
	}
	path, err := os.Readlink(filepath.Join(dir, "exe"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: binary path: %w", pid, err)
	}
	after, err := nsID(filepath.Join(dir, "ns", "mnt"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: mount namespace: %w", pid, err)
	}
	if before == after && slices.Contains(pathNS, before) {
		add("unix", "path:"+path)
	}
	// The hash is of the file the process runs, whatever it is called in
	// whichever namespace, so it needs no such condition.
	sum, err := a.binaryHash(ctx, filepath.Join(dir, "exe"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: binary hash: %w", pid, err)
	}
	if sum != "" {
		add("unix", "sha256:"+sum)
	}
	cg, err := os.ReadFile(filepath.Join(dir, "cgroup"))
	if err != nil {
		return nil, fmt.Errorf("pid %d: cgroup: %w", pid, err)
	}
	// A cgroup's name is chosen by whoever may create it, so unit and
	// container names count only from cgroups root made and root alone
	// can move processes into. Any other cgroup yields neither, without
	// failing the attestation: the other selectors still hold.
	hier, cgPath := cgroupPath(cg)
	if unit, id := cgroupNames(cgPath); (unit != "" || id != "") && a.rootMadeCgroup(hier, cgPath) == nil {
		if unit != "" {
			add("systemd", "unit:"+unit)
		}
		if id != "" {
			add("container", "id:"+id)
		}
	}
	// Everything above was read through the pid; it describes the caller
	// only if the caller still holds that pid now.
	if err := c.alive(); err != nil {
		return nil, err
	}
	return s, nil
}

// binaryHash hashes the executable through /proc/PID/exe, which opens the
// file the process runs even if its path was since replaced. It returns ""
// for a binary larger than MaxHashedBinary.
func (a *Attestor) binaryHash(ctx context.Context, exe string) (string, error) {
	f, err := os.Open(exe)
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }() // read-only
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
	if sys.Size > MaxHashedBinary {
		return "", nil
	}
	select {
	case a.hashing <- struct{}{}:
		defer func() { <-a.hashing }()
	case <-ctx.Done():
		return "", ctx.Err()
	}
	h := sha256.New()
	// A running binary cannot be written (ETXTBSY); the bound holds anyway.
	if _, err := io.Copy(h, io.LimitReader(ctxReader{ctx, f}, MaxHashedBinary)); err != nil {
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
	defer func() { _ = f.Close() }() // read-only
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

// pathNamespaces are the mount namespaces whose callers' paths are
// reported: the agent's and, when the agent may read it, pid 1's.
func (a *Attestor) pathNamespaces() ([][2]uint64, error) {
	self, err := nsID(filepath.Join(a.proc, "self", "ns", "mnt"))
	if err != nil {
		return nil, fmt.Errorf("agent mount namespace: %w", err)
	}
	out := [][2]uint64{self}
	// Without ptrace access to pid 1 (no CAP_SYS_PTRACE), only callers in
	// the agent's own namespace get a path: fewer selectors, never a
	// wrong one.
	if host, err := nsID(filepath.Join(a.proc, "1", "ns", "mnt")); err == nil && host != self {
		out = append(out, host)
	}
	return out, nil
}

// nsID identifies the namespace a /proc/PID/ns link names (its nsfs
// device and inode).
func nsID(link string) ([2]uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(link, &st); err != nil {
		return [2]uint64{}, err
	}
	return [2]uint64{st.Dev, st.Ino}, nil
}

// SystemdUnit returns the systemd unit the cgroup names: the deepest
// .service or .scope in the unified cgroup path, but none under a user
// manager (user@UID.service names its units as that user asks) and none
// below a container's own cgroup (the container names those). It reads
// names only: Attest also requires root to have made every cgroup on the
// path.
func SystemdUnit(cgroup []byte) string {
	_, p := cgroupPath(cgroup)
	unit, _ := cgroupNames(p)
	return unit
}

// ContainerID returns the id of the container the cgroup names, if any,
// from the cgroup names container runtimes create. Like SystemdUnit it
// reads names only.
func ContainerID(cgroup []byte) string {
	_, p := cgroupPath(cgroup)
	_, id := cgroupNames(p)
	return id
}

// userManager matches user@UID.service, the per-user systemd instance
// whose subtree is delegated to that user.
var userManager = regexp.MustCompile(`^user@[0-9]+\.service$`)

// Container runtimes name a container's cgroup after its 64-hex id:
// docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope and
// libpod-<id>.scope through systemd; /docker/<id>, /libpod_parent/libpod-<id>
// and /kubepods/.../<id> (or crio-<id>, cri-containerd-<id>) with the
// cgroupfs driver. Monitor processes (crio-conmon-<id>, libpod-conmon-<id>)
// are not the container.
var containerName = regexp.MustCompile(`^(?:(docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})(\.scope)?$`)

// cgroupNames reads the systemd unit and container id from a cgroup path.
// The container is the outermost one on the path; the unit is the deepest
// unit name at or above it and above any user manager.
func cgroupNames(p string) (unit, container string) {
	parts, ok := cgroupParts(p)
	if !ok {
		return "", ""
	}
	stop := len(parts)
	kubepods := false
	for i, c := range parts {
		if userManager.MatchString(c) && i < stop {
			stop = i
		}
		if c == "kubepods" {
			kubepods = true
		}
		m := containerName.FindStringSubmatch(c)
		if m == nil {
			continue
		}
		parent := ""
		if i > 0 {
			parent = parts[i-1]
		}
		runtime, id, scope := m[1], m[2], m[3] != ""
		switch {
		case scope && runtime != "",
			!scope && runtime == "" && (parent == "docker" || kubepods),
			!scope && runtime == "libpod" && parent == "libpod_parent",
			!scope && (runtime == "crio" || runtime == "cri-containerd") && kubepods:
			container = id
			stop = min(stop, i+1)
		}
		if container != "" {
			break
		}
	}
	for i := stop - 1; i >= 0; i-- {
		if strings.HasSuffix(parts[i], ".service") || strings.HasSuffix(parts[i], ".scope") {
			return parts[i], container
		}
	}
	return "", container
}

// cgroupParts splits an absolute cgroup path. A path outside the agent's
// cgroup namespace reads as "/../.." and is refused, as is any path that
// is not plainly one cgroup below another.
func cgroupParts(p string) ([]string, bool) {
	rest, ok := strings.CutPrefix(p, "/")
	if !ok {
		return nil, false
	}
	if rest == "" {
		return nil, true
	}
	parts := strings.Split(rest, "/")
	for _, c := range parts {
		if c == "" || c == "." || c == ".." {
			return nil, false
		}
	}
	return parts, true
}

// cgroupPath is the cgroup v2 path (the "0::" line), or on v1 hosts the
// name=systemd hierarchy's, with the hierarchy it is in.
func cgroupPath(cgroup []byte) (hierarchy, path string) {
	var v1 string
	for line := range strings.SplitSeq(string(cgroup), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok && p != "/" {
			return hierCgroup2, p
		}
		if _, p, ok := strings.Cut(line, ":name=systemd:"); ok {
			v1 = p
		}
	}
	if v1 == "" {
		return "", ""
	}
	return hierSystemdV1, v1
}

const (
	hierCgroup2   = "cgroup2"
	hierSystemdV1 = "name=systemd"
)

// rootMadeCgroup checks that only root could have named the cgroup at p
// or put a process in it: every directory from the hierarchy's mount down
// to it is root's and writable by no one else, as are the files that move
// processes into it. A delegated subtree (user@UID.service, a service
// with Delegate=yes and User=) is chowned to its user, who may then create
// cgroups of any name in it and move its processes there.
func (a *Attestor) rootMadeCgroup(hier, p string) error {
	parts, ok := cgroupParts(p)
	if !ok {
		return fmt.Errorf("cgroup path %q is not below the agent's cgroup root", p)
	}
	mnt, parts, err := a.cgroupMount(hier, parts)
	if err != nil {
		return fmt.Errorf("cgroup %q: %w", p, err)
	}
	// What is visible at the mount point must be that cgroup file system,
	// not something mounted over it; every directory below is checked to
	// be on the same one.
	var fsInfo unix.Statfs_t
	if err := unix.Statfs(mnt, &fsInfo); err != nil {
		return err
	}
	if fsInfo.Type != unix.CGROUP2_SUPER_MAGIC && fsInfo.Type != unix.CGROUP_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup file system (type %#x)", mnt, fsInfo.Type)
	}
	var top syscall.Stat_t
	if err := syscall.Lstat(mnt, &top); err != nil {
		return err
	}
	dir := mnt
	for i := -1; i < len(parts); i++ {
		if i >= 0 {
			dir = filepath.Join(dir, parts[i])
		}
		if err := rootOnly(dir, top.Dev, true); err != nil {
			return err
		}
	}
	for _, f := range []string{"cgroup.procs", "cgroup.threads", "tasks"} {
		err := rootOnly(filepath.Join(dir, f), top.Dev, false)
		if f != "cgroup.procs" && errors.Is(err, os.ErrNotExist) {
			continue // v1 has tasks, v2 cgroup.threads
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// rootOnly checks that path is on device dev, owned by root, writable by
// no one else, and a directory or a regular file as wanted.
func rootOnly(path string, dev uint64, dir bool) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil {
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	kind := uint32(syscall.S_IFREG)
	if dir {
		kind = syscall.S_IFDIR
	}
	switch {
	case st.Mode&syscall.S_IFMT != kind:
		return fmt.Errorf("%s: unexpected file type", path)
	case st.Dev != dev:
		return fmt.Errorf("%s: another file system is mounted there", path)
	case st.Uid != 0:
		return fmt.Errorf("%s: owned by uid %d, not root", path, st.Uid)
	case st.Mode&0o022 != 0:
		return fmt.Errorf("%s: writable by group or others (mode %o)", path, st.Mode&0o7777)
	}
	return nil
}

// cgroupMount finds where the agent's mount namespace has the hierarchy
// holding the cgroup parts, and returns that mount point and the parts
// below the mount's root (a mount may show only a subtree).
func (a *Attestor) cgroupMount(hier string, parts []string) (string, []string, error) {
	b, err := os.ReadFile(filepath.Join(a.proc, "self", "mountinfo"))
	if err != nil {
		return "", nil, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		// id parent maj:min root mountpoint opts [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 {
			continue
		}
		switch {
		case hier == hierCgroup2 && g[0] == "cgroup2":
		case hier == hierSystemdV1 && g[0] == "cgroup" && slices.Contains(strings.Split(g[2], ","), "name=systemd"):
		default:
			continue
		}
		root, ok := cgroupParts(unescapeMount(f[3]))
		if ok && len(root) <= len(parts) && slices.Equal(root, parts[:len(root)]) {
			return unescapeMount(f[4]), parts[len(root):], nil
		}
	}
	return "", nil, fmt.Errorf("no %s hierarchy holding it is mounted in the agent's mount namespace", hier)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
