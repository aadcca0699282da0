package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// runCLI runs sigil-ceremony in process.
func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	write(t, pin, "12345678\n")
	cfg := filepath.Join(dir, "split.yaml")
	write(t, cfg, `kind: pin-split
transcript: `+filepath.Join(dir, "t.jsonl")+`
pin-split:
  token: tok
  pin-file: `+pin+`
  threshold: 2
  shares: [`+filepath.Join(dir, "a")+`, `+filepath.Join(dir, "b")+`]
`)
	bad := filepath.Join(dir, "bad.yaml")
	write(t, bad, "kind: pin-split\nbogus: 1\npin-split:\n  extra: 2\n")
	invalid := filepath.Join(dir, "invalid.yaml")
	write(t, invalid, "kind: pin-split\npin-split:\n  threshold: 9\n  shares: [a]\n")

	for _, tc := range []struct {
		args   []string
		code   int
		stdout string // substrings expected
		stderr string
	}{
		{nil, 2, "", "usage: sigil-ceremony <kind> --config FILE.yaml"},
		{[]string{"--help"}, 0, "verify-transcript", ""},
		{[]string{"bogus"}, 2, "", `unknown ceremony kind "bogus"`},
		{[]string{"--bogus"}, 2, "", "unknown flag: --bogus"},
		{[]string{"root"}, 2, "", "--config is required"},
		{[]string{"root", "--config", cfg}, 1, "", "kind"}, // kind mismatch
		{[]string{"root", "-config", cfg}, 1, "", "kind"},  // the Go flag style still works
		{[]string{"pin-split", "--config", bad, "--dry-run"}, 1, "", "bogus is an unknown field"},
		{[]string{"pin-split", "--config", bad, "--dry-run"}, 1, "", "pin-split.extra is an unknown field"},
		{[]string{"pin-split", "--config", invalid, "--dry-run"}, 1, "", "transcript is required"},
		{[]string{"pin-split", "--config", invalid, "--dry-run"}, 1, "", "pin-split.token is required"},
		{[]string{"pin-split", "--config", invalid, "--dry-run"}, 1, "", "fewer than the threshold 9"},
		{[]string{"pin-split", "--config", invalid, "--dry-run"}, 1, "", "Nothing was done"},
		{[]string{"pin-split", "--config", filepath.Join(dir, "none.yaml")}, 1, "", "none.yaml"},
		{[]string{"pin-split", "--config", cfg, "extra"}, 2, "", "extra"},
		{[]string{"verify-transcript"}, 2, "", "accepts 1 arg"},
		{[]string{"pin-split", "--config", cfg, "--dry-run"}, 0, "nothing was done (dry run)", ""},
		{[]string{"pin-split", "-config=" + cfg, "-dry-run"}, 0, "nothing was done (dry run)", ""},
	} {
		code, out, errOut := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(out, tc.stdout) || !strings.Contains(errOut, tc.stderr) {
			t.Errorf("sigil-ceremony %q: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out, errOut)
		}
	}
	if code, out, _ := runCLI("--help"); code != 0 {
		t.Fatal("--help failed")
	} else {
		for _, k := range []string{"pin-split", "root", "issuing-csr", "sign-issuing", "reissue-root", "cross-sign", "crl", "verify-transcript"} {
			if !strings.Contains(out, "  "+k+" ") {
				t.Errorf("--help does not list %s:\n%s", k, out)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Fatal("dry run wrote a share")
	}
	if code, _, errOut := runCLI("pin-split", "--config", cfg); code != 0 {
		t.Fatalf("pin-split: exit %d: %s", code, errOut)
	}
	if code, out, _ := runCLI("verify-transcript", filepath.Join(dir, "t.jsonl")); code != 0 || !strings.Contains(out, "hash chain intact") {
		t.Fatalf("verify-transcript: exit %d: %s", code, out)
	}
	if code, _, _ := runCLI("pin-split", "--config", cfg); code != 1 {
		t.Fatalf("second pin-split over existing shares: exit %d, want 1", code)
	}
}

// Help is asked for, not a mistake: it goes to stdout and exits 0, from
// the top and from every kind.
func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"root", "--help"}, {"help", "sign-issuing"}, {"crl", "-h"}, {"verify-transcript", "--help"}} {
		code, out, errOut := runCLI(args...)
		if code != 0 || errOut != "" || !strings.Contains(out, "Usage:") {
			t.Errorf("sigil-ceremony %q: exit %d, want 0, usage on stdout and nothing on stderr\nstdout: %s\nstderr: %s", args, code, out, errOut)
		}
		if len(args) > 1 && args[0] != "help" && !strings.Contains(out, "--config") && args[0] != "verify-transcript" {
			t.Errorf("sigil-ceremony %q does not describe --config:\n%s", args, out)
		}
	}
	_, out, _ := runCLI("--help")
	if !strings.Contains(out, "kinds, in the order a new trust domain uses them: pin-split, root, issuing-csr, sign-issuing, reissue-root, cross-sign, crl") {
		t.Errorf("--help does not list the kinds in order:\n%s", out)
	}
}

