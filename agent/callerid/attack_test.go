package callerid_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sigil-appliance/sigil/agent/callerid"
)

// attackUID is the unprivileged local user carrying out the attacks.
const attackUID = 1001

// callerDir is a directory every uid can reach, holding a copy of this
// test binary (the callers' executable) and the sockets they connect to.
type callerDir struct {
	dir, bin, binSum string
}

func newCallerDir(t testing.TB) *callerDir {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("runs callers under other uids and creates cgroups: needs root, as CI has")
	}
	dir, err := os.MkdirTemp("", "sigil-attest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("left behind: %v", err)
		}
	})
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "workload")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return &callerDir{dir: dir, bin: bin, binSum: hex.EncodeToString(sum[:])}
}

// attest starts cmd (a caller: this test binary, however launched), waits
// until it has connected to a fresh Workload API socket, and attests it as
// the agent does.
func (d *callerDir) attest(t testing.TB, cmd *exec.Cmd) callerid.Selectors {
	t.Helper()
	return d.attestWith(t, cmd, nil)
}

// attestWith is attest with connected run once the caller has connected
// and before it is attested.
func (d *callerDir) attestWith(t testing.TB, cmd *exec.Cmd, connected func(pid int)) callerid.Selectors {
	t.Helper()
	caller := d.connect(t, cmd)
	if connected != nil {
		connected(cmd.Process.Pid)
	}
	if caller == nil || int(caller.PID) != cmd.Process.Pid {
		t.Fatalf("caller %+v, started pid %d", caller, cmd.Process.Pid)
	}
	sel, err := callerid.New("").Attest(context.Background(), caller)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%v: %v", cmd.Args, sel.List())
	return sel
}

// connect starts cmd (a caller helper) against a fresh socket in d and
// returns the caller the listening side saw (nil if none).
func (d *callerDir) connect(t testing.TB, cmd *exec.Cmd) *callerid.Caller {
	t.Helper()
	sockDir, err := os.MkdirTemp(d.dir, "sock-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sockDir, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(sockDir, "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() }) // the test is over: closing only stops accepting
	// connect(2) needs write permission on the socket file.
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	got := serve(t, l)
	cmd.Env = append(cmd.Env, helperEnv+"="+sock, "PATH=/usr/bin:/bin", "TMPDIR=/tmp")
	startUntil(t, cmd, "connected")
	return <-got
}

// startUntil starts a helper (caller or agent), waits for its first line
// to be want, and returns its output's scanner. The helper exits when the
// test ends (its stdin closes) or is killed.
func startUntil(t testing.TB, cmd *exec.Cmd, want string) *bufio.Scanner {
	t.Helper()
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reap(cmd, stdin) })
	sc := bufio.NewScanner(out)
	if !sc.Scan() || sc.Text() != want {
		reap(cmd, nil)
		t.Fatalf("%v: %q, want %q; stderr %q", cmd.Args, sc.Text(), want, stderr.String())
	}
	return sc
}

// asUser runs the caller binary as the attacking uid.
func (d *callerDir) asUser(env ...string) *exec.Cmd {
	cmd := exec.Command(d.bin)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: attackUID, Gid: attackUID}}
	return cmd
}

// cgroup2Mount is where the agent's mount namespace has the cgroup v2
// hierarchy (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
// hybrid ones).
func cgroup2Mount(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		for i, x := range f {
			if x == "-" && i+1 < len(f) && f[i+1] == "cgroup2" && f[3] == "/" {
				return f[4]
			}
		}
	}
	t.Skip("no cgroup2 hierarchy mounted in this mount namespace: cannot create cgroups")
	return ""
}

// cgroupBase makes a cgroup to build a test's tree under and removes the
// tree when the test's processes are gone.
func cgroupBase(t testing.TB) string {
	t.Helper()
	var r [6]byte
	rand.Read(r[:])
	base := filepath.Join(cgroup2Mount(t), "sigil-attest-"+hex.EncodeToString(r[:]))
	if err := os.Mkdir(base, 0o755); err != nil {
		t.Skipf("cannot create a cgroup under the cgroup2 hierarchy: %v", err)
	}
	// Registered before any caller starts, so it runs after they are
	// killed and reaped (cleanups run last-in first-out).
	t.Cleanup(func() { removeCgroupTree(t, base) })
	return base
}

