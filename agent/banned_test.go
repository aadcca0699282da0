package agent_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// A banned agent says so on /healthz, /readyz and /metrics, in the
// appliance's words, and stops saying it once unbanned.
func TestBannedAgentHealth(t *testing.T) {
	e := newAgentEnv(t, "agban", nil)
	ctx := context.Background()
	probe := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + e.cfg.HealthListen + path)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}
	clustertest.Eventually(t, 15*time.Second, "agent ready", func() bool { c, _ := probe("/readyz"); return c == http.StatusOK })
	if v := metric(t, e.cfg.HealthListen, "sigil_agent_banned"); v != "0" {
		t.Fatalf("sigil_agent_banned %s before the ban", v)
	}
	testReadmeAgentMetrics(t, e.cfg.HealthListen)

	leader := e.c.WaitLeader(10 * time.Second)
	if _, err := e.c.Admin(leader).AgentBan(ctx, &api.IDRequest{ID: e.id}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "agent to report the ban", func() bool {
		return metric(t, e.cfg.HealthListen, "sigil_agent_banned") == "1"
	})
	for _, p := range []string{"/healthz", "/readyz"} {
		code, body := probe(p)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "agent is banned by the appliance") || !strings.Contains(body, "banned") {
			t.Fatalf("%s of a banned agent: %d %q", p, code, body)
		}
	}
	if !strings.Contains(e.c.Log.String(), "the appliance refuses this agent: it is banned") {
		t.Fatal("the agent log does not say it is banned")
	}

	// Its renewals are refused, each counted on the appliance, and
	// audited once.
	const renewals = 5
	for i := 0; i < renewals; i++ {
		if err := e.a.Renew(ctx); err == nil || !strings.Contains(err.Error(), "banned") {
			t.Fatalf("renewal %d of a banned agent: %v", i, err)
		}
	}
	if v := nodeMetric(t, e.c.Node("node-1").HTTPAddr(), `sigil_banned_agent_calls_total{request="join.renew"}`); v != strconv.Itoa(renewals) {
		t.Fatalf("banned renewals counted: %s, want %d", v, renewals)
	}
	recs, err := e.c.Admin(leader).AuditList(ctx, &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	audited := 0
	for _, r := range recs.Records {
		if r.Action == "join.renew.refuse" && r.Target == e.id {
			audited++
		}
	}
	if audited != 1 {
		t.Fatalf("%d audit records for %d renewals of a banned agent, want 1", audited, renewals)
	}

	if _, err := e.c.Admin(leader).AgentUnban(ctx, &api.IDRequest{ID: e.id}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, "agent to clear the ban", func() bool {
		c, _ := probe("/readyz")
		return c == http.StatusOK && metric(t, e.cfg.HealthListen, "sigil_agent_banned") == "0"
	})
	if code, body := probe("/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz after the unban: %d %q", code, body)
	}
}

// nodeMetric is one series of a node's /metrics, as the text format
// writes it (name with its labels).
func nodeMetric(t *testing.T, addr, series string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v
		}
	}
	return "0"
}
