package output

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Modes of the directories the agent creates. They are set explicitly
// because the packaged unit runs with UMask=0077, which would leave them
// 0700 and out of the workload's reach.
const (
	// outputDirMode: the output's group (its GID) may list and read; the
	// owner stays the agent, so the workload cannot plant or swap anything
	// in it.
	outputDirMode = 0o750
	// parentDirMode: directories above an output only need to be
	// traversable.
	parentDirMode = 0o755
)

// outDir is an output directory opened without following symlinks: every
// file goes in relative to fd, so what happens to the path afterwards
// cannot redirect a write.
type outDir struct {
	fd   int
	path string
	c    Config
	// workloadOwned: some component belongs to the output's uid (neither
	// root nor the agent), so the workload decides what lies below it.
	workloadOwned bool
}

// openOutputDir walks c.Dir from / one component at a time, never
// following a symlink, and checks that no component can be swapped by
// anyone but root, the agent or the output's own user: the owner of a
// directory, or anyone who may write to it, can replace what is below it,
// and a root agent would then write this output's key (owned by this
// output's uid) wherever the replacement points, such as another
// workload's output. Missing directories are created with explicit modes;
// a refused component leaves everything as it was.
func openOutputDir(c Config) (*outDir, error) { return walkDir(c, c.Dir, true) }

// walkDir opens dir as openOutputDir opens the output directory, under the
// same rules for every component. With create false it changes nothing:
// a missing component is an error (the pid file's directory is the
// workload's to make, not the agent's).
func walkDir(c Config, dir string, create bool) (*outDir, error) {
	clean := filepath.Clean(dir)
	if !filepath.IsAbs(clean) {
		return nil, fmt.Errorf("output %s: %q must be an absolute path", c.Dir, dir)
	}
	euid := os.Geteuid()
	fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("output %s: open /: %w", c.Dir, err)
	}
	// The fds of the walk are O_PATH: closing one flushes nothing, so its
	// error (only ever EBADF, a bug) is ignored throughout.
	owner, err := checkDir(c, "/", fd, euid)
	if err != nil {
		_ = unix.Close(fd)
		return nil, err
	}
	workloadOwned := ownedByWorkload(c, owner, euid)
	path := ""
	names := strings.Split(strings.TrimPrefix(clean, "/"), "/")
	for i, name := range names {
		if name == "" { // c.Dir is "/"
			break
		}
		path += "/" + name
		last := i == len(names)-1
		next, err := openComponent(fd, name)
		if errors.Is(err, unix.ENOENT) && create {
			next, err = makeDir(c, fd, name, last, euid)
		}
		if err != nil {
			err = describeOpenError(c, fd, name, path, err)
			_ = unix.Close(fd)
			return nil, err
		}
		_ = unix.Close(fd)
		fd = next
		owner, err := checkDir(c, path, fd, euid)
		if err != nil {
			_ = unix.Close(fd)
			return nil, err
		}
		workloadOwned = workloadOwned || ownedByWorkload(c, owner, euid)
		if last && create {
			if err := repairDir(c, fd, euid); err != nil {
				_ = unix.Close(fd)
				return nil, err
			}
		}
	}
	return &outDir{fd: fd, path: clean, c: c, workloadOwned: workloadOwned}, nil
}

// ownedByWorkload: uid is the output's and neither root nor the agent.
func ownedByWorkload(c Config, uid, euid int) bool {
	return uid == c.UID && uid != 0 && uid != euid
}

// openComponent opens one path component below dirfd as an O_PATH
// directory fd (search permission is enough to walk). openat2 refuses
// symlinks outright; where it is missing (ENOSYS on kernels before 5.6,
// EPERM where a seccomp filter answers for it) openat with O_NOFOLLOW does
// the same for a single component.
func openComponent(dirfd int, name string) (int, error) {
	fd, err := unix.Openat2(dirfd, name, &unix.OpenHow{
		Flags:   componentFlags,
		Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_BENEATH,
	})
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		return openComponentNoFollow(dirfd, name)
	}
	return fd, err
}

const componentFlags = unix.O_PATH | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC

