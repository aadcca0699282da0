// Package unixsock owns what Sigil's two local sockets (sigild's admin
// socket and sigil-agent's Workload API socket) have in common: creating
// a listening socket whose file never has more permission than asked
// for, and reading a connected peer's credentials from the kernel
// (SO_PEERCRED). What each side decides from those credentials stays
// with it.
package unixsock

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// Listen listens on a Unix socket at path with file mode mode. The
// directory is created with dirMode when missing (an existing one keeps
// its mode). A stale socket from an earlier run is replaced; any other
// file at path is refused and left alone.
//
// The socket's mode is set on the socket before bind creates its file,
// so the file never has more permission than mode, without touching the
// process-wide umask; it is then set again because bind applies the
// umask.
func Listen(path string, dirMode, mode os.FileMode) (net.Listener, error) {
	if mode&^os.ModePerm != 0 {
		return nil, fmt.Errorf("socket %s: mode %v is not a permission mode", path, mode)
	}
	if err := os.MkdirAll(filepath.Dir(path), dirMode); err != nil {
		return nil, err
	}
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	l, err := bind(path, mode)
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, mode); err != nil {
		_ = l.Close() // the chmod error is the one to report
		return nil, err
	}
	return l, nil
}

// bind creates the socket file with at most mode (less where the umask
// clears bits).
func bind(path string, mode os.FileMode) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = unix.Fchmod(int(fd), uint32(mode)) }); cerr != nil {
			return cerr
		}
		if err != nil {
			return fmt.Errorf("socket %s: setting mode %v before bind: %w", path, mode, err)
		}
		return nil
	}}
	return lc.Listen(context.Background(), "unix", path)
}

// PeerCred returns the credentials the kernel recorded for the peer of a
// connected Unix socket when it connected: its pid, uid and gid.
func PeerCred(c syscall.Conn) (unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return unix.Ucred{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return unix.Ucred{}, err
	}
	if cerr != nil {
		return unix.Ucred{}, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return *cred, nil
}
