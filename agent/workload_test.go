package agent_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/inspect"
	"github.com/sigil-appliance/sigil/agent/output"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// helperEnv makes the test binary act as a workload (TestWorkloadHelper)
// when the tests run it as another user.
const helperEnv = "SIGIL_WORKLOAD_HELPER"

// TestWorkloadHelper is not a test: it is the workload process the tests
// start under other uids. It talks to the agent only through go-spiffe.
func TestWorkloadHelper(t *testing.T) {
	role := os.Getenv(helperEnv)
	if role == "" {
		t.Skip("run as a child workload only")
	}
	limit := 60 * time.Second
	if strings.HasPrefix(role, "mtls-") {
		limit = 10 * time.Minute // rotation_test.go: until the test kills it
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	if strings.HasPrefix(role, "mtls-") {
		fmt.Println(role, mtlsRun(ctx, role)) // rotation_test.go
		return
	}
	if strings.HasPrefix(role, "attack-") {
		fmt.Println(role, attackRun(ctx, role)) // workload_attack_test.go
		return
	}
	fmt.Println(role, workloadRun(ctx, role))
}

func workloadRun(ctx context.Context, role string) string {
	client, err := workloadapi.New(ctx) // SPIFFE_ENDPOINT_SOCKET
	if err != nil {
		return "ERR " + err.Error()
	}
	defer func() { _ = client.Close() }()
	switch role {
	case "fetch":
		svids, err := client.FetchX509SVIDs(ctx)
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		var ids []string
		for _, s := range svids {
			ids = append(ids, s.ID.String()+"#"+s.Hint)
		}
		return "OK " + strings.Join(ids, ",")
	case "inspect":
		var buf strings.Builder
		// No socket option: the address comes from SPIFFE_ENDPOINT_SOCKET.
		if err := inspect.Run(ctx, inspect.Options{Audience: []string{"svc-i"}}, "/nonexistent.sock", &buf); err != nil {
			return "ERR " + err.Error()
		}
		return "OK " + strings.ReplaceAll(buf.String(), "\n", "|")
	case "bundles":
		_, err := client.FetchJWTBundles(ctx)
		return "CODE " + status.Code(err).String()
	case "server":
		peer := spiffeid.RequireFromString(os.Getenv("SIGIL_PEER"))
		l, err := spiffetls.Listen(ctx, "tcp", "127.0.0.1:0", tlsconfig.AuthorizeID(peer))
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = l.Close() }()
		fmt.Println("LISTEN", l.Addr().String())
		c, err := l.Accept()
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = c.Close() }()
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "ERR read: " + err.Error()
		}
		id, _ := spiffetls.PeerIDFromConn(c)
		if _, err := fmt.Fprintf(c, "hello %s\n", id); err != nil {
			return "ERR write: " + err.Error()
		}
		return "SERVED " + id.String() + " " + strings.TrimSpace(line)
	case "fed-server", "fed-client":
		return federatedRun(ctx, client, role) // federation_test.go
	case "client":
		server := spiffeid.RequireFromString(os.Getenv("SIGIL_PEER"))
		c, err := spiffetls.Dial(ctx, "tcp", os.Getenv("SIGIL_ADDR"), tlsconfig.AuthorizeID(server))
		if err != nil {
			return "ERR dial: " + err.Error()
		}
		defer func() { _ = c.Close() }()
		if _, err := fmt.Fprintln(c, "ping"); err != nil {
			return "ERR write: " + err.Error()
		}
		reply, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "ERR reply: " + err.Error()
		}
		jwt, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "svc-a"})
		if err != nil {
			return "ERR jwt: " + err.Error()
		}
		return "REPLY " + strings.TrimSpace(reply) + " JWT " + jwt.Marshal()
	}
	return "ERR unknown role"
}

// workloadDir is a directory other uids can reach: the agent socket and a
// copy of this test binary (the workloads' executable) live there.
type workloadDir struct {
	dir, socket, bin, binSum string
}