// openComponentNoFollow is openComponent without openat2. name is a
// single component (no "/", never "." or ".." after filepath.Clean), so
// O_NOFOLLOW covers every symlink the walk could meet.
func openComponentNoFollow(dirfd int, name string) (int, error) {
	return unix.Openat(dirfd, name, componentFlags, 0)
}

// describeOpenError turns ELOOP/ENOTDIR into an error that names what is
// in the way and who owns it: a symlink here is either an attack or a
// path to correct in the config (such as /var/run for /run).
func describeOpenError(c Config, dirfd int, name, path string, err error) error {
	var st unix.Stat_t
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
		if unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
			if st.Mode&unix.S_IFMT == unix.S_IFLNK {
				return fmt.Errorf("output %s: %s is a symlink (owner uid %d): output paths are not followed through symlinks", c.Dir, path, st.Uid)
			}
			return fmt.Errorf("output %s: %s is not a directory (owner uid %d)", c.Dir, path, st.Uid)
		}
	}
	return fmt.Errorf("output %s: %s: %w", c.Dir, path, err)
}

// checkDir refuses a component that someone other than root, the agent
// and the output's user could swap. A sticky directory (/tmp) may be
// writable by all: others can add entries but not rename ours, and
// whatever they add is refused by the owner check one level down.
// It returns the directory's owner.
func checkDir(c Config, path string, fd, euid int) (int, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return -1, fmt.Errorf("output %s: stat %s: %w", c.Dir, path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return -1, fmt.Errorf("output %s: %s is not a directory", c.Dir, path)
	}
	if uid := int(st.Uid); uid != 0 && uid != euid && uid != c.UID {
		return -1, fmt.Errorf("output %s: %s is owned by uid %d, who could swap what is below it: each directory on the path must belong to root, the agent (uid %d) or the output's uid %d", c.Dir, path, uid, euid, c.UID)
	}
	sticky := st.Mode&unix.S_ISVTX != 0
	if st.Mode&0o002 != 0 && !sticky {
		return -1, fmt.Errorf("output %s: %s (owner uid %d, mode %o) is writable by everyone, who could swap what is below it", c.Dir, path, st.Uid, st.Mode&0o7777)
	}
	// Group root is no exception: with a POSIX ACL the group bits are the
	// ACL's mask, so a set write bit may stand for any named user.
	if st.Mode&0o020 != 0 && !sticky {
		return -1, fmt.Errorf("output %s: %s (owner uid %d, mode %o) is writable by group %d or, through an ACL, by other users, who could swap what is below it", c.Dir, path, st.Uid, st.Mode&0o7777, st.Gid)
	}
	return int(st.Uid), nil
}

// makeDir creates one missing component and gives it its mode (and, for
// the output directory itself, the output's group). On failure the new
// directory is removed again (the error says so if that failed too).
func makeDir(c Config, dirfd int, name string, last bool, euid int) (int, error) {
	if err := unix.Mkdirat(dirfd, name, 0o700); err != nil {
		if errors.Is(err, unix.EEXIST) { // created meanwhile: check what it is
			return openComponent(dirfd, name)
		}
		return -1, fmt.Errorf("create: %w", err)
	}
	fd, err := openComponent(dirfd, name)
	if err != nil {
		return -1, err
	}
	gid, mode := -1, uint32(parentDirMode)
	if last {
		gid, mode = c.GID, outputDirMode
	}
	if err := setDir(fd, euid, gid, mode); err != nil {
		_ = unix.Close(fd) // O_PATH
		// %v, not %w: describeOpenError looks for the open's own ENOTDIR
		// and ELOOP, not the removal's.
		if rmErr := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); rmErr != nil {
			return -1, fmt.Errorf("set up new directory: %w (removing it again failed too: %v)", err, rmErr)
		}
		return -1, fmt.Errorf("set up new directory: %w", err)
	}
	return fd, nil
}

