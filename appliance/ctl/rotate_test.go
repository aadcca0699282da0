package ctl_test

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// sigilctl ca rotate walks a rotation on a one-node appliance: add prints
// the phase and what comes next, the install stages, a switch out of
// order and a retire too early are refused with the reason, rollback and
// switch again, retire --force ends it; status says where it stands.
func TestSigilctlRootRotation(t *testing.T) {
	tr := clustertest.NewTrust(t, "cr", []string{"node-1"}, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Bundle.RefreshHint = node.Duration{Duration: time.Second}
	}, "node-1")
	var both []byte
	for _, r := range []*x509.Certificate{tr.Root, newRoot} {
		both = append(both, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	bothPath := filepath.Join(t.TempDir(), "both.pem")
	if err := os.WriteFile(bothPath, both, 0o644); err != nil {
		t.Fatal(err)
	}
	run, must, _ := cli(t)
	with := func(args ...string) []string {
		return append([]string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", c.AdminCert, "--key", c.AdminKey, "--root", bothPath}, args...)
	}
	out := must(with("ca", "rotate", "status")...)
	if !strings.Contains(out, "phase: none") || !strings.Contains(out, "CN=Test Root root") {
		t.Fatalf("status before:\n%s", out)
	}
	if _, err := run(with("ca", "rotate", "switch")...); err == nil || !strings.Contains(err.Error(), "switch follows add") {
		t.Fatalf("switch before add: %v", err)
	}
	out = must(with("ca", "rotate", "add", newRootPath, "--wait", "5s")...)
	if !strings.Contains(out, "add committed") || !strings.Contains(out, "phase: added") || !strings.Contains(out, "nodes not yet under the new root: node-1") ||
		!strings.Contains(out, "CN=Test Root root2") {
		t.Fatalf("add:\n%s", out)
	}
	path, _ := tr.SignIssuingBy(t, "node-1", "2y", "root2", newRootPath)
	out = must(with("node", "issuing-cert", "install", path)...)
	if !strings.Contains(out, "staged issuing CA serial") {
		t.Fatalf("install while added:\n%s", out)
	}
	time.Sleep(time.Second) // the refresh hint since the add
	out = must(with("ca", "rotate", "switch", "--wait", "10s")...)
	if !strings.Contains(out, "phase: switched") || !strings.Contains(out, "retire allowed after") || !strings.Contains(out, "every agent acknowledged") {
		t.Fatalf("switch:\n%s", out)
	}
	if _, err := run(with("ca", "rotate", "retire")...); err == nil || !strings.Contains(err.Error(), "may be valid until") {
		t.Fatalf("retire right after the switch: %v", err)
	}
	out = must(with("ca", "rotate", "rollback")...)
	if !strings.Contains(out, "phase: added") {
		t.Fatalf("rollback:\n%s", out)
	}
	must(with("ca", "rotate", "switch", "--wait", "0")...)
	out = must(with("ca", "rotate", "retire", "--force", "--wait", "0")...)
	if !strings.Contains(out, "phase: retired") || regexp.MustCompile(`CN=Test Root root\s`).MatchString(out) || !strings.Contains(out, "CN=Test Root root2") {
		t.Fatalf("retire --force:\n%s", out)
	}
}
