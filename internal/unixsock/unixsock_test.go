package unixsock

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestListenModes(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []os.FileMode{0o600, 0o660, 0o777} {
		path := filepath.Join(dir, "run", mode.String()+".sock")
		l, err := Listen(path, 0o700, mode)
		if err != nil {
			t.Fatal(err)
		}
		st, err := os.Lstat(path)
		if err != nil || st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != mode {
			t.Errorf("socket %s: %v %v, want mode %v", path, st.Mode(), err, mode)
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := os.Stat(filepath.Join(dir, "run")); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("created directory: %v %v, want 0700", st.Mode(), err)
	}
	if _, err := Listen(filepath.Join(dir, "x.sock"), 0o700, os.ModeSetuid|0o600); err == nil {
		t.Error("a mode beyond permissions accepted")
	}
}

// The file bind creates already has no more than the asked-for mode, even
// under an empty umask: nobody can connect between bind and chmod.
func TestBindNeverWider(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := bind(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	st, err := os.Lstat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket as bind made it: %v %v, want 0600", st.Mode(), err)
	}
}

func TestListenReplacesOnlySockets(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "s.sock")
	l, err := Listen(path, 0o700, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	// A socket left by a run that did not close it (no unlink) is stale.
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if l, err = Listen(path, 0o700, 0o600); err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(file, 0o700, 0o600); err == nil || !strings.Contains(err.Error(), "exists and is not a socket") {
		t.Fatalf("regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Fatal("regular file changed")
	}
}

func TestPeerCred(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen(path, 0o700, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }() // for the Fatal paths; a second Close is harmless
	cred, err := PeerCred(s.(*net.UnixConn))
	if err != nil || int(cred.Pid) != os.Getpid() || int(cred.Uid) != os.Getuid() || int(cred.Gid) != os.Getgid() {
		t.Fatalf("peer credentials %+v %v, want pid %d uid %d gid %d", cred, err, os.Getpid(), os.Getuid(), os.Getgid())
	}
	// A connection whose descriptor is gone has no credentials to give.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := PeerCred(s.(*net.UnixConn)); err == nil {
		t.Fatal("closed connection gave credentials")
	}
}
