package callerid

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/sigil-appliance/sigil/internal/unixsock"
)

// Caller is a Workload API connection's peer as the kernel reported it at
// connect time. It holds a pidfd for that exact process, so a pid reused
// by another process after the caller exits is detected, not attested;
// and the identity of the file it was executing when its connection was
// accepted, so a caller that has since exec'd another binary is detected
// too (Verify).
type Caller struct {
	UID, GID uint32
	PID      int32

	pidfd  *os.File // nil: no process to speak of, every check fails
	pidRaw syscall.RawConn
	pinned bool

	exeLink string // /proc/PID/exe
	exe     exeID  // the executable at connect
	exePath string // its path then, for logs
	started uint64 // start time, clock ticks after boot (/proc/PID/stat)

	conn *Conn      // the connection this caller made (nil outside one)
	vmu  sync.Mutex // one VerifyOnce check at a time
	vkey any        // the key of the last VerifyOnce success
}

// exeID names a file: an exec of any other file changes it.
type exeID struct{ dev, ino uint64 }

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

// ErrExecChanged means the process that connected now runs another
// executable: what it asks for was maybe written by the program it was
// before, and whoever else holds the connection reads the answers.
var ErrExecChanged = errors.New("caller's executable changed since it connected")

// alive checks that the pidfd taken at connect time still names a live
// process. A pidfd becomes readable when its process exits; it never
// follows a pid to a new process, and the handshake checked that it names
// PID, so a live pidfd means PID is still the caller.
func (c *Caller) alive() error {
	if c.pidRaw == nil {
		return ErrGone
	}
	var exited bool
	var perr error
	if err := c.pidRaw.Control(func(fd uintptr) { exited, perr = pidfdExited(int(fd)) }); err != nil {
		return ErrGone // closed with its connection
	}
	if perr != nil {
		return fmt.Errorf("poll pidfd: %w", perr)
	}
	if exited {
		return ErrGone
	}
	return nil
}

func pidfdExited(fd int) (bool, error) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n > 0, err
	}
}

// Verify checks that the caller is still the process that connected and
// still runs the executable it ran then. It costs two polls and a stat;
// the Workload API calls it for each request and (through VerifyOnce)
// for each snapshot it pushes to the caller's streams.
func (c *Caller) Verify() error {
	if err := c.alive(); err != nil {
		return err
	}
	now, err := statExe(c.exeLink)
	// The stat went through the pid: it is about the caller only if the
	// pidfd is still live afterwards.
	if aerr := c.alive(); aerr != nil {
		return aerr
	}
	if err != nil {
		return fmt.Errorf("pid %d: executable: %w", c.PID, err)
	}
	if now != c.exe {
		path, _ := os.Readlink(c.exeLink)
		return fmt.Errorf("%w: pid %d ran %s (device %d inode %d) when it connected, now %s (device %d inode %d)",
			ErrExecChanged, c.PID, c.exePath, c.exe.dev, c.exe.ino, path, now.dev, now.ino)
	}
	return nil
}

// VerifyOnce is Verify for pushes fanned out to many streams of one
// caller: the first push of a given key (comparable; the agent passes the
// cache snapshot being pushed) checks, and concurrent and later pushes of
// the same key reuse its success. That check came after the snapshot
// existed, so an exec before it is caught; one after it is no different
// from an exec just after a push, and every push of one key carries the
// same content for this caller. A rotation fanned out to a caller's
// hundred streams costs one stat, not a hundred. Failures are never
// remembered.
func (c *Caller) VerifyOnce(key any) error {
	c.vmu.Lock()
	defer c.vmu.Unlock()
	if key != nil && c.vkey == key {
		return nil
	}
	return c.verifyAs(key)
}

// VerifyAs is Verify that, on success, also stands for later VerifyOnce
// calls with key: a request admitted after the snapshot it was given
// existed has checked the caller for that snapshot's first push.
func (c *Caller) VerifyAs(key any) error {
	c.vmu.Lock()
	defer c.vmu.Unlock()
	return c.verifyAs(key)
}

func (c *Caller) verifyAs(key any) error {
	if err := c.Verify(); err != nil {
		return err
	}
	c.vkey = key
	return nil
}

// Active tells the connection that the caller made a request that was
// admitted: the idle timeout for a connection's first request is over.
func (c *Caller) Active() {
	if c.conn != nil && c.conn.idle != nil && c.conn.active.CompareAndSwap(false, true) {
		c.conn.idle.Stop()
	}
}

