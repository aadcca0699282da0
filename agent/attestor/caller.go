package attestor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Caller is a Workload API connection's peer as the kernel reported it at
// connect time. It holds a pidfd for that exact process, so a pid reused
// by another process after the caller exits is detected, not attested.
type Caller struct {
	UID, GID uint32
	PID      int32

	mu     sync.Mutex
	pidfd  int // -1 once the connection is closed
	pinned bool
}

// AuthType implements credentials.AuthInfo.
func (*Caller) AuthType() string { return "unix-peercred" }

// FromContext returns the caller of a Workload API request.
func FromContext(ctx context.Context) (*Caller, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	c, ok := p.AuthInfo.(*Caller)
	return c, ok
}

// alive checks that the pidfd taken at connect time still names a live
// process. A pidfd becomes readable when its process exits; it never
// follows a pid to a new process, and the handshake checked that it names
// PID, so a live pidfd means PID is still the caller.
func (c *Caller) alive() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pidfd < 0 {
		return ErrGone
	}
	fds := []unix.PollFd{{Fd: int32(c.pidfd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll pidfd: %w", err)
		}
		if n > 0 {
			return ErrGone
		}
		return nil
	}
}

// Pinned reports whether the kernel gave the caller's pidfd at connect
// time (SO_PEERPIDFD) rather than the agent opening it by pid afterwards.
func (c *Caller) Pinned() bool { return c.pinned }

func (c *Caller) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pidfd >= 0 {
		unix.Close(c.pidfd)
		c.pidfd = -1
	}
}

// pidfdPID reads the pid a pidfd refers to from /proc/self/fdinfo.
func pidfdPID(fd int) (int, error) {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Pid:"); ok {
			return strconv.Atoi(strings.TrimSpace(v))
		}
	}
	return 0, errors.New("pidfd fdinfo has no Pid line")
}

// soPeerPIDFD is SO_PEERPIDFD (Linux 6.5): a pidfd for the process that
// called connect(), taken by the kernel at that moment. golang.org/x/sys
// does not name it yet.
const soPeerPIDFD = 77

// Credentials are the Workload API socket's transport credentials: no
// TLS (the spec has none on the local socket), the peer from SO_PEERCRED,
// and a pidfd from SO_PEERPIDFD where the kernel has it (else
// pidfd_open of the reported pid, immediately, which leaves only the
// connect-to-accept window open to pid reuse).
func Credentials() credentials.TransportCredentials { return creds{} }

type creds struct{}

type conn struct {
	net.Conn
	caller *Caller
}

func (c *conn) Close() error {
	c.caller.close()
	return c.Conn.Close()
}

func (creds) ServerHandshake(nc net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil, nil, errors.New("workload API: not a unix socket connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, err
	}
	var cred *unix.Ucred
	pidfd, pinned := -1, false
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if cerr != nil {
			return
		}
		if p, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, soPeerPIDFD); err == nil {
			pidfd, pinned = p, true
			unix.CloseOnExec(p)
		}
	}); err != nil {
		return nil, nil, err
	}
	if cerr != nil {
		return nil, nil, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	if pidfd < 0 {
		if pidfd, err = unix.PidfdOpen(int(cred.Pid), 0); err != nil {
			return nil, nil, fmt.Errorf("pidfd_open(%d): %w", cred.Pid, err)
		}
	}
	// The pidfd must name the pid SO_PEERCRED reported (same pid
	// namespace); afterwards only its liveness needs checking.
	if got, err := pidfdPID(pidfd); err != nil || got != int(cred.Pid) {
		unix.Close(pidfd)
		return nil, nil, fmt.Errorf("caller pidfd names pid %d, peer credentials say %d: %v", got, cred.Pid, err)
	}
	c := &Caller{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid, pidfd: pidfd, pinned: pinned}
	return &conn{Conn: nc, caller: c}, c, nil
}

func (creds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, nil, errors.New("attestor credentials are server-side only")
}

func (creds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "local"}
}
func (creds) Clone() credentials.TransportCredentials { return creds{} }
func (creds) OverrideServerName(string) error         { return nil }
