//go:build faults

package faults_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.yaml.in/yaml/v3"

	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

var ids = []string{"node-1", "node-2", "node-3"}

type proc struct {
	id, ns, cfg, api, http string
	cmd                    *exec.Cmd
	done                   chan struct{}
}

func (p *proc) running() bool {
	if p.done == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

type suite struct {
	t     *testing.T
	w     *netw
	dir   string
	bin   string
	tr    *clustertest.Trust
	nodes map[string]*proc
	admin map[string]*api.AdminClient
	creds [2]string // admin cert, key
	table [][3]string
	// tmpfs is node-1's data directory, a small tmpfs for the disk test.
	tmpfs string

	// the issuance load: an agent identity (token-joined, software key)
	// in this process, and one connection per node.
	agentID string
	loadEnt string
	agents  map[string]*api.AgentClient
}

func (s *suite) row(scenario, what, value string) {
	s.table = append(s.table, [3]string{scenario, what, value})
	s.t.Logf("%s: %s = %s", scenario, what, value)
}

func build(t *testing.T, dir string) string {
	out, err := exec.Command("go", "build", "-o", dir+"/", "../cmd/sigild", "../cmd/sigil-agent").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return dir
}

func newSuite(t *testing.T) *suite {
	if os.Getuid() != 0 {
		t.Fatal("the fault suite needs root (network namespaces, tmpfs)")
	}
	s := &suite{t: t, dir: t.TempDir(), nodes: map[string]*proc{}, admin: map[string]*api.AdminClient{}, agents: map[string]*api.AgentClient{}}
	s.bin = build(t, filepath.Join(s.dir, "bin"))
	s.w = newNet(t, len(ids))
	s.tr = clustertest.NewTrust(t, "faults", ids, nil)
	c := &clustertest.Cluster{T: t, Trust: s.tr, Dir: s.dir}

	s.tmpfs = filepath.Join(s.dir, "node-1")
	os.MkdirAll(s.tmpfs, 0o700)
	sh(t, "mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "sigil-faults", s.tmpfs)
	t.Cleanup(func() { exec.Command("umount", "-l", s.tmpfs).Run() })

	for k, id := range ids {
		cfg := c.Config(id)
		n := k + 1
		m := map[string]any{
			"node-id": id, "trust-domain": cfg.TrustDomain, "data-dir": filepath.Join(s.dir, id),
			"issuing-key": cfg.IssuingKey, "issuing-cert": cfg.IssuingCert, "root-certs": cfg.RootCerts,
			"cluster": map[string]any{"bind": fmt.Sprintf("%s%d:7300", clusterNet, n),
				"heartbeat-timeout": "500ms", "election-timeout": "500ms"},
			"api":    map[string]any{"listen": fmt.Sprintf("%s%d:7400", apiNet, n), "local-socket": filepath.Join(s.dir, id+"-admin.sock")},
			"http":   map[string]any{"listen": fmt.Sprintf("%s%d:7600", apiNet, n)},
			"bundle": map[string]any{"listen": fmt.Sprintf("%s%d:7500", apiNet, n)},
			"log":    map[string]any{"level": "info", "format": "json"},
		}
		if n == 1 {
			m["cluster"].(map[string]any)["bootstrap"] = true
		} else {
			m["cluster"].(map[string]any)["join"] = []string{clusterNet + "1:7300"}
		}
		b, _ := yaml.Marshal(m)
		p := filepath.Join(s.dir, id+".yaml")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		s.nodes[id] = &proc{id: id, ns: s.w.spaces[k], cfg: p, api: fmt.Sprintf("%s%d:7400", apiNet, n), http: fmt.Sprintf("%s%d:7600", apiNet, n)}
	}
	t.Cleanup(s.stopAll)
	for _, id := range ids {
		s.start(id)
	}
	ks := pkcs11.New(pkcs11.Options{})
	cert := clustertest.ClientCert(t, s.tr.Authority(t, ks, "node-1"), "/sigil/admin/faults")
	ks.Close()
	s.creds[0], s.creds[1] = clustertest.WriteCredential(t, s.dir, "faults", cert)
	for _, id := range ids {
		conn, err := api.Dial(api.DialConfig{Addr: s.nodes[id].api, CertFile: s.creds[0], KeyFile: s.creds[1], RootFile: s.tr.RootPath})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		s.admin[id] = api.NewAdminClient(conn)
	}
	s.leader("")
	for _, id := range ids {
		s.ready(id)
	}
	s.joinLoadAgent()
	return s
}

func (s *suite) start(id string) {
	p := s.nodes[id]
	cmd := exec.Command("ip", "netns", "exec", p.ns, filepath.Join(s.bin, "sigild"), "--config", p.cfg)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+os.Getenv("SOFTHSM2_CONF"))
	logf, _ := os.OpenFile(filepath.Join(s.dir, id+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	p.cmd, p.done = cmd, make(chan struct{})
	done := p.done
	go func() { cmd.Wait(); logf.Close(); close(done) }()
}

// ready waits for node id's /readyz.
func (s *suite) ready(id string) {
	clustertest.Eventually(s.t, 60*time.Second, id+" ready", func() bool {
		r, err := http.Get("http://" + s.nodes[id].http + "/readyz")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	})
}

func (s *suite) kill(id string, sig syscall.Signal) {
	p := s.nodes[id]
	if !p.running() {
		return
	}
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (s *suite) stopAll() {
	for _, id := range ids {
		s.kill(id, syscall.SIGTERM)
	}
}

// leader waits for a leader other than exclude that sees three voters.
func (s *suite) leader(exclude string) string { return clustertest.LeaderVia(s.t, s.admin, exclude) }

func (s *suite) joinLoadAgent() {
	ctx := context.Background()
	tok, err := s.admin["node-2"].TokenCreate(ctx, &api.TokenRequest{TTL: 3600})
	if err != nil {
		s.t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	conn, err := api.Dial(api.DialConfig{Addr: s.nodes["node-2"].api, RootFile: s.tr.RootPath, Anonymous: true})
	if err != nil {
		s.t.Fatal(err)
	}
	svid, err := join.Token(ctx, api.NewJoinClient(conn), tok.Token, key)
	conn.Close()
	if err != nil {
		s.t.Fatal(err)
	}
	s.agentID = svid.ID
	for _, id := range ids {
		conn, err := api.Dial(api.DialConfig{Addr: s.nodes[id].api, RootFile: s.tr.RootPath,
			Certificate: func() (*tls.Certificate, error) { return svid.TLSCertificate(), nil }})
		if err != nil {
			s.t.Fatal(err)
		}
		s.t.Cleanup(func() { conn.Close() })
		s.agents[id] = api.NewAgentClient(conn)
	}
	e, err := s.admin["node-2"].EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/faults/load",
		ParentID: s.agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}})
	if err != nil {
		s.t.Fatal(err)
	}
	s.loadEnt = e.ID
}

// issue asks node id for one workload SVID; true when a chain came back.
func (s *suite) issue(id string, timeout time.Duration) bool {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://example.org/faults/load")
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, k)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	r, err := s.agents[id].SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: s.loadEnt, CSR: csr}}})
	return err == nil && len(r.Results) == 1 && r.Results[0].Error == "" && len(r.Results[0].Chain) > 0
}

