// Package nfpm_test builds the .deb packages the way `make package` does
// and installs them into a throwaway root with dpkg, checking what lands
// where, with which owner and mode.
package nfpm_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// nfpmTool runs nfpm the way the Makefile's NFPM does: at the version
// pinned in tools/nfpm/go.mod, the one place that pin lives.
var nfpmTool = []string{"tool", "-modfile=tools/nfpm/go.mod", "nfpm"}

func run(t *testing.T, dir string, env []string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// throwawayRoot is an empty dpkg database plus the account files useradd
// needs.
func throwawayRoot(t *testing.T) string {
	r := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "etc"} {
		if err := os.MkdirAll(filepath.Join(r, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string]string{
		"var/lib/dpkg/status": "", "var/lib/dpkg/available": "",
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\n", "etc/group": "root:x:0:\n",
		"etc/shadow": "root:*:19000:0:99999:7:::\n", "etc/gshadow": "root:*::\n",
	}
	for f, c := range files {
		if err := os.WriteFile(filepath.Join(r, f), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

type want struct {
	path      string
	mode      os.FileMode
	uid, gid  string // account names in the throwaway root
	directory bool
}

func TestPackagesInstall(t *testing.T) {
	if os.Getuid() != 0 {
		t.Fatal("dpkg --root needs root (CI runs as root)")
	}
	repo, _ := filepath.Abs("../..")
	tmp := t.TempDir()
	bin, dist := filepath.Join(tmp, "bin"), filepath.Join(tmp, "dist")
	run(t, repo, nil, "go", "build", "-trimpath", "-o", bin+"/", "./cmd/...")
	arch := strings.TrimSpace(run(t, repo, nil, "go", "env", "GOARCH"))
	if err := os.MkdirAll(dist, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"sigild", "sigil-agent", "sigil-ceremony"} {
		args := append(append([]string{}, nfpmTool...), "package",
			"--config", "packaging/nfpm/"+p+".yaml", "--packager", "deb", "--target", dist+"/")
		run(t, repo, []string{"SIGIL_BIN=" + bin, "VERSION=0.0.1", "ARCH=" + arch}, "go", args...)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "*.deb"))
	if len(debs) != 3 {
		t.Fatalf("packages built: %v", debs)
	}
	root := throwawayRoot(t)
	// Scripts run without chroot (DPKG_ROOT is set for them); the empty
	// root has no libc6 or passwd package to satisfy the dependencies.
	dpkg := func(args ...string) string {
		return run(t, repo, nil, "dpkg", append([]string{"--root=" + root, "--force-script-chrootless", "--force-depends", "--log=/dev/null"}, args...)...)
	}
	dpkg(append([]string{"-i"}, debs...)...)

	ids := func(file, name string) string {
		b, _ := os.ReadFile(filepath.Join(root, "etc", file))
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Split(line, ":")
			if f[0] == name && len(f) > 2 {
				return f[2]
			}
		}
		t.Fatalf("no %s in the throwaway root's /etc/%s", name, file)
		return ""
	}
	uidOf := func(n string) string { return ids("passwd", n) }
	gidOf := func(n string) string { return ids("group", n) }
	for _, w := range []want{
		{"/usr/bin/sigild", 0o755, "root", "root", false},
		{"/usr/bin/sigilctl", 0o755, "root", "root", false},
		{"/usr/bin/sigil-agent", 0o755, "root", "root", false},
		{"/usr/bin/sigil-ceremony", 0o755, "root", "root", false},
		{"/etc/sigil/sigild.yaml", 0o644, "root", "root", false},
		{"/etc/sigil/agent.yaml", 0o644, "root", "root", false},
		{"/lib/systemd/system/sigild.service", 0o644, "root", "root", false},
		{"/lib/systemd/system/sigil-agent.service", 0o644, "root", "root", false},
		{"/usr/share/doc/sigil-ceremony/examples/root.yaml", 0o644, "root", "root", false},
		{"/var/lib/sigil", 0o700, "sigil", "sigil", true},
		{"/var/lib/sigil-agent", 0o700, "sigil-agent", "tss", true},
	} {
		st, err := os.Lstat(filepath.Join(root, w.path))
		if err != nil {
			t.Errorf("%s: %v", w.path, err)
			continue
		}
		sys := st.Sys().(*syscall.Stat_t)
		uid, gid := "0", "0"
		if w.uid != "root" {
			uid = uidOf(w.uid)
		}
		if w.gid != "root" {
			gid = gidOf(w.gid)
		}
		if st.Mode().Perm() != w.mode || st.IsDir() != w.directory || strconv.FormatUint(uint64(sys.Uid), 10) != uid || strconv.FormatUint(uint64(sys.Gid), 10) != gid {
			t.Errorf("%s: mode %v dir %v owner %d:%d, want %v dir %v %s(%s):%s(%s)", w.path, st.Mode().Perm(), st.IsDir(),
				sys.Uid, sys.Gid, w.mode, w.directory, w.uid, uid, w.gid, gid)
		}
	}
	// System accounts that cannot log in.
	b, _ := os.ReadFile(filepath.Join(root, "etc/passwd"))
	for _, u := range []string{"sigil:", "sigil-agent:"} {
		i := strings.Index(string(b), "\n"+u)
		if i < 0 || !strings.Contains(strings.SplitN(string(b)[i+1:], "\n", 2)[0], ":/usr/sbin/nologin") {
			t.Errorf("account %s missing or has a login shell:\n%s", u, b)
		}
	}
	// Configs are conffiles: an operator's edits survive upgrades.
	status, _ := os.ReadFile(filepath.Join(root, "var/lib/dpkg/status"))
	for _, c := range []string{"/etc/sigil/sigild.yaml", "/etc/sigil/agent.yaml"} {
		if !strings.Contains(string(status), " "+c+" ") {
			t.Errorf("%s is not a conffile", c)
		}
	}
	// The installed binary runs.
	if out, err := exec.Command(filepath.Join(root, "usr/bin/sigil-ceremony")).CombinedOutput(); err == nil || !strings.Contains(string(out), "usage:") {
		t.Errorf("installed sigil-ceremony: %v %s", err, out)
	}
	// Purge removes the state; remove alone keeps it.
	if err := os.WriteFile(filepath.Join(root, "var/lib/sigil/raft.db"), []byte("state"), 0o600); err != nil {
		t.Fatal(err)
	}
	dpkg("-r", "sigild")
	if _, err := os.Stat(filepath.Join(root, "var/lib/sigil/raft.db")); err != nil {
		t.Errorf("remove deleted the node's state: %v", err)
	}
	dpkg("-P", "sigild")
	if _, err := os.Stat(filepath.Join(root, "var/lib/sigil")); !os.IsNotExist(err) {
		t.Errorf("purge left /var/lib/sigil: %v", err)
	}
}
