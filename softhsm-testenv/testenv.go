// Package testenv gives tests real hardware stand-ins: SoftHSM2 tokens and
// swtpm TPMs, each in a private temporary directory that is removed after the
// test. It drives the scripts beside it (softhsm-token.sh, swtpm-provision.sh,
// swtpm-start.sh), which the demo and operators use as well.
//
// Only tests import this package.
package testenv

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// processHSMEnv is set by Main; libsofthsm2 reads SOFTHSM2_CONF once per
// process, so every in-process token lives in this one directory.
const processHSMEnv = "SIGIL_TESTENV_PROCESS_HSM"

// Main wraps testing.M for packages that use SoftHSM in-process: it points
// SOFTHSM2_CONF at a fresh private directory before any test can initialize
// the PKCS#11 module, and removes it afterwards. Use it as
//
//	func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }
//
// The directory is made only when a test first asks for it (ProcessHSM):
// processes that never touch the HSM (fuzz workers, workload helpers a
// test runs as other users) leave nothing behind even when killed.
func Main(m *testing.M) int {
	var rnd [8]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		return 1
	}
	dir := filepath.Join(os.TempDir(), "sigil-softhsm-"+hex.EncodeToString(rnd[:]))
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			fmt.Fprintln(os.Stderr, "testenv: left behind:", err)
		}
	}()
	for k, v := range map[string]string{processHSMEnv: dir, "SOFTHSM2_CONF": filepath.Join(dir, "softhsm2.conf")} {
		if err := os.Setenv(k, v); err != nil {
			fmt.Fprintln(os.Stderr, "testenv:", err)
			return 1
		}
	}
	return m.Run()
}

// HSM is one SoftHSM2 configuration: a token directory and its conf file.
type HSM struct {
	Dir    string
	Conf   string // SOFTHSM2_CONF for processes using this HSM
	Module string // path of libsofthsm2.so, set once a token exists
}

// ProcessHSM returns the SoftHSM that this test process itself loads.
// The package's TestMain must call Main.
func ProcessHSM(t testing.TB) *HSM {
	t.Helper()
	dir := os.Getenv(processHSMEnv)
	if dir == "" {
		t.Fatal("testenv: ProcessHSM needs TestMain to call testenv.Main")
	}
	// The name is random; still refuse a directory someone else made.
	if err := os.Mkdir(dir, 0o700); err != nil && !os.IsExist(err) {
		t.Fatal(err)
	}
	if st, err := os.Lstat(dir); err != nil || !st.IsDir() || st.Mode().Perm() != 0o700 || st.Sys().(*syscall.Stat_t).Uid != uint32(os.Geteuid()) {
		t.Fatalf("testenv: %s is not a private directory of this user", dir)
	}
	return &HSM{Dir: dir, Conf: filepath.Join(dir, "softhsm2.conf"), Module: FindSoftHSMModule(t)}
}

// NewHSM makes a separate SoftHSM directory, for child processes that get
// SOFTHSM2_CONF from Env (a sigild node per process, for example).
func NewHSM(t testing.TB) *HSM {
	t.Helper()
	dir := t.TempDir()
	return &HSM{Dir: dir, Conf: filepath.Join(dir, "softhsm2.conf"), Module: FindSoftHSMModule(t)}
}

// Env is the environment entry that points a child process at this HSM.
func (h *HSM) Env() string { return "SOFTHSM2_CONF=" + h.Conf }

// Token is an initialized SoftHSM token whose PINs are in 0600 files.
type Token struct {
	HSM       *HSM
	Label     string
	PINFile   string
	SOPINFile string
}

var tokenMu sync.Mutex // softhsm-token.sh picks "the" free slot: serialize

// NewToken initializes a token with fresh random PINs.
//
// SoftHSM lists only the tokens that existed when the process initialized
// the module: create every token a test needs before its first key store
// opens one (the module is initialized again only after every key store in
// the process has closed).
func (h *HSM) NewToken(t testing.TB, label string) *Token {
	t.Helper()
	RequireTools(t, "pkcs11-tool")
	tokenMu.Lock()
	defer tokenMu.Unlock()
	kv := runScript(t, nil, "softhsm-token.sh", h.Dir, label)
	return &Token{HSM: h, Label: kv["TOKEN"], PINFile: kv["PIN_FILE"], SOPINFile: kv["SO_PIN_FILE"]}
}

// KeyURI is the RFC 7512 URI of an object on this token, with the module
// path and the PIN file as query attributes.
func (tk *Token) KeyURI(object string) string {
	return fmt.Sprintf("pkcs11:token=%s;object=%s?module-path=%s&pin-source=file:%s",
		tk.Label, object, tk.HSM.Module, tk.PINFile)
}

