package jobrun

import (
	"context"
	"encoding/pem"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A run that cannot join runs nothing and leaves nothing: no socket
// directory, no --out directory.
func TestRunJoinFailureLeavesNothing(t *testing.T) {
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp)
	root, _ := selfSigned(t, "spiffe://example.org", 1)
	rootFile := filepath.Join(t.TempDir(), "root.pem")
	if err := os.WriteFile(rootFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: root.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	if aud, err := TrustDomainAudience(rootFile); err != nil || aud != "spiffe://example.org" {
		t.Fatalf("audience %q %v", aud, err)
	}
	t.Setenv("JOB_TOKEN", fakeJWT)
	tok, err := NewEnvToken("JOB_TOKEN")
	if err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(t.TempDir(), "ran")
	out := filepath.Join(t.TempDir(), "out")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code, err := Run(ctx, Options{Servers: []string{"127.0.0.1:1"}, RootCert: rootFile, Rule: "r", Token: tok, Out: out,
		Command: []string{"touch", marker}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil || code != 0 || !strings.Contains(err.Error(), "join failed") {
		t.Fatalf("exit %d, err %v", code, err)
	}
	if strings.Contains(err.Error(), fakeJWT) {
		t.Fatal("the error carries the token")
	}
	for _, p := range []string{marker, out} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s exists: %v", p, err)
		}
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("left in TMPDIR: %v", ents)
	}
}
