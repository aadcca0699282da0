package ctl_test

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// `entry create --admin` promised that the entry's workloads would be
// appliance admins, and nothing enforced it: the flag is gone, and using
// it is an error before anything is sent.
func TestAttackEntryAdminFlagGone(t *testing.T) {
	run, _, _ := cli(t)
	for _, sub := range []string{"create", "update"} {
		args := []string{"--server", "127.0.0.1:1", "entry", sub, "--spiffe-id", "spiffe://example.org/web",
			"--parent-id", "spiffe://example.org/sigil/agent/tpm/h1", "--selector", "unix:uid:1000", "--admin"}
		if sub == "update" {
			args = append(args, "some-id")
		}
		_, err := run(args...)
		if err == nil || !strings.Contains(err.Error(), "unknown flag: --admin") {
			t.Fatalf("entry %s --admin: %v, want unknown flag", sub, err)
		}
	}
	out, _ := run("entry", "create", "--help")
	if strings.Contains(out, "--admin") || strings.Contains(out, "appliance admins") {
		t.Fatalf("entry create --help still offers --admin:\n%s", out)
	}
}

// Admin roles and revocation through sigilctl: root issues an issuer, the
// issuer issues and revokes a plain admin, who is refused from then on.
func TestSigilctlAdminRevoke(t *testing.T) {
	tr := clustertest.NewTrust(t, "cr", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	dir := t.TempDir()
	run, must, _ := cli(t)
	sock := c.ConfigOf("node-1").API.LocalSocket
	cred := func(name string) (string, string) {
		return filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	}
	ivyCert, ivyKey := cred("ivy")
	if out := must("--socket", sock, "admin", "issue", "--name", "ivy", "--role", "admin-issuer", "--key-out", ivyKey, "--cert-out", ivyCert); !strings.Contains(out, "role admin-issuer") {
		t.Fatalf("admin issue: %s", out)
	}
	as := func(cert, key string, args ...string) []string {
		return append([]string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", cert, "--key", key, "--root", tr.RootPath}, args...)
	}
	bobCert, bobKey := cred("bob")
	must(as(ivyCert, ivyKey, "admin", "issue", "--name", "bob", "--key-out", bobKey, "--cert-out", bobCert)...)
	if _, err := run(as(bobCert, bobKey, "admin", "issue", "--name", "eve", "--key-out", filepath.Join(dir, "eve.key"), "--cert-out", filepath.Join(dir, "eve.pem"))...); err == nil ||
		!strings.Contains(err.Error(), "only for its own name") {
		t.Fatalf("bob issuing eve: %v", err)
	}
	if _, err := run(as(bobCert, bobKey, "admin", "revoke", "ivy")...); err == nil || !strings.Contains(err.Error(), "may revoke only its own name") {
		t.Fatalf("bob revoking ivy: %v", err)
	}
	out := must(as(bobCert, bobKey, "admin", "list")...)
	for _, want := range []string{"NAME", "bob", "admin", "ivy", "admin-issuer"} {
		if !strings.Contains(out, want) {
			t.Fatalf("admin list lacks %q:\n%s", want, out)
		}
	}
	if out := must(as(ivyCert, ivyKey, "admin", "revoke", "bob")...); !strings.Contains(out, "revoked bob") {
		t.Fatalf("admin revoke: %s", out)
	}
	if _, err := run(as(bobCert, bobKey, "entry", "list")...); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Fatalf("revoked bob: %v", err)
	}
	// A list prints as a top-level array.
	var l []struct {
		Name      string `json:"name"`
		RevokedAt string `json:"revoked_at"`
		RevokedBy string `json:"revoked_by"`
	}
	if err := json.Unmarshal([]byte(must(as(ivyCert, ivyKey, "-o", "json", "admin", "list")...)), &l); err != nil || len(l) != 2 ||
		l[0].Name != "bob" || l[0].RevokedAt == "" || !strings.HasSuffix(l[0].RevokedBy, "/sigil/admin/ivy") {
		t.Fatalf("admin list json: %+v %v", l, err)
	}
}
