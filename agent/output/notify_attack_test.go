package output

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// notifyHelperEnv makes the test binary act as an agent that runs one
// notification (TestNotifyHelper) when a test starts it as another user
// with the packaged unit's kind of capabilities.
const notifyHelperEnv = "SIGIL_NOTIFY_HELPER"

// TestNotifyHelper is not a test: it runs the notification of the
// output in its environment, as the agent would, and prints OK or ERR
// and the error.
func TestNotifyHelper(t *testing.T) {
	spec := os.Getenv(notifyHelperEnv)
	if spec == "" {
		t.Skip("run as a child only")
	}
	var c Config
	if err := json.Unmarshal([]byte(spec), &c); err != nil {
		fmt.Println("ERR", err)
		return
	}
	err := notify(context.Background(), c)
	// The helper's controlling terminal (tty_nr, field 7 of stat): 0
	// when it has none.
	if b, err := os.ReadFile("/proc/self/stat"); err == nil {
		if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 4 {
			fmt.Println("TTY", f[4])
		}
	}
	if err != nil {
		fmt.Println("ERR", err)
		return
	}
	fmt.Println("OK")
}

// runAsAgent runs c's notification in a copy of the test binary as
// agentUID with caps raised in its ambient set (so, as with systemd's
// AmbientCapabilities=, they are also permitted, effective and
// inheritable). It returns the helper's OK or ERR line.
func runAsAgent(t *testing.T, base string, agentUID int, caps []uintptr, c Config) string {
	t.Helper()
	res, _ := runHelper(t, base, agentUID, caps, false, c)
	return res
}

// runHelper is runAsAgent, the helper in a session of its own (setsid:
// without a controlling terminal, as systemd starts a service) if asked;
// it also returns all the helper printed.
func runHelper(t *testing.T, base string, agentUID int, caps []uintptr, setsid bool, c Config) (string, string) {
	t.Helper()
	bin := filepath.Join(base, "agent.test")
	if _, err := os.Stat(bin); err != nil {
		self, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(self)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bin, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	spec, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestNotifyHelper$")
	cmd.Env = []string{notifyHelperEnv + "=" + string(spec), "PATH=/usr/bin:/bin", "TMPDIR=/tmp"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: uint32(agentUID), Gid: uint32(agentUID), Groups: []uint32{}},
		AmbientCaps: caps,
		Setsid:      setsid,
		Pdeathsig:   syscall.SIGKILL,
	}
	out, err := cmd.CombinedOutput()
	for line := range strings.SplitSeq(string(out), "\n") {
		if line == "OK" || strings.HasPrefix(line, "ERR ") {
			return line, string(out)
		}
	}
	t.Fatalf("helper as uid %d: %v\n%s", agentUID, err, out)
	return "", ""
}

// capsCommand records the capability sets and no_new_privs of the
// command itself (the shell's own /proc entry) in dir/caps.
func capsCommand(dir string) []string {
	return []string{"/bin/sh", "-c", `while read -r k v; do case $k in Cap*|NoNewPrivs:|Uid:) echo "$k $v";; esac; done < /proc/$$/status > "$1/caps"`, "sh", dir}
}

// checkNoCaps reads what capsCommand recorded: every set but the bounding
// one must be empty and no_new_privs set.
func checkNoCaps(t *testing.T, dir string, uid int) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "caps"))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		k, v, _ := strings.Cut(line, " ")
		got[strings.TrimSuffix(k, ":")] = strings.TrimSpace(v)
	}
	if f := strings.Fields(got["Uid"]); len(f) != 4 || f[0] != strconv.Itoa(uid) || f[1] != f[0] || f[2] != f[0] {
		t.Errorf("command's uids %q, want %d", got["Uid"], uid)
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapAmb"} {
		if v, ok := got[k]; !ok || strings.Trim(v, "0") != "" {
			t.Errorf("the command's %s is %q, want empty", k, v)
		}
	}
	if got["NoNewPrivs"] != "1" {
		t.Errorf("the command's NoNewPrivs is %q, want 1", got["NoNewPrivs"])
	}
	if t.Failed() {
		t.Logf("command's /proc status:\n%s", b)
	}
}