func newWorkloadDir(t testing.TB) *workloadDir {
	t.Helper()
	dir, err := os.MkdirTemp("", "sigil-wl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "workload")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return &workloadDir{dir: dir, socket: filepath.Join(dir, "run", "agent.sock"), bin: bin, binSum: hex.EncodeToString(sum[:])}
}

// start runs the workload binary as uid (gid = uid) in role.
func (w *workloadDir) start(t *testing.T, uid int, role string, env ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(w.bin, "-test.run=^TestWorkloadHelper$")
	cmd.Env = append([]string{helperEnv + "=" + role, "SPIFFE_ENDPOINT_SOCKET=unix://" + w.socket, "PATH=/usr/bin:/bin", "TMPDIR=/tmp"}, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}, Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Best effort: it may have exited already, and Wait reports the kill.
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return cmd, bufio.NewScanner(out)
}

// result runs role as uid and returns its result line.
func (w *workloadDir) result(t *testing.T, uid int, role string, env ...string) string {
	t.Helper()
	_, sc := w.start(t, uid, role, env...)
	return expectLine(t, sc, role+" ")
}

func expectLine(t *testing.T, sc *bufio.Scanner, prefix string) string {
	t.Helper()
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, prefix) {
			return strings.TrimPrefix(l, prefix)
		}
	}
	t.Fatalf("workload ended without a %q line", prefix)
	return ""
}

type agentEnv struct {
	c      *clustertest.Cluster
	tr     *clustertest.Trust
	a      *agent.Agent
	w      *workloadDir
	cfg    agent.Config
	id     string
	td     string
	cancel context.CancelFunc
	done   chan error
}

// newAgentEnv starts a one-node appliance, an swtpm, and an agent joined
// by TPM attestation and serving the Workload API.
func newAgentEnv(t testing.TB, prefix string, mod func(*agent.Config)) *agentEnv {
	t.Helper()
	return newAgentEnvWith(t, prefix, nil, mod)
}

// newAgentEnvWith is newAgentEnv with a hook on the node's config.
func newAgentEnvWith(t testing.TB, prefix string, nodeMod func(*node.Config), mod func(*agent.Config)) *agentEnv {
	t.Helper()
	return newAgentEnvOn(t, clustertest.NewTrust(t, prefix, []string{"node-1"}, nil), nodeMod, mod)
}