// write creates an entry through node id; its ID when acknowledged.
func (s *suite) write(id, name string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	e, err := s.admin[id].EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: "spiffe://example.org/faults/" + name, ParentID: s.agentID,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:" + name}}}})
	if err != nil {
		return "", err
	}
	return e.ID, nil
}

// holds waits until node id has every acknowledged entry and an intact
// audit chain; it returns how many were missing at the deadline.
func (s *suite) holds(id string, acked []string, within time.Duration) int {
	missing := len(acked)
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		l, err := s.admin[id].EntryList(ctx, &api.EntryListRequest{})
		cancel()
		if err == nil {
			have := map[string]bool{}
			for _, e := range l.Entries {
				have[e.ID] = true
			}
			missing = 0
			for _, a := range acked {
				if !have[a] {
					missing++
				}
			}
			if missing == 0 {
				return 0
			}
		}
		time.Sleep(250 * time.Millisecond)
	}
	return missing
}

func (s *suite) auditIntact(id string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v, err := s.admin[id].AuditVerify(ctx, &api.Empty{})
	return err == nil && v.Intact
}

// load runs writers and an issuer against the live nodes until stop.
type load struct {
	mu       sync.Mutex
	acked    []string
	failed   int
	issued   []time.Time
	issueErr int
	stop     chan struct{}
	wg       sync.WaitGroup
}

