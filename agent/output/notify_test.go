package output

import (
	"bufio"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/appliance/api"
)

func TestNotifyValidate(t *testing.T) {
	base := Config{Dir: "/run/sigil/out/a", Selectors: []string{"unix:uid:1000"}, UID: 1000, GID: 1000}
	with := func(n Notify) Config { c := base; c.Notify = &n; return c }
	for name, n := range map[string]Notify{
		"signal":           {Signal: "SIGHUP", PIDFile: "/run/nginx.pid"},
		"command":          {Command: []string{"/usr/sbin/nginx", "-s", "reload"}},
		"command, timeout": {Command: []string{"/bin/true"}, Timeout: time.Minute},
		"shortest timeout": {Command: []string{"/bin/true"}, Timeout: time.Second},
	} {
		if err := with(n).Validate(); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	for name, n := range map[string]Notify{
		"nothing":                {},
		"unknown signal":         {Signal: "SIGFOO", PIDFile: "/run/x.pid"},
		"signal without SIG":     {Signal: "HUP", PIDFile: "/run/x.pid"},
		"SIGKILL":                {Signal: "SIGKILL", PIDFile: "/run/x.pid"},
		"signal without pidfile": {Signal: "SIGHUP"},
		"relative pid file":      {Signal: "SIGHUP", PIDFile: "run/x.pid"},
		"unclean pid file":       {Signal: "SIGHUP", PIDFile: "/run/../etc/x.pid"},
		"signal with timeout":    {Signal: "SIGHUP", PIDFile: "/run/x.pid", Timeout: time.Second},
		"signal and command":     {Signal: "SIGHUP", PIDFile: "/run/x.pid", Command: []string{"/bin/true"}},
		"relative command":       {Command: []string{"nginx", "-s", "reload"}},
		"empty command":          {Command: []string{""}},
		"NUL in argument":        {Command: []string{"/bin/echo", "a\x00b"}},
		"pid file with command":  {Command: []string{"/bin/true"}, PIDFile: "/run/x.pid"},
		"negative timeout":       {Command: []string{"/bin/true"}, Timeout: -time.Second},
		"timeout too long":       {Command: []string{"/bin/true"}, Timeout: time.Hour},
		"timeout too short":      {Command: []string{"/bin/true"}, Timeout: 999 * time.Millisecond},
	} {
		err := with(n).Validate()
		if err == nil {
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), base.Dir) {
			t.Errorf("%s: error does not name the output: %v", name, err)
		}
	}
}

// victim is a process that handles SIGHUP and is stopped, so a SIGHUP
// sent to it stays pending where /proc shows it: whether it was signalled
// is read, not waited for.
type victim struct {
	pid int
}

