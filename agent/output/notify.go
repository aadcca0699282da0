package output

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Notify tells a workload that its files changed, after every write of
// them (the first one included): either a signal to the process named by
// a pid file, or a command. Exactly one of the two is configured.
type Notify struct {
	// Signal is sent to the process whose pid PIDFile holds, such as
	// SIGHUP for nginx or SIGUSR1.
	Signal  string `yaml:"signal"`
	PIDFile string `yaml:"pid-file"`
	// Command is an argv (no shell) run as the output's uid and gid with
	// a minimal environment; Command[0] is an absolute path.
	Command []string `yaml:"command"`
	// Timeout bounds Command (default 10s, at most 5m); the command and
	// everything in its process group is killed when it runs out.
	Timeout time.Duration `yaml:"timeout"`
}

// Bounds and defaults of a notification.
const (
	DefaultNotifyTimeout = 10 * time.Second
	MaxNotifyTimeout     = 5 * time.Minute
	// maxPIDFile: a pid file holds a number and a newline; anything
	// longer is not one.
	maxPIDFile = 64
	// maxCommandOutput is how much of a failed command's output is logged.
	maxCommandOutput = 2048
)

// notifySignals are the signals a notification may send: those daemons
// take for "reload" or "reopen", and the polite ways to stop.
var notifySignals = map[string]unix.Signal{
	"SIGHUP":   unix.SIGHUP,
	"SIGUSR1":  unix.SIGUSR1,
	"SIGUSR2":  unix.SIGUSR2,
	"SIGINT":   unix.SIGINT,
	"SIGQUIT":  unix.SIGQUIT,
	"SIGTERM":  unix.SIGTERM,
	"SIGWINCH": unix.SIGWINCH,
}

// Stats counts notifications of all outputs, for the agent's metrics.
type Stats struct {
	Notifications, NotifyFailures atomic.Int64
}

// validate checks a notification of output dir.
func (n *Notify) validate(dir string) error {
	switch {
	case n.Signal != "" && len(n.Command) > 0:
		return fmt.Errorf("output %s: notify: signal and command are exclusive", dir)
	case n.Signal != "":
		if _, ok := notifySignals[n.Signal]; !ok {
			names := slices.Sorted(maps.Keys(notifySignals))
			return fmt.Errorf("output %s: notify.signal %q: want one of %s", dir, n.Signal, strings.Join(names, ", "))
		}
		if n.PIDFile == "" || !filepath.IsAbs(n.PIDFile) || filepath.Clean(n.PIDFile) != n.PIDFile {
			return fmt.Errorf("output %s: notify.pid-file %q: want a clean absolute path", dir, n.PIDFile)
		}
		if n.Timeout != 0 {
			return fmt.Errorf("output %s: notify.timeout applies to a command, not to a signal", dir)
		}
	case len(n.Command) > 0:
		if !filepath.IsAbs(n.Command[0]) || filepath.Clean(n.Command[0]) != n.Command[0] {
			return fmt.Errorf("output %s: notify.command[0] %q: want a clean absolute path (there is no PATH search)", dir, n.Command[0])
		}
		for i, a := range n.Command {
			if strings.IndexByte(a, 0) >= 0 {
				return fmt.Errorf("output %s: notify.command[%d] holds a NUL byte", dir, i)
			}
		}
		if n.PIDFile != "" {
			return fmt.Errorf("output %s: notify.pid-file goes with a signal, not with a command", dir)
		}
		if n.Timeout < 0 || n.Timeout > MaxNotifyTimeout {
			return fmt.Errorf("output %s: notify.timeout %v: want up to %v (0: %v)", dir, n.Timeout, MaxNotifyTimeout, DefaultNotifyTimeout)
		}
	default:
		return fmt.Errorf("output %s: notify needs a signal (with pid-file) or a command", dir)
	}
	return nil
}

// notify runs c's notification; the error says what failed.
func notify(ctx context.Context, c Config) error {
	n := c.Notify
	if n.Signal != "" {
		return signalPIDFile(c, notifySignals[n.Signal])
	}
	return runCommand(ctx, c)
}

// signalPIDFile sends sig to the process named in c.Notify.PIDFile. A root
// agent can signal anything, so it refuses to act on a pid the workload
// could not signal itself:
//   - the pid file and every directory above it pass the output
//     directory's rules (no symlinks; owned by root, the agent or the
//     output's uid; not writable by group or others);
//   - the process's real or saved uid is the output's (the kernel's own
//     rule for who may signal whom), or, only when neither the file nor any
//     directory above it belongs to the output's uid, root (a daemon such as
//     nginx whose master runs as root and writes its pid file as root).
//
// The process is held by a pidfd from before the check until the signal,
// so a pid reused in between is never signalled.
func signalPIDFile(c Config, sig unix.Signal) error {
	path := c.Notify.PIDFile
	pid, workloadOwned, err := readPIDFile(c, path)
	if err != nil {
		return err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return fmt.Errorf("pid %d from %s: pidfd_open: %w", pid, path, err)
	}
	defer func() { _ = unix.Close(pidfd) }() // only a handle on the process
	ruid, suid, err := processUIDs(pid)
	if err != nil {
		return fmt.Errorf("pid %d from %s: %w", pid, path, err)
	}
	// The uids were read through the pid: they are this process's only if
	// the pidfd still names a live process afterwards.
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
		return fmt.Errorf("pid %d from %s: process gone: %w", pid, path, err)
	}
	ok := ruid == c.UID || suid == c.UID
	if !ok && !workloadOwned && ruid == 0 && suid == 0 {
		ok = true
	}
	if !ok {
		why := "the output's uid %d"
		if workloadOwned {
			why += " (root's processes only through a pid file the workload cannot write)"
		} else {
			why += " or root"
		}
		return fmt.Errorf("pid %d from %s runs as uid %d (saved uid %d), not as "+why+": not signalled", pid, path, ruid, suid, c.UID)
	}
	if err := unix.PidfdSendSignal(pidfd, sig, nil, 0); err != nil {
		return fmt.Errorf("pid %d from %s: send %s: %w", pid, path, c.Notify.Signal, err)
	}
	return nil
}

