package ctl_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/ctl"
)

// The operator commands of issue #20 against a real three-node cluster:
// the PCR policy shown, join tokens listed and revoked (a revoked token no
// longer joins), agents removed (refused while entries name them as parent
// unless --force; a removed agent no longer renews).
func TestSigilctlOperatorCommands(t *testing.T) {
	tr := clustertest.NewTrust(t, "ops", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	c.WaitLeader(30 * time.Second)
	dir := t.TempDir()
	run, must, stderr := cli(t)
	key, cert := filepath.Join(dir, "op.key"), filepath.Join(dir, "op.pem")
	must("--socket", c.ConfigOf("node-1").API.LocalSocket, "admin", "issue", "--name", "op", "--key-out", key, "--cert-out", cert)
	creds := []string{"--cert", cert, "--key", key, "--root", tr.RootPath}
	with := func(args ...string) []string {
		return append(append([]string{"--server", c.ConfigOf("node-2").API.Listen}, creds...), args...)
	}

	// PCR policy: none, then the values set, numerically ordered.
	if out := must(with("tpm", "pcr", "show")...); !strings.Contains(out, "no PCR policy") {
		t.Fatalf("pcr show without a policy: %s", out)
	}
	d0, d10 := strings.Repeat("ab", 32), strings.Repeat("CD", 32)
	must(with("tpm", "pcr", "set", "10="+d10, "0="+d0)...)
	out := must(with("tpm", "pcr", "show")...)
	if !regexp.MustCompile(`(?s)0\s+sha256\s+` + d0 + `.*10\s+sha256\s+` + strings.ToLower(d10)).MatchString(out) {
		t.Fatalf("pcr show:\n%s", out)
	}
	var pol struct {
		Policy *api.PCRPolicy `json:"policy"`
	}
	if err := json.Unmarshal([]byte(must(with("-o", "json", "tpm", "pcr", "show")...)), &pol); err != nil || pol.Policy == nil || len(pol.Policy.PCRs) != 2 {
		t.Fatalf("pcr show json: %v %+v", err, pol)
	}

	// Tokens: listed by ID, never the token itself.
	var leaked, good api.TokenResponse
	for _, tok := range []*api.TokenResponse{&leaked, &good} {
		if err := json.Unmarshal([]byte(must(with("-o", "json", "token", "create", "--ttl", "1h")...)), tok); err != nil || tok.Token == "" {
			t.Fatalf("token create: %v", err)
		}
	}
	out = must(with("token", "list")...)
	if strings.Contains(out, leaked.Token) || strings.Contains(out, good.Token) {
		t.Fatalf("token list shows a token:\n%s", out)
	}
	if !regexp.MustCompile(leaked.ID[:12] + `\s+\S+\s+spiffe://example.org/sigil/admin/op\s+\S+\s+unused`).MatchString(out) {
		t.Fatalf("token list lacks the unused token %s:\n%s", leaked.ID[:12], out)
	}
	if _, err := run(with("token", "revoke", "abc")...); err == nil || !strings.Contains(err.Error(), "at least its first 12 hex digits") {
		t.Fatalf("revoke by a short prefix: %v", err)
	}
	if _, err := run(with("token", "revoke", strings.Repeat("0", 64))...); err == nil || !strings.Contains(err.Error(), "no join token") {
		t.Fatalf("revoke of an unknown token: %v", err)
	}
	if out := must(with("token", "revoke", leaked.ID[:12])...); !strings.Contains(out, "revoked join token "+leaked.ID) {
		t.Fatalf("token revoke: %s", out)
	}
	if _, err := run(with("token", "revoke", leaked.ID)...); err == nil || !strings.Contains(err.Error(), "already revoked") {
		t.Fatalf("second revoke: %v", err)
	}
	if out := must(with("token", "list")...); !regexp.MustCompile(leaked.ID[:12] + `.*revoked \S+ by spiffe://example.org/sigil/admin/op`).MatchString(out) {
		t.Fatalf("token list after revoke:\n%s", out)
	}
	// The revoked token joins on no node (node-3 applied the revocation
	// through raft); the good one does.
	agentKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if _, err := joinWithToken(t, c.ConfigOf("node-3").API.Listen, tr.RootPath, leaked.Token, agentKey); err == nil ||
		!strings.Contains(err.Error(), "join token "+leaked.ID[:12]+" was revoked") || strings.Contains(err.Error(), "admin/op") {
		// The holder of a leaked token learns it was revoked, not by whom.
		t.Fatalf("join with a revoked token: %v", err)
	}
	svid, err := joinWithToken(t, c.ConfigOf("node-3").API.Listen, tr.RootPath, good.Token, agentKey)
	if err != nil {
		t.Fatal(err)
	}
	if out := must(with("token", "list")...); !regexp.MustCompile(good.ID[:12] + `.*used \S+ by ` + regexp.QuoteMeta(svid.AgentID)).MatchString(out) {
		t.Fatalf("token list after the join:\n%s", out)
	}
	if _, err := run(with("token", "revoke", good.ID)...); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("revoke of a used token: %v", err)
	}
	if out := must(with("audit", "list")...); !regexp.MustCompile(`admin/op\s+token.revoke\s+` + leaked.ID[:12]).MatchString(out) {
		t.Fatalf("token revoke not audited:\n%s", out)
	}

	// The agent renews while it is known.
	renewed, err := renewAgent(t, c.ConfigOf("node-1").API.Listen, tr.RootPath, svid, agentKey)
	if err != nil {
		t.Fatalf("renewal of a known agent: %v", err)
	}

	// Last seen, as each node saw it: node-1 renewed the agent, node-2
	// has not heard from it; an open sync stream to node-2 shows it
	// connected there, and once closed (the agent stopped), when it was.
	seenBy := func(node string) string {
		t.Helper()
		return must(append(append([]string{"--server", c.ConfigOf(node).API.Listen}, creds...), "agent", "list")...)
	}
	row := regexp.QuoteMeta(svid.AgentID) + `\s+join_token\s+\S+\s+false\s+`
	if out := seenBy("node-1"); !regexp.MustCompile(`LAST SEEN \(BY node-1\)`).MatchString(out) || !regexp.MustCompile(row+`\d+s ago`).MatchString(out) {
		t.Fatalf("agent list on node-1 after its renewal there:\n%s", out)
	}
	if out := seenBy("node-2"); !regexp.MustCompile(row + `not seen`).MatchString(out) {
		t.Fatalf("agent list on node-2, which the agent never called:\n%s", out)
	}
	closeSync := openSync(t, c.ConfigOf("node-2").API.Listen, tr.RootPath, renewed, agentKey)
	if out := seenBy("node-2"); !regexp.MustCompile(row + `connected`).MatchString(out) {
		t.Fatalf("agent list on node-2 while the agent syncs there:\n%s", out)
	}
	closeSync()
	clustertest.Eventually(t, 10*time.Second, "the closed sync stream to end", func() bool {
		return regexp.MustCompile(row + `\d+s ago`).MatchString(seenBy("node-2"))
	})
	var shown api.Agent
	if err := json.Unmarshal([]byte(must(with("-o", "json", "agent", "show", svid.AgentID)...)), &shown); err != nil ||
		shown.SeenBy != "node-2" || shown.Connected || time.Since(shown.LastSeen) > time.Minute {
		t.Fatalf("agent show json: %v %+v", err, shown)
	}

	// Agent remove: refused while an entry names the agent as parent.
	var e api.Entry
	if err := json.Unmarshal([]byte(must(with("-o", "json", "entry", "create", "--spiffe-id", "spiffe://example.org/db",
		"--parent-id", svid.AgentID, "--selector", "unix:uid:70")...)), &e); err != nil {
		t.Fatal(err)
	}
	if _, err := run(with("agent", "remove", svid.AgentID)...); err == nil || !strings.Contains(err.Error(), "parent of 1 entries ("+e.ID+")") {
		t.Fatalf("remove of a parent agent: %v", err)
	}
	// As the shell sees it: a refusal, exit 1, naming how many entries.
	wantExit(t, with("agent", "remove", svid.AgentID), 1, "parent of 1 entries ("+e.ID+")")
	if out := must(with("agent", "list")...); !strings.Contains(out, svid.AgentID) {
		t.Fatalf("a refused remove removed the agent:\n%s", out)
	}
	out = must(with("agent", "remove", "--force", svid.AgentID)...)
	if !strings.Contains(out, "removed "+svid.AgentID) || !strings.Contains(out, "kept 1 entries parented to it: "+e.ID) {
		t.Fatalf("agent remove --force: %s", out)
	}
	if out := must(with("agent", "list")...); strings.Contains(out, svid.AgentID) {
		t.Fatalf("agent list after remove:\n%s", out)
	}
	if _, err := run(with("agent", "show", svid.AgentID)...); err == nil || !strings.Contains(err.Error(), "no agent") {
		t.Fatalf("agent show after remove: %v", err)
	}
	if out := must(with("entry", "show", e.ID)...); !strings.Contains(out, svid.AgentID) {
		t.Fatalf("the kept entry:\n%s", out)
	}
	if _, err := run(with("agent", "remove", svid.AgentID)...); err == nil || !strings.Contains(err.Error(), "no agent") {
		t.Fatalf("second remove: %v", err)
	}
	// Its certificate no longer renews.
	if _, err := renewAgent(t, c.ConfigOf("node-1").API.Listen, tr.RootPath, renewed, agentKey); err == nil {
		t.Fatal("a removed agent renewed its certificate")
	} else if !strings.Contains(err.Error(), "unknown") {
		t.Fatalf("renewal of a removed agent: %v", err)
	}
	if out := must(with("audit", "list")...); !regexp.MustCompile(`admin/op\s+agent.remove\s+` + regexp.QuoteMeta(svid.AgentID)).MatchString(out) {
		t.Fatalf("agent remove not audited:\n%s", out)
	}
	// Its certificate stays valid until it expires and it may keep asking
	// for SVIDs: every call is refused, and the replicated audit gets one
	// record for the agent per period, not one per call.
	countRefusals := func() int {
		var l api.AuditList
		if err := json.Unmarshal([]byte(must(with("-o", "json", "audit", "list", "--limit", "10000")...)), &l); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, r := range l.Records {
			if strings.HasSuffix(r.Action, ".refuse") && r.Detail["agent"] == svid.AgentID {
				n++
			}
		}
		return n
	}
	before := countRefusals()
	if calls := removedAgentCalls(t, c.ConfigOf("node-1").API.Listen, tr.RootPath, renewed, agentKey, 20); calls != 20 {
		t.Fatalf("%d of 20 calls of a removed agent were refused", calls)
	}
	if n := countRefusals() - before; n > 1 {
		t.Fatalf("20 refused calls of a removed agent wrote %d audit records, want at most 1", n)
	}

	testAuditFilters(t, must, stderr, with, leaked.ID[:12], svid.AgentID)

	// JWT key rotation: the node asked (node-2) rotates its own key, the
	// bundle another node serves lists it, the audit log names the admin.
	out = must(with("jwt", "rotate")...)
	m := regexp.MustCompile(`^node node-2 rotated its JWT signing key: kid (node-2-[0-9a-f]{24})\n$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("jwt rotate: %q", out)
	}
	var rot api.JWTKeyRotated
	if err := json.Unmarshal([]byte(must(with("-o", "json", "jwt", "rotate")...)), &rot); err != nil || rot.Node != "node-2" ||
		!strings.HasPrefix(rot.KID, "node-2-") || rot.KID == m[1] {
		t.Fatalf("jwt rotate json: %v %+v", err, rot)
	}
	if out := must(append(append([]string{"--server", c.ConfigOf("node-3").API.Listen}, creds...), "bundle", "show")...); !strings.Contains(out, `"kid":"`+m[1]+`"`) ||
		!strings.Contains(out, `"kid":"`+rot.KID+`"`) {
		t.Fatalf("bundle show on node-3 lacks node-2's new keys %s, %s:\n%s", m[1], rot.KID, out)
	}
	if out := must(with("audit", "list", "--action", "bundle.jwt.rotate")...); !regexp.MustCompile(`admin/op\s+bundle.jwt.rotate\s+`+m[1]).MatchString(out) ||
		!strings.Contains(out, rot.KID) {
		t.Fatalf("jwt rotate not audited:\n%s", out)
	}

	// --server lists nodes: a node that cannot be reached is skipped with
	// a note, a node's answer (here a refusal) is the answer.
	c.Stop("node-1")
	c.WaitLeader(30 * time.Second)
	list := c.ConfigOf("node-1").API.Listen + "," + c.ConfigOf("node-3").API.Listen
	out = must(append(append([]string{"--server", list}, creds...), "token", "list")...)
	if !strings.Contains(out, good.ID[:12]) || !strings.Contains(stderr.String(), "node "+c.ConfigOf("node-1").API.Listen+" unreachable") {
		t.Fatalf("token list with the first node down:\n%s\nstderr: %s", out, stderr)
	}
	t.Setenv("SIGIL_SERVER", list)
	if _, err := run(append(creds, "token", "revoke", strings.Repeat("0", 64))...); err == nil || !strings.Contains(err.Error(), "no join token") {
		t.Fatalf("an application error through $SIGIL_SERVER with the first node down: %v", err)
	}
	// A refusal is not a connection failure: node-2, listed first and up,
	// answers and node-3 is not asked.
	if _, err := run(append(append([]string{"--server", c.ConfigOf("node-2").API.Listen + "," + c.ConfigOf("node-3").API.Listen}, creds...),
		"agent", "remove", "spiffe://example.org/sigil/agent/nope")...); err == nil || !strings.Contains(err.Error(), "no agent") || strings.Contains(stderr.String(), "unreachable") {
		t.Fatalf("a refusal with two live nodes: %v (stderr %s)", err, stderr)
	}
	if _, err := run(append(append([]string{"--server", c.ConfigOf("node-1").API.Listen + ",127.0.0.1:1"}, creds...), "token", "list")...); err == nil ||
		!strings.Contains(err.Error(), "cannot connect to any of the 2 nodes") {
		t.Fatalf("every node down: %v", err)
	}
	if _, err := run(append(append([]string{"--server", "node-9"}, creds...), "token", "list")...); err == nil || !strings.Contains(err.Error(), "not host:port") {
		t.Fatalf("a bad address: %v", err)
	}
	// Exit codes as the operator's shell sees them: 0, 1 for a refusal or
	// no node, 2 for a wrong command line.
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"--server", list, "token", "list"}, 0, ""},
		{[]string{"--server", list, "token", "revoke", strings.Repeat("0", 64)}, 1, "no join token"},
		{[]string{"--server", c.ConfigOf("node-1").API.Listen, "token", "list"}, 1, "cannot connect to node " + c.ConfigOf("node-1").API.Listen},
		{[]string{"--server", "node-9", "token", "list"}, 2, "not host:port"},
		{[]string{"--server", list, "token", "revoke"}, 2, "accepts 1 arg"},
		{[]string{"--server", list, "agent", "remove", "spiffe://example.org/sigil/agent/nope"}, 1, "no agent"},
		{[]string{"--server", list, "tpm", "pcr", "show", "extra-arg"}, 2, `tpm pcr show: takes no arguments (got "extra-arg")`},
		// audit list's filters: each mistake named.
		{[]string{"--server", list, "audit", "list", "--since", "yesterday"}, 2, `--since "yesterday": want an RFC 3339 time`},
		{[]string{"--server", list, "audit", "list", "--until", "-1h"}, 2, `--until "-1h": want an RFC 3339 time`},
		{[]string{"--server", list, "audit", "list", "--all", "--actor", "x"}, 2, "--all pages an unfiltered list"},
		{[]string{"--server", list, "audit", "list", "--before", "3"}, 2, "--before applies with --newest-first"},
		{[]string{"--server", list, "audit", "list", "--since", "1h ago", "--until", "2h ago"}, 2, "is before --since"},
	} {
		wantExit(t, append(tc.args[:len(tc.args):len(tc.args)], creds...), tc.code, tc.msg)
	}
}

// wantExit runs sigilctl as its main does and checks the exit code and
// that stderr carries msg.
func wantExit(t *testing.T, args []string, code int, msg string) {
	t.Helper()
	var out, errOut bytes.Buffer
	if got := ctl.Run(context.Background(), args, &out, &errOut); got != code || !strings.Contains(errOut.String(), msg) {
		t.Errorf("sigilctl %v: exit %d, want %d with %q; stderr: %s", args, got, code, msg, errOut.String())
	}
}

func joinWithToken(t *testing.T, addr, root, token string, key *ecdsa.PrivateKey) (*api.AgentSVID, error) {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: root, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return api.NewJoinClient(conn).Token(ctx, &api.JoinTokenRequest{Token: token, CSR: csrFor(t, key)})
}

func renewAgent(t *testing.T, addr, root string, svid *api.AgentSVID, key *ecdsa.PrivateKey) (*api.AgentSVID, error) {
	t.Helper()
	cert := &tls.Certificate{Certificate: svid.Chain, PrivateKey: key}
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: root, Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return api.NewJoinClient(conn).Renew(ctx, &api.RenewRequest{CSR: csrFor(t, key)})
}

// removedAgentCalls asks for a JWT-SVID n times with an agent's
// certificate and returns how many were refused as from an unknown agent.
func removedAgentCalls(t *testing.T, addr, root string, svid *api.AgentSVID, key *ecdsa.PrivateKey, n int) int {
	t.Helper()
	cert := &tls.Certificate{Certificate: svid.Chain, PrivateKey: key}
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: root, Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	refused := 0
	for i := 0; i < n; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := api.NewAgentClient(conn).SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: "any", Audience: []string{"x"}})
		cancel()
		if err != nil && strings.Contains(err.Error(), "unknown agent") {
			refused++
		} else {
			t.Logf("call %d of a removed agent: %v", i, err)
		}
	}
	return refused
}

func csrFor(t *testing.T, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

// testAuditFilters: audit list selects by actor, action, target and time,
// newest first, and says where to go on when it stops at --limit.
func testAuditFilters(t *testing.T, must mustFunc, stderr *bytes.Buffer, with func(...string) []string, revoked, agent string) {
	t.Helper()
	list := func(args ...string) []api.AuditRecord {
		t.Helper()
		var l api.AuditList
		if err := json.Unmarshal([]byte(must(with(append([]string{"-o", "json", "audit", "list"}, args...)...)...)), &l); err != nil {
			t.Fatalf("audit list %v: %v", args, err)
		}
		return l.Records
	}
	actions := func(recs []api.AuditRecord) string {
		var a []string
		for _, r := range recs {
			a = append(a, r.Action)
		}
		return strings.Join(a, ",")
	}
	all := list()
	if r := list("--action", "token.revoke"); len(r) != 1 || r[0].Target != revoked {
		t.Fatalf("--action token.revoke: %+v", r)
	}
	if out := must(with("audit", "list", "--action", "token.revoke")...); !regexp.MustCompile(`admin/op\s+token.revoke\s+`+revoked).MatchString(out) ||
		strings.Count(out, "\n") != 2 {
		t.Fatalf("--action token.revoke, as a table:\n%s", out)
	}
	tokens := list("--action", "token.*", "--newest-first")
	if got := actions(tokens); got != "token.use,token.revoke,token.create,token.create" {
		t.Fatalf("--action 'token.*' --newest-first: %s", got)
	}
	for i := 1; i < len(tokens); i++ {
		if tokens[i].Seq >= tokens[i-1].Seq {
			t.Fatalf("--newest-first not descending: %d after %d", tokens[i].Seq, tokens[i-1].Seq)
		}
	}
	if r := list("--actor", "spiffe://example.org/sigil/admin/op", "--target", agent); actions(r) != "entry.create,agent.remove" && actions(r) != "agent.remove" {
		// entry.create's target is the entry's SPIFFE ID, not its parent.
		t.Fatalf("--actor op --target %s: %s", agent, actions(r))
	}
	if r := list("--actor", "spiffe://example.org/sigil/node/*", "--action", "agent.upsert"); len(r) != 2 || r[0].Target != agent {
		t.Fatalf("--actor node/* --action agent.upsert (the join and the renewal): %+v", r)
	}
	if r := list("--since", "1h"); len(r) != len(all) {
		t.Fatalf("--since 1h: %d records of %d", len(r), len(all))
	}
	if r := list("--until", "1h ago"); len(r) != 0 {
		t.Fatalf("--until '1h ago': %d records", len(r))
	}
	if r := list("--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339)); len(r) != 0 {
		t.Fatalf("--since in an hour: %d records", len(r))
	}
	mid := all[len(all)/2].Time.Format(time.RFC3339Nano)
	if r := list("--until", mid); len(r) == 0 || len(r) >= len(all) || r[len(r)-1].Time.After(all[len(all)/2].Time) {
		t.Fatalf("--until %s: %d records of %d", mid, len(r), len(all))
	}
	// Capped: the note says where to go on, and going on finds the rest.
	first := list("--action", "token.*", "--limit", "2")
	note := regexp.MustCompile(`go on with --after (\d+)`).FindStringSubmatch(stderr.String())
	if actions(first) != "token.create,token.create" || note == nil {
		t.Fatalf("--limit 2: %s, stderr %s", actions(first), stderr)
	}
	if rest := list("--action", "token.*", "--after", note[1]); actions(rest) != "token.revoke,token.use" {
		t.Fatalf("--after %s: %s", note[1], actions(rest))
	}
	newest := list("--action", "token.*", "--newest-first", "--limit", "1")
	note = regexp.MustCompile(`go on with --newest-first --before (\d+)`).FindStringSubmatch(stderr.String())
	if actions(newest) != "token.use" || note == nil {
		t.Fatalf("--newest-first --limit 1: %s, stderr %s", actions(newest), stderr)
	}
	if rest := list("--action", "token.*", "--newest-first", "--before", note[1]); actions(rest) != "token.revoke,token.create,token.create" {
		t.Fatalf("--newest-first --before %s: %s", note[1], actions(rest))
	}
	// Its mistakes (exit 2 with the reason) are rows of the exit code
	// table at the end of TestSigilctlOperatorCommands.
}

// openSync opens an agent's sync stream and waits for its first update;
// the function returned closes it.
func openSync(t *testing.T, addr, root string, svid *api.AgentSVID, key *ecdsa.PrivateKey) func() {
	t.Helper()
	cert := &tls.Certificate{Certificate: svid.Chain, PrivateKey: key}
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: root, Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := api.NewAgentClient(conn).Sync(ctx, &api.SyncRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if err != nil {
		cancel()
		_ = conn.Close()
		t.Fatalf("sync: %v", err)
	}
	return func() {
		cancel()
		_ = conn.Close()
	}
}
