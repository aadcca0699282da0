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
	// Timeout bounds Command (default 10s, at least 1s, at most 5m); the
	// command and everything in its session is killed when it runs out.
	Timeout time.Duration `yaml:"timeout"`
}

// Bounds and defaults of a notification.
const (
	DefaultNotifyTimeout = 10 * time.Second
	// MinNotifyTimeout: below it a command hardly gets to start (exec,
	// the dynamic loader) on a loaded host, and every rotation would end
	// in a kill.
	MinNotifyTimeout = time.Second
	MaxNotifyTimeout = 5 * time.Minute
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

// rootSignals are the only ones a root process gets (through a pid file
// the workload cannot write): a daemon reloads or reopens on them, and a
// pid file that names the wrong root process then costs a reload, never
// a stop.
var rootSignals = map[unix.Signal]bool{unix.SIGHUP: true, unix.SIGUSR1: true, unix.SIGUSR2: true, unix.SIGWINCH: true}

// staleSlack is how much later than its pid file's mtime a process may
// appear to have started: the start time is in clock ticks, file times
// come from the coarse clock (a jiffy behind), and the two are compared
// through the current offset between the real-time and boot clocks.
// Reusing a pid takes pid_max forks, far more than a second's worth.
const staleSlack = time.Second

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
		if n.Timeout != 0 && (n.Timeout < MinNotifyTimeout || n.Timeout > MaxNotifyTimeout) {
			return fmt.Errorf("output %s: notify.timeout %v: want %v to %v (0: %v)", dir, n.Timeout, MinNotifyTimeout, MaxNotifyTimeout, DefaultNotifyTimeout)
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
//     nginx whose master runs as root and writes its pid file as root),
//     and then only with SIGHUP, SIGUSR1, SIGUSR2 or SIGWINCH;
//   - the process did not start after the pid file was last written: a
//     daemon writes its pid file once it runs, so a younger process holds
//     a reused pid of a daemon that died and left its file behind.
//
// The process is held by a pidfd from before the check until the signal,
// so a pid reused in between is never signalled.
func signalPIDFile(c Config, sig unix.Signal) error {
	path := c.Notify.PIDFile
	pid, workloadOwned, mtime, err := readPIDFile(c, path)
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
	started, err := processStart(pid)
	if err != nil {
		return fmt.Errorf("pid %d from %s: %w", pid, path, err)
	}
	// The uids and start time were read through the pid: they are this
	// process's only if the pidfd still names a live process afterwards.
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
		return fmt.Errorf("pid %d from %s: %w", pid, path, signalError(err))
	}
	if started.After(mtime.Add(staleSlack)) {
		return fmt.Errorf("pid %d from %s started at %s, after the pid file was last written (%s): the file is stale (its daemon died and the pid was reused), not signalled",
			pid, path, started.UTC().Format(time.RFC3339Nano), mtime.UTC().Format(time.RFC3339Nano))
	}
	ok := ruid == c.UID || suid == c.UID
	if !ok && !workloadOwned && ruid == 0 && suid == 0 {
		if !rootSignals[sig] {
			return fmt.Errorf("pid %d from %s runs as root, which gets only SIGHUP, SIGUSR1, SIGUSR2 or SIGWINCH, not %s: not signalled", pid, path, c.Notify.Signal)
		}
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
		return fmt.Errorf("pid %d from %s: send %s: %w", pid, path, c.Notify.Signal, signalError(err))
	}
	return nil
}

// signalError says what a failed signal means: EPERM is the agent's own
// lack of permission (a non-root agent needs CAP_KILL for another uid's
// process), not a process that went away (ESRCH).
func signalError(err error) error {
	switch {
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("the agent (uid %d) may not signal it (another uid's process needs CAP_KILL): %w", os.Geteuid(), err)
	case errors.Is(err, unix.ESRCH):
		return fmt.Errorf("process gone: %w", err)
	}
	return err
}

// readPIDFile reads a pid file under the output directory's path rules
// and tells whether the workload controls it (the file or a directory
// above it belongs to the output's uid) and when it was last written.
func readPIDFile(c Config, path string) (pid int, workloadOwned bool, mtime time.Time, err error) {
	d, err := walkDir(c, filepath.Dir(path), false)
	if err != nil {
		return 0, false, time.Time{}, fmt.Errorf("pid file %s: %w", path, err)
	}
	defer func() { _ = d.Close() }() // O_PATH
	// O_NOCTTY: the agent may be a session leader without a terminal
	// (systemd makes every service one), and opening a terminal would
	// make it the agent's; O_NONBLOCK: a FIFO does not hold it up. Both
	// are refused below as not regular files.
	fd, err := unix.Openat(d.fd, filepath.Base(path), unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false, time.Time{}, fmt.Errorf("pid file %s: %w", path, err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer func() { _ = f.Close() }() // read only
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, false, time.Time{}, fmt.Errorf("pid file %s: %w", path, err)
	}
	euid := os.Geteuid()
	switch uid := int(st.Uid); {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return 0, false, time.Time{}, fmt.Errorf("pid file %s is not a regular file", path)
	case st.Nlink != 1:
		// Another name for the file may sit where the path rules were
		// never checked (a directory the workload owns): which of its
		// names the writer meant is unknowable.
		return 0, false, time.Time{}, fmt.Errorf("pid file %s has %d hard links: a pid file must have exactly one name", path, st.Nlink)
	case uid != 0 && uid != euid && uid != c.UID:
		return 0, false, time.Time{}, fmt.Errorf("pid file %s is owned by uid %d: it must belong to root, the agent (uid %d) or the output's uid %d", path, uid, euid, c.UID)
	case st.Mode&0o022 != 0:
		// With a POSIX ACL the group bits are the mask: a named user
		// may write too.
		return 0, false, time.Time{}, fmt.Errorf("pid file %s (owner uid %d, mode %o) is writable by group or others", path, st.Uid, st.Mode&0o7777)
	}
	b := make([]byte, maxPIDFile+1)
	n, err := f.Read(b)
	if err != nil && n == 0 {
		return 0, false, time.Time{}, fmt.Errorf("pid file %s: read: %w", path, err)
	}
	s := strings.TrimSpace(string(b[:n]))
	pid, err = strconv.Atoi(s)
	if n > maxPIDFile || err != nil || pid <= 0 || pid > 1<<22 {
		return 0, false, time.Time{}, fmt.Errorf("pid file %s does not hold a pid", path)
	}
	mtime = time.Unix(st.Mtim.Unix())
	return pid, d.workloadOwned || ownedByWorkload(c, int(st.Uid), euid), mtime, nil
}

// processStart is when pid started, on the real-time clock. /proc gives
// it in clock ticks since boot (boot time clock, suspend included); it is
// moved to the real-time clock with their offset now, so a clock step
// since the process started moves it by as much (see staleSlack).
func processStart(pid int) (time.Time, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return time.Time{}, err
	}
	// comm, in parentheses, may hold spaces and parentheses: fields
	// are counted after the last ')'. starttime is field 22, the 20th
	// after it.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 20 {
		return time.Time{}, errors.New("unreadable /proc stat")
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("/proc stat starttime: %w", err)
	}
	var boot, real unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &boot); err != nil {
		return time.Time{}, err
	}
	if err := unix.ClockGettime(unix.CLOCK_REALTIME, &real); err != nil {
		return time.Time{}, err
	}
	hz := clockTicks()
	sinceBoot := time.Duration(ticks/hz)*time.Second + time.Duration(ticks%hz)*time.Second/time.Duration(hz)
	age := time.Duration(boot.Nano()) - sinceBoot
	return time.Unix(0, real.Nano()).Add(-age), nil
}