func (s *suite) startLoad(prefix string, targets func() []string) *load {
	l := &load{stop: make(chan struct{})}
	var seq atomic.Int64
	for w := 0; w < 3; w++ {
		l.loop(w, targets, func(target string) {
			id, err := s.write(target, fmt.Sprintf("%s-%d", prefix, seq.Add(1)))
			l.mu.Lock()
			defer l.mu.Unlock()
			if err == nil {
				l.acked = append(l.acked, id)
			} else {
				l.failed++
			}
		})
	}
	l.loop(0, targets, func(target string) {
		ok := s.issue(target, 2*time.Second)
		l.mu.Lock()
		defer l.mu.Unlock()
		if ok {
			l.issued = append(l.issued, time.Now())
		} else {
			l.issueErr++
		}
	})
	return l
}

// loop calls op on the current targets in turn, from offset, until stop.
func (l *load) loop(offset int, targets func() []string, op func(target string)) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for i := offset; ; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			ts := targets()
			if len(ts) == 0 {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			op(ts[i%len(ts)])
		}
	}()
}

func (l *load) end() {
	close(l.stop)
	l.wg.Wait()
}

// longestGap is the longest time without a successful issuance.
func (l *load) longestGap(from, to time.Time) time.Duration {
	pts := append([]time.Time{from}, l.issued...)
	pts = append(pts, to)
	var gap time.Duration
	for i := 1; i < len(pts); i++ {
		gap = max(gap, pts[i].Sub(pts[i-1]))
	}
	return gap
}

func (s *suite) running() []string {
	var out []string
	for _, id := range ids {
		if s.nodes[id].running() {
			out = append(out, id)
		}
	}
	return out
}