// A command line that names no kind, an unknown kind, or no script says
// why on its first line, then how to call it, and exits 2.
func TestUsageErrorsSayWhy(t *testing.T) {
	kinds := "one of: pin-split, root, issuing-csr, sign-issuing, reissue-root, cross-sign, crl"
	for _, tc := range []struct {
		args  []string
		first string // the first line of stderr
		usage string // a later line
	}{
		{nil, "sigil-ceremony: a ceremony kind is required; " + kinds, "usage: sigil-ceremony <kind> --config FILE.yaml [--dry-run]"},
		{[]string{"rot", "--config", "root.yaml"}, `sigil-ceremony: unknown ceremony kind "rot"; ` + kinds + " (or verify-transcript FILE)", "usage: sigil-ceremony <kind> --config FILE.yaml [--dry-run]"},
		{[]string{"--config", "root.yaml"}, "sigil-ceremony: the ceremony kind comes first, then --config; " + kinds, "usage: sigil-ceremony <kind> --config FILE.yaml [--dry-run]"},
		{[]string{"-dry-run"}, "sigil-ceremony: the ceremony kind comes first, then --config; " + kinds, "usage: sigil-ceremony <kind> --config FILE.yaml [--dry-run]"},
		{[]string{"sign-issuing"}, "sigil-ceremony: --config is required (the ceremony script)", "usage: sigil-ceremony sign-issuing --config FILE.yaml [--dry-run]"},
		{[]string{"crl", "--dry-run"}, "sigil-ceremony: --config is required (the ceremony script)", "usage: sigil-ceremony crl --config FILE.yaml [--dry-run]"},
	} {
		code, out, errOut := runCLI(tc.args...)
		lines := strings.Split(errOut, "\n")
		if code != 2 || out != "" || lines[0] != tc.first || !strings.Contains(errOut, "\n"+tc.usage+"\n") {
			t.Errorf("sigil-ceremony %q: exit %d, want 2; first line of stderr %q, want %q then %q\nstdout: %s\nstderr: %s",
				tc.args, code, lines[0], tc.first, tc.usage, out, errOut)
		}
	}
}

// Unknown and mistyped fields are listed with every other problem of the
// script, each by its field name, in one run.
func TestEveryProblemListed(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "root.yaml")
	write(t, cfg, `kind: root
trust-domain: example.org
transcript: `+filepath.Join(dir, "t.jsonl")+`
colour: blue
hsm:
  module: /nonexistent/libsofthsm2.so
  token: sigil-root
key:
  label: root-key
  curv: P-384
root:
  subject:
    common-name: Root
    country: USA
  validity: 1.5y
  name-constraint: maybe
  output: `+filepath.Join(dir, "missing-dir", "root.pem")+`
`)
	code, out, errOut := runCLI("root", "--config", cfg, "--dry-run")
	want := []string{
		"colour is an unknown field (line 4); a ceremony script has: kind, trust-domain, transcript, hsm, key, root, issuing-csr, sign-issuing, cross-sign, crl, pin-split",
		"key.curv is an unknown field (line 10); key has: label, curve",
		`root.validity is not valid: duration "1.5y": want a positive whole number before "y" (line 15)`,
		`root.name-constraint must be true or false, not "maybe" (line 16)`,
		"hsm.module /nonexistent/libsofthsm2.so is not a readable library",
		"hsm needs a PIN source",
		"root.subject.country must be a two-letter code",
		"root.output directory " + filepath.Join(dir, "missing-dir") + " does not exist",
		"Nothing was done: no HSM was opened and no file was written",
	}
	if code != 1 || out != "" {
		t.Fatalf("exit %d, want 1 with nothing on stdout\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, w := range want {
		if !strings.Contains(errOut, w) {
			t.Errorf("stderr does not say %q:\n%s", w, errOut)
		}
	}
	// A mistyped value is reported once, as mistyped, not again as missing.
	if strings.Contains(errOut, "root.validity is required") {
		t.Errorf("root.validity reported twice:\n%s", errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, "t.jsonl")); !os.IsNotExist(err) {
		t.Fatal("a refused script wrote the transcript")
	}
}