// readPIDFile reads a pid file under the output directory's path rules
// and tells whether the workload controls it (the file or a directory
// above it belongs to the output's uid).
func readPIDFile(c Config, path string) (int, bool, error) {
	d, err := walkDir(c, filepath.Dir(path), false)
	if err != nil {
		return 0, false, fmt.Errorf("pid file %s: %w", path, err)
	}
	defer func() { _ = d.Close() }() // O_PATH
	fd, err := unix.Openat(d.fd, filepath.Base(path), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false, fmt.Errorf("pid file %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer func() { _ = f.Close() }() // read only
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, false, fmt.Errorf("pid file %s: %w", path, err)
	}
	euid := os.Geteuid()
	switch uid := int(st.Uid); {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return 0, false, fmt.Errorf("pid file %s is not a regular file", path)
	case uid != 0 && uid != euid && uid != c.UID:
		return 0, false, fmt.Errorf("pid file %s is owned by uid %d: it must belong to root, the agent (uid %d) or the output's uid %d", path, uid, euid, c.UID)
	case st.Mode&0o022 != 0:
		// With a POSIX ACL the group bits are the mask: a named user
		// may write too.
		return 0, false, fmt.Errorf("pid file %s (owner uid %d, mode %o) is writable by group or others", path, st.Uid, st.Mode&0o7777)
	}
	b := make([]byte, maxPIDFile+1)
	n, err := f.Read(b)
	if err != nil && n == 0 {
		return 0, false, fmt.Errorf("pid file %s: read: %w", path, err)
	}
	s := strings.TrimSpace(string(b[:n]))
	pid, err := strconv.Atoi(s)
	if n > maxPIDFile || err != nil || pid <= 0 || pid > 1<<22 {
		return 0, false, fmt.Errorf("pid file %s does not hold a pid", path)
	}
	return pid, d.workloadOwned || ownedByWorkload(c, int(st.Uid), euid), nil
}

// processUIDs reads the real and saved uid of pid from /proc.
func processUIDs(pid int) (ruid, suid int, err error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0, err
	}
	defer func() { _ = f.Close() }() // read only
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "Uid:")
		if !ok {
			continue
		}
		// real, effective, saved, filesystem
		u := strings.Fields(v)
		if len(u) != 4 {
			break
		}
		r, err1 := strconv.Atoi(u[0])
		s, err2 := strconv.Atoi(u[2])
		if err1 != nil || err2 != nil {
			break
		}
		return r, s, nil
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	return 0, 0, errors.New("no Uid line in /proc status")
}

// commandEnv is all a notification command gets from the agent: the
// agent's own environment may hold what the workload must not see.
func commandEnv(c Config) []string {
	return []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "SIGIL_OUTPUT_DIR=" + filepath.Clean(c.Dir)}
}

// runCommand runs c.Notify.Command as the output's uid and gid, with no
// supplementary groups, in its own process group, from /, with stdin
// empty. When the timeout or ctx ends, the whole group is killed; what
// the command leaves running after it exited in time is left alone.
func runCommand(ctx context.Context, c Config) error {
	n := c.Notify
	timeout := n.Timeout
	if timeout == 0 {
		timeout = DefaultNotifyTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, n.Command[0], n.Command[1:]...)
	cmd.Env = commandEnv(c)
	cmd.Dir = "/"
	out := &limitedBuffer{max: maxCommandOutput}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	// A root agent always sets them (dropping its own supplementary
	// groups); any other can only run a command as itself.
	if os.Geteuid() == 0 || os.Geteuid() != c.UID || os.Getegid() != c.GID {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(c.UID), Gid: uint32(c.GID), Groups: []uint32{}}
	}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Output pipes held open by a grandchild must not hold the agent.
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	// A command that started something in the background (a restarted
	// workload) succeeded even if that still holds its output open.
	if err == nil || errors.Is(err, exec.ErrWaitDelay) {
		return nil
	}
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (timeout %v)", ctx.Err(), timeout)
	}
	return fmt.Errorf("command %s as uid %d gid %d: %w; output: %q", n.Command[0], c.UID, c.GID, err, out.String())
}

// limitedBuffer keeps the first max bytes written to it.
type limitedBuffer struct {
	max int
	b   bytes.Buffer
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	if room := l.max - l.b.Len(); room > 0 {
		l.b.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *limitedBuffer) String() string { return l.b.String() }
