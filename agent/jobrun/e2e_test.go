package jobrun_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/cli"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// cliEnv makes the test binary sigil-agent itself: the command an exec
// runs (`sigil-agent inspect`) is this binary run again.
const cliEnv = "SIGIL_JOBRUN_TEST_AS_CLI"

func TestMain(m *testing.M) {
	if os.Getenv(cliEnv) == "1" {
		os.Exit(cli.Run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(testenv.Main(m))
}

// jobCluster is a three-node appliance with a GitHub Actions join rule
// whose issuer is a real OIDC issuer over TLS.
type jobCluster struct {
	c       *clustertest.Cluster
	iss     *jobruletest.Issuer
	admin   *api.AdminClient
	servers []string
	aud, td string
}

func newJobCluster(t *testing.T, prefix string, ttl api.Seconds) *jobCluster {
	t.Helper()
	iss := jobruletest.NewIssuer(t)
	tr := clustertest.NewTrust(t, prefix, []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	admin := c.Admin("node-1")
	rule, err := admin.JoinRuleCreate(context.Background(), &api.JoinRule{Name: "gh", Preset: "github-actions", Issuer: iss.URL(),
		IssuerCA: string(iss.CAPEM()), TTL: ttl, MaxTokenAge: 300,
		Conditions: []api.ClaimCondition{{Claim: "repository", Pattern: "octo-org/*"}}})
	if err != nil {
		t.Fatal(err)
	}
	jc := &jobCluster{c: c, iss: iss, admin: admin, aud: rule.Audience, td: tr.TrustDomain.Name()}
	for _, n := range []string{"node-1", "node-2", "node-3"} {
		jc.servers = append(jc.servers, c.ConfigOf(n).API.Listen)
	}
	return jc
}

// token signs a GitHub Actions shaped ID token for the run; jti makes
// each one a fresh token.
func (jc *jobCluster) token(t *testing.T, jti string) string {
	cl := jobruletest.GitHubClaims(jc.iss.URL(), jc.aud, time.Now())
	cl["jti"] = jti
	return jc.iss.Sign(t, cl)
}

func (jc *jobCluster) execArgs(rule, tokenFile, out string) []string {
	args := []string{"exec", "--rule", rule, "--token-file", tokenFile, "--root-cert", jc.c.Trust.RootPath}
	for _, s := range jc.servers {
		args = append(args, "--server", s)
	}
	if out != "" {
		args = append(args, "--out", out, "--audience", "deploy", "--audience", "https://vault.example.org")
	}
	return args
}

// `sigil-agent exec --token-file ... --out DIR -- sh -c '...; sigil-agent
// inspect'` against a real three-node appliance: the run joins with its
// platform token, the command finds the Workload API through
// SPIFFE_ENDPOINT_SOCKET and gets the rule's templated identity (X.509
// and JWT), the --out files are there (0600) while it runs; once it exits
// the run is over: the job agent is gone from AgentList, the run's
// X.509-SVID revoked, the exit code audited, the --out files and the
// socket directory gone, and sigil-agent exits with the command's status.
func TestExecEndToEnd(t *testing.T) {
	jc := newJobCluster(t, "je", 600)
	ctx := context.Background()
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(jc.token(t, "first")), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "run-out")
	tmp := t.TempDir()
	t.Setenv("TMPDIR", tmp) // the socket directory goes here
	t.Setenv(cliEnv, "1")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	script := `cd "$1" && stat -c '%n %a' . svid.pem svid-key.pem bundle.pem jwt-deploy.token jwt-https___vault.example.org.token && ` +
		`echo "socket $SPIFFE_ENDPOINT_SOCKET" && "$2" inspect --audience deploy && exit 7`
	var stdout, stderr bytes.Buffer
	args := append(jc.execArgs("gh", tokenFile, out), "--", "sh", "-c", script, "sh", out, self)
	code := cli.Run(ctx, args, &stdout, &stderr)
	t.Logf("stdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
	if code != 7 {
		t.Fatalf("exit %d, want the command's 7", code)
	}
	o := stdout.String()
	id := "spiffe://" + jc.td + "/ci/github/octo-org/octo-repo"
	for _, want := range []string{". 700", "svid.pem 600", "svid-key.pem 600", "bundle.pem 600", "jwt-deploy.token 600",
		"jwt-https___vault.example.org.token 600", "socket unix://" + tmp + "/", "X.509-SVIDs from unix://", "  " + id + " (default)",
		"JWT-SVID " + id + " aud=[deploy]", "ValidateJWTSVID: valid for deploy"} {
		if !strings.Contains(o, want) {
			t.Errorf("command output lacks %q", want)
		}
	}
	if strings.Contains(stderr.String(), jc.token(t, "first")[:40]) {
		t.Error("the log shows the token")
	}
	m := regexp.MustCompile(`serial:\s+([0-9a-f]+)`).FindStringSubmatch(o)
	if m == nil {
		t.Fatal("inspect printed no serial")
	}
	serial := m[1]

	// The run is over on the appliance.
	agents, err := jc.admin.AgentList(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range agents.Agents {
		if strings.Contains(a.ID, "/sigil/agent/job/") {
			t.Errorf("job agent %s still listed after the run", a.ID)
		}
	}
	b, err := jc.admin.BundleShow(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	revoked := false
	for _, r := range b.Bundle.Revoked {
		revoked = revoked || r.Serial == serial
	}
	if !revoked {
		t.Errorf("the run's X.509-SVID %s is not revoked", serial)
	}
	l, err := jc.admin.AuditList(ctx, &api.AuditRequest{Limit: 100, NewestFirst: true, Filter: &api.AuditFilter{Action: "job.end"}})
	if err != nil || len(l.Records) != 1 || l.Records[0].Detail["exit_code"] != "7" || !strings.Contains(l.Records[0].Detail["revoked"], serial) {
		t.Errorf("job.end audit: %+v %v", l, err)
	}
	// Nothing left on the job's machine.
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("--out dir left: %v", err)
	}
	if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
		t.Errorf("left in TMPDIR: %v", ents)
	}

	// The token joined once: a second exec with it is refused, runs
	// nothing, and says why.
	stdout.Reset()
	stderr.Reset()
	code = cli.Run(ctx, append(jc.execArgs("gh", tokenFile, ""), "--", "sh", "-c", "echo ran"), &stdout, &stderr)
	if code != 1 || stdout.Len() != 0 || !strings.Contains(stderr.String(), "already used") {
		t.Fatalf("replayed token: exit %d, stdout %q, stderr %s", code, stdout.String(), stderr.String())
	}
}