// ceremonyRoom is the officers' machine: a root token and a node token in
// the test process's SoftHSM, PIN shares, and a directory for scripts.
type ceremonyRoom struct {
	dir    string
	module string
	root   *testenv.Token
	node   *testenv.Token
	shares []string
}

func newRoom(t *testing.T) *ceremonyRoom {
	hsm := testenv.ProcessHSM(t)
	testenv.RequireTools(t, "openssl")
	r := &ceremonyRoom{dir: t.TempDir(), module: hsm.Module}
	// Every token first: SoftHSM shows a process only the tokens that
	// existed when it initialized the module.
	r.root = hsm.NewToken(t, fmt.Sprintf("cli-root-%d", time.Now().UnixNano()%1e6))
	r.node = hsm.NewToken(t, fmt.Sprintf("cli-node-%d", time.Now().UnixNano()%1e6))
	for i := 1; i <= 3; i++ {
		r.shares = append(r.shares, r.path(fmt.Sprintf("officer-%d.share", i)))
	}
	return r
}

func (r *ceremonyRoom) path(name string) string { return filepath.Join(r.dir, name) }

// script writes a ceremony script and returns its path.
func (r *ceremonyRoom) script(t *testing.T, name, body string) string {
	t.Helper()
	p := r.path(name)
	write(t, p, fmt.Sprintf("trust-domain: example.org\ntranscript: %s\n%s", r.path("transcript.jsonl"), body))
	return p
}

func (r *ceremonyRoom) rootHSM() string {
	return fmt.Sprintf("hsm:\n  module: %s\n  token: %s\n  pin-shares: [%s, %s]\n", r.module, r.root.Label, r.shares[0], r.shares[2])
}

// mustRun runs sigil-ceremony and wants it to succeed.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	code, out, errOut := runCLI(args...)
	if code != 0 || errOut != "" {
		t.Fatalf("sigil-ceremony %q: exit %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
	}
	return out
}

