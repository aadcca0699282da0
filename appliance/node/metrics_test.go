package node_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// scrape reads a node's /metrics: series (name with its labels, as the
// text format writes them) to value.
func scrape(t *testing.T, c *clustertest.Cluster, id string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + c.Node(id).HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(string(body)))
	for sc.Scan() {
		l := sc.Text()
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		v, err := strconv.ParseFloat(l[i+1:], 64)
		if err != nil {
			t.Fatalf("%s: %q: %v", id, l, err)
		}
		out[l[:i]] = v
	}
	return out
}

// What an operator watches, each from a real cluster: SVIDs issued and
// refused by type and class, joins by method, a banned agent counted on
// every call and audited once, every sigild metric README names, admin
// changes logged with their target, leader changes, peer reachability as
// each node sees it, expiries, commit failures apart from refusals (and
// counted when quorum is gone), and the log's shape.
func TestMetricsOperator(t *testing.T) {
	ic := newIssuer(t, "obs")
	c := ic.c
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-3")

	// Issued and refused, by type and class.
	res, err := ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{
		{EntryID: web.ID, CSR: csrFor(t, "")},
		{EntryID: "no-such-entry", CSR: csrFor(t, "")},
	}})
	if err != nil || res.Results[0].Error != "" || res.Results[1].Error == "" {
		t.Fatalf("batch: %+v %v", res, err)
	}
	if _, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("JWT without audience: %v", err)
	}
	m := scrape(t, c, "node-3")
	for series, want := range map[string]float64{
		`sigil_svids_issued_total{type="x509"}`:                     1,
		`sigil_svids_issued_total{type="jwt"}`:                      1,
		`sigil_svids_refused_total{class="no-entry",type="x509"}`:   1,
		`sigil_svids_refused_total{class="bad-request",type="jwt"}`: 1,
	} {
		if m[series] != want {
			t.Errorf("node-3 %s = %v, want %v", series, m[series], want)
		}
	}

	// Joins by method, and the agent SVID a join issues; a join with a
	// token nobody created is refused by class.
	joinByToken(t, c, "node-3")
	if _, err := joinWithToken(t, c, "node-3", strings.Repeat("ab", 32)); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("join with an unknown token: %v", err)
	}
	m = scrape(t, c, "node-3")
	for series, want := range map[string]float64{
		`sigil_join_attempts_total{method="token"}`:        2,
		`sigil_svids_issued_total{type="agent"}`:           1,
		`sigil_join_refusals_total{class="token-unknown"}`: 1,
	} {
		if m[series] != want {
			t.Errorf("node-3 %s = %v, want %v", series, m[series], want)
		}
	}

	// A banned agent: every call counted, one audit record for many calls.
	if _, err := c.Admin("node-1").AgentBan(ctx, &api.IDRequest{ID: agentID}); err != nil {
		t.Fatal(err)
	}
	// A call that reaches node-3 before it applied the ban is refused by
	// the state machine at commit (and recorded there): wait for the ban.
	clustertest.Eventually(t, 10*time.Second, "node-3 to apply the ban", func() bool {
		a, _ := c.Node("node-3").State().Agent(agentID)
		return a.Banned
	})
	const calls = 30
	for i := 0; i < calls; i++ {
		if _, err := ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}}); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("banned agent call %d: %v", i, err)
		}
		if _, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}}); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("banned agent JWT call %d: %v", i, err)
		}
	}
	m = scrape(t, c, "node-3")
	if got := m[`sigil_banned_agent_calls_total{request="svid.x509"}`] + m[`sigil_banned_agent_calls_total{request="svid.jwt"}`]; got != 2*calls {
		t.Fatalf("banned agent calls counted: %v, want %d", got, 2*calls)
	}
	if got := m[`sigil_svids_refused_total{class="banned",type="x509"}`]; got != calls {
		t.Fatalf("x509 refusals of class banned: %v, want %d", got, calls)
	}
	var banned int
	for _, a := range []string{"svid.x509.refuse", "svid.jwt.refuse"} {
		for _, r := range auditActions(t, c, "node-1")[a] {
			if r.Detail["agent"] == agentID && strings.HasPrefix(r.Detail["reason"], "agent is banned") {
				banned++
			}
		}
	}
	if banned != 1 {
		t.Fatalf("%d audit records for %d calls of a banned agent, want 1", banned, 2*calls)
	}

	// Commit failures apart from refusals: a duplicate entry is the state
	// machine's refusal, not a failed commit (--force: its parent is
	// banned now, which the node itself refuses before proposing).
	if _, err := c.Admin("node-2").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{ID: web.ID,
		SPIFFEID: "spiffe://example.org/web2", ParentID: agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}, Force: true}); err == nil {
		t.Fatal("an entry with an existing ID was created")
	} else {
		t.Logf("duplicate entry refused: %v", err)
	}
	m = scrape(t, c, "node-2")
	if m[`sigil_raft_apply_errors_total{command="entry.create",kind="refused_by_state"}`] != 1 ||
		m[`sigil_raft_apply_errors_total{command="entry.create",kind="commit_failed"}`] != 0 {
		t.Fatalf("node-2 apply errors: refused %v, failed %v", m[`sigil_raft_apply_errors_total{command="entry.create",kind="refused_by_state"}`],
			m[`sigil_raft_apply_errors_total{command="entry.create",kind="commit_failed"}`])
	}

	// An agent's certificate calling an admin method: refused before the
	// call is read, and counted.
	if _, err := c.Client("node-3", ic.agentCert, ic.agentKey).AuditList(ctx, &api.AuditRequest{Limit: 1}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("an admin call with an agent's certificate: %v", err)
	}
	// The same duplicate through node-3, so that one node's scrape holds
	// every metric README names.
	if _, err := c.Admin("node-3").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{ID: web.ID,
		SPIFFEID: "spiffe://example.org/web2", ParentID: agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}, Force: true}); err == nil {
		t.Fatal("an entry with an existing ID was created")
	}
	testReadmeMetrics(t, c, "node-3")

	// Admin changes are logged with what they changed.
	adminChanges := map[string]string{}
	for _, l := range strings.Split(c.Log.String(), "\n") {
		var rec struct{ Msg, Command, Target, Actor string }
		if json.Unmarshal([]byte(l), &rec) == nil && rec.Msg == "admin change" {
			adminChanges[rec.Command] = rec.Target
		}
	}
	for cmd, want := range map[string]string{
		"entry.create": web.ID + " spiffe://example.org/web",
		"agent.ban":    agentID,
	} {
		if got, ok := adminChanges[cmd]; !ok || got != want {
			t.Errorf("admin change %s logged with target %q (logged: %v), want %q", cmd, got, ok, want)
		}
	}

	// Leader changes, reachability and expiries on every node.
	leader := c.WaitLeader(10 * time.Second)
	for _, id := range c.Running() {
		m := scrape(t, c, id)
		if m["sigil_raft_leader_changes_total"] < 1 {
			t.Errorf("%s: no leader change counted", id)
		}
		for _, g := range []string{"sigil_root_ca_expiry_seconds", "sigil_issuing_ca_expiry_seconds", "sigil_audit_records", "sigil_state_bytes"} {
			if m[g] <= 0 {
				t.Errorf("%s: %s = %v", id, g, m[g])
			}
		}
		want := []string{id, leader}
		if id == leader {
			want = []string{"node-1", "node-2", "node-3"}
		}
		clustertest.Eventually(t, 10*time.Second, id+" to see its peers reachable", func() bool {
			m := scrape(t, c, id)
			for _, p := range want {
				if m[`sigil_raft_peer_reachable{peer="`+p+`"}`] != 1 {
					return false
				}
			}
			return true
		})
	}
	if m := scrape(t, c, "node-3"); m["sigil_jwt_key_expiry_seconds"] <= 0 {
		t.Errorf("node-3 signed a JWT-SVID but its JWT key expiry is %v", m["sigil_jwt_key_expiry_seconds"])
	}

	// A stopped follower: the leader sees it unreachable; the log says
	// why the node stopped.
	gone := follower(c, leader)
	goneAddr := c.Node(gone).RaftAddr()
	c.Stop(gone)
	stopped := time.Now()
	clustertest.Eventually(t, 15*time.Second, "the leader to see "+gone+" unreachable", func() bool {
		return scrape(t, c, leader)[`sigil_raft_peer_reachable{peer="`+gone+`"}`] == 0
	})
	// Keep the peer down a little longer, then count the leader's raft
	// lines about it: each message at most once per 10 s window.
	time.Sleep(3 * time.Second)
	logs := c.Log.String()
	windows := int(time.Since(stopped)/(10*time.Second)) + 1
	perMsg := map[string]int{}
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, `"component":"raft"`) && strings.Contains(l, `"node":"`+leader+`"`) && strings.Contains(l, goneAddr) {
			var rec struct {
				Time       time.Time
				Msg, Level string
			}
			if err := json.Unmarshal([]byte(l), &rec); err == nil && rec.Level != "DEBUG" && !rec.Time.Before(stopped) {
				perMsg[rec.Msg]++
			}
		}
	}
	for msg, n := range perMsg {
		if n > windows {
			t.Errorf("leader logged %q about the stopped peer %d times in %d windows", msg, n, windows)
		}
	}
	t.Logf("leader's raft lines about the stopped peer: %v", perMsg)
	// Every line is JSON with no key twice; raft's own lines carry their
	// fields as attributes.
	raftLines := 0
	for _, l := range strings.Split(strings.TrimSpace(logs), "\n") {
		if dup := duplicateKey(l); dup != "" {
			t.Fatalf("key %q twice in %s", dup, l)
		}
		if strings.Contains(l, `"component":"raft"`) && strings.Contains(l, `"peer":`) {
			raftLines++
		}
		if strings.Contains(l, `"line":`) {
			t.Fatalf("a raft line as a formatted string: %s", l)
		}
	}
	if !strings.Contains(logs, `"msg":"sigild stopped","node":"`+gone+`","reason":"stop requested"`) {
		t.Fatal("no sigild stopped line with its reason")
	}
	t.Logf("%d raft lines with a peer field", raftLines)

	// The cluster's failure, apart from refusals: with two of three nodes
	// stopped, a write on the last one cannot commit.
	// (An unban: entry writes read through a barrier first, and that
	// fails before anything is proposed.)
	failed := `sigil_raft_apply_errors_total{command="agent.unban",kind="commit_failed"}`
	before := scrape(t, c, leader)[failed]
	c.Stop(follower(c, leader))
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := c.Admin(leader).AgentUnban(wctx, &api.IDRequest{ID: agentID}); err == nil {
		t.Fatal("a write committed on one node of three")
	}
	clustertest.Eventually(t, 10*time.Second, leader+" to count the failed commit", func() bool {
		return scrape(t, c, leader)[failed] > before
	})
}

