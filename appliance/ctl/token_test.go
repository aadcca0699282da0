package ctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// An admin whose key lives in a PKCS#11 token (a real SoftHSM token): the
// first certificate through the local socket for a key made in the token,
// then admin calls over mutual TLS that the token signs, its PIN read from
// a file or from the environment, never from the command line.
func TestTokenAdminKey(t *testing.T) {
	// SoftHSM shows a process only the tokens that existed when the module
	// was initialized: the admin's token is made before the cluster's.
	tk := testenv.ProcessHSM(t).NewToken(t, "ctl-admin")
	tr := clustertest.NewTrust(t, "ctltok", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	dir := t.TempDir()
	run, must, stderr := cli(t)
	sock := c.ConfigOf("node-1").API.LocalSocket
	pin := strings.TrimSpace(tk.PIN(t))

	uri := tk.KeyURI("alice")
	cert := filepath.Join(dir, "alice.pem")
	out := must("--socket", sock, "admin", "issue", "--name", "alice", "--key-out", uri, "--cert-out", cert)
	if !strings.Contains(out, "spiffe://example.org/sigil/admin/alice") || !strings.Contains(out, "key "+uri) {
		t.Fatalf("admin issue to a token: %s", out)
	}
	if k, ok := tk.PrivateKeys(t)["alice"]; !ok || k["Access"] != testenv.NonExtractable {
		t.Fatalf("the token holds no non-extractable key alice: %+v", tk.PrivateKeys(t))
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("admin issue to a token wrote files besides the certificate: %v", entries)
	}
	// A second issue for the same object is refused before any file is
	// made.
	cert2 := filepath.Join(dir, "again.pem")
	if _, err := run("--socket", sock, "admin", "issue", "--name", "alice", "--key-out", uri, "--cert-out", cert2); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("admin issue over an existing token key: %v", err)
	}
	if _, err := os.Stat(cert2); !os.IsNotExist(err) {
		t.Fatal("a refused admin issue left its certificate file")
	}

	listen := c.ConfigOf("node-1").API.Listen
	as := func(key string, args ...string) []string {
		return append([]string{"--server", listen, "--cert", cert, "--key", key, "--root", tr.RootPath}, args...)
	}
	// The PIN from the file the URI names.
	out = must(as(uri, "-o", "json", "entry", "create", "--spiffe-id", "spiffe://example.org/tok", "--parent-id",
		"spiffe://example.org/sigil/agent/tpm/h1", "--selector", "unix:uid:7", "--force")...)
	var e struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(out), &e); err != nil || e.ID == "" {
		t.Fatalf("entry create with a token key: %v %s", err, out)
	}
	// The PIN from the environment.
	t.Setenv("SIGIL_CTL_TEST_PIN", pin)
	envURI := strings.Replace(uri, "pin-source=file:"+tk.PINFile, "pin-source=env:SIGIL_CTL_TEST_PIN", 1)
	if envURI == uri {
		t.Fatalf("no pin-source file in %s", uri)
	}
	out = must(as(envURI, "audit", "list")...)
	if !regexp.MustCompile(`spiffe://example.org/sigil/admin/alice\s+entry.create\s+spiffe://example.org/tok`).MatchString(out) {
		t.Fatalf("the appliance did not record alice (token key) creating %s:\n%s", e.ID, out)
	}
	// A wrong PIN, and a certificate of another key, are refused.
	t.Setenv("SIGIL_CTL_TEST_PIN", "00000000")
	if _, err := run(as(envURI, "entry", "list")...); err == nil || !strings.Contains(err.Error(), "PIN") {
		t.Fatalf("wrong PIN: %v", err)
	}
	t.Setenv("SIGIL_CTL_TEST_PIN", pin)
	bobKey, bobCert := filepath.Join(dir, "bob.key"), filepath.Join(dir, "bob.pem")
	must("--socket", sock, "admin", "issue", "--name", "bob", "--key-out", bobKey, "--cert-out", bobCert)
	if _, err := run("--server", listen, "--cert", bobCert, "--key", envURI, "--root", tr.RootPath, "entry", "list"); err == nil ||
		!strings.Contains(err.Error(), "is not the certificate of the --key token key") {
		t.Fatalf("bob's certificate with alice's token key: %v", err)
	}
	// The PIN is never printed.
	for _, args := range [][]string{as(envURI, "entry", "list"), as(uri, "admin", "list")} {
		out, _ := run(args...)
		if strings.Contains(out, pin) || strings.Contains(stderr.String(), pin) {
			t.Fatalf("sigilctl %q printed the PIN", args)
		}
	}

	testJSONOutput(t, must, func(args ...string) []string { return as(uri, args...) })
	testOutputWriteFails(t, as(uri, "bundle", "show")...)
}

// testJSONOutput: lists are top-level arrays, and every key is lower-case
// snake_case.
func testJSONOutput(t *testing.T, must mustFunc, with func(...string) []string) {
	snake := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, v := range x {
				if !snake.MatchString(k) && !strings.HasSuffix(path, ".detail") && !strings.HasSuffix(path, ".facts") && !strings.HasSuffix(path, ".pcrs") {
					t.Errorf("%s: key %q is not lower-case snake_case", path, k)
				}
				walk(path+"."+k, v)
			}
		case []any:
			for _, v := range x {
				walk(path+"[]", v)
			}
		}
	}
	for _, tc := range []struct {
		args  []string
		array bool
	}{
		{[]string{"entry", "list"}, true},
		{[]string{"agent", "list"}, true},
		{[]string{"admin", "list"}, true},
		{[]string{"tpm", "ek-ca", "list"}, true},
		{[]string{"tpm", "allow", "list"}, true},
		{[]string{"cluster", "status"}, false},
		{[]string{"audit", "list"}, false},
		{[]string{"audit", "list", "--all"}, false},
		{[]string{"audit", "verify"}, false},
		{[]string{"bundle", "show"}, false},
	} {
		out := must(with(append([]string{"-o", "json"}, tc.args...)...)...)
		var v any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("%s: not JSON: %v\n%s", tc.args, err, out)
		}
		if _, isArray := v.([]any); isArray != tc.array {
			t.Errorf("%s: top-level array %v, want %v:\n%s", tc.args, isArray, tc.array, out)
		}
		walk(strings.Join(tc.args, " "), v)
	}
	var status struct {
		NodeID string `json:"node_id"`
		Peers  []struct {
			ID string `json:"id"`
		} `json:"peers"`
	}
	if err := json.Unmarshal([]byte(must(with("-o", "json", "cluster", "status")...)), &status); err != nil || status.NodeID == "" || len(status.Peers) != 1 || status.Peers[0].ID == "" {
		t.Fatalf("cluster status json: %v %+v", err, status)
	}
}

// failWriter fails every write, like a closed pipe or a full disk.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// testOutputWriteFails: a result that cannot be written fails the command,
// in text and in JSON.
func testOutputWriteFails(t *testing.T, args ...string) {
	for _, extra := range [][]string{nil, {"-o", "json"}} {
		var stderr bytes.Buffer
		a := append(append([]string{}, extra...), args...)
		if code := ctl.Run(context.Background(), a, failWriter{}, &stderr); code != 1 || !strings.Contains(stderr.String(), "disk full") {
			t.Errorf("sigilctl %q into a failing writer: exit %d, stderr %q", a, code, stderr.String())
		}
	}
}