func TestFaults(t *testing.T) {
	s := newSuite(t)
	var all []string // every acknowledged entry, all scenarios
	t.Cleanup(func() {
		fmt.Println()
		fmt.Printf("FAULTS | %-28s | %-52s | %s\n", "scenario", "measure", "value")
		for _, r := range s.table {
			fmt.Printf("FAULTS | %-28s | %-52s | %s\n", r[0], r[1], r[2])
		}
	})

	// The agent serves a workload through every scenario: its cached SVID
	// must stay available whatever happens to the appliance.
	ag := s.startAgent(t)
	if _, err := s.admin[s.leader("")].EntryCreate(context.Background(), &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: "spiffe://example.org/faults/workload", ParentID: ag.id,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}}); err != nil {
		t.Fatal(err)
	}
	var serial string
	clustertest.Eventually(t, 30*time.Second, "the workload's SVID", func() bool {
		serial = ag.fetch(1)
		return serial != ""
	})
	workloadRow := func(sc string, w *watch) {
		ok, failed := w.stop()
		s.row(sc, "workload fetches from the agent ok / failed", fmt.Sprintf("%d / %d", ok, failed))
		if failed != 0 {
			t.Errorf("%s: the agent failed %d workload fetches", sc, failed)
		}
	}

	t.Run("disk full on one node", func(t *testing.T) {
		const sc = "disk full (node-1, tmpfs)"
		role := "follower"
		if s.leader("") == "node-1" {
			role = "leader"
		}
		s.row(sc, "node-1's role when its disk filled", role)
		filler := filepath.Join(s.tmpfs, "filler")
		f, _ := os.Create(filler)
		_, err := io.Copy(f, zero{})
		f.Close()
		if !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("filling the tmpfs: %v", err)
		}
		wl := ag.watch()
		defer workloadRow(sc, wl)
		l := s.startLoad("disk", func() []string { return []string{"node-2", "node-3"} })
		time.Sleep(6 * time.Second)
		var st *api.ClusterStatus
		if s.nodes["node-1"].running() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, _ = s.admin["node-1"].ClusterStatus(ctx, &api.Empty{})
			cancel()
		}
		l.end()
		outcome := "exited"
		if st != nil {
			outcome = "running as " + st.State
			if st.State == "Leader" {
				t.Error("node-1 still leads with a full disk")
			}
		}
		s.row(sc, "node-1 with a full disk", outcome)
		s.row(sc, "writes acknowledged / refused while full", fmt.Sprintf("%d / %d", len(l.acked), l.failed))
		s.row(sc, "issuances while full (majority)", fmt.Sprint(len(l.issued)))
		os.Remove(filler)
		freed := time.Now()
		if !s.nodes["node-1"].running() {
			s.start("node-1")
		}
		all = append(all, l.acked...)
		lost := 0
		for _, id := range ids {
			lost += s.holds(id, l.acked, 60*time.Second)
		}
		s.row(sc, "acknowledged writes lost (all nodes)", fmt.Sprint(lost))
		s.row(sc, "node-1 caught up after space freed", time.Since(freed).Round(100*time.Millisecond).String())
		if lost != 0 || !s.auditIntact("node-1") {
			t.Fatalf("lost %d acknowledged writes, or node-1's audit chain broke", lost)
		}
	})

	t.Run("partition the leader", func(t *testing.T) {
		const sc = "partition (leader alone)"
		leader := s.leader("")
		k := slices.Index(ids, leader) + 1
		var majority []string
		for _, id := range ids {
			if id != leader {
				majority = append(majority, id)
			}
		}
		wl := ag.watch()
		defer workloadRow(sc, wl)
		s.w.partition(k)
		cut := time.Now()
		var minority atomic.Int64
		stopMin := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stopMin:
					return
				default:
				}
				if s.issue(leader, 2*time.Second) {
					minority.Add(1)
				}
			}
		}()
		l := s.startLoad("part", func() []string { return majority })
		time.Sleep(8 * time.Second)
		l.end()
		close(stopMin)
		wg.Wait()
		first := "none"
		if len(l.issued) > 0 {
			first = l.issued[0].Sub(cut).Round(time.Millisecond).String()
		}
		s.row(sc, "issuances by the cut-off leader", fmt.Sprint(minority.Load()))
		s.row(sc, "issuances by the majority (8 s)", fmt.Sprint(len(l.issued)))
		s.row(sc, "first majority issuance after the cut", first)
		s.row(sc, "writes acknowledged by the majority", fmt.Sprint(len(l.acked)))
		s.w.heal(k)
		all = append(all, l.acked...)
		lost := 0
		for _, id := range ids {
			lost += s.holds(id, all, 60*time.Second)
		}
		intact := s.auditIntact(leader)
		s.row(sc, "acknowledged writes lost after healing", fmt.Sprint(lost))
		s.row(sc, "audit chain on the healed node", fmt.Sprint(intact))
		if minority.Load() != 0 || len(l.issued) == 0 || lost != 0 || !intact {
			t.Fatal("partition figures out of bounds")
		}
	})

	t.Run("kill -9 the leader 20 times", func(t *testing.T) {
		const sc = "kill -9 leader x20 (load)"
		wl := ag.watch()
		defer workloadRow(sc, wl)
		l := s.startLoad("kill", s.running)
		began := time.Now()
		var failovers []time.Duration
		for round := 0; round < 20; round++ {
			time.Sleep(700 * time.Millisecond)
			leader := s.leader("")
			killed := time.Now()
			s.kill(leader, syscall.SIGKILL)
			s.leader(leader)
			failovers = append(failovers, time.Since(killed))
			s.start(leader)
		}
		time.Sleep(time.Second)
		l.end()
		ended := time.Now()
		all = append(all, l.acked...)
		lost := 0
		for _, id := range ids {
			lost += s.holds(id, all, 90*time.Second)
		}
		sort.Slice(failovers, func(i, j int) bool { return failovers[i] < failovers[j] })
		intact := true
		for _, id := range ids {
			intact = intact && s.auditIntact(id)
		}
		s.row(sc, "writes acknowledged / lost", fmt.Sprintf("%d / %d", len(l.acked), lost))
		s.row(sc, "issuances / failed attempts", fmt.Sprintf("%d / %d", len(l.issued), l.issueErr))
		s.row(sc, "longest issuance outage", l.longestGap(began, ended).Round(time.Millisecond).String())
		s.row(sc, "new leader after kill: median / max", fmt.Sprintf("%v / %v", failovers[len(failovers)/2].Round(time.Millisecond), failovers[len(failovers)-1].Round(time.Millisecond)))
		s.row(sc, "audit chains intact (3 nodes)", fmt.Sprint(intact))
		if lost != 0 || !intact {
			t.Fatal("acknowledged writes lost or audit chain broken")
		}
	})

	t.Run("whole appliance stopped, agent serves from cache", func(t *testing.T) {
		const sc = "appliance stopped (agent)"
		ctx := context.Background()
		s.stopAll()
		stopped := time.Now()
		time.Sleep(3 * time.Second)
		cached := ag.fetch(1)
		s.row(sc, "new workload connection with all nodes down", map[bool]string{true: "served cached SVID", false: "nothing"}[cached == serial])
		if cached != serial {
			t.Fatalf("with the appliance down the agent served %q, want cached %q", cached, serial)
		}
		for _, id := range ids {
			s.start(id)
		}
		restarted := time.Now()
		for _, id := range ids {
			s.ready(id)
		}
		if _, err := s.admin[s.leader("")].EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/faults/workload-2",
			ParentID: ag.id, Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}}); err != nil {
			t.Fatal(err)
		}
		clustertest.Eventually(t, 90*time.Second, "the agent reconnects on its own", func() bool { return ag.fetch(2) != "" })
		s.row(sc, "appliance down for", restarted.Sub(stopped).Round(100*time.Millisecond).String())
		s.row(sc, "agent reconnected, new entry served after restart", time.Since(restarted).Round(100*time.Millisecond).String())
	})
}

