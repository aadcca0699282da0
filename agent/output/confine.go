package output

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// Secure bits (linux/securebits.h; golang.org/x/sys/unix lacks them).
const (
	secbitNoRoot       = 1 << 0
	secbitNoRootLocked = 1 << 1
)

// errNotStarted marks a command the agent refused to start because it
// could not strip the agent's privileges from it.
var errNotStarted = errors.New("not started")

// runConfined runs cmd to completion from an OS thread of its own that
// gives away, before the fork, what the command must not inherit from the
// agent. Credentials are per thread on Linux and os/exec forks from the
// calling thread, so the changes reach the command and no other
// goroutine. The goroutine never unlocks the thread: when it returns the
// runtime ends the thread (no_new_privs and the dropped sets cannot be
// undone, and the Go code of other goroutines must never run with them).
// If the goroutine ran on the main thread, which Linux cannot end without
// the process, the runtime parks that thread for good instead: it never
// runs Go code again, but /proc/<agent>/status, which shows the main
// thread, then shows its NoNewPrivs 1 and empty ambient and inheritable
// sets. The thread also lives until the command is reaped, because
// Pdeathsig fires when the thread that forked the child exits, not the
// process. asRoot: the command's real or effective uid is 0.
func runConfined(cmd *exec.Cmd, asRoot bool) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := confineThread(asRoot); err != nil {
			done <- fmt.Errorf("%w: %w", errNotStarted, err)
			return
		}
		done <- cmd.Run()
	}()
	return <-done
}

// confineThread prepares the calling (locked, to be discarded) thread so
// that a program it executes holds no capability, whatever the agent
// holds (the packaged unit gives it ambient CAP_SYS_PTRACE and CAP_CHOWN,
// a drop-in CAP_SETUID, CAP_SETGID and CAP_KILL; a root agent has all):
//   - the ambient set is emptied: ambient capabilities survive execve and
//     a change between two non-zero uids, so the workload's command got
//     CAP_SYS_PTRACE and with it the agent's memory (its keys);
//   - the inheritable set is emptied, so a binary with inheritable file
//     capabilities gets nothing from it;
//   - no_new_privs: a set-user-ID binary or file capabilities add
//     nothing beyond what the caller had at execve;
//   - for a command that runs as root, SECBIT_NOROOT: root's execve would
//     otherwise grant the whole bounding set. Setting it takes
//     CAP_SETPCAP; without it (and without the bit already set, as the
//     packaged unit's SecureBits=noroot-locked does) the command is not
//     run.
//
// The thread keeps its permitted and effective sets: the child needs
// CAP_SETUID and CAP_SETGID to switch to the output's uid, they do not pass
// execve for a non-root uid once ambient and inheritable are empty, and
// should the thread be the main one, the kernel's ptrace check on
// /proc/<agent>/mem compares a caller's capabilities with its permitted
// set: emptying it would let any process of the agent's uid read the
// agent's memory.
//
// Descriptors the agent inherited without close-on-exec are marked too.
func confineThread(asRoot bool) error {
	if err := cloexecInherited(); err != nil {
		return fmt.Errorf("mark inherited descriptors close-on-exec: %w", err)
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set no_new_privs: %w", err)
	}
	if asRoot {
		bits, err := unix.PrctlRetInt(unix.PR_GET_SECUREBITS, 0, 0, 0, 0)
		if err != nil {
			return fmt.Errorf("read secure bits: %w", err)
		}
		if bits&secbitNoRoot == 0 {
			if err := unix.Prctl(unix.PR_SET_SECUREBITS, uintptr(bits|secbitNoRoot|secbitNoRootLocked), 0, 0, 0); err != nil {
				return fmt.Errorf("the command would run as root with root's capabilities and SECBIT_NOROOT cannot be set (CAP_SETPCAP, or SecureBits=noroot in the unit): %w", err)
			}
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return fmt.Errorf("clear ambient capabilities: %w", err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	if data[0].Inheritable != 0 || data[1].Inheritable != 0 {
		data[0].Inheritable, data[1].Inheritable = 0, 0
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			// The packaged unit's ~@privileged filter holds capset; the
			// unit allows it again (it can only lower).
			return fmt.Errorf("clear inheritable capabilities (is capset allowed by the unit's SystemCallFilter?): %w", err)
		}
	}
	return nil
}

// cloexecInherited marks every descriptor above stderr close-on-exec, for
// the whole process (the descriptor table is shared by all threads). Go
// opens its own with O_CLOEXEC and os/exec passes a child only what it is
// given, but a descriptor the agent inherited from whoever started it
// (a shell, a supervisor) would otherwise reach every command. Marking
// is harmless to the agent: it only acts at execve.
func cloexecInherited() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	// Before Linux 5.11, or where a seccomp filter answers for it: one
	// descriptor at a time.
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EINVAL) {
		return err
	}
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return err
	}
	defer func() { _ = d.Close() }() // read only
	names, err := d.Readdirnames(-1)
	if err != nil {
		return err
	}
	for _, n := range names {
		fd, err := strconv.Atoi(n)
		if err != nil || fd < 3 {
			continue
		}
		// EBADF: closed since the listing (the listing's own fd among
		// them); nothing left to leak.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && !errors.Is(err, unix.EBADF) {
			return fmt.Errorf("fd %d: %w", fd, err)
		}
	}
	return nil
}
