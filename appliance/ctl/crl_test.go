package ctl_test

import (
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// sigilctl ca revoke adds a root CRL from the ceremony's PEM file and
// reports what it revoked; a file that is not a root CRL is refused with
// the reason.
func TestSigilctlCARevoke(t *testing.T) {
	tr := clustertest.NewTrust(t, "cr", []string{"node-1", "node-2"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	run, must, _ := cli(t)
	with := func(args ...string) []string {
		return append([]string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", c.AdminCert, "--key", c.AdminKey, "--root", tr.RootPath}, args...)
	}
	dir := t.TempDir()
	// node-2 never joined: its CA is retired.
	crl := filepath.Join(dir, "root.crl")
	if err := os.WriteFile(crl, pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: tr.RootCRL(t, 1, "node-2")}), 0o644); err != nil {
		t.Fatal(err)
	}
	out := must(with("ca", "revoke", "--crl", crl)...)
	if want := tr.Nodes["node-2"].Issuing.SerialNumber.Text(16); !strings.Contains(out, "root CRL number 1") || !strings.Contains(out, want) {
		t.Fatalf("ca revoke:\n%s", out)
	}
	if _, err := run(with("ca", "revoke", "--crl", crl)...); err == nil || !strings.Contains(err.Error(), "is not newer than the stored CRL number 1") {
		t.Fatalf("the same CRL again: %v", err)
	}
	if _, err := run(with("ca", "revoke", "--crl", tr.RootPath)...); err == nil || !strings.Contains(err.Error(), `no "X509 CRL" block`) {
		t.Fatalf("a certificate as a CRL: %v", err)
	}
	if _, err := run(with("ca", "revoke")...); err == nil || !strings.Contains(err.Error(), "--crl is required") {
		t.Fatalf("no --crl: %v", err)
	}
}