// newAgentEnvOn is newAgentEnvWith on the trust material tr (its node-1).
func newAgentEnvOn(t testing.TB, tr *clustertest.Trust, nodeMod func(*node.Config), mod func(*agent.Config)) *agentEnv {
	t.Helper()
	c := clustertest.NewClusterWith(t, tr, nodeMod, "node-1")
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	clustertest.TrustEKCAs(t, c.Admin("node-1"), sw.EKCARoot, sw.EKCAIssuer)
	w := newWorkloadDir(t)
	cfg := agent.Config{
		Servers: []string{c.ConfigOf("node-1").API.Listen}, RootCert: tr.RootPath, DataDir: t.TempDir(), TPM: sw.Socket,
		WorkloadAPI:  agent.WorkloadAPIConfig{Socket: w.socket},
		HealthListen: clustertest.FreePort(t),
	}
	if mod != nil {
		mod(&cfg)
	}
	log := slog.New(slog.NewJSONHandler(c.Log, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	e := &agentEnv{c: c, tr: tr, a: a, w: w, cfg: cfg, id: a.SVID().ID, td: "spiffe://" + spiffeid.RequireFromString(a.SVID().ID).TrustDomain().Name(), cancel: cancel, done: make(chan error, 1)}
	go func() { e.done <- a.Serve(sctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-e.done:
			if err != nil {
				t.Errorf("agent Serve: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop")
		}
		_ = a.Close() // test cleanup
		if _, err := os.Stat(w.socket); err == nil {
			_ = os.Remove(w.socket) // best effort: the directory's cleanup removes it anyway
		}
	})
	clustertest.Eventually(t, 10*time.Second, "socket up", func() bool { _, err := os.Stat(w.socket); return err == nil })
	return e
}

func (e *agentEnv) entry(t testing.TB, path string, ttl int64, hint string, sel ...string) *api.Entry {
	t.Helper()
	r := &api.EntryRequest{Entry: api.Entry{SPIFFEID: e.td + path, ParentID: e.id, Hint: hint, X509TTL: api.Seconds(ttl)}}
	for _, s := range sel {
		typ, val, _ := strings.Cut(s, ":")
		r.Entry.Selectors = append(r.Entry.Selectors, api.Selector{Type: typ, Value: val})
	}
	en, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryCreate(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	return en
}

func (e *agentEnv) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+e.w.socket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func metric(t *testing.T, addr, name string) string {
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
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return v
		}
	}
	t.Fatalf("metric %s missing", name)
	return ""
}

// The end-to-end path: two workloads under different uids get
// different SVIDs from one agent and authenticate each other with
// spiffetls; a JWT-SVID of one validates through the agent and through
// the JWT bundle; callers without an entry and requests without the
// security header are refused; a rotation reaches an open stream; with the
// appliance stopped, a new connection still gets its cached SVID, and the
// agent reconnects on its own when the appliance returns.
func TestWorkloadAPI(t *testing.T) {
	var outDir string
	e := newAgentEnv(t, "wl", func(c *agent.Config) {
		outDir = filepath.Join(os.TempDir(), fmt.Sprintf("sigil-out-%d", time.Now().UnixNano()))
		c.Outputs = []output.Config{{Dir: outDir, Selectors: []string{"unix:uid:1001"}, UID: 1001, GID: 1001, JWTAudiences: []string{"svc-x"}}}
	})
	t.Cleanup(func() { _ = os.RemoveAll(outDir) })
	ctx := context.Background()
	rootEntry := e.entry(t, "/test/root", 60, "", "unix:uid:0")
	e.entry(t, "/wl/a", 0, "internal", "unix:uid:1001", "unix:sha256:"+e.w.binSum)
	e.entry(t, "/wl/a-ext", 0, "external", "unix:uid:1001")
	e.entry(t, "/wl/b", 0, "", "unix:uid:1002", "unix:path:"+e.w.bin)

	// A stream opened now must see the scheduled rotation (60 s SVID,
	// rotated at 27-30 s) later in this test.
	conn, err := grpc.NewClient("unix://"+e.w.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	wc := workload.NewSpiffeWorkloadAPIClient(conn)
	sctx, scancel := context.WithCancel(metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true"))
	defer scancel()
	stream, err := wc.FetchX509SVID(sctx, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	serials := make(chan string, 16)
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				close(serials)
				return
			}
			s, err := x509svid.ParseRaw(r.Svids[0].X509Svid, r.Svids[0].X509SvidKey)
			if err == nil {
				serials <- s.Certificates[0].SerialNumber.Text(16)
			}
		}
	}()
	var first string
	select {
	case first = <-serials:
	case <-time.After(20 * time.Second):
		t.Fatal("no X.509-SVID on the open stream")
	}

	t.Run("no security header", func(t *testing.T) {
		s, err := wc.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err == nil {
			_, err = s.Recv()
		}
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("without the header: %v", err)
		}
		if _, err := wc.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}}); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("JWT without the header: %v", err)
		}
	})

	t.Run("root verifies its SVID against the bundle", func(t *testing.T) {
		x, err := e.client(t).FetchX509Context(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(x.SVIDs) != 1 || x.SVIDs[0].ID.String() != rootEntry.SPIFFEID {
			t.Fatalf("root got %+v", x.SVIDs)
		}
		if _, _, err := x509svid.Verify(x.SVIDs[0].Certificates, x.Bundles); err != nil {
			t.Fatal(err)
		}
	})

	var jwt string
	t.Run("two uids, mutual TLS by ID", func(t *testing.T) {
		if got := e.w.result(t, 1001, "fetch"); got != "OK "+e.td+"/wl/a#internal,"+e.td+"/wl/a-ext#external" {
			t.Fatalf("uid 1001 got %q", got)
		}
		_, srv := e.w.start(t, 1001, "server", "SIGIL_PEER="+e.td+"/wl/b")
		addr := expectLine(t, srv, "LISTEN ")
		got := e.w.result(t, 1002, "client", "SIGIL_PEER="+e.td+"/wl/a", "SIGIL_ADDR="+addr)
		want := "REPLY hello " + e.td + "/wl/b JWT "
		if !strings.HasPrefix(got, want) {
			t.Fatalf("client: %q", got)
		}
		jwt = strings.TrimPrefix(got, want)
		if s := expectLine(t, srv, "server "); s != "SERVED "+e.td+"/wl/b ping" {
			t.Fatalf("server: %q", s)
		}
	})

	t.Run("JWT-SVID validates through the agent and the bundle", func(t *testing.T) {
		if jwt == "" {
			t.Skip("no token from the previous subtest")
		}
		c := e.client(t)
		s, err := c.ValidateJWTSVID(ctx, jwt, "svc-a")
		if err != nil || s.ID.String() != e.td+"/wl/b" {
			t.Fatalf("ValidateJWTSVID: %v %v", s, err)
		}
		if _, err := c.ValidateJWTSVID(ctx, jwt, "svc-other"); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("wrong audience: %v", err)
		}
		bundles, err := c.FetchJWTBundles(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s, err := jwtsvid.ParseAndValidate(jwt, bundles, []string{"svc-a"}); err != nil || s.ID.String() != e.td+"/wl/b" {
			t.Fatalf("through the bundle: %v %v", s, err)
		}
		forged := jwt[:len(jwt)-4] + "AAAA"
		if _, err := c.ValidateJWTSVID(ctx, forged, "svc-a"); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("forged signature: %v", err)
		}
	})

	t.Run("caller with no entry is refused", func(t *testing.T) {
		if got := e.w.result(t, 1003, "fetch"); got != "ERR PermissionDenied" {
			t.Fatalf("uid 1003: %q", got)
		}
		if got := e.w.result(t, 1003, "bundles"); got != "CODE PermissionDenied" {
			t.Fatalf("uid 1003 bundles: %q", got)
		}
		logs := e.c.Log.String()
		if !strings.Contains(logs, `"reason":"no registration entry matches the caller's selectors"`) || !strings.Contains(logs, `"unix:uid:1003"`) {
			t.Fatal("the agent log does not say why the caller was refused")
		}
	})

	t.Run("inspect", func(t *testing.T) {
		got := e.w.result(t, 1002, "inspect")
		for _, want := range []string{"OK X.509-SVIDs from unix://" + e.w.socket + ": 1", e.td + "/wl/b (default)", "chain[1]", "X.509 bundle example.org: 1 authorities", "JWT bundle example.org", "JWT-SVID " + e.td + "/wl/b aud=[svc-i]"} {
			if !strings.Contains(got, want) {
				t.Fatalf("inspect output lacks %q:\n%s", want, strings.ReplaceAll(got, "|", "\n"))
			}
		}
		if got := e.w.result(t, 1003, "inspect"); !strings.HasPrefix(got, "ERR ") || !strings.Contains(got, "PermissionDenied") {
			t.Fatalf("inspect for a caller with no entry: %q", got)
		}
	})

	t.Run("file output", func(t *testing.T) {
		key := filepath.Join(outDir, "svid_key.pem")
		clustertest.Eventually(t, 10*time.Second, "output files", func() bool {
			_, err := os.Stat(filepath.Join(outDir, "jwt_svid.token"))
			return err == nil
		})
		st, err := os.Stat(key)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 || st.Sys().(*syscall.Stat_t).Uid != 1001 {
			t.Fatalf("key file mode %v uid %d", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Uid)
		}
		s, err := x509svid.Load(filepath.Join(outDir, "svid.pem"), key)
		// The output's selectors have no unix:sha256, so only the entry
		// without one matches.
		if err != nil || s.ID.String() != e.td+"/wl/a-ext" {
			t.Fatalf("svid.pem: %v %v", s, err)
		}
		tok, _ := os.ReadFile(filepath.Join(outDir, "jwt_svid.token"))
		if v, err := e.client(t).ValidateJWTSVID(ctx, string(tok), "svc-x"); err != nil || v.ID.String() != e.td+"/wl/a-ext" {
			t.Fatalf("jwt_svid.token: %v", err)
		}
		before := s.Certificates[0].SerialNumber
		e.a.Cache().Rotate()
		clustertest.Eventually(t, 10*time.Second, "output re-written on rotation", func() bool {
			s2, err := x509svid.Load(filepath.Join(outDir, "svid.pem"), key)
			return err == nil && s2.Certificates[0].SerialNumber.Cmp(before) != 0
		})
		ents, _ := os.ReadDir(outDir)
		for _, f := range ents {
			if strings.HasPrefix(f.Name(), ".") {
				t.Fatalf("temporary file left behind: %s", f.Name())
			}
		}
	})

	t.Run("metrics", func(t *testing.T) {
		if v := metric(t, e.cfg.HealthListen, "sigil_agent_appliance_connected"); v != "1" {
			t.Fatalf("connected %s", v)
		}
		if v := metric(t, e.cfg.HealthListen, "sigil_agent_workload_denied_total"); v == "0" {
			t.Fatal("denials not counted")
		}
		if v := metric(t, e.cfg.HealthListen, "sigil_agent_cache_svids"); v != "4" {
			t.Fatalf("cache svids %s", v)
		}
	})

	t.Run("a rotation reaches the open stream", func(t *testing.T) {
		// The forced rotation above already sent one; the scheduled one
		// comes at half the 60 s lifetime.
		deadline := time.After(45 * time.Second)
		seen := map[string]bool{first: true}
		for len(seen) < 3 {
			select {
			case s, ok := <-serials:
				if !ok {
					t.Fatal("stream ended")
				}
				seen[s] = true
			case <-deadline:
				t.Fatalf("rotations seen on the stream: %d", len(seen)-1)
			}
		}
	})

	t.Run("appliance down: cached SVIDs, then reconnection", func(t *testing.T) {
		x, _ := e.client(t).FetchX509Context(ctx)
		cached := x.SVIDs[0].Certificates[0].SerialNumber
		e.c.StopAll()
		clustertest.Eventually(t, 10*time.Second, "agent notices", func() bool { return !e.a.Cache().Stats.Connected.Load() })
		x, err := e.client(t).FetchX509Context(ctx)
		if err != nil || x.SVIDs[0].Certificates[0].SerialNumber.Cmp(cached) != 0 {
			t.Fatalf("with the appliance down: %v", err)
		}
		if got := e.w.result(t, 1002, "fetch"); got != "OK "+e.td+"/wl/b#" {
			t.Fatalf("uid 1002 with the appliance down: %q", got)
		}
		e.c.Start("node-1")
		e.entry(t, "/test/root-2", 0, "", "unix:uid:0")
		clustertest.Eventually(t, 45*time.Second, "agent reconnected and got the new entry", func() bool {
			svids, err := e.client(t).FetchX509SVIDs(ctx)
			return err == nil && len(svids) == 2
		})
	})
}