// removeCgroupTree removes cgroup directories deepest first; rmdir is the
// only way to remove one (its files cannot be unlinked).
func removeCgroupTree(t testing.TB, root string) {
	var dirs []string
	// The callback never fails: a part of the tree it cannot read is left
	// to the rmdir below, which reports what stays.
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	for _, d := range dirs {
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := unix.Rmdir(d)
			if err == nil || errors.Is(err, unix.ENOENT) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", d, err)
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// mkCgroup creates a root-owned cgroup, as the system manager does.
func mkCgroup(t testing.TB, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// delegate hands a cgroup to uid the way systemd does for Delegate=yes
// (user@UID.service, or a service with User=): the directory and the
// files that create children and move processes become the user's.
func delegate(t testing.TB, dir string, uid int) string {
	t.Helper()
	mkCgroup(t, dir)
	for _, f := range []string{"", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control", "tasks"} {
		err := os.Chown(filepath.Join(dir, f), uid, uid)
		if f != "" && f != "cgroup.procs" && errors.Is(err, fs.ErrNotExist) {
			continue // cgroup.threads and cgroup.subtree_control are v2's, tasks v1's
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// startIn makes cmd start inside the cgroup dir (clone3 CLONE_INTO_CGROUP),
// as the system manager places a unit's first process.
func startIn(t testing.TB, cmd *exec.Cmd, dir string) *exec.Cmd {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Close(fd) }) // a read-only directory handle: nothing to flush
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = fd
	return cmd
}

func hasPrefix(sel callerid.Selectors, prefix string) []string {
	var out []string
	for _, s := range sel.List() {
		if strings.HasPrefix(s, prefix) {
			out = append(out, s)
		}
	}
	return out
}

// A local user cannot get a system unit's name by creating a cgroup
// called after it in a subtree delegated to it; a unit the system manager
// made still attests.
func TestAttackFakeSystemdUnit(t *testing.T) {
	d := newCallerDir(t)
	base := cgroupBase(t)
	const want = "systemd:unit:nginx.service"

	t.Run("user manager subtree", func(t *testing.T) {
		// systemd-run --user --unit=nginx.service: the user's own manager
		// names the cgroup.
		mgr := delegate(t, filepath.Join(base, "user.slice", "user-1001.slice", "user@1001.service"), attackUID)
		sel := d.attest(t, startIn(t, d.asUser(cgroupEnv+"="+filepath.Join(mgr, "app.slice", "nginx.service")), mgr))
		if sel.Has(want) {
			t.Fatalf("a uid %d process in its own delegated cgroup got %s: %v", attackUID, want, sel.List())
		}
		if u := hasPrefix(sel, "systemd:unit:"); len(u) > 0 {
			t.Fatalf("a process under a user manager got %v", u)
		}
	})
	t.Run("delegated system service", func(t *testing.T) {
		// A service with Delegate=yes and User=1001: the user names the
		// cgroups below it.
		svc := delegate(t, filepath.Join(base, "system.slice", "app.service"), attackUID)
		sel := d.attest(t, startIn(t, d.asUser(cgroupEnv+"="+filepath.Join(svc, "nginx.service")), svc))
		if sel.Has(want) {
			t.Fatalf("a uid %d process in a cgroup it created got %s: %v", attackUID, want, sel.List())
		}
	})
	t.Run("unit named inside a container", func(t *testing.T) {
		// Root in a container (with its cgroup mounted writable, as
		// systemd containers have) names cgroups below the container's
		// scope; the host's manager made only the scope.
		id := strings.Repeat("ab", 32)
		scope := mkCgroup(t, filepath.Join(base, "system.slice", "docker-"+id+".scope"))
		inner := mkCgroup(t, filepath.Join(scope, "system.slice", "nginx.service"))
		sel := d.attest(t, startIn(t, d.asUser(), inner))
		if sel.Has(want) {
			t.Fatalf("a process named a unit inside container %s and got %s", id, want)
		}
		if !sel.Has("systemd:unit:docker-"+id+".scope", "container:id:"+id) {
			t.Fatalf("container process: %v", sel.List())
		}
	})
	t.Run("system unit", func(t *testing.T) {
		// Positive control: nginx's workers run as an unprivileged uid in
		// the cgroup the system manager made.
		unit := mkCgroup(t, filepath.Join(base, "system.slice", "nginx.service"))
		sel := d.attest(t, startIn(t, d.asUser(), unit))
		if !sel.Has(want, "unix:uid:1001") {
			t.Fatalf("a process the system manager placed in nginx.service: %v", sel.List())
		}
	})
	t.Run("cgroup v1 name=systemd", func(t *testing.T) {
		// Hybrid and v1 hosts: units are read from the name=systemd
		// hierarchy when the process is in the v2 root. v1 has no
		// common-ancestor rule: a user moves its processes into any
		// cgroup whose cgroup.procs it may write.
		v1 := systemdV1Base(t)
		mine := delegate(t, filepath.Join(v1, "user.slice", "user-1001.slice", "user@1001.service"), attackUID)
		sel := d.attest(t, d.asUser(cgroupEnv+"="+filepath.Join(mine, "app.slice", "nginx.service")))
		if sel.Has(want) {
			t.Fatalf("a uid %d process in its own v1 cgroup got %s: %v", attackUID, want, sel.List())
		}
		unit := mkCgroup(t, filepath.Join(v1, "system.slice", "nginx.service"))
		sel = d.attestWith(t, d.asUser(), func(pid int) {
			if err := os.WriteFile(filepath.Join(unit, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
				t.Fatal(err)
			}
		})
		if !sel.Has(want) {
			t.Fatalf("a process root placed in the v1 nginx.service: %v", sel.List())
		}
	})
}

// systemdV1Base makes a cgroup in the v1 name=systemd hierarchy, if this
// host has one and the v2 hierarchy leaves it in use (callers in the v2
// root cgroup).
func systemdV1Base(t testing.TB) string {
	t.Helper()
	if cg, _ := os.ReadFile("/proc/self/cgroup"); !strings.Contains("\n"+string(cg), "\n0::/\n") {
		t.Skip("this process is not in the cgroup v2 root: the v1 name=systemd path would not be read")
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	mnt := ""
	for line := range strings.SplitSeq(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 3 && g[0] == "cgroup" && f[3] == "/" && slices.Contains(strings.Split(g[2], ","), "name=systemd") {
			mnt = f[4]
			break
		}
	}
	if mnt == "" {
		t.Skip("no cgroup v1 name=systemd hierarchy on this host (a pure cgroup v2 host)")
	}
	var r [6]byte
	rand.Read(r[:])
	base := filepath.Join(mnt, "sigil-attest-"+hex.EncodeToString(r[:]))
	if err := os.Mkdir(base, 0o755); err != nil {
		t.Skipf("cannot create a cgroup in the name=systemd hierarchy: %v", err)
	}
	t.Cleanup(func() { removeCgroupTree(t, base) })
	return base
}

// A local user cannot get a container id by naming a cgroup after a
// container; cgroups a runtime made (root-owned, named as runtimes name
// them) still give one.
func TestAttackFakeContainerID(t *testing.T) {
	d := newCallerDir(t)
	base := cgroupBase(t)
	id := "4f1c0e2a9b7d6c5e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e"

	for _, c := range []struct{ name, fake string }{
		{"docker scope", filepath.Join("system.slice", "docker-"+id+".scope")},
		{"kubepods", filepath.Join("kubepods", "burstable", "pod0d9e7e3a", id)},
		{"docker cgroupfs", filepath.Join("docker", id)},
	} {
		t.Run("user-made "+c.name, func(t *testing.T) {
			mgr := delegate(t, filepath.Join(base, "user.slice", "user-1001.slice", "user@1001.service", strings.ReplaceAll(c.name, " ", "-")), attackUID)
			sel := d.attest(t, startIn(t, d.asUser(cgroupEnv+"="+filepath.Join(mgr, c.fake)), mgr))
			if got := hasPrefix(sel, "container:"); len(got) > 0 {
				t.Fatalf("a uid %d process in a cgroup it named %s got %v", attackUID, c.fake, got)
			}
		})
	}
	t.Run("root-owned, not a runtime's name", func(t *testing.T) {
		dir := mkCgroup(t, filepath.Join(base, "system.slice", "x-"+id+".scope"))
		sel := d.attest(t, startIn(t, d.asUser(), dir))
		if got := hasPrefix(sel, "container:"); len(got) > 0 {
			t.Fatalf("a cgroup no runtime names so gave %v", got)
		}
	})
	for _, c := range []struct{ name, dir string }{
		{"docker scope", filepath.Join("system.slice", "docker-"+id+".scope")},
		{"cri-containerd scope", filepath.Join("kubepods.slice", "kubepods-burstable.slice", "kubepods-burstable-pod1.slice", "cri-containerd-"+id+".scope")},
		{"kubepods cgroupfs", filepath.Join("kubepods", "burstable", "pod0d9e7e3a", id)},
		{"libpod cgroupfs", filepath.Join("libpod_parent", "libpod-"+id)},
	} {
		t.Run("runtime-made "+c.name, func(t *testing.T) {
			dir := mkCgroup(t, filepath.Join(base, "rt-"+strings.ReplaceAll(c.name, " ", "-"), c.dir))
			sel := d.attest(t, startIn(t, d.asUser(), dir))
			if !sel.Has("container:id:" + id) {
				t.Fatalf("a process in runtime cgroup %s: %v", c.dir, sel.List())
			}
		})
	}
}

// A user in its own user and mount namespace bind-mounts its binary over
// a registered workload's path and runs it: /proc/PID/exe then reads as
// that path. The path is only reported for callers in the host's or the
// agent's mount namespace; the hash is of the file really running.
func TestAttackMountNamespacePath(t *testing.T) {
	d := newCallerDir(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("no unshare(1) to create the attacker's namespaces")
	}
	// The registered workload: a root-owned binary.
	target := d.bin
	// The attacker's binary: another program (the same code with bytes
	// appended, so its hash differs), owned by the attacker.
	b, err := os.ReadFile(d.bin)
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, []byte("attacker")...)
	attacker := filepath.Join(d.dir, "attacker")
	if err := os.WriteFile(attacker, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(attacker, attackUID, attackUID); err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	attackerSum := hex.EncodeToString(s[:])

	// As an unprivileged user where the kernel allows user namespaces;
	// else as root with a mount namespace only, which is the same caller
	// as far as the agent can see.
	nsArgs, cred := []string{"--user", "--map-root-user", "--mount", "--propagation", "private"}, &syscall.Credential{Uid: attackUID, Gid: attackUID}
	probe := exec.Command(unshare, append(nsArgs, "true")...)
	probe.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := probe.CombinedOutput(); err != nil {
		t.Logf("uid %d cannot create a user namespace (%v: %s); attacking as root with a mount namespace only", attackUID, err, out)
		nsArgs, cred = []string{"--mount", "--propagation", "private"}, nil
	}
	inNamespace := func(prog string, env ...string) *exec.Cmd {
		cmd := exec.Command(unshare, append(nsArgs, prog)...)
		cmd.Env = env
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		return cmd
	}

	t.Run("agent namespace", func(t *testing.T) {
		sel := d.attest(t, d.asUser())
		if !sel.Has("unix:path:"+target, "unix:sha256:"+d.binSum) {
			t.Fatalf("a caller in the agent's mount namespace: %v", sel.List())
		}
	})
	t.Run("bind mount over the path", func(t *testing.T) {
		// In the new namespaces the attacker's binary mounts itself over
		// the target path and executes that path.
		sel := d.attest(t, inNamespace(attacker, bindEnv+"="+attacker+":"+target))
		if sel.Has("unix:path:" + target) {
			t.Fatalf("the attacker's binary, mounted over %s in its own namespace, was attested as that path: %v", target, sel.List())
		}
		if p := hasPrefix(sel, "unix:path:"); len(p) > 0 {
			t.Fatalf("a caller in another mount namespace got %v", p)
		}
		if !sel.Has("unix:sha256:"+attackerSum) || sel.Has("unix:sha256:"+d.binSum) {
			t.Fatalf("hash should be the attacker's binary %s: %v", attackerSum, sel.List())
		}
	})
	t.Run("agent in a private mount namespace", func(t *testing.T) {
		// sigil-agent.service (ProtectSystem=, PrivateTmp=, ...) runs the
		// agent in a private copy of the host's mount namespace, so
		// callers are never in the agent's own: the host's (pid 1's) is
		// the one whose paths count. A fresh pid namespace stands in for
		// the host, because pid 1 of the test machine may not be readable
		// (it is not in the CI container).
		nsenter, err := exec.LookPath("nsenter")
		if err != nil {
			t.Skip("no nsenter(1) to start processes in the stand-in host")
		}
		hostInit := exec.Command(unshare, "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private", "sleep", "3600")
		hostInit.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := hostInit.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { reap(hostInit, nil) })
		host := childOf(t, hostInit.Process.Pid)
		onHost := func(args ...string) *exec.Cmd {
			return exec.Command(nsenter, append([]string{"--target", strconv.Itoa(host), "--pid", "--mount"}, args...)...)
		}
		sock := filepath.Join(d.dir, "private-agent.sock")
		agent := onHost(unshare, "--mount", "--propagation", "slave", d.bin)
		agent.Env = []string{agentEnv + "=" + sock}
		attested := startUntil(t, agent, "listening")
		attest := func(caller *exec.Cmd) []string {
			t.Helper()
			caller.Env = append(caller.Env, helperEnv+"="+sock, "PATH=/usr/bin:/bin")
			startUntil(t, caller, "connected")
			if !attested.Scan() || !strings.HasPrefix(attested.Text(), "SEL ") {
				t.Fatalf("agent: %q", attested.Text())
			}
			sel := strings.Fields(strings.TrimPrefix(attested.Text(), "SEL "))
			t.Logf("%v: %v", caller.Args, sel)
			return sel
		}
		asUser := []string{"--setuid", strconv.Itoa(attackUID), "--setgid", strconv.Itoa(attackUID)}

		sel := attest(onHost(append(asUser, target)...))
		if !slices.Contains(sel, "unix:path:"+target) {
			t.Fatalf("a caller in the host's mount namespace, attested by an agent in its own: %v", sel)
		}
		attack := onHost(append(asUser, append([]string{unshare}, append(nsArgs, attacker)...)...)...)
		if cred == nil {
			attack = onHost(append([]string{unshare}, append(nsArgs, attacker)...)...)
		}
		attack.Env = []string{bindEnv + "=" + attacker + ":" + target}
		sel = attest(attack)
		if slices.Contains(sel, "unix:path:"+target) || !slices.Contains(sel, "unix:sha256:"+attackerSum) {
			t.Fatalf("the attacker's binary mounted over %s: %v", target, sel)
		}
	})
	t.Run("own namespace, real binary", func(t *testing.T) {
		// No bind mount: the path would be true, but no path from a
		// namespace its caller could have set up is taken on its word.
		sel := d.attest(t, inNamespace(target))
		if p := hasPrefix(sel, "unix:path:"); len(p) > 0 {
			t.Fatalf("a caller in another mount namespace got %v", p)
		}
		if !sel.Has("unix:sha256:" + d.binSum) {
			t.Fatalf("hash: %v", sel.List())
		}
	})
}

// BenchmarkAttestSystemUnit is the cost of attesting a caller in a system
// unit: the ownership walk from the cgroup mount down to the unit adds a
// few stats and a mountinfo read to each attestation.
func BenchmarkAttestSystemUnit(b *testing.B) {
	d := newCallerDir(b)
	unit := mkCgroup(b, filepath.Join(cgroupBase(b), "system.slice", "nginx.service"))
	var c *callerid.Caller
	sock := filepath.Join(d.dir, "bench.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = l.Close() }() // the benchmark is over: closing only stops accepting
	if err := os.Chmod(sock, 0o777); err != nil {
		b.Fatal(err)
	}
	got := serve(b, l)
	cmd := startIn(b, d.asUser(helperEnv+"="+sock), unit)
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	stdin, _ := cmd.StdinPipe()
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer reap(cmd, stdin)
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		b.Fatalf("helper did not connect: %v", err)
	}
	c = <-got
	a := callerid.New("")
	b.ResetTimer()
	for b.Loop() {
		sel, err := a.Attest(context.Background(), c)
		if err != nil || !sel.Has("systemd:unit:nginx.service") {
			b.Fatal(err, sel.List())
		}
	}
}

// childOf waits for the process unshare --fork started and returns its pid.
func childOf(t testing.TB, pid int) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		if f := strings.Fields(string(b)); len(f) > 0 {
			child, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatal(err)
			}
			return child
		}
		if time.Now().After(deadline) {
			t.Fatalf("unshare (pid %d) started no child", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestAttackHugeSparseBinary: a local user runs a copy of a binary made 64
// GiB long with truncate (sparse: no disk used) and connects; hashing it
// for unix:sha256 would keep a core busy for every connection. The agent
// hashes nothing over callerid.MaxHashedBinary: the caller is attested at
// once, without a unix:sha256 selector, with the rest.
func TestAttackHugeSparseBinary(t *testing.T) {
	d := newCallerDir(t)
	if err := os.Truncate(d.bin, 64<<30); err != nil {
		t.Fatal(err)
	}
	caller := d.connect(t, d.asUser())
	if caller == nil {
		t.Fatal("no caller")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	sel, err := callerid.New("").Attest(ctx, caller)
	if err != nil {
		t.Fatalf("ATTACK SUCCEEDED: attesting a caller running a 64 GiB sparse binary: %v after %v", err, time.Since(start).Round(time.Millisecond))
	}
	t.Logf("attested in %v: %v", time.Since(start).Round(time.Millisecond), sel.List())
	if s := hasPrefix(sel, "unix:sha256:"); len(s) != 0 {
		t.Errorf("a binary over MaxHashedBinary was hashed: %v", s)
	}
	if s := hasPrefix(sel, "unix:uid:"); len(s) != 1 || s[0] != fmt.Sprintf("unix:uid:%d", attackUID) {
		t.Errorf("uid selector %v, want unix:uid:%d", s, attackUID)
	}
}

// reap ends a helper process a test started: its stdin closed (helpers exit
// on EOF), then killed and waited for. Their errors are those of a process
// that is gone or going, which is the point, so none is reported.
func reap(cmd *exec.Cmd, stdin io.Closer) {
	if stdin != nil {
		_ = stdin.Close()
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
}