// Pinned reports whether the kernel gave the caller's pidfd at connect
// time (SO_PEERPIDFD) rather than the agent opening it by pid afterwards.
func (c *Caller) Pinned() bool { return c.pinned }

// ExePath is the path of the executable the caller ran when it connected.
func (c *Caller) ExePath() string { return c.exePath }

func statExe(link string) (exeID, error) {
	var st unix.Stat_t
	if err := unix.Stat(link, &st); err != nil {
		return exeID{}, err
	}
	return exeID{dev: st.Dev, ino: st.Ino}, nil
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

// startTime reads a process's start time (clock ticks after boot) from
// /proc/PID/stat: field 22, counted after the command name, which may
// itself hold spaces and parentheses.
func startTime(pid int32) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(int(pid)) + "/stat")
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("/proc stat without a command name")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, errors.New("/proc stat too short")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// bootTicks is the time since boot in the clock ticks of /proc/PID/stat
// (USER_HZ, 100 on Linux).
func bootTicks() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("CLOCK_BOOTTIME: %w", err)
	}
	return uint64(ts.Nano() / 1e7), nil
}

// soPeerPIDFD is SO_PEERPIDFD (Linux 6.5): a pidfd for the process that
// called connect(), taken by the kernel at that moment. golang.org/x/sys
// does not name it yet.
const soPeerPIDFD = 77

// ConnPolicy bounds Workload API connections before anything is read from
// them.
type ConnPolicy struct {
	// Admit is asked for each accepted connection with the peer's uid
	// and pid; an error refuses the connection (it is closed unread, and
	// Admit logs why). release is called once when the connection closes.
	Admit func(uid uint32, pid int32) (release func(), err error)
	// IdleTimeout closes a connection whose first request has not been
	// admitted within it (0: never).
	IdleTimeout time.Duration
	Log         *slog.Logger
}

// Listen wraps a Unix listener for the Workload API: the kernel's peer
// credentials are read as each connection is accepted, the policy
// admits or refuses it by uid, and a connection that makes no request
// is closed after the idle timeout. Serve the result with Credentials.
func Listen(l net.Listener, p ConnPolicy) (net.Listener, error) {
	if p.Log == nil {
		p.Log = slog.Default()
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		return nil, fmt.Errorf("workload API listener %v is not a unix socket", l.Addr())
	}
	// The kernel records a writer's credentials on the data only if the
	// receiving socket asks for them when it is written: set on the
	// listener, every accepted socket has it from the start (one set
	// after accept would miss what the client wrote in between).
	raw, err := ul.SyscallConn()
	if err != nil {
		return nil, err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		return nil, fmt.Errorf("SO_PASSCRED on the workload API socket: %v %v", err, serr)
	}
	return &listener{Listener: l, p: p}, nil
}

type listener struct {
	net.Listener
	p ConnPolicy
}

// Accept returns the next admitted connection; refused ones are closed
// here, so a flood of them costs the server loop nothing but this.
func (l *listener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if c, err := l.admit(nc); err == nil {
			return c, nil
		}
		_ = nc.Close() // refused (admit logged why): nothing is owed to the peer
	}
}

func (l *listener) admit(nc net.Conn) (*Conn, error) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		l.p.Log.Warn("workload API connection refused: not a unix socket connection")
		return nil, errors.New("not a unix socket connection")
	}
	c, err := newConn(uc, l.p.Log)
	if err != nil {
		l.p.Log.Warn("workload API connection refused", "err", err)
		return nil, err
	}
	if l.p.Admit != nil {
		r, err := l.p.Admit(c.cred.Uid, c.cred.Pid)
		if err != nil {
			return nil, err
		}
		c.release = r
	}
	if l.p.IdleTimeout > 0 {
		c.idle = time.AfterFunc(l.p.IdleTimeout, func() {
			c.log.Debug("workload API connection closed: no request within the idle timeout",
				"uid", c.cred.Uid, "pid", c.cred.Pid, "timeout", l.p.IdleTimeout)
			_ = c.Close() // dropped on purpose: its close error has no reader
		})
	}
	return c, nil
}