// clockTicks is the kernel's USER_HZ, which /proc counts in: AT_CLKTCK
// from the auxiliary vector, else 100 (its value on every architecture
// Go runs on).
func clockTicks() uint64 {
	const atClkTck = 17
	if auxv, err := unix.Auxv(); err == nil {
		for _, kv := range auxv {
			if kv[0] == atClkTck && kv[1] > 0 {
				return uint64(kv[1])
			}
		}
	}
	return 100
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
// supplementary groups and no capabilities (runConfined), in a session
// of its own (no controlling terminal; its process group is the
// session's), from /, with stdin empty. When the timeout or ctx ends, the
// whole group is killed; what the command leaves running after it exited
// in time is left alone.
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
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	// A root agent always sets them (dropping its own supplementary
	// groups); any other can only run a command as itself.
	asRoot := c.UID == 0
	if os.Geteuid() == 0 || os.Geteuid() != c.UID || os.Getegid() != c.GID {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(c.UID), Gid: uint32(c.GID), Groups: []uint32{}}
	} else if os.Getuid() == 0 {
		asRoot = true // a real uid of 0 gets root's capabilities at execve
	}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Output pipes held open by a grandchild must not hold the agent.
	cmd.WaitDelay = time.Second
	err := runConfined(cmd, asRoot)
	if errors.Is(err, errNotStarted) {
		return fmt.Errorf("command %s as uid %d gid %d: %w", n.Command[0], c.UID, c.GID, err)
	}
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
