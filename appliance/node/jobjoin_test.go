package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// jobJoin joins a run through node with token under rule and returns the
// answer and the run's agent key.
func jobJoin(t *testing.T, c *clustertest.Cluster, node, rule, token string) (*api.JobSVID, *ecdsa.PrivateKey, error) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return jobJoinWith(t, c, node, rule, token, key)
}

// jobJoinWith is jobJoin with a given agent key (a renewal keeps it).
func jobJoinWith(t *testing.T, c *clustertest.Cluster, node, rule, token string, key *ecdsa.PrivateKey) (*api.JobSVID, *ecdsa.PrivateKey, error) {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(node).API.Listen, RootFile: c.Trust.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := api.NewJoinClient(conn).Job(ctx, &api.JoinJobRequest{Rule: rule, Token: token, CSR: agentCSR(t, key), UID: 1000})
	return out, key, err
}

// auditHas reports whether the audit log has a record of action on target
// whose detail holds every key=value of want.
func auditHas(t *testing.T, admin *api.AdminClient, action, target string, want map[string]string) bool {
	t.Helper()
	l, err := admin.AuditList(context.Background(), &api.AuditRequest{Limit: 1000, NewestFirst: true, Filter: &api.AuditFilter{Action: action, Target: target}})
	if err != nil {
		t.Fatal(err)
	}
next:
	for _, r := range l.Records {
		if r.Action != action || r.Target != target {
			continue
		}
		for k, v := range want {
			if r.Detail[k] != v {
				continue next
			}
		}
		return true
	}
	return false
}

