package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCLI(t *testing.T) {
	dir := t.TempDir()
	pin := filepath.Join(dir, "pin")
	os.WriteFile(pin, []byte("12345678\n"), 0o600)
	cfg := filepath.Join(dir, "split.yaml")
	os.WriteFile(cfg, []byte(`kind: pin-split
transcript: `+filepath.Join(dir, "t.jsonl")+`
pin-split:
  token: tok
  pin-file: `+pin+`
  threshold: 2
  shares: [`+filepath.Join(dir, "a")+`, `+filepath.Join(dir, "b")+`]
`), 0o600)

	for _, tc := range []struct {
		args []string
		code int
	}{
		{nil, 2},
		{[]string{"root"}, 2},
		{[]string{"root", "--config", cfg}, 1}, // kind mismatch
		{[]string{"pin-split", "--config", cfg, "--dry-run"}, 0},
	} {
		if got := run(tc.args); got != tc.code {
			t.Errorf("sigil-ceremony %v: exit %d, want %d", tc.args, got, tc.code)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Fatal("dry run wrote a share")
	}
	if got := run([]string{"pin-split", "--config", cfg}); got != 0 {
		t.Fatalf("pin-split: exit %d", got)
	}
	if got := run([]string{"verify-transcript", filepath.Join(dir, "t.jsonl")}); got != 0 {
		t.Fatalf("verify-transcript: exit %d", got)
	}
	if got := run([]string{"pin-split", "--config", cfg}); got != 1 {
		t.Fatalf("second pin-split over existing shares: exit %d, want 1", got)
	}
}