func startVictim(t *testing.T, uid int) *victim {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", `trap 'echo hup' HUP; trap 'echo term' TERM; echo ready; read x`)
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}}
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Best effort: Wait reports the kill, and the victim may have
		// exited already.
		_ = cmd.Process.Kill()
		_ = stdin.Close()
		_ = cmd.Wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("victim: %q %v", line, err)
	}
	v := &victim{pid: cmd.Process.Pid}
	if err := syscall.Kill(v.pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for v.state(t) != "T" {
		if time.Now().After(deadline) {
			t.Fatalf("victim %d not stopped: state %s", v.pid, v.state(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
	return v
}

func (v *victim) state(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(v.pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	return f[0]
}

// hupPending: a SIGHUP reached the process (it is stopped, so it waits).
func (v *victim) hupPending(t *testing.T) bool {
	t.Helper()
	return v.pending(t, syscall.SIGHUP)
}

// pending: sig (HUP or TERM, which it traps) reached the process.
func (v *victim) pending(t *testing.T, sig syscall.Signal) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(v.pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		for _, p := range []string{"ShdPnd:", "SigPnd:"} {
			if h, ok := strings.CutPrefix(line, p); ok {
				mask, err := strconv.ParseUint(strings.TrimSpace(h), 16, 64)
				if err != nil {
					t.Fatal(err)
				}
				if mask&(1<<(sig-1)) != 0 {
					return true
				}
			}
		}
	}
	return false
}

func writePIDFile(t *testing.T, path string, pid, uid int, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, uid, uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// Workload 1001 writes the pid file its output's notification reads (it
// owns the directory, as a daemon running as 1001 writes its own pid
// file). It names a process of uid 1002, or one of root: a root agent
// must not send them the signal, or any workload could have any process
// on the host signalled on every rotation.
func TestAttackNotifySignalsOtherUID(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	wdir := filepath.Join(base, "w")
	mkdir(t, wdir, 0o755, 1001, 1001)
	pidFile := filepath.Join(wdir, "app.pid")
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: pidFile}}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		uid  int
	}{{"another workload's process", 1002}, {"a root process", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			v := startVictim(t, tc.uid)
			// Written by the workload itself, as it could.
			if out, err := asUID(t, 1001, `echo "$1" > "$2"`, strconv.Itoa(v.pid), pidFile); err != nil {
				t.Fatalf("uid 1001 could not write its pid file: %v %s", err, out)
			}
			err := notify(context.Background(), c)
			if v.hupPending(t) {
				t.Fatalf("pid %d (uid %d) was sent SIGHUP through a pid file of uid 1001", v.pid, tc.uid)
			}
			if err == nil || !strings.Contains(err.Error(), "not signalled") || !strings.Contains(err.Error(), pidFile) {
				t.Fatalf("want a refusal naming the pid file, got %v", err)
			}
			t.Logf("refused: %v", err)
		})
	}
	// The same file naming the workload's own process works.
	t.Run("the workload's own process", func(t *testing.T) {
		v := startVictim(t, 1001)
		if out, err := asUID(t, 1001, `echo "$1" > "$2"`, strconv.Itoa(v.pid), pidFile); err != nil {
			t.Fatalf("uid 1001 could not write its pid file: %v %s", err, out)
		}
		if err := notify(context.Background(), c); err != nil {
			t.Fatal(err)
		}
		if !v.hupPending(t) {
			t.Fatal("no SIGHUP reached the workload's process")
		}
	})
}

// Which pid files and processes a signal notification accepts.
func TestNotifySignalRules(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	rdir := filepath.Join(base, "r")
	mkdir(t, rdir, 0o755, 0, 0)
	other := filepath.Join(base, "o")
	mkdir(t, other, 0o755, 1002, 1002)
	// The workload's directory: whatever is in it, even a root-owned
	// file (a hard link to another daemon's pid file), is the workload's.
	wdir := filepath.Join(base, "w")
	mkdir(t, wdir, 0o755, 1001, 1001)
	real := filepath.Join(rdir, "real.pid")
	for _, tc := range []struct {
		name   string
		victim int                         // uid of the process named
		setup  func(t *testing.T, pid int) // writes rdir/app.pid or not
		file   string                      // pid file if not rdir/app.pid
		refuse string                      // "" if signalled
	}{
		{"root's file, root's process (a daemon's master)", 0, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 0, 0o644)
		}, "", ""},
		{"root's file, the output's process", 1001, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 0, 0o644)
		}, "", ""},
		{"root's file, another uid's process", 1002, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 0, 0o644)
		}, "", "runs as uid 1002"},
		{"output's file in root's dir, root's process", 0, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 1001, 0o644)
		}, "", "not signalled"},
		{"root's file in the output's dir, root's process", 0, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(wdir, "app.pid"), pid, 0, 0o644)
		}, filepath.Join(wdir, "app.pid"), "not signalled"},
		{"root's file in the output's dir, the output's process", 1001, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(wdir, "app.pid"), pid, 0, 0o644)
		}, filepath.Join(wdir, "app.pid"), ""},
		{"group-writable file", 0, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 0, 0o664)
		}, "", "writable by group or others"},
		{"another uid's file", 1002, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(rdir, "app.pid"), pid, 1002, 0o644)
		}, "", "owned by uid 1002"},
		{"a symlink", 0, func(t *testing.T, pid int) {
			writePIDFile(t, real, pid, 0, 0o644)
			if err := os.Symlink(real, filepath.Join(rdir, "app.pid")); err != nil {
				t.Fatal(err)
			}
		}, "", "symbolic link"},
		{"in another uid's directory", 0, func(t *testing.T, pid int) {
			writePIDFile(t, filepath.Join(other, "app.pid"), pid, 0, 0o644)
		}, filepath.Join(other, "app.pid"), "owned by uid 1002"},
		{"not a pid", 0, func(t *testing.T, pid int) {
			if err := os.WriteFile(filepath.Join(rdir, "app.pid"), []byte("-1\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, "", "does not hold a pid"},
		{"missing", 0, func(t *testing.T, pid int) {}, "", "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range []string{filepath.Join(rdir, "app.pid"), filepath.Join(wdir, "app.pid"), real} {
				if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
					t.Fatal(err)
				}
			}
			v := startVictim(t, tc.victim)
			tc.setup(t, v.pid)
			file := tc.file
			if file == "" {
				file = filepath.Join(rdir, "app.pid")
			}
			c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
				Notify: &Notify{Signal: "SIGHUP", PIDFile: file}}
			err := notify(context.Background(), c)
			if tc.refuse == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !v.hupPending(t) {
					t.Fatal("not signalled")
				}
				return
			}
			if v.hupPending(t) {
				t.Fatal("signalled")
			}
			if err == nil || !strings.Contains(err.Error(), tc.refuse) {
				t.Fatalf("want refusal with %q, got %v", tc.refuse, err)
			}
		})
	}
}