// A GitHub Actions run joins through one node with its ID token (from a
// real OIDC issuer over TLS, keys by discovery): it gets the templated
// identity, its agent syncs the run's entry and signs an X.509-SVID for
// it, no longer than its own SVID; the audit log says which repository,
// ref, commit, run and actor. The same token is refused on another node
// (the replay key is replicated); the job agent cannot renew by
// certificate; at run end its agent is gone and its SVID revoked.
func TestJobJoinGitHubActions(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	tr := clustertest.NewTrust(t, "jj", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	admin := c.Admin("node-1")
	rule, err := admin.JoinRuleCreate(ctx, &api.JoinRule{Name: "gh", Preset: "github-actions", Issuer: iss.URL(),
		IssuerCA: string(iss.CAPEM()), TTL: 600, MaxTokenAge: 300,
		Conditions: []api.ClaimCondition{{Claim: "repository", Pattern: "octo-org/*"}, {Claim: "ref", Pattern: "refs/heads/*"}}})
	if err != nil {
		t.Fatal(err)
	}
	if rule.Audience != "spiffe://"+c.Trust.TrustDomain.Name() || rule.SPIFFEIDTemplate == "" || rule.RunTemplate == "" {
		t.Fatalf("preset did not fill the rule: %+v", rule)
	}
	claims := jobruletest.GitHubClaims(iss.URL(), rule.Audience, time.Now())
	token := iss.Sign(t, claims)
	svid, key, err := jobJoin(t, c, "node-1", "gh", token)
	if err != nil {
		t.Fatal(err)
	}
	td := c.Trust.TrustDomain.Name()
	if want := "spiffe://" + td + "/ci/github/octo-org/octo-repo"; svid.SPIFFEID != want {
		t.Fatalf("run identity %s, want %s", svid.SPIFFEID, want)
	}
	if want := "spiffe://" + td + "/sigil/agent/job/gh/1234567-1/"; !strings.HasPrefix(svid.AgentID, want) || len(svid.AgentID) != len(want)+16 {
		t.Fatalf("job agent %s, want %s<key>", svid.AgentID, want)
	}
	if d := time.Until(svid.ExpiresAt); d > 10*time.Minute+time.Second || d < 9*time.Minute {
		t.Fatalf("job agent SVID lives %v, want the rule's 10m", d)
	}
	for _, want := range []map[string]string{{"fact.repository": "octo-org/octo-repo", "fact.ref": "refs/heads/main",
		"fact.sha": claims["sha"].(string), "fact.run_id": "1234567", "fact.actor": "octocat", "fact.workflow": "CI",
		"rule": "gh", "spiffe_id": svid.SPIFFEID}} {
		if !auditHas(t, admin, "job.join", svid.AgentID, want) {
			t.Fatalf("no job.join audit record with %v", want)
		}
	}

	// The job agent: Sync has the run's entry; an X.509-SVID is signed for
	// it, cut at the agent's own expiry at the latest.
	cred := writeCred(t, c, "job-agent", key, svid.Chain)
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf("node-2").API.Listen, CertFile: cred.cert, KeyFile: cred.key, RootFile: c.Trust.RootPath})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ac := api.NewAgentClient(conn)
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	stream, err := ac.Sync(sctx, &api.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	u, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if len(u.Entries) != 1 || u.Entries[0].ID != svid.EntryID || u.Entries[0].SPIFFEID != svid.SPIFFEID ||
		len(u.Entries[0].Selectors) != 1 || u.Entries[0].Selectors[0].String() != "unix:uid:1000" {
		t.Fatalf("job agent's view: %+v", u.Entries)
	}
	wkey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	res, err := ac.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: svid.EntryID, CSR: agentCSR(t, wkey)}}})
	if err != nil || res.Results[0].Error != "" {
		t.Fatalf("run SVID: %v %+v", err, res)
	}
	leaf, err := x509.ParseCertificate(res.Results[0].Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	if leaf.URIs[0].String() != svid.SPIFFEID || leaf.NotAfter.After(svid.ExpiresAt) {
		t.Fatalf("run SVID %s until %s; agent until %s", leaf.URIs[0], leaf.NotAfter, svid.ExpiresAt)
	}
	jwt, err := ac.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: svid.EntryID, Audience: []string{"deploy"}})
	if err != nil || jwt.SPIFFEID != svid.SPIFFEID {
		t.Fatalf("run JWT-SVID: %v %+v", err, jwt)
	}

	// The same token on another node: a replay.
	if _, _, err := jobJoin(t, c, "node-3", "gh", token); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("replay on node-3: %v", err)
	}
	// Renewal by certificate is not how a run renews.
	if _, err := api.NewJoinClient(conn).Renew(ctx, &api.RenewRequest{CSR: agentCSR(t, key)}); status.Code(err) != codes.FailedPrecondition ||
		!strings.Contains(err.Error(), "fresh platform token") {
		t.Fatalf("renewal of a job agent: %v", err)
	}
	// A fresh token of the same run, with the same key, renews: same
	// agent, new certificate.
	claims["jti"] = "second-token-of-run"
	again, _, err := jobJoinWith(t, c, "node-2", "gh", iss.Sign(t, claims), key)
	if err != nil || again.AgentID != svid.AgentID {
		t.Fatalf("second token of the run: %v %+v", err, again)
	}
	// Another job of the same workflow run (same claims, its own key) is
	// another agent: ending one does not end the other.
	claims["jti"] = "other-job-of-run"
	sibling, siblingKey, err := jobJoin(t, c, "node-3", "gh", iss.Sign(t, claims))
	if err != nil || sibling.AgentID == svid.AgentID || sibling.SPIFFEID != svid.SPIFFEID {
		t.Fatalf("another job of the run: %v %+v", err, sibling)
	}

	// Run end, with the run's serial: revoked, and the agent is gone.
	// The run's agent now holds the second certificate: the first (the
	// one this connection has) is no longer the agent's, but it is still
	// the run's agent ID, so the run ends.
	if _, err := ac.RunEnd(ctx, &api.RunEndRequest{Serials: []string{leaf.SerialNumber.Text(16)}, ExitCode: 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.AgentShow(ctx, &api.IDRequest{ID: svid.AgentID}); status.Code(err) != codes.NotFound {
		t.Fatalf("job agent after run end: %v", err)
	}
	b, err := admin.BundleShow(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	revoked := false
	for _, r := range b.Bundle.Revoked {
		revoked = revoked || r.Serial == leaf.SerialNumber.Text(16)
	}
	if !revoked {
		t.Fatalf("run SVID %s not revoked at run end", leaf.SerialNumber.Text(16))
	}
	if !auditHas(t, admin, "job.end", svid.AgentID, map[string]string{"exit_code": "3", "revoked": leaf.SerialNumber.Text(16)}) {
		t.Fatal("no job.end audit record")
	}
	// After its run ended the agent gets nothing more.
	if _, err := ac.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: svid.EntryID, Audience: []string{"deploy"}}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("JWT-SVID after run end: %v", err)
	}
	// The sibling job still works, until its rule is deleted: what the
	// rule admitted ends with it.
	scred := writeCred(t, c, "job-sibling", siblingKey, sibling.Chain)
	sconn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf("node-1").API.Listen, CertFile: scred.cert, KeyFile: scred.key, RootFile: c.Trust.RootPath})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sconn.Close() }()
	sac := api.NewAgentClient(sconn)
	if _, err := sac.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: sibling.EntryID, Audience: []string{"deploy"}}); err != nil {
		t.Fatalf("the sibling job after the first ended: %v", err)
	}
	if _, err := admin.JoinRuleDelete(ctx, &api.IDRequest{ID: "gh"}); err != nil {
		t.Fatal(err)
	}
	if _, err := sac.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: sibling.EntryID, Audience: []string{"deploy"}}); status.Code(err) != codes.PermissionDenied ||
		!strings.Contains(err.Error(), "join rule") {
		t.Fatalf("a job of a deleted rule: %v", err)
	}
}

