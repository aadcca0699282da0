package callerid_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sigil-appliance/sigil/agent/callerid"
)

const (
	helperEnv = "SIGIL_ATTEST_HELPER"
	// cgroupEnv names a cgroup directory the helper creates (as its own
	// uid) and moves itself into before connecting: what a user does in a
	// cgroup subtree delegated to it.
	cgroupEnv = "SIGIL_ATTEST_CGROUP"
	// bindEnv is "SRC:DST": the helper bind-mounts SRC over DST in its
	// (private) mount namespace and executes DST, which then connects.
	bindEnv = "SIGIL_ATTEST_BIND"
	// agentEnv names a socket the test binary serves as the agent does:
	// it attests each caller and prints "SEL" and its selectors.
	agentEnv = "SIGIL_ATTEST_AGENT"
)

// TestMain lets the test binary act as a caller process: it connects to
// the socket named in the environment and holds the connection until its
// stdin closes.
func TestMain(m *testing.M) {
	if bind := os.Getenv(bindEnv); bind != "" {
		src, dst, _ := strings.Cut(bind, ":")
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			fmt.Fprintln(os.Stderr, "bind mount:", err)
			os.Exit(3)
		}
		if err := os.Unsetenv(bindEnv); err != nil {
			fmt.Fprintln(os.Stderr, "unsetenv:", err)
			os.Exit(3)
		}
		err := unix.Exec(dst, []string{dst}, os.Environ())
		fmt.Fprintln(os.Stderr, "exec:", err)
		os.Exit(3)
	}
	if sock := os.Getenv(agentEnv); sock != "" {
		os.Exit(runAgent(sock))
	}
	if sock := os.Getenv(helperEnv); sock != "" {
		if dir := os.Getenv(cgroupEnv); dir != "" {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				fmt.Fprintln(os.Stderr, "cgroup:", err)
				os.Exit(3)
			}
			// "0" is the writing process: the whole thread group moves.
			if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("0\n"), 0); err != nil {
				fmt.Fprintln(os.Stderr, "cgroup:", err)
				os.Exit(3)
			}
		}
		c, err := net.Dial("unix", sock)
		if err != nil {
			os.Exit(2)
		}
		if _, err := os.Stdout.WriteString("connected\n"); err != nil {
			os.Exit(2)
		}
		// Returns at EOF: the test closing stdin is the signal to go.
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		_ = c.Close() // nothing was written on it, and the process exits
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runAgent serves sock as the agent's Workload API would, attesting each
// caller once, until stdin closes.
func runAgent(sock string) int {
	l, err := net.Listen("unix", sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 3
	}
	defer func() { _ = l.Close() }() // exiting: closing only stops accepting
	if err := os.Chmod(sock, 0o777); err != nil {
		fmt.Fprintln(os.Stderr, "agent:", err)
		return 3
	}
	go func() {
		// Stdin closing (EOF or error alike) is the signal to stop.
		_, _ = io.Copy(io.Discard, os.Stdin)
		_ = l.Close()
	}()
	if _, err := os.Stdout.WriteString("listening\n"); err != nil {
		return 3
	}
	a := callerid.New("")
	for {
		c, err := l.Accept()
		if err != nil {
			return 0
		}
		conn, info, err := callerid.Credentials().ServerHandshake(c)
		if err != nil {
			fmt.Printf("ERR %v\n", err)
			_ = c.Close() // refused: the ERR line is the report
			continue
		}
		sel, err := a.Attest(context.Background(), info.(*callerid.Caller))
		if err != nil {
			fmt.Printf("ERR %v\n", err)
		} else {
			fmt.Printf("SEL %s\n", strings.Join(sel.List(), " "))
		}
		_ = conn.Close() // attested once: the SEL or ERR line is the report
	}
}

