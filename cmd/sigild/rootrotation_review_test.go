package main

import (
	"bytes"
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// TestCheckConfigAfterRootRetire: after a root rotation's retire the
// README has the operator remove the old root from root-certs. The node
// signs with the certificate the switch kept as issuing/current.pem (under
// the new root) and starts, but --check-config, which the systemd unit runs
// as ExecStartPre, checked the configured issuing-cert (still the one
// under the retired root) against root-certs and declared the config
// invalid: the next restart of the unit fails.
func TestCheckConfigAfterRootRetire(t *testing.T) {
	tr := clustertest.NewTrust(t, "chkrot", []string{"node-1"}, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	_, switched := tr.SignIssuingBy(t, "node-1", "2y", "root2", newRootPath)
	c := &clustertest.Cluster{T: t, Trust: tr, Dir: t.TempDir(), Log: &clustertest.LogBuffer{}}
	cfg := c.Config("node-1")
	cfg.Cluster.Bootstrap = true
	cfg.RootCerts = []string{newRootPath} // README, after retire: the old root leaves the files
	// The data directory as a node leaves it after retire.
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "issuing"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, der := range map[string][]byte{"issuing/current.pem": switched.Raw, "roots.pem": newRoot.Raw} {
		if err := os.WriteFile(filepath.Join(cfg.DataDir, name), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	path := writeConfig(t, c.Dir, cfg)
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--check-config", "--config", path}, &out, &errb)

	// The node itself starts, signing under the new root.
	n, err := c.StartWith(cfg)
	if err != nil {
		t.Fatalf("the node does not start either: %v", err)
	}
	if !n.Authority().Issuing().Equal(switched) {
		t.Fatalf("the node signs with serial %x, want the switched certificate", n.Authority().Issuing().SerialNumber)
	}
	if code != 0 {
		t.Fatalf("--check-config refuses the config of a node that starts: exit %d\nstdout: %s\nstderr: %s", code, out.String(), errb.String())
	}
}
