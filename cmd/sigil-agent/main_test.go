package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// sigil-agent's command line, in process: help, flags old and new, the
// inspect subcommand, and config files with problems (nothing started).
func TestRun(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	base := "servers: [127.0.0.1:1]\nroot-cert: " + filepath.Join(dir, "root.pem") + "\ndata-dir: " + dir + "\njoin-token-file: " + filepath.Join(dir, "token") + "\n"
	badLog := write("badlog.yaml", base+"log: {level: loud, format: xml}\n")
	unknown := write("unknown.yaml", base+"bogus-field: 1\nlog: {colour: red}\n")
	incomplete := write("incomplete.yaml", "log: {level: debug}\n")
	twoDocs := write("two.yaml", base+"---\n"+base)
	noSocket := filepath.Join(dir, "no.sock")

	t.Setenv("SIGIL_SERVERS", "")
	t.Setenv("SIGIL_ROOT_CERT", "")
	t.Setenv("ACTIONS_ID_TOKEN_REQUEST_URL", "")
	for _, tc := range []struct {
		args   []string
		code   int
		stdout []string
		stderr []string
	}{
		{[]string{"--help"}, 0, []string{"inspect", "exec", "--config", "/etc/sigil/agent.yaml"}, nil},
		{[]string{"exec", "--help"}, 0, []string{"--server", "--root-cert", "--rule", "--token-file", "--token-env", "--github-actions", "--token-audience", "--out", "--audience", "SIGIL_SERVERS"}, nil},
		{[]string{"exec", "--rule", "r", "--token-env", "T", "--server", "h:1", "--root-cert", "/x", "true"}, 2, nil, []string{"give the command after --"}},
		{[]string{"exec", "--rule", "r", "--token-env", "T", "--server", "h:1", "--root-cert", "/x", "--"}, 2, nil, []string{"give the command after --"}},
		{[]string{"exec", "--rule", "r", "--token-env", "T", "--root-cert", "/x", "--", "true"}, 2, nil, []string{"--server or $SIGIL_SERVERS"}},
		{[]string{"exec", "--rule", "r", "--token-env", "T", "--server", "h:1", "--", "true"}, 2, nil, []string{"--root-cert or $SIGIL_ROOT_CERT"}},
		{[]string{"exec", "--rule", "r", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 2, nil, []string{"exactly one of --token-file, --token-env, --github-actions"}},
		{[]string{"exec", "--rule", "r", "--token-env", "T", "--token-file", "/t", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 2, nil, []string{"exactly one of"}},
		{[]string{"exec", "--rule", "r", "--token-file", "/t", "--token-audience", "a", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 2, nil, []string{"--token-audience is for --github-actions"}},
		{[]string{"exec", "--rule", "r", "--token-file", "/t", "--audience", "a", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 2, nil, []string{"give --out"}},
		{[]string{"exec", "--rule", "r", "--token-env", "SIGIL_TEST_NO_SUCH_VAR", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 1, nil, []string{"SIGIL_TEST_NO_SUCH_VAR: empty platform token"}},
		{[]string{"exec", "--rule", "r", "--github-actions", "--token-audience", "a", "--server", "h:1", "--root-cert", "/x", "--", "true"}, 1, nil, []string{"id-token: write"}},
		{[]string{"help"}, 0, []string{"inspect"}, nil},
		{[]string{"inspect", "--help"}, 0, []string{"--socket", "--audience", "--timeout", "10s"}, nil},
		{[]string{"bogus"}, 2, nil, []string{`unknown command "bogus"`, "inspect"}},
		{[]string{"--bogus"}, 2, nil, []string{"unknown flag: --bogus"}},
		{[]string{"inspect", "--bogus"}, 2, nil, []string{"inspect: unknown flag: --bogus"}},
		{[]string{"inspect", "--timeout", "soon"}, 2, nil, []string{"--timeout"}},
		{[]string{"inspect", "extra"}, 2, nil, []string{`inspect: takes no arguments (got "extra")`}},
		{[]string{"-config", filepath.Join(dir, "none.yaml")}, 1, nil, []string{"none.yaml", "no such file"}},
		{[]string{"--config", badLog}, 1, nil, []string{badLog, `log.level must be debug, info, warn or error (got "loud")`, `log.format must be json or text (got "xml")`}},
		{[]string{"--config=" + unknown}, 1, nil, []string{unknown, "bogus-field", "colour"}},
		{[]string{"-config=" + incomplete}, 1, nil, []string{incomplete, "servers is required", "root-cert is required", "data-dir is required"}},
		{[]string{"--config", twoDocs}, 1, nil, []string{"more than one YAML document"}},
		// The Go flag package's single-dash style, as older scripts call it.
		{[]string{"inspect", "-socket", noSocket, "-timeout", "2s", "-audience", "a,b"}, 1, nil, []string{noSocket}},
		{[]string{"inspect", "--socket=" + noSocket, "--timeout=2s"}, 1, nil, []string{noSocket}},
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
		if !ok {
			t.Errorf("sigil-agent %q: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out.String(), errb.String())
		}
	}
}