// A command runs as the output's uid and gid without the agent's groups
// or environment; one that overruns its timeout is killed with everything
// it started.
func TestNotifyCommand(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	m := filepath.Join(base, "m")
	mkdir(t, m, 0o755, 1001, 1001)
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
	t.Setenv("SIGIL_SECRET_TEST", "agent-only")

	// The session (field 6 of stat) and process group (5) are the
	// command's own: no controlling terminal of the agent's.
	c.Notify = &Notify{Command: []string{"/bin/sh", "-c", `{ id -u; id -g; id -G; pwd; read -r pid comm st ppid pgrp sid rest < /proc/$$/stat; echo "$$ $pgrp $sid"; env | sort; } > "$1/ran"`, "sh", m}}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := notify(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(m, "ran"))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(got) < 5 || got[0] != "1001" || got[1] != "1001" || got[2] != "1001" || got[3] != "/" {
		t.Fatalf("uid, gid, groups, cwd: %q", got)
	}
	if ids := strings.Fields(got[4]); len(ids) != 3 || ids[1] != ids[0] || ids[2] != ids[0] {
		t.Fatalf("pid, process group, session: %q, want all the same", got[4])
	}
	env := strings.Join(got[5:], "\n")
	if strings.Contains(env, "SIGIL_SECRET_TEST") || !strings.Contains(env, "SIGIL_OUTPUT_DIR="+c.Dir) {
		t.Fatalf("environment: %s", env)
	}

	c.Notify = &Notify{Command: []string{"/bin/sh", "-c", "echo failing; exit 3"}}
	if err := notify(context.Background(), c); err == nil || !strings.Contains(err.Error(), "exit status 3") || !strings.Contains(err.Error(), "failing") {
		t.Fatalf("failing command: %v", err)
	}

	// The child writes the pid of a grandchild, then both hang.
	c.Notify = &Notify{Command: []string{"/bin/sh", "-c", `sleep 600 & echo $! > "$1/grandchild"; wait`, "sh", m}, Timeout: time.Second}
	err = notify(context.Background(), c)
	if err == nil || !strings.Contains(err.Error(), "timeout 1s") {
		t.Fatalf("hanging command: %v", err)
	}
	b, err = os.ReadFile(filepath.Join(m, "grandchild"))
	if err != nil {
		t.Fatal(err)
	}
	gc, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	// Dead once it is gone or a zombie (its reaper is init, not us).
	alive := func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(gc) + "/stat")
		if err != nil {
			return false
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		return len(f) > 0 && f[0] != "Z" && f[0] != "X"
	}
	deadline := time.Now().Add(10 * time.Second)
	for alive() {
		if time.Now().After(deadline) {
			_ = syscall.Kill(gc, syscall.SIGKILL) // best effort before failing
			t.Fatalf("grandchild %d outlived the timeout", gc)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Run notifies after the files are written, again after each rotation; a
// failing notification is logged with the output and counted, and does
// not hold up another output.
func TestRunNotifies(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	m := filepath.Join(base, "m")
	mkdir(t, m, 0o755, 1001, 1001)
	ca := newTestCA(t)
	src := &switchSource{ch: make(chan struct{})}
	set := func() {
		snap := ca.snapshot()
		v := ca.svid(t, "/a")
		v.EntryID = "e1"
		snap.Entries = []api.Entry{{ID: "e1", SPIFFEID: v.SPIFFEID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1001"}}}}
		snap.SVIDs = map[string]*cache.SVID{"e1": v}
		src.set(snap)
	}
	set()
	// The command records the serial it finds in place, so it must run
	// after svid.pem is complete.
	good := Config{Dir: filepath.Join(base, "good"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Command: []string{"/bin/sh", "-c", `cat "$SIGIL_OUTPUT_DIR/svid.pem" "$SIGIL_OUTPUT_DIR/bundle.pem" >> "$1/seen"`, "sh", m}}}
	bad := Config{Dir: filepath.Join(base, "bad"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: filepath.Join(base, "none.pid")}}
	var buf syncBuffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	var st Stats
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{}, 2)
	for _, c := range []Config{bad, good} {
		go func() { Run(ctx, src, c, log, &st); done <- struct{}{} }()
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s; log: %s", what, buf.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	seen := func() string { b, _ := os.ReadFile(filepath.Join(m, "seen")); return string(b) }
	chainOf := func(c Config) string { b, _ := os.ReadFile(filepath.Join(c.Dir, "svid.pem")); return string(b) }
	wait("the first notification", func() bool { return strings.Count(seen(), "CERTIFICATE-----\n") == 4 })
	first := chainOf(good)
	if !strings.HasPrefix(seen(), first) {
		t.Fatal("the command did not see the chain in place")
	}
	set()
	wait("the notification after rotation", func() bool { return strings.Count(seen(), "CERTIFICATE-----\n") == 8 })
	if second := chainOf(good); second == first || !strings.Contains(seen(), second) {
		t.Fatal("the second notification did not see the rotated chain")
	}
	wait("both failures counted", func() bool { return st.NotifyFailures.Load() >= 2 })
	// The command wrote what it saw before it exited: cancelling before
	// it was reaped would kill it and count a failure.
	wait("both commands reaped", func() bool { return strings.Count(buf.String(), `"msg":"output notified"`) == 2 })
	cancel()
	<-done
	<-done
	if n, f := st.Notifications.Load(), st.NotifyFailures.Load(); n != 4 || f != 2 {
		t.Fatalf("notifications %d failures %d, want 4 and 2", n, f)
	}
	l := buf.String()
	if !strings.Contains(l, `"msg":"output notification failed","dir":"`+bad.Dir+`"`) || !strings.Contains(l, "none.pid") {
		t.Fatalf("failure not logged with the output and the pid file: %s", l)
	}
}

// switchSource is a cache whose snapshot the test replaces.
type switchSource struct {
	mu   sync.Mutex
	ch   chan struct{}
	snap *cache.Snapshot
}

func (s *switchSource) set(snap *cache.Snapshot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snap = snap
	close(s.ch)
	s.ch = make(chan struct{})
}

func (s *switchSource) Current() (*cache.Snapshot, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap, s.ch
}

func (*switchSource) JWTSVID(context.Context, api.Entry, []string) (string, time.Time, error) {
	return "", time.Time{}, nil
}
