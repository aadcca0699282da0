package output

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

func TestValidate(t *testing.T) {
	good := Config{Dir: "/run/sigil/out/a", Selectors: []string{"unix:uid:1000"}, UID: 1000, GID: 1000}
	if err := good.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]Config{
		"relative dir":   {Dir: "out", Selectors: good.Selectors},
		"no selectors":   {Dir: good.Dir},
		"short selector": {Dir: good.Dir, Selectors: []string{"uid:1000"}},
		"negative uid":   {Dir: good.Dir, Selectors: good.Selectors, UID: -1},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// A secret file gets its owner and mode before its content, replaces the
// old file in one rename, and leaves no temporary file behind.
func TestWriteFileAtomicAndOwned(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("needs root to give files away (CI runs as root)")
	}
	dir := t.TempDir()
	c := Config{Dir: filepath.Join(dir, "out"), UID: 1234, GID: 2345}
	for _, content := range []string{"first", "second"} {
		if err := writeFile(c, "svid_key.pem", []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(filepath.Join(c.Dir, "svid_key.pem"))
		st, _ := os.Stat(filepath.Join(c.Dir, "svid_key.pem"))
		sys := st.Sys().(*syscall.Stat_t)
		if string(b) != content || st.Mode().Perm() != 0o600 || sys.Uid != 1234 || sys.Gid != 2345 {
			t.Fatalf("%q mode %v owner %d:%d", b, st.Mode().Perm(), sys.Uid, sys.Gid)
		}
	}
	ents, _ := os.ReadDir(c.Dir)
	if len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}
}

// Which directories an output may sit under: each one on the path must be
// beyond the reach of uids other than root, the agent and the output's
// own, and no component may be a symlink. A refused output creates
// nothing.
func TestOutputPathRules(t *testing.T) {
	needRoot(t)
	ca := newTestCA(t)
	for _, tc := range []struct {
		name   string
		setup  func(t *testing.T, base string) // prepares base/d
		refuse string                          // "" if accepted
	}{
		{"agent's own", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o755, 0, 0) }, ""},
		{"output uid owns", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o700, 1001, 1001) }, ""},
		{"sticky world-writable", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o1777, 0, 0) }, ""},
		{"root group writable (the bits may be an ACL mask)", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o775, 0, 0) }, "writable by group 0"},
		{"other uid owns", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o755, 1002, 1002) }, "owned by uid 1002"},
		{"world-writable", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o777, 0, 0) }, "writable by everyone"},
		{"group writable", func(t *testing.T, base string) { mkdir(t, base+"/d", 0o775, 0, 1002) }, "writable by group 1002"},
		{"root's symlink", func(t *testing.T, base string) {
			mkdir(t, base+"/real", 0o755, 0, 0)
			if err := os.Symlink("real", base+"/d"); err != nil {
				t.Fatal(err)
			}
		}, "is a symlink (owner uid 0)"},
		{"a file", func(t *testing.T, base string) {
			if err := os.WriteFile(base+"/d", nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}, "is not a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := testBase(t)
			tc.setup(t, base)
			c := Config{Dir: base + "/d/out", Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
			err := writeAll(c, ca, ca.svid(t, "/a"))
			if tc.refuse == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.refuse) || !strings.Contains(err.Error(), base+"/d") {
				t.Fatalf("want refusal naming %s/d and %q, got %v", base, tc.refuse, err)
			}
			if _, err := os.Lstat(base + "/real/out"); err == nil {
				t.Fatal("output written through the symlink")
			}
			if _, err := os.Lstat(c.Dir); err == nil {
				t.Fatal("refused output's directory was created")
			}
		})
	}
}

// Without openat2 (old kernels, seccomp filters answering EPERM) the walk
// falls back to openat(O_NOFOLLOW), which must refuse the same symlinks.
func TestOpenComponentWithoutOpenat2(t *testing.T) {
	base := t.TempDir()
	if err := os.Mkdir(filepath.Join(base, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("dir", filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	parent, err := unix.Open(base, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = unix.Close(parent) }() // O_PATH
	for name, open := range map[string]func(int, string) (int, error){"openat2": openComponent, "openat": openComponentNoFollow} {
		fd, err := open(parent, "dir")
		if err != nil {
			t.Fatalf("%s: dir: %v", name, err)
		}
		_ = unix.Close(fd) // O_PATH
		if fd, err := open(parent, "link"); err == nil {
			_ = unix.Close(fd)
			t.Fatalf("%s followed a symlink", name)
		} else if !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.ENOTDIR) {
			t.Fatalf("%s: symlink: %v", name, err)
		}
	}
}

// A refused output is logged with its path and the reason, and retried;
// the agent's other outputs go on.
func TestRunLogsRefusedOutput(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	ca := newTestCA(t)
	if err := os.Symlink(base, filepath.Join(base, "link")); err != nil {
		t.Fatal(err)
	}
	snap := ca.snapshot()
	v := ca.svid(t, "/a")
	v.EntryID = "e1"
	snap.Entries = []api.Entry{{ID: "e1", SPIFFEID: v.SPIFFEID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1001"}}}}
	snap.SVIDs = map[string]*cache.SVID{"e1": v}
	src := fixedSource{snap}
	var buf syncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bad := Config{Dir: filepath.Join(base, "link", "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
	good := Config{Dir: filepath.Join(base, "good"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
	done := make(chan struct{}, 2)
	for _, c := range []Config{bad, good} {
		go func() { Run(ctx, src, c, log, nil); done <- struct{}{} }()
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(buf.String(), `"msg":"output not written"`) || !strings.Contains(buf.String(), `"msg":"output written"`) {
		if time.Now().After(deadline) {
			t.Fatalf("log: %s", buf.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	<-done
	if !strings.Contains(buf.String(), filepath.Join(base, "link")+" is a symlink") {
		t.Fatalf("log does not name the symlink: %s", buf.String())
	}
	if _, err := os.Lstat(filepath.Join(base, "out")); err == nil {
		t.Fatal("output written through the symlink")
	}
	if _, err := os.Stat(filepath.Join(good.Dir, "svid_key.pem")); err != nil {
		t.Fatal(err)
	}
}

type fixedSource struct{ s *cache.Snapshot }

func (f fixedSource) Current() (*cache.Snapshot, <-chan struct{}) { return f.s, nil }
func (fixedSource) JWTSVID(context.Context, api.Entry, []string) (string, time.Time, error) {
	return "", time.Time{}, errors.New("no JWT-SVIDs here")
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