// The packaged unit runs the agent as its own user with ambient
// CAP_SYS_PTRACE and CAP_CHOWN (and README's drop-in adds CAP_SETUID,
// CAP_SETGID and CAP_KILL). A change between two non-zero uids keeps
// capabilities and ambient ones survive execve: the workload's command
// held CAP_SYS_PTRACE, enough to read the agent's memory and its keys.
// Whatever the agent holds, the command must hold nothing.
func TestAttackNotifyCommandCapabilities(t *testing.T) {
	needRoot(t)
	const agentUID = 1003
	packaged := []uintptr{unix.CAP_SYS_PTRACE, unix.CAP_CHOWN}
	dropIn := []uintptr{unix.CAP_SYS_PTRACE, unix.CAP_CHOWN, unix.CAP_SETUID, unix.CAP_SETGID, unix.CAP_KILL}
	for _, tc := range []struct {
		name          string
		agent         int       // -1: this (root) test process
		caps          []uintptr // the agent's, when not root
		uid           int       // the output's
		refused       string    // "" if run
		refusedDetail string
	}{
		{"packaged agent, its own uid", agentUID, packaged, agentUID, "", ""},
		{"agent with the drop-in, workload uid", agentUID, dropIn, 1001, "", ""},
		// Without CAP_SETPCAP the agent cannot keep root's execve from
		// granting the bounding set: such a command is not run.
		{"agent with the drop-in, root output", agentUID, dropIn, 0, "not started", "SECBIT_NOROOT"},
		{"root agent, workload uid", -1, nil, 1001, "", ""},
		{"root agent, root output", -1, nil, 0, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := testBase(t)
			m := filepath.Join(base, "m")
			mkdir(t, m, 0o755, tc.uid, tc.uid)
			c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:" + strconv.Itoa(tc.uid)}, UID: tc.uid, GID: tc.uid,
				Notify: &Notify{Command: capsCommand(m)}}
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			var res string
			if tc.agent < 0 {
				res = "OK"
				if err := notify(context.Background(), c); err != nil {
					res = "ERR " + err.Error()
				}
			} else {
				res = runAsAgent(t, base, tc.agent, tc.caps, c)
			}
			if tc.refused != "" {
				if !strings.Contains(res, tc.refused) || !strings.Contains(res, tc.refusedDetail) {
					t.Errorf("want a refusal with %q and %q, got %s", tc.refused, tc.refusedDetail, res)
				}
				if b, err := os.ReadFile(filepath.Join(m, "caps")); err == nil {
					t.Fatalf("the command ran:\n%s", b)
				}
				t.Logf("refused: %s", res)
				return
			}
			if res != "OK" {
				t.Fatalf("notification: %s", res)
			}
			checkNoCaps(t, m, tc.uid)
		})
	}
}

// The agent was started with a descriptor open without close-on-exec (a
// shell redirection, a supervisor's socket): every command it ran got it.
func TestAttackNotifyCommandInheritedFD(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	m := filepath.Join(base, "m")
	mkdir(t, m, 0o755, 1001, 1001)
	secret := filepath.Join(base, "agent-secret")
	if err := os.WriteFile(secret, []byte("agent only"), 0o600); err != nil {
		t.Fatal(err)
	}
	// syscall.Open, unlike os.Open, does not add O_CLOEXEC: as inherited.
	fd, err := syscall.Open(secret, syscall.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Close(fd) }) // read only
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Command: []string{"/bin/sh", "-c", `for f in /proc/$$/fd/*; do echo "${f##*/} $(readlink "$f")"; done > "$1/fds"`, "sh", m}}}
	if err := notify(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(m, "fds"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), secret) {
		t.Fatalf("the command holds the agent's fd %d (%s):\n%s", fd, secret, b)
	}
	// The agent's own descriptor still works.
	buf := make([]byte, 32)
	if n, err := syscall.Pread(fd, buf, 0); err != nil || string(buf[:n]) != "agent only" {
		t.Fatalf("the agent's fd: %q %v", buf[:n], err)
	}
}

// nginx died and left /run/nginx.pid (root's, in root's directory)
// behind; its pid now belongs to another root process. The agent must not
// signal a process that started after the pid file was written.
func TestAttackNotifyStalePIDFile(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	rdir := filepath.Join(base, "r")
	mkdir(t, rdir, 0o755, 0, 0)
	pidFile := filepath.Join(rdir, "nginx.pid")
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: pidFile}}
	v := startVictim(t, 0)
	writePIDFile(t, pidFile, v.pid, 0, 0o644)
	// Written a minute before the process started: by its dead daemon.
	old := time.Now().Add(-time.Minute)
	if err := os.Chtimes(pidFile, old, old); err != nil {
		t.Fatal(err)
	}
	err := notify(context.Background(), c)
	if v.hupPending(t) {
		t.Fatalf("pid %d, younger than its pid file, was signalled", v.pid)
	}
	if err == nil || !strings.Contains(err.Error(), "stale") || !strings.Contains(err.Error(), pidFile) {
		t.Fatalf("want a refusal of a stale pid file, got %v", err)
	}
	t.Logf("refused: %v", err)
	// Rewritten by the live daemon, the same file is accepted.
	writePIDFile(t, pidFile, v.pid, 0, 0o644)
	if err := notify(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if !v.hupPending(t) {
		t.Fatal("not signalled through a fresh pid file")
	}
}