// PIN reads the user PIN, for tests that drive pkcs11-tool.
func (tk *Token) PIN(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(tk.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// ListObjects runs pkcs11-tool --list-objects logged in to the token and
// returns its output; the PIN travels in the environment.
func (tk *Token) ListObjects(t testing.TB) string {
	t.Helper()
	RequireTools(t, "pkcs11-tool")
	cmd := exec.Command("pkcs11-tool", "--module", tk.HSM.Module, "--token-label", tk.Label,
		"--login", "--pin", "env:SIGIL_TEST_PIN", "--list-objects")
	cmd.Env = append(os.Environ(), tk.HSM.Env(), "SIGIL_TEST_PIN="+tk.PIN(t))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool --list-objects: %v\n%s", err, out)
	}
	return string(out)
}

// PrivateKeys parses pkcs11-tool --list-objects into the attributes it
// prints for each private key ("Usage", "Access", ...), by label: what the
// token itself says about its keys.
func (tk *Token) PrivateKeys(t testing.TB) map[string]map[string]string {
	t.Helper()
	keys := map[string]map[string]string{}
	var cur map[string]string
	flush := func() {
		if cur != nil {
			keys[cur["label"]] = cur
		}
		cur = nil
	}
	for _, line := range strings.Split(tk.ListObjects(t), "\n") {
		if !strings.HasPrefix(line, " ") {
			flush()
			if strings.HasPrefix(line, "Private Key Object") {
				cur = map[string]string{}
			}
			continue
		}
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && cur != nil {
			cur[k] = strings.TrimSpace(v)
		}
	}
	flush()
	return keys
}

// NonExtractable is how pkcs11-tool shows a private key that was generated
// in the token and can never leave it.
const NonExtractable = "sensitive, always sensitive, never extractable, local"

// FindSoftHSMModule returns the path of libsofthsm2.so.
func FindSoftHSMModule(t testing.TB) string {
	t.Helper()
	for _, p := range []string{
		os.Getenv("SIGIL_PKCS11_MODULE"),
		"/usr/lib/softhsm/libsofthsm2.so",
		"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
		"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("testenv: libsofthsm2.so not found; run `make deps` (apt-get install softhsm2)")
	return ""
}

// TPM is a running swtpm with an EK certificate from a local CA.
type TPM struct {
	Dir        string
	Socket     string // TPM command socket
	CtrlSocket string
	// EKCARoot is the local CA's root certificate: the stand-in for a TPM
	// manufacturer's root. EKCAIssuer is the intermediate that signed the
	// EK certificates.
	EKCARoot   string
	EKCAIssuer string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// NewTPM manufactures a fresh swtpm (new seeds, so a new EK) and starts it.
// It is stopped and its directory removed when the test ends.
func NewTPM(t testing.TB) *TPM {
	t.Helper()
	RequireTools(t, "swtpm", "swtpm_setup", "swtpm_localca")
	dir, err := os.MkdirTemp("", "sigil-swtpm-")
	if err != nil {
		t.Fatal(err)
	}
	tp := &TPM{Dir: dir, Socket: filepath.Join(dir, "tpm.sock"), CtrlSocket: filepath.Join(dir, "tpm.sock.ctrl")}
	t.Cleanup(func() {
		tp.Stop(t)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("testenv: swtpm state left behind: %v", err)
		}
	})
	kv := runScript(t, nil, "swtpm-provision.sh", dir)
	tp.EKCARoot, tp.EKCAIssuer = kv["EK_CA_ROOT"], kv["EK_CA_ISSUER"]
	tp.Start(t)
	return tp
}

// Start runs swtpm as a child of the test process; the kernel kills it if
// the test binary dies, so no TPM outlives its test.
func (tp *TPM) Start(t testing.TB) {
	t.Helper()
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if tp.cmd != nil {
		t.Fatal("testenv: swtpm already running")
	}
	cmd := exec.Command("bash", filepath.Join(scriptDir(t), "swtpm-start.sh"), tp.Dir)
	cmd.Env = append(os.Environ(), "SWTPM_FOREGROUND=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("testenv: start swtpm: %v", err)
	}
	exited := make(chan struct{})
	// How swtpm exits is in its stderr and log, which a failure prints;
	// Wait is here to learn that it did.
	go func() { _ = cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", tp.Socket); err == nil {
			_ = c.Close() // only probing that swtpm listens
			break
		}
		select {
		case <-exited:
			t.Fatalf("testenv: swtpm exited: %s\n%s", stderr.String(), readTail(filepath.Join(tp.Dir, "swtpm.log")))
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill() // fails only if it already exited
			t.Fatalf("testenv: swtpm socket %s did not appear", tp.Socket)
		}
		time.Sleep(20 * time.Millisecond)
	}
	tp.cmd, tp.exited = cmd, exited
}

// Stop stops swtpm (the TPM state stays, as across a host reboot).
func (tp *TPM) Stop(t testing.TB) {
	t.Helper()
	tp.mu.Lock()
	defer tp.mu.Unlock()
	if tp.cmd == nil {
		return
	}
	// Signal and Kill fail only for a process that already exited, which
	// exited then reports.
	_ = tp.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-tp.exited:
	case <-time.After(5 * time.Second):
		_ = tp.cmd.Process.Kill()
		<-tp.exited
	}
	tp.cmd, tp.exited = nil, nil
}

// Tool runs a tpm2-tools command against this TPM and returns its stdout.
func (tp *TPM) Tool(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+tp.Socket)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// RequireTools fails the test (never skips it) when a tool is missing:
// these tests exist to run against the real thing.
func RequireTools(t testing.TB, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("testenv: %s not found; run `make deps` as root", tool)
		}
	}
}

func scriptDir(t testing.TB) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("testenv: cannot locate scripts")
	}
	return filepath.Dir(file)
}

// runScript runs one of the scripts beside this file and parses its
// KEY=VALUE output.
func runScript(t testing.TB, env []string, name string, args ...string) map[string]string {
	t.Helper()
	cmd := exec.Command("bash", append([]string{filepath.Join(scriptDir(t), name)}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("testenv: %s %s: %v\n%s", name, strings.Join(args, " "), err, stderr.String())
	}
	kv := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			kv[k] = v
		}
	}
	return kv
}

func readTail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// LogBuffer is a log destination that tests read back; safe for
// concurrent writers.
type LogBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