// A noisy caller runs into its own limits, answered Unavailable (the code
// the Workload Endpoint spec gives; go-spiffe's client retries it with
// backoff); another uid is still served.
func TestWorkloadAPILimits(t *testing.T) {
	e := newAgentEnv(t, "wlim", func(c *agent.Config) {
		c.WorkloadAPI.Limits.StreamsPerCaller = 3
		c.WorkloadAPI.Limits.RequestsPerSecond = 2
		c.WorkloadAPI.Limits.Burst = 8
	})
	e.entry(t, "/test/root", 0, "", "unix:uid:0")
	e.entry(t, "/wl/b", 0, "", "unix:uid:1002")
	ctx, cancel := context.WithCancel(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"))
	defer cancel()
	conn, err := grpc.NewClient("unix://"+e.w.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	wc := workload.NewSpiffeWorkloadAPIClient(conn)
	var open []grpc.ServerStreamingClient[workload.X509SVIDResponse]
	var codesSeen []codes.Code
	var mu sync.Mutex
	for range 3 {
		s, err := wc.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
		if err == nil {
			_, err = s.Recv()
		}
		if err != nil {
			t.Fatalf("stream within the limit: %v", err)
		}
		open = append(open, s)
	}
	s, err := wc.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("fourth stream: %v, want Unavailable", err)
	}
	for range 12 {
		_, err := wc.ValidateJWTSVID(ctx, &workload.ValidateJWTSVIDRequest{})
		mu.Lock()
		codesSeen = append(codesSeen, status.Code(err))
		mu.Unlock()
	}
	limited := 0
	for _, c := range codesSeen {
		if c == codes.Unavailable {
			limited++
		}
	}
	if limited == 0 {
		t.Fatalf("a burst over the rate was not limited: %v", codesSeen)
	}
	if got := e.w.result(t, 1002, "fetch"); got != "OK "+e.td+"/wl/b#" {
		t.Fatalf("another uid starved: %q", got)
	}
	_ = open
}
