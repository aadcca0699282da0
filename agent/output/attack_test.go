package output

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/agent/cache"
)

// testCA issues real SVIDs (ECDSA P-256, SPIFFE ID in the URI SAN), so
// what the tests write is what the agent writes.
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	td   spiffeid.TrustDomain
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString("example.org")
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: k, cert: cert, td: td}
}

func (ca *testCA) svid(t testing.TB, path string) *cache.SVID {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireFromPath(ca.td, path)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		URIs:         []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &k.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	kd, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return &cache.SVID{SPIFFEID: id.String(), Chain: []*x509.Certificate{leaf}, Key: k, KeyDER: kd, ChainDER: der, NotAfter: leaf.NotAfter}
}

func (ca *testCA) snapshot() *cache.Snapshot {
	b := spiffebundle.New(ca.td)
	b.AddX509Authority(ca.cert)
	return &cache.Snapshot{Bundle: b}
}

// writeAll writes what Run writes for one SVID: key, chain and bundle.
func writeAll(c Config, ca *testCA, v *cache.SVID) error {
	if err := writeSVID(c, v); err != nil {
		return err
	}
	return writeBundle(c, ca.snapshot())
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("needs root to act as other uids (CI runs as root)")
	}
}

// testBase is a root-owned 0755 directory under /tmp that other uids can
// traverse (t.TempDir is 0700).
func testBase(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sigil-out-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
	})
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// asUID runs a shell command as uid:uid with no supplementary groups, as
// a workload on the host would.
func asUID(t testing.TB, uid int, script string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command("/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid), Groups: []uint32{}},
		Pdeathsig:  syscall.SIGKILL,
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func mkdir(t *testing.T, path string, mode os.FileMode, uid, gid int) {
	t.Helper()
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, uid, gid); err != nil {
		t.Fatal(err)
	}
	// os.Chmod maps sticky through ModeSticky, not the raw bit.
	if err := syscall.Chmod(path, uint32(mode)); err != nil {
		t.Fatal(err)
	}
}

// fileState is what a workload relies on in its output directory: the
// names, and each file's content, owner and mode.
type fileState struct {
	names []string
	files map[string]string
}

func stateOf(t testing.TB, dir string) fileState {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := fileState{files: map[string]string{}}
	for _, e := range ents {
		s.names = append(s.names, e.Name())
		p := filepath.Join(dir, e.Name())
		b, _ := os.ReadFile(p)
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		s.files[e.Name()] = fmt.Sprintf("%d:%d %o ino %d sha256 %x", st.Uid, st.Gid, st.Mode, st.Ino, sum[:8])
	}
	return s
}

func (s fileState) equal(o fileState) bool {
	if !slices.Equal(s.names, o.names) || len(s.files) != len(o.files) {
		return false
	}
	for k, v := range s.files {
		if o.files[k] != v {
			return false
		}
	}
	return true
}

// Workload 1001 owns the parent of its own output directory (an admin
// gave it /srv/app and put the output in /srv/app/tls). Between two
// writes it replaces that directory with a symlink to workload 1002's
// output directory: the agent must not follow it and put 1001's key,
// owned by 1001, in place of 1002's.
func TestAttackOutputSymlinkSwap(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	p := filepath.Join(base, "p")
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, 1001, 1001); err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	a := Config{Dir: filepath.Join(p, "a"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
	b := Config{Dir: filepath.Join(base, "b"), Selectors: []string{"unix:uid:1002"}, UID: 1002, GID: 1002}
	if err := writeAll(a, ca, ca.svid(t, "/a")); err != nil {
		t.Fatalf("first write of 1001's output: %v", err)
	}
	if err := writeAll(b, ca, ca.svid(t, "/b")); err != nil {
		t.Fatalf("first write of 1002's output: %v", err)
	}
	before := stateOf(t, b.Dir)

	// The swap, by uid 1001 itself: it owns p, so it may rename p/a.
	if out, err := asUID(t, 1001, `mv "$1/a" "$1/a.old" && ln -s "$2" "$1/a"`, p, b.Dir); err != nil {
		t.Fatalf("uid 1001 could not swap its directory: %v %s", err, out)
	}

	err := writeAll(a, ca, ca.svid(t, "/a"))
	if err == nil {
		t.Errorf("write through a symlinked output dir succeeded")
	} else if !strings.Contains(err.Error(), a.Dir) || !strings.Contains(err.Error(), "symlink") || !strings.Contains(err.Error(), "1001") {
		t.Errorf("error does not name the path, the symlink and its owner: %v", err)
	} else {
		t.Logf("refused: %v", err)
	}
	if after := stateOf(t, b.Dir); !after.equal(before) {
		t.Fatalf("1002's output dir changed:\nbefore %v\nafter  %v", before, after)
	}

	// The same workload renaming another output's directory into its
	// place is only possible when that directory also lives under a
	// directory 1001 owns: such an output is refused from the start.
	b2 := Config{Dir: filepath.Join(p, "b2"), Selectors: []string{"unix:uid:1002"}, UID: 1002, GID: 1002}
	if err := writeAll(b2, ca, ca.svid(t, "/b")); err == nil {
		t.Errorf("1002's output under a directory owned by 1001 was written")
	} else if !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "1001") {
		t.Errorf("error does not name the directory and its owner: %v", err)
	}
	if _, err := os.Lstat(b2.Dir); err == nil {
		t.Errorf("refused output's directory %s was created", b2.Dir)
	}
}

// The symlink is higher up: 1001 owns p, the agent created p/x for the
// output p/x/b, and 1001 replaces p/x with a symlink to the directory
// holding 1002's output b.
func TestAttackOutputParentSymlink(t *testing.T) {
	needRoot(t)
	base := testBase(t)
	p := filepath.Join(base, "p")
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, 1001, 1001); err != nil {
		t.Fatal(err)
	}
	ca := newTestCA(t)
	a := Config{Dir: filepath.Join(p, "x", "b"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
	b := Config{Dir: filepath.Join(base, "b"), Selectors: []string{"unix:uid:1002"}, UID: 1002, GID: 1002}
	if err := writeAll(a, ca, ca.svid(t, "/a")); err != nil {
		t.Fatalf("first write of 1001's output: %v", err)
	}
	if err := writeAll(b, ca, ca.svid(t, "/b")); err != nil {
		t.Fatalf("first write of 1002's output: %v", err)
	}
	before := stateOf(t, b.Dir)

	if out, err := asUID(t, 1001, `mv "$1/x" "$1/x.old" && ln -s "$2" "$1/x"`, p, base); err != nil {
		t.Fatalf("uid 1001 could not swap p/x: %v %s", err, out)
	}
	err := writeAll(a, ca, ca.svid(t, "/a"))
	if err == nil {
		t.Errorf("write through a symlinked parent succeeded")
	} else if !strings.Contains(err.Error(), filepath.Join(p, "x")) || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("error does not name the symlinked component: %v", err)
	} else {
		t.Logf("refused: %v", err)
	}
	if after := stateOf(t, b.Dir); !after.equal(before) {
		t.Fatalf("1002's output dir changed:\nbefore %v\nafter  %v", before, after)
	}
}

// writerHelperEnv makes the test binary act as the packaged agent's
// writer (TestOutputWriterHelper) when a test runs it as another user.
const writerHelperEnv = "SIGIL_OUTPUT_WRITER"

// TestOutputWriterHelper is not a test: it is the agent's file output
// writer as the packaged unit runs it (its own uid, CAP_CHOWN only,
// UMask=0077), started by TestOutputModesUnderUMask0077.
func TestOutputWriterHelper(t *testing.T) {
	spec := os.Getenv(writerHelperEnv)
	if spec == "" {
		t.Skip("run as a child only")
	}
	syscall.Umask(0o077)
	ca := newTestCA(t)
	for o := range strings.SplitSeq(spec, ";") {
		f := strings.Split(o, ":") // dir:uid:gid
		uid, _ := strconv.Atoi(f[1])
		gid, _ := strconv.Atoi(f[2])
		c := Config{Dir: f[0], Selectors: []string{"unix:uid:" + f[1]}, UID: uid, GID: gid}
		for range 2 { // the second write replaces files now owned by uid
			if err := writeAll(c, ca, ca.svid(t, "/w")); err != nil {
				fmt.Println("ERR", err)
				return
			}
		}
	}
	fmt.Println("OK")
}

// The packaged unit runs with UMask=0077: directories the agent creates
// must still let the workload (and only it) reach its files, whether the
// agent runs as root or, as packaged, as its own user with CAP_CHOWN.
func TestOutputModesUnderUMask0077(t *testing.T) {
	needRoot(t)
	check := func(t *testing.T, c Config, agentUID int, created bool) {
		t.Helper()
		var st syscall.Stat_t
		if err := syscall.Stat(c.Dir, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mode&0o7777 != 0o750 || int(st.Uid) != agentUID || int(st.Gid) != c.GID {
			t.Errorf("output dir mode %o owner %d:%d, want 750 %d:%d", st.Mode&0o7777, st.Uid, st.Gid, agentUID, c.GID)
		}
		if err := syscall.Stat(filepath.Dir(c.Dir), &st); err != nil {
			t.Fatal(err)
		}
		if created && st.Mode&0o7777 != 0o755 {
			t.Errorf("intermediate dir mode %o, want 755", st.Mode&0o7777)
		}
		for name, mode := range map[string]uint32{"svid_key.pem": 0o600, "svid.pem": 0o644, "bundle.pem": 0o644} {
			if err := syscall.Stat(filepath.Join(c.Dir, name), &st); err != nil {
				t.Fatal(err)
			}
			if st.Mode&0o7777 != mode || int(st.Uid) != c.UID || int(st.Gid) != c.GID {
				t.Errorf("%s mode %o owner %d:%d", name, st.Mode&0o7777, st.Uid, st.Gid)
			}
		}
		out, err := asUID(t, c.UID, `cd "$1" && cat svid_key.pem svid.pem bundle.pem`, c.Dir)
		if err != nil || !strings.Contains(out, "PRIVATE KEY") || strings.Count(out, "CERTIFICATE-----\n") != 4 {
			t.Errorf("workload uid %d cannot read its files: %v %s", c.UID, err, out)
		}
		if out, err := asUID(t, 1002, `cat "$1/svid_key.pem" || ls "$1"`, c.Dir); err == nil {
			t.Errorf("uid 1002 reads the output of uid %d: %s", c.UID, out)
		}
	}

	t.Run("root agent", func(t *testing.T) {
		old := syscall.Umask(0o077)
		defer syscall.Umask(old)
		base := testBase(t)
		c := Config{Dir: filepath.Join(base, "run", "out", "a"), Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001}
		ca := newTestCA(t)
		for range 2 {
			if err := writeAll(c, ca, ca.svid(t, "/a")); err != nil {
				t.Fatal(err)
			}
		}
		syscall.Umask(old)
		check(t, c, 0, true)
	})

	t.Run("packaged agent user", func(t *testing.T) {
		const agentUID = 1003
		base := testBase(t)
		// RuntimeDirectory=sigil: owned by the agent's user.
		run := filepath.Join(base, "run")
		if err := os.Mkdir(run, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(run, agentUID, agentUID); err != nil {
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
		bin := filepath.Join(base, "agent.test")
		if err := os.WriteFile(bin, b, 0o755); err != nil {
			t.Fatal(err)
		}
		c := Config{Dir: filepath.Join(run, "out", "a"), UID: 1001, GID: 1001}
		// What an agent before the fix left behind under UMask=0077 (and
		// /run keeps across restarts): a 0700 directory of its own.
		upgraded := Config{Dir: filepath.Join(run, "old"), UID: 1001, GID: 1001}
		mkdir(t, upgraded.Dir, 0o700, agentUID, agentUID)
		key := filepath.Join(upgraded.Dir, "svid_key.pem")
		if err := os.WriteFile(key, []byte("old"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(key, 1001, 1001); err != nil {
			t.Fatal(err)
		}
		spec := fmt.Sprintf("%s:%d:%d;%s:%d:%d", c.Dir, c.UID, c.GID, upgraded.Dir, upgraded.UID, upgraded.GID)
		cmd := exec.Command(bin, "-test.run=^TestOutputWriterHelper$")
		cmd.Env = []string{writerHelperEnv + "=" + spec, "PATH=/usr/bin:/bin", "TMPDIR=/tmp"}
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Credential:  &syscall.Credential{Uid: agentUID, Gid: agentUID, Groups: []uint32{}},
			AmbientCaps: []uintptr{0}, // CAP_CHOWN
			Pdeathsig:   syscall.SIGKILL,
		}
		out, err := cmd.CombinedOutput()
		if err != nil || !bytes.Contains(out, []byte("\nOK\n")) && !bytes.HasPrefix(out, []byte("OK\n")) {
			t.Fatalf("writer as uid %d: %v\n%s", agentUID, err, out)
		}
		check(t, c, agentUID, true)
		check(t, upgraded, agentUID, false)
	})
}