// Conn is an accepted Workload API connection. Once its caller is
// identified every read checks who wrote the bytes (SCM_CREDENTIALS): a
// request written by any process but the one that connected, such as a
// helper it handed a copy of the socket to, closes the connection. It is
// also closed when the caller exits, whoever still holds a copy.
type Conn struct {
	*net.UnixConn
	raw      syscall.RawConn
	cred     unix.Ucred
	accepted uint64 // bootTicks at accept
	log      *slog.Logger
	release  func()
	idle     *time.Timer
	active   atomic.Bool

	// Set once by the handshake, before the first Read.
	caller      *Caller
	checkSender bool
	oob         []byte

	mu        sync.Mutex
	closed    bool
	closeOnce sync.Once
	closeErr  error
}

func newConn(uc *net.UnixConn, log *slog.Logger) (*Conn, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	cred, err := unixsock.PeerCred(uc)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	accepted, err := bootTicks()
	if err != nil {
		return nil, err
	}
	return &Conn{UnixConn: uc, raw: raw, cred: cred, accepted: accepted, log: log, release: func() {}}, nil
}

// Caller is the connection's peer (nil before the handshake).
func (c *Conn) Caller() *Caller { return c.caller }

// Close closes the socket and the caller's pidfd and releases the
// connection's place under the policy's caps; only the first call acts.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		caller := c.caller
		c.mu.Unlock()
		if c.idle != nil {
			c.idle.Stop()
		}
		if caller != nil {
			_ = caller.pidfd.Close() // a pidfd is only watched, never written
		}
		c.closeErr = c.UnixConn.Close()
		c.release()
	})
	return c.closeErr
}

// identify pins the caller: its pidfd, the executable it runs now, its
// start time; then turns on per-read sender credentials.
func (c *Conn) identify() error {
	pid := c.cred.Pid
	pidfd, pinned := -1, false
	var peerErr error
	if err := c.raw.Control(func(fd uintptr) {
		p, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, soPeerPIDFD)
		if err == nil {
			pidfd, pinned = p, true
			unix.CloseOnExec(p)
		}
		peerErr = err
	}); err != nil {
		return err
	}
	// Only a kernel without SO_PEERPIDFD falls back to opening by pid. Any
	// other error (the peer was already reaped) means its pid may now name
	// another process: opening it would attest that one.
	if peerErr != nil && !errors.Is(peerErr, unix.ENOPROTOOPT) {
		return fmt.Errorf("SO_PEERPIDFD: %w (the caller is gone)", peerErr)
	}
	if pidfd < 0 {
		var err error
		if pidfd, err = unix.PidfdOpen(int(pid), 0); err != nil {
			return fmt.Errorf("pidfd_open(%d): %w", pid, err)
		}
	}
	// The pidfd must name the pid SO_PEERCRED reported (same pid
	// namespace); afterwards only its liveness needs checking.
	// On the failures below the pidfd is let go of: closing a descriptor
	// only read from loses nothing, and the error returned says why.
	if got, err := pidfdPID(pidfd); err != nil || got != int(pid) {
		_ = unix.Close(pidfd)
		return fmt.Errorf("caller pidfd names pid %d, peer credentials say %d: %v", got, pid, err)
	}
	// Non-blocking, so the runtime's poller can wait for the exit.
	if err := unix.SetNonblock(pidfd, true); err != nil {
		_ = unix.Close(pidfd)
		return fmt.Errorf("pidfd: %w", err)
	}
	f := os.NewFile(uintptr(pidfd), "pidfd:"+strconv.Itoa(int(pid)))
	raw, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return err
	}
	caller := &Caller{UID: c.cred.Uid, GID: c.cred.Gid, PID: pid, pidfd: f, pidRaw: raw, pinned: pinned,
		exeLink: "/proc/" + strconv.Itoa(int(pid)) + "/exe", conn: c}
	fail := func(err error) error { _ = f.Close(); return err }
	if caller.exe, err = statExe(caller.exeLink); err != nil {
		return fail(fmt.Errorf("pid %d: executable: %w", pid, err))
	}
	caller.exePath, _ = os.Readlink(caller.exeLink)
	if caller.started, err = startTime(pid); err != nil {
		return fail(fmt.Errorf("pid %d: start time: %w", pid, err))
	}
	// A pidfd opened by pid after accept may name a process that took
	// the pid since; one that started after the accept cannot have made
	// the connection (a tick of slack for rounding).
	if !pinned && caller.started > c.accepted+1 {
		return fail(fmt.Errorf("pid %d started after its connection was accepted: the connecting process is gone", pid))
	}
	// Everything above was read through the pid.
	if err := caller.alive(); err != nil {
		return fail(err)
	}
	var serr error
	if err := c.raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		return fail(fmt.Errorf("SO_PASSCRED: %v %v", err, serr))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return fail(net.ErrClosed)
	}
	c.caller, c.checkSender = caller, true
	c.oob = make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	return nil
}