// opensslSerial is the serial number as `openssl x509 -text` prints it.
func opensslSerial(t *testing.T, certFile string) string {
	t.Helper()
	out, err := exec.Command("openssl", "x509", "-in", certFile, "-noout", "-text").CombinedOutput()
	if err != nil {
		t.Fatalf("openssl x509: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Serial Number:\s*\n\s*([0-9a-f:]+)\n`).FindStringSubmatch(string(out))
	if m == nil {
		t.Fatalf("openssl printed no colon-separated serial:\n%s", out)
	}
	return m[1]
}

// planTime reads "name: <RFC 3339 time>" from a printed plan.
func planTime(t *testing.T, plan, name string) time.Time {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\s+` + regexp.QuoteMeta(name) + `:\s+(\S+Z) `).FindStringSubmatch(plan)
	if m == nil {
		t.Fatalf("plan has no %s in UTC:\n%s", name, plan)
	}
	ts, err := time.Parse(time.RFC3339, m[1])
	if err != nil {
		t.Fatal(err)
	}
	return ts
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s holds no PEM", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// near: the plan's times are those of a ceremony started when the dry run
// ran; the real run, seconds later, computes them again.
func near(a, b time.Time) bool { d := a.Sub(b); return d > -time.Minute && d < time.Minute }

// TestCeremoniesAsOfficersRunThem runs a trust domain's ceremonies through
// the command line on SoftHSM: each script is dry-run first and its plan
// checked against what the real run then makes, and serials read as
// openssl prints them, on the screen and in the transcript.
func TestCeremoniesAsOfficersRunThem(t *testing.T) {
	r := newRoom(t)

	split := r.script(t, "pin-split.yaml", fmt.Sprintf("kind: pin-split\npin-split:\n  token: %s\n  pin-file: %s\n  threshold: 2\n  shares: [%s]\n",
		r.root.Label, r.root.PINFile, strings.Join(r.shares, ", ")))
	write(t, split, strings.Replace(string(must(os.ReadFile(split))), "trust-domain: example.org\n", "", 1))
	plan := mustRun(t, "pin-split", "--config", split, "--dry-run")
	for _, w := range []string{
		"PLAN of the pin-split ceremony",
		fmt.Sprintf("Read the PIN of token %q from %s", r.root.Label, r.root.PINFile),
		"Split it into 3 shares, any 2 of which rebuild it",
		fmt.Sprintf("output:                %s (mode 0600)", r.shares[1]),
		"Write share 3 of 3 to " + r.shares[2],
		"nothing was done (dry run)",
	} {
		if !strings.Contains(plan, w) {
			t.Errorf("pin-split plan lacks %q:\n%s", w, plan)
		}
	}
	if strings.Contains(plan, r.root.PIN(t)) {
		t.Fatal("the plan shows the PIN")
	}
	mustRun(t, "pin-split", "--config", split)

	// The root: the plan names the key, its type and token, the subject,
	// validity, serial policy, output, and what signs what.
	rootPEM := r.path("root.pem")
	rootCfg := r.script(t, "root.yaml", "kind: root\n"+r.rootHSM()+"key:\n  label: root-key\n  curve: P-384\nroot:\n  subject:\n    common-name: CLI Root\n    organization: Sigil Test\n    country: US\n  validity: 10y\n  output: "+rootPEM+"\n")
	plan = mustRun(t, "root", "--config", rootCfg, "--dry-run")
	for _, w := range []string{
		"PLAN of the root ceremony",
		"trust domain:          example.org",
		fmt.Sprintf("PIN from:              2 share files, rebuilt in memory only: %s, %s", r.shares[0], r.shares[2]),
		"Generate a new key in the HSM",
		"label:                 root-key",
		"type:                  ECDSA P-384",
		"token:                 " + r.root.Label,
		"subject:               CN=CLI Root,O=Sigil Test,C=US",
		"issuer:                the same: self-signed",
		"SPIFFE ID:             spiffe://example.org",
		"CA:                    yes, path length 1",
		"name constraint:       URI SANs in example.org only",
		"serial:                128 random bits",
		fmt.Sprintf("Sign it with key \"root-key\" on token %q (self-signed)", r.root.Label),
		fmt.Sprintf("output:                %s (mode 0644)", rootPEM),
		"Write the root certificate to " + rootPEM,
	} {
		if !strings.Contains(plan, w) {
			t.Errorf("root plan lacks %q:\n%s", w, plan)
		}
	}
	if _, err := os.Stat(rootPEM); !os.IsNotExist(err) {
		t.Fatal("the dry run wrote the root certificate")
	}
	if keys := r.root.PrivateKeys(t); len(keys) != 0 {
		t.Fatalf("the dry run made keys: %v", keys)
	}
	out := mustRun(t, "root", "--config", rootCfg)
	root := readCert(t, rootPEM)
	if !near(planTime(t, plan, "not before"), root.NotBefore) || !near(planTime(t, plan, "not after"), root.NotAfter) {
		t.Errorf("root validity %s..%s is not the plan's:\n%s", root.NotBefore, root.NotAfter, plan)
	}
	rootSerial := opensslSerial(t, rootPEM)
	if !strings.Contains(out, "serial:                "+rootSerial+"\n") {
		t.Errorf("the root ceremony does not print serial %s as openssl does:\n%s", rootSerial, out)
	}
	if !strings.Contains(out, "PLAN of the root ceremony") {
		t.Errorf("the root ceremony does not show its plan first:\n%s", out)
	}

	csr := r.path("node-1.csr")
	csrCfg := r.script(t, "csr.yaml", fmt.Sprintf("kind: issuing-csr\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: issuing\nissuing-csr:\n  node-id: node-1\n  output: %s\n", r.module, r.node.Label, r.node.PINFile, csr))
	plan = mustRun(t, "issuing-csr", "--config", csrCfg, "--dry-run")
	for _, w := range []string{"type:                  ECDSA P-256", "subject:               CN=node-1,OU=Sigil issuing CA", "PIN from:              file " + r.node.PINFile} {
		if !strings.Contains(plan, w) {
			t.Errorf("issuing-csr plan lacks %q:\n%s", w, plan)
		}
	}
	mustRun(t, "issuing-csr", "--config", csrCfg)

	// A curve for a key the HSM already holds does nothing: refused,
	// naming the field and the kind.
	inter := r.path("node-1-issuing.pem")
	signBody := "kind: sign-issuing\n" + r.rootHSM() + "key:\n  label: root-key\n  curve: P-384\nsign-issuing:\n  root-certificate: " + rootPEM + "\n  csr: " + csr + "\n  node-id: node-1\n  validity: 1y\n  output: " + inter + "\n"
	signCfg := r.script(t, "sign.yaml", signBody)
	code, out, errOut := runCLI("sign-issuing", "--config", signCfg, "--dry-run")
	if code != 1 || out != "" || !strings.Contains(errOut, "key.curve is not used by kind sign-issuing") || !strings.Contains(errOut, "Nothing was done") {
		t.Fatalf("key.curve in sign-issuing: exit %d, want 1\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	signCfg = r.script(t, "sign.yaml", strings.Replace(signBody, "  curve: P-384\n", "", 1))
	plan = mustRun(t, "sign-issuing", "--config", signCfg, "--dry-run")
	for _, w := range []string{
		"Check the node's CSR",
		"file:                  " + csr,
		"public key:            ECDSA P-256, sha256 ",
		"Find the existing key in the HSM and check it is the key of the root certificate " + rootPEM,
		"type:                  ECDSA P-384",
		"root:                  CN=CLI Root,O=Sigil Test,C=US",
		"serial:              " + rootSerial + "\n",
		"subject:               CN=node-1,OU=Sigil issuing CA,O=Sigil Test",
		"issuer:                CN=CLI Root,O=Sigil Test,C=US",
		"CA:                    yes, path length 0",
		"serial:                128 random bits",
		fmt.Sprintf("Sign it with the root key \"root-key\" on token %q", r.root.Label),
		"Write the issuing CA certificate to " + inter,
	} {
		if !strings.Contains(plan, w) {
			t.Errorf("sign-issuing plan lacks %q:\n%s", w, plan)
		}
	}
	out = mustRun(t, "sign-issuing", "--config", signCfg)
	cert := readCert(t, inter)
	if !near(planTime(t, plan, "not after"), cert.NotAfter) || !near(planTime(t, plan, "not before"), cert.NotBefore) {
		t.Errorf("issuing CA validity %s..%s is not the plan's:\n%s", cert.NotBefore, cert.NotAfter, plan)
	}
	interSerial := opensslSerial(t, inter)
	if !strings.Contains(out, "serial:                "+interSerial+"\n") {
		t.Errorf("sign-issuing does not print serial %s as openssl does:\n%s", interSerial, out)
	}

	// The CRL plan names what it revokes by serial, as openssl prints it.
	crlCfg := r.script(t, "crl.yaml", "kind: crl\n"+r.rootHSM()+"key:\n  label: root-key\ncrl:\n  root-certificate: "+rootPEM+"\n  revoke: ["+inter+"]\n  number: 1\n  validity: 30d\n  output: "+r.path("root.crl")+"\n")
	plan = mustRun(t, "crl", "--config", crlCfg, "--dry-run")
	for _, w := range []string{"CRL number:            1", "revokes:               " + interSerial + "\n", "subject:             CN=node-1,OU=Sigil issuing CA,O=Sigil Test", "next update:"} {
		if !strings.Contains(plan, w) {
			t.Errorf("crl plan lacks %q:\n%s", w, plan)
		}
	}
	out = mustRun(t, "crl", "--config", crlCfg)
	if !strings.Contains(out, "revokes:               "+interSerial+" (node-1)") {
		t.Errorf("the crl ceremony does not print the revoked serial %s as openssl does:\n%s", interSerial, out)
	}

	transcript := string(must(os.ReadFile(r.path("transcript.jsonl"))))
	for _, s := range []string{rootSerial, interSerial} {
		if !strings.Contains(transcript, `"value":"`+s) {
			t.Errorf("the transcript does not record serial %s as openssl prints it", s)
		}
	}
	if out := mustRun(t, "verify-transcript", r.path("transcript.jsonl")); !strings.Contains(out, "hash chain intact") {
		t.Fatal(out)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