func TestSystemdUnitAndContainer(t *testing.T) {
	id := "4f1c0e2a9b7d6c5e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"
	for _, c := range []struct{ cgroup, unit, container string }{
		{"0::/system.slice/web.service\n", "web.service", ""},
		{"0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope", ""},
		{"0::/system.slice/docker-" + id + ".scope\n", "docker-" + id + ".scope", id},
		{"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-" + id + ".scope\n", "cri-containerd-" + id + ".scope", id},
		{"12:memory:/docker/" + id + "\n1:name=systemd:/docker/" + id + "\n0::/\n", "", id},
		{"1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service", ""},
		{"0::/\n", "", ""},
		// 63 hex digits is not a container id.
		{"0::/system.slice/x-" + id[1:] + ".scope\n", "x-" + id[1:] + ".scope", ""},
		// Nor is a name no runtime gives a container's cgroup.
		{"0::/system.slice/x-" + id + ".scope\n", "x-" + id + ".scope", ""},
		{"0::/system.slice/crio-conmon-" + id + ".scope\n", "crio-conmon-" + id + ".scope", ""},
		{"0::/system.slice/" + id + "\n", "", ""},
		{"0::/kubepods/burstable/pod1/" + id + "\n", "", id},
		{"0::/kubepods/burstable/pod1/crio-" + id + "\n", "", id},
		{"0::/libpod_parent/libpod-" + id + "\n", "", id},
		{"0::/machine.slice/libpod-" + id + ".scope/container\n", "libpod-" + id + ".scope", id},
		// A user manager names its units as its user asks.
		{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service\n", "", ""},
		{"0::/user.slice/user-1000.slice/user@1000.service/user.slice/docker-" + id + ".scope\n", "", id},
		// Below a container's cgroup the container names the units.
		{"0::/system.slice/docker-" + id + ".scope/system.slice/nginx.service\n", "docker-" + id + ".scope", id},
		// Outside the agent's cgroup namespace: nothing is read.
		{"0::/../../system.slice/nginx.service\n", "", ""},
	} {
		if u := callerid.SystemdUnit([]byte(c.cgroup)); u != c.unit {
			t.Errorf("%q: unit %q, want %q", c.cgroup, u, c.unit)
		}
		if got := callerid.ContainerID([]byte(c.cgroup)); got != c.container {
			t.Errorf("%q: container %q, want %q", c.cgroup, got, c.container)
		}
	}
}

// serve accepts one connection and runs the attesting handshake on it.
func serve(t testing.TB, l net.Listener) <-chan *callerid.Caller {
	out := make(chan *callerid.Caller, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			close(out)
			return
		}
		conn, info, err := callerid.Credentials().ServerHandshake(c)
		if err != nil {
			t.Error(err)
			close(out)
			return
		}
		t.Cleanup(func() { _ = conn.Close() }) // the test is over: nothing more goes through it
		out <- info.(*callerid.Caller)
	}()
	return out
}

// A caller is attested from the kernel's view of it; once it exits,
// attesting its connection fails instead of reading whatever process
// holds the pid next.
func TestAttestCallerAndExit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }() // the test is over: closing only stops accepting
	got := serve(t, l)
	self, _ := os.Executable()
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), helperEnv+"="+sock)
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill() }() // fails when the helper already exited, as it should have
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "connected\n" {
		t.Fatalf("helper: %q", line)
	}
	caller := <-got
	if caller == nil || int(caller.PID) != cmd.Process.Pid {
		t.Fatalf("caller %+v, helper pid %d", caller, cmd.Process.Pid)
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &major, &minor); err != nil {
		t.Fatalf("kernel release %q: %v", unix.ByteSliceToString(u.Release[:]), err)
	}
	if (major > 6 || major == 6 && minor >= 5) && !caller.Pinned() {
		t.Fatalf("kernel %d.%d has SO_PEERPIDFD but the pidfd was not taken from it", major, minor)
	}
	a := callerid.New("")
	sel, err := a.Attest(context.Background(), caller)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(self)
	sum := sha256.Sum256(b)
	want := []string{"unix:uid:0", "unix:gid:0", "unix:user:root", "unix:group:root", "unix:path:" + self, "unix:sha256:" + hex.EncodeToString(sum[:])}
	if os.Getuid() != 0 {
		t.Skip("expects to run as root, as CI does")
	}
	if !sel.Has(want...) {
		t.Fatalf("selectors %v, want %v", sel.List(), want)
	}
	if err := stdin.Close(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	if _, err := a.Attest(context.Background(), caller); !errors.Is(err, callerid.ErrGone) {
		t.Fatalf("after the caller exited: %v", err)
	}
}
