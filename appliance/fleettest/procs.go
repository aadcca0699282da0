package fleettest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// Appliance is a real three-node appliance: three sigild processes on
// loopback, built from this tree, each with its own SoftHSM issuing CA,
// raft over mutual TLS and a data directory. The fleet's agents live in
// the test's process and the nodes in their own, so what a node holds per
// agent is read from the node's own /metrics, each process has its own
// descriptor limit, and a node is killed with SIGKILL.
type Appliance struct {
	T     testing.TB
	Trust *clustertest.Trust
	Dir   string
	// AdminCert and AdminKey are an admin credential (files) from node-1's
	// issuing CA.
	AdminCert, AdminKey string

	mu     sync.Mutex
	procs  map[string]*Proc
	admins map[string]*api.AdminClient
}

// Proc is one sigild process.
type Proc struct {
	ID   string
	API  string // host:port of the agent and admin API
	HTTP string // host:port of /metrics, /readyz
	// Pprof is host:port of Go's profiles when the appliance was built
	// for them (ApplianceOptions.Pprof), else "".
	Pprof string
	cfg   string
	log   string
	cmd   *exec.Cmd
	done  chan struct{}
}

// ApplianceOptions shape the nodes.
type ApplianceOptions struct {
	// AgentTTL is the agent SVID lifetime (join.agent-svid-ttl).
	AgentTTL time.Duration
	// Agents sizes each node's connection bound: a node may have to hold
	// every agent once the others are gone.
	Agents int
	// MaxHandshakes is each node's api.max-handshakes (at least the
	// default, 256).
	MaxHandshakes int
	// Pprof builds sigild with the pprof tag and has each node serve Go's
	// profiles on a loopback port (Proc.Pprof).
	Pprof bool
}

// StartAppliance builds sigild, writes three node configs and starts the
// processes, node-1 bootstrapping and the others joining it, and waits
// until all three are ready and agree on a leader.
func StartAppliance(t testing.TB, prefix string, opt ApplianceOptions) *Appliance {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "sigild")
	start := time.Now()
	args := []string{"build", "-o", bin}
	if opt.Pprof {
		args = append(args, "-tags", "pprof")
	}
	if out, err := exec.Command("go", append(args, "github.com/sigil-appliance/sigil/cmd/sigild")...).CombinedOutput(); err != nil {
		t.Fatalf("go build sigild: %v\n%s", err, out)
	}
	t.Logf("fleet: sigild built in %v", time.Since(start).Round(time.Millisecond))
	tr := clustertest.NewTrust(t, prefix, NodeIDs(), nil)
	a := &Appliance{T: t, Trust: tr, Dir: dir, procs: map[string]*Proc{}, admins: map[string]*api.AdminClient{}}
	// Only Config (fresh ports, the trust's files) is used: the nodes run
	// as processes, not in this one.
	shape := &clustertest.Cluster{T: t, Trust: tr, Dir: dir}
	var first string
	for i, id := range NodeIDs() {
		cfg := shape.Config(id)
		cluster := map[string]any{"bind": cfg.Cluster.Bind, "heartbeat-timeout": "500ms", "election-timeout": "500ms"}
		if i == 0 {
			cluster["bootstrap"], first = true, cfg.Cluster.Bind
		} else {
			cluster["join"] = []string{first}
		}
		m := map[string]any{
			"node-id": id, "trust-domain": cfg.TrustDomain, "data-dir": cfg.DataDir,
			"issuing-key": cfg.IssuingKey, "issuing-cert": cfg.IssuingCert, "root-certs": cfg.RootCerts,
			"cluster": cluster,
			// Every agent, plus renewal and admin connections in flight:
			// after a node dies the two left hold the whole fleet.
			"api": map[string]any{"listen": cfg.API.Listen, "local-socket": cfg.API.LocalSocket, "max-connections": max(4096, opt.Agents+1024),
				"max-handshakes": max(256, opt.MaxHandshakes)},
			"http":   map[string]any{"listen": cfg.HTTP.Listen},
			"bundle": map[string]any{"listen": cfg.Bundle.Listen},
			"join":   map[string]any{"agent-svid-ttl": opt.AgentTTL.String()},
			"log":    map[string]any{"level": "info", "format": "json"},
		}
		b, err := yaml.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		p := &Proc{ID: id, API: cfg.API.Listen, HTTP: cfg.HTTP.Listen, cfg: filepath.Join(dir, id+".yaml"), log: filepath.Join(dir, id+".log")}
		if opt.Pprof {
			p.Pprof = clustertest.FreePort(t)
		}
		if err := os.WriteFile(p.cfg, b, 0o600); err != nil {
			t.Fatal(err)
		}
		a.procs[id] = p
	}
	t.Cleanup(a.stopAll)
	for _, id := range NodeIDs() {
		a.Start(id)
	}
	for _, id := range NodeIDs() {
		a.WaitReady(id, time.Minute)
	}
	ks := pkcs11.New(pkcs11.Options{})
	cert := clustertest.ClientCert(t, tr.Authority(t, ks, NodeIDs()[0]), "/sigil/admin/fleet")
	_ = ks.Close() // the credential is made: the module is only let go of
	a.AdminCert, a.AdminKey = clustertest.WriteCredential(t, dir, "fleet-admin", cert)
	a.Leader("")
	return a
}

