package agent_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// mtlsRun is the workload pair of TestRootRotationEndToEnd, with nothing
// but go-spiffe and its agent's socket: mtls-server accepts mutual TLS
// from SIGIL_PEER and answers each line; mtls-client dials SIGIL_ADDR
// every 100 ms authorizing SIGIL_PEER, one exchange per connection, until
// the file SIGIL_STOP exists. Both print a line for every failed handshake at once,
// and a line whenever the root their own SVID or the peer's chains to
// changes (ROOT self|peer <issuer CN of the issuing CA>).
func mtlsRun(ctx context.Context, role string) string {
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		return "ERR source: " + err.Error()
	}
	defer func() { _ = source.Close() }()
	peer := spiffeid.RequireFromString(os.Getenv("SIGIL_PEER"))
	var mu sync.Mutex
	roots := map[string]string{}
	note := func(who string, chain []*x509.Certificate) {
		if len(chain) < 2 {
			return
		}
		cn := chain[1].Issuer.CommonName
		mu.Lock()
		defer mu.Unlock()
		if roots[who] != cn {
			roots[who] = cn
			fmt.Printf("ROOT %s %s\n", who, cn)
		}
	}
	self := func() {
		if s, err := source.GetX509SVID(); err == nil {
			note("self", s.Certificates)
		}
	}
	switch role {
	case "mtls-server":
		l, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0", spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(peer), source))
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = l.Close() }()
		fmt.Println("LISTEN", l.Addr().String())
		for {
			c, err := l.Accept()
			if err != nil {
				return "ERR accept: " + err.Error()
			}
			go func(c net.Conn) {
				defer func() { _ = c.Close() }()
				self()
				line, err := bufio.NewReader(c).ReadString('\n')
				if err != nil {
					fmt.Println("FAIL server:", err)
					return
				}
				if tc, ok := c.(interface{ ConnectionState() tls.ConnectionState }); ok {
					note("peer", tc.ConnectionState().PeerCertificates)
				}
				_, _ = fmt.Fprintf(c, "pong %s", line) // a lost answer shows as the client's failure
			}(c)
		}
	case "mtls-client":
		ok, failed := 0, 0
		for i := 0; ; i++ {
			if _, err := os.Stat(os.Getenv("SIGIL_STOP")); err == nil {
				return fmt.Sprintf("RESULT ok=%d failed=%d", ok, failed)
			}
			select {
			case <-ctx.Done():
				return fmt.Sprintf("RESULT ok=%d failed=%d (timed out)", ok, failed)
			case <-time.After(100 * time.Millisecond):
			}
			err := func() error {
				dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				c, err := spiffetls.DialWithMode(dctx, "tcp", os.Getenv("SIGIL_ADDR"), spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(peer), source))
				if err != nil {
					return err
				}
				defer func() { _ = c.Close() }()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := fmt.Fprintf(c, "ping %d\n", i); err != nil {
					return err
				}
				if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
					return err
				}
				if tc, ok := c.(interface{ ConnectionState() tls.ConnectionState }); ok {
					note("peer", tc.ConnectionState().PeerCertificates)
				}
				self()
				return nil
			}()
			if err != nil {
				failed++
				fmt.Println("FAIL client:", err)
				continue
			}
			ok++
			if ok%50 == 0 {
				fmt.Println("OK", ok)
			}
		}
	}
	return "ERR unknown role"
}

