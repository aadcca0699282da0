package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runCLI runs sigil-ceremony in process.
func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	write := func(path, content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(pin, "12345678\n")
	cfg := filepath.Join(dir, "split.yaml")
	write(cfg, `kind: pin-split
transcript: `+filepath.Join(dir, "t.jsonl")+`
pin-split:
  token: tok
  pin-file: `+pin+`
  threshold: 2
  shares: [`+filepath.Join(dir, "a")+`, `+filepath.Join(dir, "b")+`]
`)
	bad := filepath.Join(dir, "bad.yaml")
	write(bad, "kind: pin-split\nbogus: 1\npin-split:\n  extra: 2\n")
	invalid := filepath.Join(dir, "invalid.yaml")
	write(invalid, "kind: pin-split\npin-split:\n  threshold: 9\n  shares: [a]\n")

	for _, tc := range []struct {
		args   []string
		code   int
		stdout string // substrings expected
		stderr string
	}{
		{nil, 2, "", "usage: sigil-ceremony <command>"},
		{[]string{"--help"}, 0, "verify-transcript", ""},
		{[]string{"bogus"}, 2, "", `unknown command "bogus"`},
		{[]string{"--bogus"}, 2, "", "unknown flag: --bogus"},
		{[]string{"root"}, 2, "", "--config is required"},
		{[]string{"root", "--config", cfg}, 1, "", "kind"}, // kind mismatch
		{[]string{"root", "-config", cfg}, 1, "", "kind"},  // the Go flag style still works
		{[]string{"pin-split", "--config", bad, "--dry-run"}, 1, "", "field bogus"},
		{[]string{"pin-split", "--config", bad, "--dry-run"}, 1, "", "field extra"},
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
		for _, k := range []string{"pin-split", "root", "issuing-csr", "sign-issuing", "reissue-root", "crl", "verify-transcript"} {
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