type zero struct{}

func (zero) Read(p []byte) (int, error) { clear(p); return len(p), nil }

type agentProc struct {
	id     string
	socket string
	health string
}

// startAgent runs sigil-agent (swtpm, TPM join) in the root namespace.
func (s *suite) startAgent(t *testing.T) *agentProc {
	sw := testenv.NewTPM(t)
	ctx := context.Background()
	clustertest.TrustEKCAs(t, s.admin[s.leader("")], sw.EKCARoot, sw.EKCAIssuer)
	dir := filepath.Join(s.dir, "agent")
	os.MkdirAll(dir, 0o700)
	a := &agentProc{socket: filepath.Join(dir, "agent.sock"), health: clustertest.FreePort(t)}
	cfg := map[string]any{
		"servers":   []string{s.nodes["node-1"].api, s.nodes["node-2"].api, s.nodes["node-3"].api},
		"root-cert": s.tr.RootPath, "data-dir": filepath.Join(dir, "data"), "tpm": sw.Socket,
		"workload-api": map[string]any{"socket": a.socket}, "health-listen": a.health,
	}
	b, _ := yaml.Marshal(cfg)
	os.WriteFile(filepath.Join(dir, "agent.yaml"), b, 0o600)
	cmd := exec.Command(filepath.Join(s.bin, "sigil-agent"), "--config", filepath.Join(dir, "agent.yaml"))
	logf, _ := os.Create(filepath.Join(s.dir, "agent.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait(); logf.Close() })
	clustertest.Eventually(t, 60*time.Second, "agent ready", func() bool {
		r, err := http.Get("http://" + a.health + "/readyz")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == 200
	})
	l, err := s.admin[s.leader("")].AgentList(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range l.Agents {
		if strings.Contains(x.ID, "/agent/tpm/") {
			a.id = x.ID
		}
	}
	if a.id == "" {
		t.Fatal("the TPM agent is not registered")
	}
	return a
}

// fetch connects afresh and returns the default SVID's serial when the
// caller gets n SVIDs ("" otherwise).
func (a *agentProc) fetch(n int) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+a.socket), workloadapi.WithLogger(quiet{}))
	if err != nil {
		return ""
	}
	defer c.Close()
	svids, err := c.FetchX509SVIDs(ctx)
	if err != nil || len(svids) != n {
		return ""
	}
	return svids[0].Certificates[0].SerialNumber.Text(16)
}

// watch polls the agent as a workload would, with a new connection each
// time, until stop.
type watch struct {
	ok, failed atomic.Int64
	done       chan struct{}
	wg         sync.WaitGroup
}

func (a *agentProc) watch() *watch {
	w := &watch{done: make(chan struct{})}
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		for {
			select {
			case <-w.done:
				return
			case <-time.After(250 * time.Millisecond):
			}
			if a.fetch(1) != "" {
				w.ok.Add(1)
			} else {
				w.failed.Add(1)
			}
		}
	}()
	return w
}

func (w *watch) stop() (int64, int64) {
	close(w.done)
	w.wg.Wait()
	return w.ok.Load(), w.failed.Load()
}

type quiet struct{}

func (quiet) Debugf(string, ...any) {}
func (quiet) Infof(string, ...any)  {}
func (quiet) Warnf(string, ...any)  {}
func (quiet) Errorf(string, ...any) {}
