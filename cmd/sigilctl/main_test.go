package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// sigilctl's command line, in process, where no appliance is needed: help,
// bad flags and subcommands, durations the appliance cannot store, token
// key URIs that cannot be used. Commands against a real cluster are
// tested in appliance/ctl.
func TestRun(t *testing.T) {
	dir := t.TempDir()
	key, cert := filepath.Join(dir, "k.pem"), filepath.Join(dir, "c.pem")
	token := "pkcs11:token=admin;object=alice?module-path=/usr/lib/softhsm/libsofthsm2.so"
	for _, tc := range []struct {
		args   []string
		code   int
		stdout []string
		stderr []string
	}{
		{[]string{"--help"}, 0, []string{"entry", "agent", "tpm", "token", "cluster", "snapshot", "audit", "bundle", "jwt", "admin", "svid", "ca", "--output"}, nil},
		{[]string{"help", "jwt"}, 0, []string{"rotate"}, nil},
		{[]string{"jwt", "rotate", "--help"}, 0, []string{"its own HSM", "Refused while the node already has 8 keys"}, nil},
		{[]string{"entry", "--help"}, 0, []string{"create", "update", "list", "show", "delete"}, nil},
		{[]string{"help", "audit"}, 0, []string{"export", "verify-segment"}, nil},
		{nil, 2, nil, []string{"usage: sigilctl <command>", "entry"}},
		{[]string{"entry"}, 2, nil, []string{"usage: sigilctl entry <command>", "create"}},
		{[]string{"bogus"}, 2, nil, []string{`unknown command "bogus"`}},
		{[]string{"entry", "bogus"}, 2, nil, []string{`unknown command "bogus"`, "sigilctl entry --help"}},
		{[]string{"--bogus", "entry", "list"}, 2, nil, []string{"unknown flag: --bogus"}},
		{[]string{"entry", "show"}, 2, nil, []string{"entry show: accepts 1 arg"}},
		{[]string{"-o", "yaml", "entry", "list"}, 2, nil, []string{"--output must be text or json"}},
		{[]string{"entry", "list", "--timeout", "soon"}, 2, nil, []string{"--timeout"}},
		{[]string{"entry", "list", "--timeout", "0s"}, 2, nil, []string{"--timeout must be positive"}},
		{[]string{"cluster", "status", "extra"}, 2, nil, []string{`cluster status: takes no arguments (got "extra")`}},
		{[]string{"jwt", "rotate", "node-2"}, 2, nil, []string{`jwt rotate: takes no arguments (got "node-2")`}},
		// Durations the appliance keeps in whole seconds are refused, not
		// truncated, before anything is dialed.
		{[]string{"entry", "create", "--spiffe-id", "spiffe://example.org/w", "--x509-ttl", "1500ms"}, 2, nil, []string{"--x509-ttl 1.5s", "whole seconds", "2s"}},
		{[]string{"entry", "update", "id", "--jwt-ttl", "300ms"}, 2, nil, []string{"--jwt-ttl 300ms", "whole seconds", "1s"}},
		{[]string{"entry", "create", "--x509-ttl", "-1h"}, 2, nil, []string{"--x509-ttl -1h0m0s: must not be negative"}},
		{[]string{"token", "create", "--ttl", "90.5s"}, 2, nil, []string{"--ttl 1m30.5s", "whole seconds"}},
		{[]string{"admin", "issue", "--name", "a", "--key-out", key, "--cert-out", cert, "--ttl", "1h0m0.5s"}, 2, nil, []string{"--ttl", "whole seconds"}},
		{[]string{"admin", "issue", "--name", "a"}, 2, nil, []string{"--key-out and --cert-out are required"}},
		// Token keys: the PIN comes from a pin-source, never the command line.
		{[]string{"--server", "127.0.0.1:1", "--root", cert, "--cert", cert, "--key", token, "entry", "list"}, 2, nil, []string{"no pin-source", "env:NAME"}},
		{[]string{"--server", "127.0.0.1:1", "--root", cert, "--cert", cert, "--key", token + "&pin-value=87654321", "entry", "list"}, 2, nil, []string{"pin-value is not allowed"}},
		{[]string{"--server", "127.0.0.1:1", "--root", cert, "--key", token + "&pin-source=env:NOPE", "entry", "list"}, 2, nil, []string{"--cert must name"}},
		{[]string{"admin", "issue", "--name", "a", "--key-out", "pkcs11:token=admin?module-path=/x&pin-source=env:P", "--cert-out", cert}, 2, nil, []string{"names no key"}},
		{[]string{"entry", "list"}, 1, nil, []string{"no server address"}},
		// The Go flag package's single-dash long flags are accepted too.
		{[]string{"-server", "127.0.0.1:1", "-root", filepath.Join(dir, "none.pem"), "-cert", cert, "-key", key, "entry", "list"}, 1, nil, []string{key, "no such file"}},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), tc.args, &out, &errb)
		ok := code == tc.code
		for _, s := range tc.stdout {
			ok = ok && strings.Contains(out.String(), s)
		}
		for _, s := range tc.stderr {
			ok = ok && strings.Contains(errb.String(), s)
		}
		if strings.Contains(errb.String(), "87654321") {
			ok = false
			t.Errorf("sigilctl %q printed the PIN", tc.args)
		}
		if !ok {
			t.Errorf("sigilctl %q: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out.String(), errb.String())
		}
	}
	for _, p := range []string{key, cert} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("a refused command left %s", p)
		}
	}
}
