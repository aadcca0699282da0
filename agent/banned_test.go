package agent_test

import (
	"context"
	"io"
	"net/http"
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
