package ctl_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// sigilctl against a real cluster, as an operator would use it: the first
// admin credential through the local socket, then everything over mTLS.
func TestSigilctl(t *testing.T) {
	tr := clustertest.NewTrust(t, "ctl", []string{"node-1", "node-2"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2")
	dir := t.TempDir()
	run := func(args ...string) (string, error) {
		var out bytes.Buffer
		cmd := ctl.NewCommand(&out)
		cmd.SetArgs(args)
		cmd.SetOut(&out)
		cmd.SetErr(&out)
		err := cmd.Execute()
		return out.String(), err
	}
	must := func(args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("sigilctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	// Bootstrap: root on node-2 issues the first admin credential.
	key, cert := filepath.Join(dir, "alice.key"), filepath.Join(dir, "alice.pem")
	out := must("--socket", c.ConfigOf("node-2").API.LocalSocket, "admin", "issue", "--name", "alice", "--key-out", key, "--cert-out", cert)
	if !strings.Contains(out, "spiffe://example.org/sigil/admin/alice") {
		t.Fatalf("admin issue: %s", out)
	}
	if st, _ := os.Stat(key); st.Mode().Perm() != 0o600 {
		t.Fatalf("admin key mode %v", st.Mode().Perm())
	}
	if _, err := run("--socket", c.ConfigOf("node-2").API.LocalSocket, "admin", "issue", "--name", "alice", "--key-out", key, "--cert-out", cert); err == nil {
		t.Fatal("admin issue overwrote an existing key")
	}

	mtls := []string{"--server", c.ConfigOf("node-1").API.Listen, "--cert", cert, "--key", key, "--root", tr.RootPath}
	with := func(args ...string) []string { return append(append([]string{}, mtls...), args...) }

	out = must(with("-o", "json", "entry", "create", "--spiffe-id", "spiffe://example.org/web", "--parent-id",
		"spiffe://example.org/sigil/agent/tpm/h1", "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", "--hint", "web")...)
	var e struct {
		ID       string `json:"id"`
		SPIFFEID string `json:"spiffe_id"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil || e.SPIFFEID != "spiffe://example.org/web" {
		t.Fatalf("entry create json: %v %s", err, out)
	}
	if out := must(with("entry", "list")...); !strings.Contains(out, e.ID) || !strings.Contains(out, "unix:gid:1000,unix:uid:1000") {
		t.Fatalf("entry list:\n%s", out)
	}
	if _, err := run(with("entry", "create", "--spiffe-id", "spiffe://evil.org/x", "--parent-id", "spiffe://example.org/p", "--selector", "unix:uid:1")...); err == nil ||
		!strings.Contains(err.Error(), "not in trust domain") {
		t.Fatalf("bad entry: %v", err)
	}
	if out := must(with("tpm", "ek-ca", "add", tr.RootPath)...); !strings.Contains(out, "trusted") {
		t.Fatalf("ek-ca add: %s", out)
	}
	if out := must(with("token", "create", "--ttl", "10m")...); !strings.Contains(out, "shown once") {
		t.Fatalf("token create: %s", out)
	}
	if out := must(with("cluster", "status")...); !strings.Contains(out, "node-1") || !strings.Contains(out, "node-2") {
		t.Fatalf("cluster status:\n%s", out)
	}
	snap := filepath.Join(dir, "state.snap")
	must(with("snapshot", "save", snap)...)
	if _, err := run(with("snapshot", "save", snap)...); err == nil {
		t.Fatal("snapshot save overwrote a file")
	}
	if out := must(with("audit", "verify")...); !strings.Contains(out, "audit chain intact") {
		t.Fatalf("audit verify: %s", out)
	}
	if out := must(with("bundle", "show", "--format", "pem")...); !strings.Contains(out, "BEGIN CERTIFICATE") {
		t.Fatalf("bundle: %s", out)
	}
	if out := must(with("audit", "list")...); !strings.Contains(out, "admin.cert.issue") || !strings.Contains(out, "local:uid=") {
		t.Fatalf("audit list lacks the bootstrap credential:\n%s", out)
	}
	if _, err := run(with("svid", "revoke", "deadbeef")...); err == nil || !strings.Contains(err.Error(), "no X.509-SVID with serial deadbeef") {
		t.Fatalf("revoke of an unknown serial: %v", err)
	}
	// No credential, no service.
	if _, err := run("--server", c.ConfigOf("node-1").API.Listen, "--root", tr.RootPath, "entry", "list"); err == nil {
		t.Fatal("entry list without a credential")
	}
}