// Every refusal of a job join says why, is counted by class, and changes
// nothing: no agent, no audit record. Each token is a real one from the
// test's issuer (or forged against it).
func TestAttackJobJoinRefusals(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	tr := clustertest.NewTrust(t, "jr", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	admin := c.Admin("node-1")
	if _, err := admin.JoinRuleCreate(ctx, &api.JoinRule{Name: "gh", Preset: "github-actions", Issuer: iss.URL(),
		JWKS: string(iss.JWKS()), TTL: 600, MaxTokenAge: 300,
		Conditions: []api.ClaimCondition{{Claim: "repository", Pattern: "octo-org/*"}, {Claim: "ref", Pattern: "refs/heads/main"}}}); err != nil {
		t.Fatal(err)
	}
	aud := "spiffe://" + c.Trust.TrustDomain.Name()
	now := time.Now()
	gh := func(mod func(map[string]any)) map[string]any {
		cl := jobruletest.GitHubClaims(iss.URL(), aud, now)
		cl["jti"] = rand.Text()
		if mod != nil {
			mod(cl)
		}
		return cl
	}
	other := jobruletest.NewKey(t, "RS256", iss.Current("RS256").KID)
	head := func() uint64 {
		l, err := admin.AuditList(ctx, &api.AuditRequest{Limit: 1, NewestFirst: true})
		if err != nil || len(l.Records) != 1 {
			t.Fatal(err)
		}
		return l.Records[0].Seq
	}
	before := head()
	for _, tc := range []struct {
		name, rule, token, want string
		code                    codes.Code
	}{
		{"unknown rule", "nope", iss.Sign(t, gh(nil)), "no join rule", codes.PermissionDenied},
		{"unknown issuer", "gh", iss.Sign(t, gh(func(m map[string]any) { m["iss"] = "https://evil.example" })), "issuer", codes.PermissionDenied},
		{"bad signature", "gh", jobruletest.SignWithKey(t, other, gh(nil)), "signature", codes.PermissionDenied},
		{"unknown key", "gh", jobruletest.SignWithKey(t, jobruletest.NewKey(t, "RS256", "rogue"), gh(nil)), "unknown-key", codes.PermissionDenied},
		{"alg none", "gh", jobruletest.None(t, iss.Current("RS256").KID, gh(nil)), "algorithm", codes.PermissionDenied},
		{"expired", "gh", iss.Sign(t, gh(func(m map[string]any) {
			m["exp"] = now.Add(-time.Hour).Unix()
			m["iat"] = now.Add(-2 * time.Hour).Unix()
		})), "expired", codes.PermissionDenied},
		{"too old", "gh", iss.Sign(t, gh(func(m map[string]any) { m["iat"] = now.Add(-time.Hour).Unix(); m["nbf"] = now.Add(-time.Hour).Unix() })), "too-old", codes.PermissionDenied},
		{"wrong audience", "gh", iss.Sign(t, gh(func(m map[string]any) { m["aud"] = "sts.amazonaws.com" })), "audience", codes.PermissionDenied},
		{"claim mismatch", "gh", iss.Sign(t, gh(func(m map[string]any) { m["ref"] = "refs/heads/feature" })), "ref", codes.PermissionDenied},
		{"unsafe template value", "gh", iss.Sign(t, gh(func(m map[string]any) { m["repository"] = "octo-org/.." })), "unsafe", codes.PermissionDenied},
		{"oversized token", "gh", strings.Repeat("a", api.MaxJobTokenBytes+1), "at most", codes.InvalidArgument},
		{"garbage", "gh", "not.a.jwt", "malformed", codes.PermissionDenied},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := jobJoin(t, c, "node-1", tc.rule, tc.token)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %v naming %q", err, tc.code, tc.want)
			}
			if strings.Contains(err.Error(), tc.token) && len(tc.token) > 20 {
				t.Fatal("the refusal echoes the token")
			}
		})
	}
	agents, err := admin.AgentList(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if after := head(); len(agents.Agents) != 0 || after != before {
		t.Fatalf("refused joins changed the state: %d agents, audit head %d -> %d", len(agents.Agents), before, after)
	}
	metrics := scrape(t, c, "node-1")
	for _, class := range []string{"job-rule-unknown", "job-wrong-issuer", "job-bad-signature", "job-unknown-key", "job-algorithm",
		"job-expired", "job-too-old", "job-wrong-audience", "job-claim-mismatch", "job-unsafe-value", "job-malformed", "malformed"} {
		if metrics[`sigil_join_refusals_total{class="`+class+`"}`] < 1 {
			t.Errorf("no refusal counted as %s", class)
		}
	}
}