// joinWithToken asks node to admit an agent by token.
func joinWithToken(t *testing.T, c *clustertest.Cluster, node, token string) (*api.AgentSVID, error) {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(node).API.Listen, RootFile: c.Trust.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return api.NewJoinClient(conn).Token(context.Background(), &api.JoinTokenRequest{Token: token, CSR: agentCSR(t, key)})
}

// testReadmeMetrics: every sigild metric README's "Operations: what to
// watch" table names is in a scrape of node's /metrics.
func testReadmeMetrics(t *testing.T, c *clustertest.Cluster, node string) {
	t.Helper()
	names := clustertest.ReadmeMetrics(t, "../../README.md", "sigild", func(n string) bool {
		// The OIDC listener's counter needs the listener (and a request):
		// TestOIDCFederation checks it. The federation series need a
		// relationship and a fetch by the leader: TestFederationBothWays
		// and TestFederationFetchFailures check them.
		return strings.HasPrefix(n, "sigil_") && !strings.HasPrefix(n, "sigil_agent_") && n != "sigil_oidc_requests_total" &&
			!strings.HasPrefix(n, "sigil_federation_")
	})
	if len(names) < 20 {
		t.Fatalf("only %d sigild metrics found in README's table: %v", len(names), names)
	}
	scraped := map[string]bool{}
	for series := range scrape(t, c, node) {
		name, _, _ := strings.Cut(series, "{")
		scraped[strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")] = true
	}
	for _, n := range names {
		if !scraped[n] {
			t.Errorf("README names %s; %s's /metrics has no such series", n, node)
		}
	}
}

// duplicateKey is a top-level key that appears twice in a JSON object
// line ("" if none).
func duplicateKey(line string) string {
	dec := json.NewDecoder(strings.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return ""
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		k, _ := tok.(string)
		if seen[k] {
			return k
		}
		seen[k] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}