// watch closes the connection when its caller exits: a copy of the
// socket held by another process must not keep the caller's streams.
func (c *Conn) watch() {
	err := c.caller.pidRaw.Read(func(fd uintptr) bool {
		exited, err := pidfdExited(int(fd))
		return exited || err != nil
	})
	if err != nil {
		return // the connection closed first
	}
	// The exiting process closed its own descriptors first, so a socket
	// whose other end is not hung up is held by someone else.
	held := false
	// Control fails only on a closed socket, which is not held: it is
	// closed below either way.
	_ = c.raw.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
		if n, err := unix.Poll(p, 0); err == nil && (n == 0 || p[0].Revents&(unix.POLLHUP|unix.POLLRDHUP) == 0) {
			held = true
		}
	})
	if held {
		c.log.Warn("workload API caller exited while another process holds its connection: closing it",
			"uid", c.cred.Uid, "pid", c.cred.Pid, "exe", c.caller.exePath)
	}
	_ = c.Close() // dropped on purpose: its close error has no reader
}

// Read reads what the caller wrote. Each chunk carries the credentials
// of the process that wrote it (the kernel never joins chunks from
// different writers into one read); bytes from any other process, or any
// ancillary data beyond the credentials (passed descriptors), close the
// connection.
func (c *Conn) Read(b []byte) (int, error) {
	if !c.checkSender {
		return c.UnixConn.Read(b)
	}
	if len(b) == 0 {
		return 0, nil
	}
	var n, oobn, flags int
	var rerr error
	if err := c.raw.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), b, c.oob, unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return rerr != unix.EAGAIN
			}
		}
	}); err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, &net.OpError{Op: "read", Net: "unix", Addr: c.LocalAddr(), Err: os.NewSyscallError("recvmsg", rerr)}
	}
	if n == 0 {
		return 0, io.EOF
	}
	if err := c.checkWriter(c.oob[:oobn], flags); err != nil {
		c.log.Warn("workload API connection used by a process other than the one that connected: closing it",
			"uid", c.cred.Uid, "pid", c.cred.Pid, "exe", c.caller.exePath, "err", err)
		_ = c.Close() // dropped on purpose: err says why
		return 0, err
	}
	return n, nil
}

func (c *Conn) checkWriter(oob []byte, flags int) error {
	if flags&unix.MSG_CTRUNC != 0 {
		return errors.New("ancillary data beyond credentials (passed descriptors?)")
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return fmt.Errorf("ancillary data: %w", err)
	}
	var cred *unix.Ucred
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_CREDENTIALS {
			return fmt.Errorf("unexpected ancillary data (level %d type %d)", m.Header.Level, m.Header.Type)
		}
		if cred, err = unix.ParseUnixCredentials(m); err != nil {
			return err
		}
	}
	if cred == nil {
		return errors.New("no writer credentials on the data")
	}
	if cred.Pid != c.cred.Pid {
		return fmt.Errorf("bytes written by pid %d (uid %d)", cred.Pid, cred.Uid)
	}
	return nil
}

// Credentials are the Workload API socket's transport credentials: no
// TLS (the spec has none on the local socket), the peer from SO_PEERCRED,
// and a pidfd from SO_PEERPIDFD where the kernel has it (else
// pidfd_open of the reported pid, immediately, and a start-time check).
// Connections from Listen keep their policy; others get none.
func Credentials() credentials.TransportCredentials { return creds{} }

type creds struct{}

func (creds) ServerHandshake(nc net.Conn) (net.Conn, credentials.AuthInfo, error) {
	c, ok := nc.(*Conn)
	if !ok {
		uc, ok := nc.(*net.UnixConn)
		if !ok {
			return nil, nil, errors.New("workload API: not a unix socket connection")
		}
		var err error
		if c, err = newConn(uc, nil); err != nil {
			return nil, nil, err
		}
	}
	if err := c.identify(); err != nil {
		c.log.Warn("workload API caller could not be identified", "uid", c.cred.Uid, "pid", c.cred.Pid, "err", err)
		return nil, nil, err
	}
	go c.watch()
	return c, c.caller, nil
}

func (creds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, nil, errors.New("attestor credentials are server-side only")
}

func (creds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "local"}
}
func (creds) Clone() credentials.TransportCredentials { return creds{} }
func (creds) OverrideServerName(string) error         { return nil }