// TestRootRotationEndToEnd is issue #18's whole rotation on three nodes
// with a TPM-joined agent configured with the old root only, and two
// workloads (go-spiffe, their own uids) doing mutual TLS every 100 ms
// throughout: add (the agent learns the new root over Sync and
// acknowledges it), stage on every node, switch, a retire refused while
// the old root's SVIDs may be valid, then retire when they cannot be.
// No handshake fails and no SVID is refused; the workloads' SVIDs move to
// the new root; after retire the bundle, the agent's trusted roots, the
// node CA records and every chain served (workloads', the agent's, each
// node's TLS) hold nothing of the old root.
func TestRootRotationEndToEnd(t *testing.T) {
	nodes := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "rre", nodes, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		// Short lifetimes so that retire is allowed within the test: the
		// longest is 60 s (entries and admin certificates), plus 60 s.
		cfg.Join.AgentSVIDTTL = node.Duration{Duration: 30 * time.Second}
		cfg.API.AdminCertMaxTTL = node.Duration{Duration: time.Minute}
		cfg.Bundle.RefreshHint = node.Duration{Duration: time.Second}
	}, nodes...)
	admin := func() *api.AdminClient { return c.LocalAdmin(c.WaitLeader(10 * time.Second)) }
	ctx := context.Background()

	sw := testenv.NewTPM(t)
	clustertest.TrustEKCAs(t, admin(), sw.EKCARoot, sw.EKCAIssuer)
	w := newWorkloadDir(t)
	var servers []string
	for _, id := range nodes {
		servers = append(servers, c.ConfigOf(id).API.Listen)
	}
	cfg := agent.Config{Servers: servers, RootCert: tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: w.socket}, HealthListen: clustertest.FreePort(t)}
	a, err := agent.New(ctx, cfg, slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- a.Serve(sctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-served:
			if err != nil {
				t.Errorf("agent Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop")
		}
		_ = a.Close() // test cleanup
	})
	clustertest.Eventually(t, 10*time.Second, "socket up", func() bool { _, err := os.Stat(w.socket); return err == nil })
	agentID := a.SVID().ID
	td := "spiffe://" + tr.TrustDomain.Name()
	for _, e := range []struct {
		path string
		uid  int
	}{{"/rot/server", 1001}, {"/rot/client", 1002}} {
		if _, err := admin().EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: td + e.path, ParentID: agentID,
			Selectors: []api.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", e.uid)}}, X509TTL: 60, JWTTTL: 30}}); err != nil {
			t.Fatal(err)
		}
	}

	// The pair.
	_, srvOut := w.start(t, 1001, "mtls-server", "SIGIL_PEER="+td+"/rot/client")
	lines := make(chan string, 1024)
	addr := expectLine(t, srvOut, "LISTEN ")
	go func() {
		for srvOut.Scan() {
			lines <- "server " + srvOut.Text()
		}
	}()
	stopFile := filepath.Join(w.dir, "stop")
	_, cliOut := w.start(t, 1002, "mtls-client", "SIGIL_PEER="+td+"/rot/server", "SIGIL_ADDR="+addr, "SIGIL_STOP="+stopFile)
	result := make(chan string, 1)
	go func() {
		for cliOut.Scan() {
			l := cliOut.Text()
			if r, ok := strings.CutPrefix(l, "mtls-client "); ok {
				result <- r
				return
			}
			lines <- "client " + l
		}
		result <- "ended without a result"
	}()
	var mu sync.Mutex
	var seen []string
	go func() {
		for l := range lines {
			mu.Lock()
			seen = append(seen, l)
			mu.Unlock()
		}
	}()
	has := func(sub string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range seen {
			if strings.Contains(l, sub) {
				return true
			}
		}
		return false
	}
	hasLine := func(line string) bool {
		mu.Lock()
		defer mu.Unlock()
		for _, l := range seen {
			if l == line {
				return true
			}
		}
		return false
	}
	exchanges := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, l := range seen {
			if v, ok := strings.CutPrefix(l, "client OK "); ok {
				n, _ = strconv.Atoi(v)
			}
		}
		return n
	}
	clustertest.Eventually(t, 30*time.Second, "the pair's first 50 exchanges", func() bool { return exchanges() >= 50 })
	if !hasLine("client ROOT self Test Root root") || hasLine("client ROOT self Test Root root2") {
		t.Fatal("the pair does not start under the old root")
	}
	status := func() *api.RootRotationStatus {
		t.Helper()
		st, err := admin().RootRotation(ctx, &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	phase := func(p string) *api.RootRotationStatus {
		t.Helper()
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		st, err := admin().RootRotate(rctx, &api.RootRotateRequest{Phase: p, Root: rootPEMIf(t, p, newRootPath)})
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		t.Logf("%s committed at bundle sequence %d after %d exchanges", p, st.Sequence, exchanges())
		return st
	}

	// Add: the agent, configured with the old root only, learns the new
	// one over Sync, keeps it and acknowledges it.
	phase("add")
	clustertest.Eventually(t, 30*time.Second, "the agent to acknowledge the add", func() bool { return status().AgentsPendingCount == 0 })
	if kept := a.Cache().Roots(); len(kept) != 2 {
		t.Fatalf("the agent trusts %d roots after the add, want 2", len(kept))
	}
	for _, id := range nodes {
		path, _ := tr.SignIssuingBy(t, id, "2y", "root2", newRootPath)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if r, err := c.LocalAdmin(id).NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: b}); err != nil || !r.Staged {
			t.Fatalf("stage on %s: %+v %v", id, r, err)
		}
	}
	time.Sleep(time.Second) // the bundle refresh hint since the add

	// Switch: the workloads move to the new root at their next renewal.
	st := phase("switch")
	switchSeq := st.Sequence
	clustertest.Eventually(t, 90*time.Second, "both workloads' SVIDs and their peers' under the new root", func() bool {
		return hasLine("client ROOT self Test Root root2") && hasLine("server ROOT self Test Root root2") &&
			hasLine("client ROOT peer Test Root root2") && hasLine("server ROOT peer Test Root root2")
	})
	clustertest.Eventually(t, 60*time.Second, "the agent's own SVID under the new root", func() bool {
		s := a.SVID()
		return len(s.Chain) > 1 && s.Chain[1].CheckSignatureFrom(newRoot) == nil
	})
	if _, err := admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "retire"}); err == nil || !strings.Contains(err.Error(), "may be valid until") {
		t.Fatalf("retire right after the switch: %v", err)
	}
	clustertest.Eventually(t, 30*time.Second, "the agent to acknowledge the switch", func() bool {
		st := status()
		return st.AgentsPendingCount == 0 && st.Sequence == switchSeq && len(st.NodesNotStaged) == 0
	})
	wait := time.Until(status().RetireAfter)
	if wait > 3*time.Minute {
		t.Fatalf("retire allowed only in %s: the lifetimes configured here are 60 s at most", wait)
	}
	t.Logf("waiting %s for the old root's last SVID to expire", wait.Round(time.Second))
	time.Sleep(wait + time.Second)

	// Retire, not forced.
	phase("retire")
	clustertest.Eventually(t, 30*time.Second, "the agent to trust the new root only", func() bool {
		r := a.Cache().Roots()
		return len(r) == 1 && r[0].Equal(newRoot)
	})
	before := exchanges()
	clustertest.Eventually(t, 30*time.Second, "50 more exchanges after retire", func() bool { return exchanges() >= before+50 })
	if err := os.WriteFile(stopFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var res string
	select {
	case res = <-result:
	case <-time.After(30 * time.Second):
		t.Fatal("the client did not stop")
	}
	t.Logf("client: %s", res)
	if !strings.HasSuffix(res, "failed=0") || has("FAIL") {
		mu.Lock()
		for _, l := range seen {
			if strings.Contains(l, "FAIL") {
				t.Log(l)
			}
		}
		mu.Unlock()
		t.Fatalf("handshakes failed during the rotation: %s", res)
	}

	// Nothing refers to the old root: the bundle, the node CA records,
	// the agent's and the workloads' chains, each node's TLS chain.
	oldFP := fp(tr.Root)
	for _, id := range nodes {
		for _, d := range c.Node(id).State().Bundle().Roots {
			if sum := fpDER(d); sum == oldFP {
				t.Fatalf("%s's bundle still holds the old root", id)
			}
		}
		for _, r := range c.Node(id).State().NodeCAs() {
			if r.Root != fp(newRoot) {
				t.Fatalf("%s: node CA record %+v not under the new root", id, r)
			}
		}
		conn, err := tls.Dial("tcp", c.ConfigOf(id).API.Listen, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // the chain is checked below
		if err != nil {
			t.Fatal(err)
		}
		chain := conn.ConnectionState().PeerCertificates
		_ = conn.Close()
		if len(chain) < 2 || chain[len(chain)-1].CheckSignatureFrom(newRoot) != nil {
			t.Fatalf("%s serves a TLS chain not under the new root", id)
		}
		// A node that could not commit in time (class "unavailable": a
		// slow disk on a loaded machine) is retried by the agent and is no
		// verdict on the rotation; every other refusal is.
		refused := sumMetric(t, c.ConfigOf(id).HTTP.Listen, "sigil_svids_refused_total", `class="unavailable"`)
		if refused != 0 {
			t.Errorf("%s refused %v SVIDs during the rotation", id, refused)
		}
	}
	if s := a.SVID(); s.Chain[1].CheckSignatureFrom(newRoot) != nil {
		t.Fatal("the agent's SVID is not under the new root")
	}
}

func rootPEMIf(t *testing.T, phase, path string) []byte {
	t.Helper()
	if phase != "add" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fp(c *x509.Certificate) string { return fpDER(c.Raw) }

func fpDER(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// sumMetric adds every series of a metric on a /metrics endpoint but
// those whose labels hold except.
func sumMetric(t *testing.T, addr, name, except string) float64 {
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
	total := 0.0
	for line := range strings.SplitSeq(string(b), "\n") {
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		if v != 0 {
			t.Logf("%s: %s", addr, line) // the labels say which class, when a check on the total fails
		}
		if except != "" && strings.Contains(line, except) {
			continue
		}
		total += v
	}
	return total
}