// A GitLab CI job's and a Kubernetes pod's ID tokens map through their
// presets: the identity and the run come from the platform's claims.
func TestJobJoinPresets(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	tr := clustertest.NewTrust(t, "jp", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	admin := c.Admin("node-1")
	td := c.Trust.TrustDomain.Name()
	for _, tc := range []struct {
		preset         string
		claims         map[string]any
		identity, run  string
		auditedClaim   string
		auditedClaimIs string
	}{
		{"gitlab-ci", jobruletest.GitLabClaims(iss.URL(), "spiffe://"+td, time.Now()), "/ci/gitlab/my-group/my-project", "302", "fact.project_path", "my-group/my-project"},
		{"kubernetes", jobruletest.KubernetesClaims(iss.URL(), "spiffe://"+td, time.Now()), "/k8s/ns/ci/sa/builder", "9d2c4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f", "fact.pod", "runner-7d9f"},
	} {
		t.Run(tc.preset, func(t *testing.T) {
			var conds []api.ClaimCondition
			if tc.preset == "gitlab-ci" {
				// gitlab.com signs for every project: the rule pins the group.
				conds = []api.ClaimCondition{{Claim: "namespace_path", Pattern: "my-group"}}
			}
			if _, err := admin.JoinRuleCreate(ctx, &api.JoinRule{Name: tc.preset, Preset: tc.preset, Issuer: iss.URL(),
				IssuerCA: string(iss.CAPEM()), TTL: 300, MaxTokenAge: 300, Conditions: conds}); err != nil {
				t.Fatal(err)
			}
			svid, _, err := jobJoin(t, c, "node-1", tc.preset, iss.Sign(t, tc.claims))
			if err != nil {
				t.Fatal(err)
			}
			if svid.SPIFFEID != "spiffe://"+td+tc.identity || svid.RunID != tc.run ||
				!strings.HasPrefix(svid.AgentID, "spiffe://"+td+"/sigil/agent/job/"+tc.preset+"/"+tc.run+"/") {
				t.Fatalf("joined as %s (run %s, agent %s)", svid.SPIFFEID, svid.RunID, svid.AgentID)
			}
			if !auditHas(t, admin, "job.join", svid.AgentID, map[string]string{tc.auditedClaim: tc.auditedClaimIs}) {
				t.Fatalf("audit record lacks %s=%s", tc.auditedClaim, tc.auditedClaimIs)
			}
		})
	}
	// A join naming no rule is checked against the rules of the token's
	// issuer, by name: the Kubernetes token fails gitlab-ci's and joins
	// by kubernetes.
	k8s := jobruletest.KubernetesClaims(iss.URL(), "spiffe://"+td, time.Now())
	k8s["jti"] = "second-k8s-token"
	svid, _, err := jobJoin(t, c, "node-1", "", iss.Sign(t, k8s))
	if err != nil || svid.SPIFFEID != "spiffe://"+td+"/k8s/ns/ci/sa/builder" {
		t.Fatalf("join without a rule: %v %+v", err, svid)
	}
	// An issuer no rule names: refused as such.
	other := jobruletest.NewIssuer(t)
	if _, _, err := jobJoin(t, c, "node-1", "", other.Sign(t, jobruletest.KubernetesClaims(other.URL(), "spiffe://"+td, time.Now()))); status.Code(err) != codes.PermissionDenied ||
		!strings.Contains(err.Error(), "no join rule for issuer") {
		t.Fatalf("join of an unknown issuer's token: %v", err)
	}
}