// A pid file with a second name: the name the path rules checked is not
// the only way to it, so the file is refused whoever owns it.
func TestAttackNotifyHardlinkedPIDFile(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	rdir := filepath.Join(base, "r")
	mkdir(t, rdir, 0o755, 0, 0)
	pidFile := filepath.Join(rdir, "app.pid")
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: pidFile}}
	v := startVictim(t, 0)
	writePIDFile(t, pidFile, v.pid, 0, 0o644)
	if err := os.Link(pidFile, filepath.Join(base, "other.pid")); err != nil {
		t.Fatal(err)
	}
	err := notify(context.Background(), c)
	if v.hupPending(t) {
		t.Fatal("signalled through a hard-linked pid file")
	}
	if err == nil || !strings.Contains(err.Error(), "hard links") {
		t.Fatalf("want a refusal of the hard link, got %v", err)
	}
}

// Through root's pid file a root process gets a reload signal, never one
// that stops it; the output's own process may get any allowed signal.
func TestAttackNotifyRootStopSignal(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	rdir := filepath.Join(base, "r")
	mkdir(t, rdir, 0o755, 0, 0)
	pidFile := filepath.Join(rdir, "app.pid")
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGTERM", PIDFile: pidFile}}
	root := startVictim(t, 0)
	writePIDFile(t, pidFile, root.pid, 0, 0o644)
	err := notify(context.Background(), c)
	if root.pending(t, syscall.SIGTERM) {
		t.Fatal("root's process got SIGTERM")
	}
	if err == nil || !strings.Contains(err.Error(), "only SIGHUP, SIGUSR1, SIGUSR2 or SIGWINCH") {
		t.Fatalf("want a refusal of SIGTERM to root, got %v", err)
	}
	own := startVictim(t, 1001)
	writePIDFile(t, pidFile, own.pid, 0, 0o644)
	if err := notify(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	if !own.pending(t, syscall.SIGTERM) {
		t.Fatal("the output's process did not get SIGTERM")
	}
}

// An agent without CAP_KILL may not signal another uid's process: the
// error says so, rather than that the process is gone.
func TestNotifySignalPermissionError(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	rdir := filepath.Join(base, "r")
	mkdir(t, rdir, 0o755, 0, 0)
	pidFile := filepath.Join(rdir, "nginx.pid")
	v := startVictim(t, 0)
	writePIDFile(t, pidFile, v.pid, 0, 0o644)
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: pidFile}}
	res := runAsAgent(t, base, 1003, []uintptr{unix.CAP_SYS_PTRACE, unix.CAP_CHOWN}, c)
	if v.hupPending(t) {
		t.Fatal("signalled without CAP_KILL")
	}
	if !strings.Contains(res, "may not signal it") || !strings.Contains(res, "CAP_KILL") || strings.Contains(res, "gone") {
		t.Fatalf("want a permission error, got %s", res)
	}
}

// The pid file path names a terminal (root's pty here; a device node in a
// directory the path rules accept). The agent, a session leader without a
// terminal as every systemd service is, must not make it its controlling
// terminal by opening it, even though the file is then refused.
func TestAttackNotifyPIDFileTerminal(t *testing.T) {
	needRoot(t)
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	t.Cleanup(func() { _ = ptmx.Close() }) // the pty goes with it
	if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	pts := "/dev/pts/" + strconv.Itoa(n)
	base := testBase(t)
	c := Config{Dir: filepath.Join(base, "out"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001,
		Notify: &Notify{Signal: "SIGHUP", PIDFile: pts}}
	res, out := runHelper(t, base, 0, nil, true, c)
	if !strings.HasPrefix(res, "ERR ") {
		t.Fatalf("a terminal as pid file was accepted: %s", out)
	}
	if !strings.Contains(out, "\nTTY 0\n") && !strings.HasPrefix(out, "TTY 0\n") {
		t.Fatalf("the agent acquired %s as its controlling terminal:\n%s", pts, out)
	}
	t.Logf("refused: %s", res)
}