// Start (re)starts node id's process. Its output goes to its log file.
func (a *Appliance) Start(id string) {
	a.T.Helper()
	p := a.Proc(id)
	cmd := exec.Command(filepath.Join(a.Dir, "sigild"), "--config", p.cfg)
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		a.T.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if p.Pprof != "" {
		cmd.Env = append(os.Environ(), "SIGIL_PPROF_ADDR="+p.Pprof)
	}
	// A node must not outlive a test binary that dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		_ = logf.Close() // nothing was written
		a.T.Fatalf("start %s: %v", id, err)
	}
	done := make(chan struct{})
	// The exit is the event; the log says why.
	go func() { _ = cmd.Wait(); _ = logf.Close(); close(done) }()
	a.mu.Lock()
	p.cmd, p.done = cmd, done
	a.mu.Unlock()
}

// Proc returns node id's process description.
func (a *Appliance) Proc(id string) *Proc {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.procs[id]
	if p == nil {
		a.T.Fatalf("no node %s", id)
	}
	return p
}

// Running reports whether node id's process is alive.
func (a *Appliance) Running(id string) bool {
	p := a.Proc(id)
	a.mu.Lock()
	done := p.done
	a.mu.Unlock()
	if done == nil {
		return false
	}
	select {
	case <-done:
		return false
	default:
		return true
	}
}

// Kill sends sig to node id and waits for it to exit (SIGKILL after 20 s).
func (a *Appliance) Kill(id string, sig syscall.Signal) {
	p := a.Proc(id)
	a.mu.Lock()
	cmd, done := p.cmd, p.done
	a.mu.Unlock()
	if cmd == nil {
		return
	}
	// Signal fails only for a process that already exited, which done
	// then reports.
	_ = cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill() // as above
		<-done
	}
}

func (a *Appliance) stopAll() {
	for _, id := range NodeIDs() {
		a.Kill(id, syscall.SIGTERM)
	}
	if a.T.Failed() {
		for _, id := range NodeIDs() {
			if b, err := os.ReadFile(a.Proc(id).log); err == nil {
				a.T.Logf("%s log (tail):\n%s", id, tail(string(b), 3000))
			}
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// WaitReady waits for node id's /readyz.
func (a *Appliance) WaitReady(id string, timeout time.Duration) {
	a.T.Helper()
	url := "http://" + a.Proc(id).HTTP + "/readyz"
	clustertest.Eventually(a.T, timeout, id+" ready", func() bool {
		r, err := http.Get(url)
		if err != nil {
			return false
		}
		_ = r.Body.Close() // only the status is wanted
		return r.StatusCode == http.StatusOK
	})
}

// Admin is an admin client of node id (one connection, kept).
func (a *Appliance) Admin(id string) *api.AdminClient {
	a.T.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.admins[id]; c != nil {
		return c
	}
	conn, err := api.Dial(api.DialConfig{Addr: a.procs[id].API, CertFile: a.AdminCert, KeyFile: a.AdminKey, RootFile: a.Trust.RootPath})
	if err != nil {
		a.T.Fatal(err)
	}
	a.T.Cleanup(func() { _ = conn.Close() }) // the test is over: nothing more goes through it
	a.admins[id] = api.NewAdminClient(conn)
	return a.admins[id]
}

// Leader waits for a leader other than exclude that the running nodes
// agree on with three voters, and returns it.
func (a *Appliance) Leader(exclude string) string {
	a.T.Helper()
	clients := map[string]*api.AdminClient{}
	for _, id := range NodeIDs() {
		if a.Running(id) {
			clients[id] = a.Admin(id)
		}
	}
	return clustertest.LeaderVia(a.T, clients, exclude)
}

// HeapProfile writes node id's heap profile (after a GC) to path; the
// appliance must have been started with Pprof.
func (a *Appliance) HeapProfile(id, path string) error {
	p := a.Proc(id)
	if p.Pprof == "" {
		return fmt.Errorf("%s serves no profiles: start the appliance with Pprof", id)
	}
	r, err := http.Get("http://" + p.Pprof + "/debug/pprof/heap?gc=1")
	if err != nil {
		return err
	}
	defer func() { _ = r.Body.Close() }() // read to the end below
	if r.StatusCode != http.StatusOK {
		return fmt.Errorf("%s heap profile: %s", id, r.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, r.Body); err != nil {
		_ = f.Close() // the copy's error is the one to report
		return err
	}
	return f.Close()
}

// Metrics is one scrape of a node's /metrics: each series (name with its
// labels, as exposed) to its value.
type Metrics map[string]float64

// Scrape reads node id's /metrics.
func (a *Appliance) Scrape(ctx context.Context, id string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.Proc(id).HTTP+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = r.Body.Close() }() // read to the end below
	if r.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s /metrics: %s", id, r.Status)
	}
	m := Metrics{}
	sc := bufio.NewScanner(r.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m, sc.Err()
}

// MustScrape is Scrape that fails the test.
func (a *Appliance) MustScrape(id string) Metrics {
	a.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := a.Scrape(ctx, id)
	if err != nil {
		a.T.Fatal(err)
	}
	return m
}

// AfterGC scrapes node id once it has completed a garbage collection
// after now, so go_gc_heap_live_bytes describes the node as it is (a
// node that allocates little may go two minutes, Go's forced period,
// between collections).
func (a *Appliance) AfterGC(id string) Metrics {
	a.T.Helper()
	base := a.MustScrape(id)["go_gc_duration_seconds_count"]
	deadline := time.Now().Add(3 * time.Minute)
	for {
		m := a.MustScrape(id)
		if m["go_gc_duration_seconds_count"] > base || time.Now().After(deadline) {
			return m
		}
		time.Sleep(500 * time.Millisecond)
	}
}