// setDir sets group and mode of a directory the agent just created
// through a real fd for it (fchmod does not work on O_PATH). It touches
// only a directory the agent owns: if the name was swapped between mkdir
// and open, the stranger's directory is left alone and checkDir decides.
func setDir(pathfd, euid, gid int, mode uint32) error {
	fd, err := unix.Openat(pathfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	// fchown and fchmod take effect when they return; closing a directory
	// fd has nothing left to report.
	defer func() { _ = unix.Close(fd) }()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if int(st.Uid) != euid {
		return nil
	}
	if gid >= 0 && int(st.Gid) != gid {
		if err := unix.Fchown(fd, -1, gid); err != nil {
			return fmt.Errorf("give to group %d: %w", gid, err)
		}
	}
	return unix.Fchmod(fd, mode)
}

// repairDir fixes an output directory that an agent before this check
// created under UMask=0077: 0700 and owned by the (non-root) agent, so the
// workload could never read it. /run survives agent restarts, so an
// upgrade would otherwise keep such directories. Only a directory that
// holds nothing but this output's files, its key already given to the
// output's uid, is touched; any other is the administrator's (or the
// agent's own state) and is left as it is.
func repairDir(c Config, fd, euid int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if euid == 0 || int(st.Uid) != euid || st.Mode&0o7777 != 0o700 || !onlyOutputFiles(c, fd) {
		return nil
	}
	if err := setDir(fd, euid, c.GID, outputDirMode); err != nil {
		return fmt.Errorf("output %s: repair mode of %s: %w", c.Dir, c.Dir, err)
	}
	return nil
}

func onlyOutputFiles(c Config, pathfd int) bool {
	var st unix.Stat_t
	if unix.Fstatat(pathfd, "svid_key.pem", &st, unix.AT_SYMLINK_NOFOLLOW) != nil || int(st.Uid) != c.UID {
		return false
	}
	fd, err := unix.Openat(pathfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	f := os.NewFile(uintptr(fd), c.Dir)
	defer func() { _ = f.Close() }() // read only
	names, err := f.Readdirnames(-1)
	if err != nil {
		return false
	}
	for _, n := range names {
		switch n {
		case "svid.pem", "svid_key.pem", "bundle.pem", "jwt_svid.token", "jwt_bundle.json":
		default:
			return false
		}
	}
	return true
}

func (d *outDir) Close() error { return unix.Close(d.fd) }

// write replaces name in the directory atomically. The temporary file is
// created exclusively (nothing planted there is reused), gets its final
// mode and owner before any secret is written into it (mode first: once
// given away, a non-root agent could no longer chmod it) and is renamed
// within the same directory fd, and the directory is synced. It returns
// nil only once all of that succeeded.
func (d *outDir) write(name string, data []byte, mode os.FileMode) (err error) {
	c := d.c
	tmp := "." + name + "." + rand.Text()[:12]
	fd, err := unix.Openat(d.fd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("output %s: create %s: %w", c.Dir, tmp, err)
	}
	f := os.NewFile(uintptr(fd), filepath.Join(d.path, tmp))
	ok := false
	defer func() {
		if !ok {
			// Already failing: a second Close after the one below only
			// says so (os.ErrClosed), and a temporary file left behind
			// is named in the error.
			_ = f.Close()
			if rmErr := unix.Unlinkat(d.fd, tmp, 0); rmErr != nil {
				err = fmt.Errorf("%w (temporary file %s not removed: %v)", err, tmp, rmErr)
			}
		}
	}()
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("output %s: chmod %s: %w", c.Dir, name, err)
	}
	if err := f.Chown(c.UID, c.GID); err != nil && !(errors.Is(err, os.ErrPermission) && c.UID == os.Getuid()) {
		return fmt.Errorf("output %s: chown %s to %d:%d: %w", c.Dir, name, c.UID, c.GID, err)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("output %s: write %s: %w", c.Dir, name, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("output %s: sync %s: %w", c.Dir, name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("output %s: close %s: %w", c.Dir, name, err)
	}
	if err := unix.Renameat(d.fd, tmp, d.fd, name); err != nil {
		return fmt.Errorf("output %s: rename %s: %w", c.Dir, name, err)
	}
	ok = true
	// The rename reaches disk with the directory: until it is synced, the
	// file is in place but not yet written (on tmpfs, the packaged
	// /run/sigil, the sync succeeds at once).
	dfd, err := unix.Openat(d.fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("output %s: open directory to sync %s: %w", c.Dir, name, err)
	}
	defer func() { _ = unix.Close(dfd) }() // read only: Fsync is what reports
	if err := unix.Fsync(dfd); err != nil {
		return fmt.Errorf("output %s: sync directory after renaming %s: %w", c.Dir, name, err)
	}
	return nil
}
