package jobrun_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/jobrun"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// A run that outlives half its identity's life (the rule's shortest TTL,
// one minute) renews by joining again: with a token file, once the file
// holds a fresh token of the same run (same job agent, new certificate;
// the --out SVID rotates meanwhile); with an environment variable, which
// cannot change, it says when the identity ends and carries on. Both
// end their runs at exit, the renewed one revoking every SVID it held.
func TestExecRenewsWithFreshToken(t *testing.T) {
	jc := newJobCluster(t, "jn", 60)
	ctx := context.Background()
	dir := t.TempDir()

	type runResult struct {
		code int
		err  error
	}
	start := func(name string, tok jobrun.TokenSource, out string, log *clustertest.LogBuffer) (stop func() runResult) {
		stopFile := filepath.Join(dir, name+".stop")
		done := make(chan runResult, 1)
		go func() {
			code, err := jobrun.Run(ctx, jobrun.Options{Servers: jc.servers, RootCert: jc.c.Trust.RootPath, Rule: "gh", Token: tok, Out: out,
				Command: []string{"sh", "-c", `while [ ! -e "$1" ]; do sleep 0.1; done; exit 4`, "sh", stopFile},
				Log:     slog.New(slog.NewTextHandler(log, nil))})
			done <- runResult{code, err}
		}()
		return func() runResult {
			if err := os.WriteFile(stopFile, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			select {
			case r := <-done:
				return r
			case <-time.After(30 * time.Second):
				t.Fatalf("%s: run did not end", name)
				return runResult{}
			}
		}
	}
	claims := func(run string) map[string]any {
		cl := jobruletest.GitHubClaims(jc.iss.URL(), jc.aud, time.Now())
		cl["run_id"], cl["jti"] = run, run+"-first"
		return cl
	}

	// The token file run.
	fileClaims := claims("111")
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(jc.iss.Sign(t, fileClaims)), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	var fileLog clustertest.LogBuffer
	stopFileRun := start("file", &jobrun.FileToken{Path: tokenFile}, out, &fileLog)

	// The environment variable run.
	t.Setenv("JOB_TOKEN", jc.iss.Sign(t, claims("222")))
	envTok, err := jobrun.NewEnvToken("JOB_TOKEN")
	if err != nil {
		t.Fatal(err)
	}
	var envLog clustertest.LogBuffer
	stopEnvRun := start("env", envTok, "", &envLog)

	clustertest.Eventually(t, 30*time.Second, "both runs joined", func() bool {
		return strings.Contains(fileLog.String(), "run SVID written") && strings.Contains(envLog.String(), "job joined")
	})
	// The run's agent: its ID ends with its key's name.
	agents, err := jc.admin.AgentList(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	var agentID string
	for _, a := range agents.Agents {
		if strings.HasPrefix(a.ID, "spiffe://"+jc.td+"/sigil/agent/job/gh/111-1/") {
			agentID = a.ID
		}
	}
	first, err := jc.admin.AgentShow(ctx, &api.IDRequest{ID: agentID})
	if err != nil {
		t.Fatal(err)
	}
	serialOf := func() string {
		b, err := os.ReadFile(filepath.Join(out, "svid.pem"))
		if err != nil {
			return ""
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return ""
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return ""
		}
		return c.SerialNumber.Text(16)
	}
	firstSVID := serialOf()
	if firstSVID == "" {
		t.Fatal("no svid.pem")
	}

	// Past half the life, the unchanged file gives no fresh token: the
	// run waits for one. Then the pipeline writes a fresh token.
	clustertest.Eventually(t, 45*time.Second, "the file run to find no fresh token at half life", func() bool {
		return strings.Contains(fileLog.String(), "no fresh platform token")
	})
	fileClaims["jti"], fileClaims["iat"] = "111-second", time.Now().Unix()
	if err := os.WriteFile(tokenFile, []byte(jc.iss.Sign(t, fileClaims)), 0o600); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 40*time.Second, "the file run renewed with the fresh token", func() bool {
		return strings.Contains(fileLog.String(), "run identity renewed")
	})
	renewed, err := jc.admin.AgentShow(ctx, &api.IDRequest{ID: agentID})
	if err != nil || renewed.SerialNumber == first.SerialNumber || !renewed.ExpiresAt.After(first.ExpiresAt) {
		t.Fatalf("job agent after renewal: %+v (first %+v) %v", renewed, first, err)
	}
	clustertest.Eventually(t, 40*time.Second, "the run's SVID in --out rotated", func() bool {
		s := serialOf()
		return s != "" && s != firstSVID
	})
	secondSVID := serialOf()
	if !strings.Contains(envLog.String(), "no fresh platform token") || !strings.Contains(envLog.String(), "refreshable=false") {
		t.Fatalf("the env run did not say its identity ends:\n%s", envLog.String())
	}

	// The run's SVID is signed once per job agent SVID (it ends with the
	// agent's): not re-signed ever faster as the agent's expiry nears.
	if n := strings.Count(fileLog.String(), "run SVID written"); n != 2 {
		t.Errorf("the run's SVID was written %d times in one renewal", n)
	}
	for name, stop := range map[string]func() runResult{"file": stopFileRun, "env": stopEnvRun} {
		if r := stop(); r.code != 4 || r.err != nil {
			t.Errorf("%s run: exit %d, %v", name, r.code, r.err)
		}
	}
	b, err := jc.admin.BundleShow(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	revoked := map[string]bool{}
	for _, r := range b.Bundle.Revoked {
		revoked[r.Serial] = true
	}
	if !revoked[firstSVID] || !revoked[secondSVID] {
		t.Errorf("the renewed run's SVIDs %s and %s not both revoked", firstSVID, secondSVID)
	}
	agents, err = jc.admin.AgentList(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range agents.Agents {
		t.Errorf("agent %s left after both runs ended", a.ID)
	}
	if _, err := os.Stat(out); !os.IsNotExist(err) {
		t.Errorf("--out left: %v", err)
	}
	t.Logf("file run log:\n%s\nenv run log:\n%s", fileLog.String(), envLog.String())
}
