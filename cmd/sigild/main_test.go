package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// execArgsEnv makes the test binary run sigild's command line itself with
// these arguments (JSON), in a process whose environment the test chose:
// SoftHSM reads SOFTHSM2_CONF once per process.
const execArgsEnv = "SIGILD_TEST_EXEC_ARGS"

func TestMain(m *testing.M) {
	if a := os.Getenv(execArgsEnv); a != "" {
		var args []string
		if err := json.Unmarshal([]byte(a), &args); err != nil {
			fmt.Fprintln(os.Stderr, execArgsEnv, err)
			os.Exit(3)
		}
		os.Exit(run(context.Background(), args, os.Stdout, os.Stderr))
	}
	os.Exit(testenv.Main(m))
}

// sigild's command line, in process: flags old and new, help, and config
// files with problems (every one listed, nothing started).
func TestRun(t *testing.T) {
	tr := clustertest.NewTrust(t, "run", []string{"node-1"}, nil)
	c := &clustertest.Cluster{T: t, Trust: tr, Dir: t.TempDir()}
	good := writeConfig(t, c.Dir, c.Config("node-1"))
	bad := filepath.Join(c.Dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("node-id: \"Node 1!\"\ntrust-domain: example.org\nlog: {level: loud, format: xml}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unknown := filepath.Join(c.Dir, "unknown.yaml")
	if err := os.WriteFile(unknown, []byte("node-id: node-1\nbogus-field: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		args   []string
		code   int
		stdout []string
		stderr []string
	}{
		{[]string{"--help"}, 0, []string{"--config", "--check-config", "/etc/sigil/sigild.yaml"}, nil},
		{[]string{"-help"}, 0, []string{"--check-config"}, nil},
		{[]string{"--bogus"}, 2, nil, []string{"unknown flag: --bogus", "--help"}},
		{[]string{"bogus"}, 2, nil, []string{`"bogus"`}},
		{[]string{"--config"}, 2, nil, []string{"needs an argument"}},
		{[]string{"--config", good, "--check-config"}, 0, []string{good + ": valid"}, nil},
		// The Go flag package's style, as older units and scripts write it.
		{[]string{"-config", good, "-check-config"}, 0, []string{good + ": valid"}, nil},
		{[]string{"-config=" + good, "-check-config=true"}, 0, []string{good + ": valid"}, nil},
		{[]string{"--config", filepath.Join(c.Dir, "none.yaml"), "--check-config"}, 1, nil, []string{"none.yaml", "no such file"}},
		{[]string{"--config", bad, "--check-config"}, 1, nil, []string{
			"node-id must match", "data-dir is required", "issuing-key", "cluster.bind", "api.listen",
			`log.level must be debug, info, warn or error (got "loud")`, `log.format must be json or text (got "xml")`}},
		{[]string{"--config", unknown, "--check-config"}, 1, nil, []string{"bogus-field"}},
		// Without --check-config a bad file starts nothing either.
		{[]string{"--config", bad}, 1, nil, []string{"node-id must match"}},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), tc.args, &out, &errb)
		ok := code == tc.code
		for _, s := range tc.stdout {
			ok = ok && strings.Contains(out.String(), s)
		}
		for _, s := range tc.stderr {
			ok = ok && strings.Contains(errb.String(), s)
		}
		if tc.code != 0 && out.Len() > 0 {
			ok = false
		}
		if !ok {
			t.Errorf("sigild %q: exit %d, want %d\nstdout: %s\nstderr: %s", tc.args, code, tc.code, out.String(), errb.String())
		}
	}
}

// --check-config opens the HSM and reads every file: each broken config
// below passes the field checks yet could never start, and is refused with
// its reason; a good one is valid, and both say what was not checked.
func TestCheckConfigHSMAndFiles(t *testing.T) {
	tr := clustertest.NewTrust(t, "check", []string{"node-1", "node-2"}, nil)
	c := &clustertest.Cluster{T: t, Trust: tr, Dir: t.TempDir()}
	n1 := tr.Nodes["node-1"]
	variant := func(name string, mod func(*node.Config)) string {
		cfg := c.Config("node-1")
		mod(cfg)
		cfg.NodeID = "node-1"
		p := writeConfig(t, c.Dir, cfg)
		q := filepath.Join(c.Dir, name+".yaml")
		if err := os.Rename(p, q); err != nil {
			t.Fatal(err)
		}
		return q
	}
	check := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		code := run(context.Background(), append([]string{"--check-config", "--config"}, args...), &out, &errb)
		return code, out.String(), errb.String()
	}
	notChecked := "raft peers not contacted"

	good := variant("good", func(*node.Config) {})
	if code, out, errs := check(good); code != 0 || !strings.Contains(out, good+": valid") || !strings.Contains(out, notChecked) {
		t.Fatalf("good config: exit %d\nstdout: %s\nstderr: %s", code, out, errs)
	}
	// An issuing certificate installed while the node ran, kept in
	// data-dir, is named among what was not checked.
	dataDir := c.Config("node-1").DataDir
	_, statErr := os.Stat(dataDir)
	if err := os.MkdirAll(filepath.Join(dataDir, "issuing"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	kept := filepath.Join(dataDir, "issuing", "current.pem")
	if err := os.WriteFile(kept, []byte("not checked"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := check(good); code != 0 || !strings.Contains(out, kept+" (the issuing certificate last installed while the node ran) not checked") {
		t.Fatalf("good config with %s: exit %d\nstdout: %s\nstderr: %s", kept, code, out, errs)
	}
	if os.IsNotExist(statErr) {
		if err := os.RemoveAll(dataDir); err != nil {
			t.Fatal(err)
		}
	} else if err := os.RemoveAll(filepath.Join(dataDir, "issuing")); err != nil {
		t.Fatal(err)
	}

	missingPIN := filepath.Join(c.Dir, "absent.pin")
	openPIN := filepath.Join(c.Dir, "open.pin")
	if err := os.WriteFile(openPIN, []byte(n1.Token.PIN(t)), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		mod  func(*node.Config)
		want []string
	}{
		{"missing PIN file", func(c *node.Config) { c.IssuingKey = strings.Replace(c.IssuingKey, n1.Token.PINFile, missingPIN, 1) },
			[]string{"issuing-key: pin-source", missingPIN, "no such file"}},
		{"PIN file readable by others", func(c *node.Config) { c.IssuingKey = strings.Replace(c.IssuingKey, n1.Token.PINFile, openPIN, 1) },
			[]string{"pin-source " + openPIN + " has mode -rw-r--r--", "chmod 600"}},
		{"another node's issuing certificate", func(c *node.Config) { c.IssuingCert = tr.Nodes["node-2"].IssuingPath },
			[]string{`issuing CA certificate of node "node-2", this is node-id "node-1"`, "the HSM key's public key is not the one in issuing-cert"}},
		{"wrong object label", func(c *node.Config) {
			c.IssuingKey = strings.Replace(c.IssuingKey, "object=issuing", "object=issuing-2027", 1)
		},
			[]string{"issuing-key: keystore: key not found", `object="issuing-2027"`, "object label or id in issuing-key is wrong"}},
		{"token the module does not have", func(c *node.Config) {
			c.IssuingKey = strings.Replace(c.IssuingKey, "token="+n1.Token.Label, "token=sigil-node-9", 1)
		},
			[]string{"token not found", "token=sigil-node-9", tr.Module, "SOFTHSM2_CONF="}},
		{"OIDC key in the HSM that is not the OIDC certificate's", func(c *node.Config) {
			c.JWT.Issuer, c.HTTP.OIDCListen = "https://sigil.example.org", "127.0.0.1:0"
			c.HTTP.OIDCCert, c.HTTP.OIDCKey = tr.Nodes["node-2"].IssuingPath, c.IssuingKey
		},
			[]string{"http.oidc-key pkcs11:", "is not the key of the certificate in http.oidc-cert " + tr.Nodes["node-2"].IssuingPath}},
		{"root that did not sign the issuing certificate", func(c *node.Config) { c.RootCerts = []string{tr.Nodes["node-2"].IssuingPath} },
			[]string{"root-certs[0]", "is not a self-signed CA certificate", "issuing-cert not checked against the roots"}},
	} {
		p := variant(strings.ReplaceAll(tc.name, " ", "-"), tc.mod)
		code, out, errs := check(p)
		ok := code == 1 && out == "" && strings.Contains(errs, p+": invalid sigild config") && strings.Contains(errs, notChecked)
		for _, w := range tc.want {
			ok = ok && strings.Contains(errs, w)
		}
		if !ok || strings.Contains(errs, n1.Token.PIN(t)) {
			t.Errorf("%s: exit %d, want 1 naming %q\nstdout: %s\nstderr: %s", tc.name, code, tc.want, out, errs)
		}
	}

	// The demo's failure: a node started without the SOFTHSM2_CONF its
	// token was made under. Its own process, with an HSM config whose
	// token directory is empty.
	empty := t.TempDir()
	conf := filepath.Join(empty, "softhsm2.conf")
	if err := os.MkdirAll(filepath.Join(empty, "tokens"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(empty, "tokens")+"\nobjectstore.backend = file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	args, err := json.Marshal([]string{"--check-config", "--config", good})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), execArgsEnv+"="+string(args), "SOFTHSM2_CONF="+conf)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("check with another SOFTHSM2_CONF: %v, want exit 1\n%s", err, out)
	}
	for _, w := range []string{"token not found", "token=" + n1.Token.Label, tr.Module, "SOFTHSM2_CONF=" + conf, "token directory " + filepath.Join(empty, "tokens"), "no initialized tokens"} {
		if !strings.Contains(string(out), w) {
			t.Errorf("check with another SOFTHSM2_CONF does not say %q:\n%s", w, out)
		}
	}
}

type proc struct {
	cfgPath string
	cmd     *exec.Cmd
	done    chan struct{}
	api     string
	// killed is set before the test kills or stops the process: any other
	// exit is a failure.
	killed atomic.Bool
}

// privateLoopback returns an address of 127.0.0.0/8 other than 127.0.0.1,
// chosen at random, for this test's nodes alone. The nodes' ports are
// picked before the sigild processes bind them and sit free while a killed
// node restarts; other test processes of a parallel `go test ./...` pick
// ports on 127.0.0.1 from the same range (clustertest), and one that takes
// a node's port makes that node fail to start ("address already in use")
// and the test time out waiting for three voters. A port on another
// loopback address does not collide with theirs.
func privateLoopback() string {
	return fmt.Sprintf("127.%d.%d.%d", 1+mrand.IntN(254), mrand.IntN(256), 1+mrand.IntN(254))
}

// freePortOn picks a port free on host, below the kernel's ephemeral range
// (as clustertest does: a port handed out by :0 can be taken as the source
// port of an outgoing connection while its node is down).
func freePortOn(t *testing.T, host string) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if _, err := fmt.Sscan(string(b), &low); err != nil {
			t.Fatalf("ip_local_port_range %q: %v", b, err)
		}
	}
	for range 1000 {
		addr := net.JoinHostPort(host, strconv.Itoa(10000+mrand.IntN(low-10000)))
		if ln, err := net.Listen("tcp", addr); err == nil {
			if err := ln.Close(); err != nil {
				t.Fatalf("free port %s: %v", addr, err)
			}
			return addr
		}
	}
	t.Fatalf("no free port on %s", host)
	return ""
}

// Three sigild processes built from this command, configured by files,
// each with its own HSM token. The leader is killed with SIGKILL under a
// steady write load, three times over; no acknowledged write may be lost.
func TestSigildProcessesSurviveKill9(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "sigild")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	ids := []string{"node-1", "node-2", "node-3"}
	tr := clustertest.NewTrust(t, "kill", ids, nil)
	c := &clustertest.Cluster{T: t, Trust: tr, Dir: t.TempDir()}
	// The admin credential is issued before any sigild runs. SoftHSM keeps
	// each token in files that a login rewrites, so a process that opens
	// node-1's token while sigild node-1 starts can make that node miss it
	// ("keystore: token not found", or "has no user PIN"): the bootstrap
	// node exited, and the test timed out waiting for three voters.
	ks := pkcs11.New(pkcs11.Options{})
	admin := clustertest.ClientCert(t, tr.Authority(t, ks, "node-1"), "/sigil/admin/ops")
	if err := ks.Close(); err != nil {
		t.Fatalf("close key store: %v", err)
	}
	certPath, keyPath := clustertest.WriteCredential(t, c.Dir, "ops", admin)

	procs := map[string]*proc{}
	var first string
	host := privateLoopback()
	for i, id := range ids {
		cfg := c.Config(id)
		cfg.Cluster.Bind = freePortOn(t, host)
		cfg.API.Listen = freePortOn(t, host)
		cfg.HTTP.Listen = freePortOn(t, host)
		if i == 0 {
			cfg.Cluster.Bootstrap, first = true, cfg.Cluster.Bind
		} else {
			cfg.Cluster.Join = []string{first}
		}
		procs[id] = &proc{cfgPath: writeConfig(t, c.Dir, cfg), api: cfg.API.Listen}
	}
	start := func(id string) {
		p := procs[id]
		p.cmd = exec.Command(bin, "--config", p.cfgPath)
		p.cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+os.Getenv("SOFTHSM2_CONF"))
		logf, err := os.OpenFile(filepath.Join(c.Dir, id+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		p.cmd.Stdout, p.cmd.Stderr = logf, logf
		p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		p.done = make(chan struct{})
		p.killed.Store(false)
		go func() {
			err := p.cmd.Wait()
			_ = logf.Close() // the log is only read back to explain a failure
			if !p.killed.Load() {
				t.Errorf("sigild %s exited by itself (%v): see its log", id, err)
			}
			close(p.done)
		}()
	}
	kill := func(id string) {
		procs[id].killed.Store(true)
		if err := procs[id].cmd.Process.Kill(); err != nil {
			t.Fatalf("kill sigild %s: %v", id, err)
		}
		<-procs[id].done
	}
	t.Cleanup(func() {
		for _, p := range procs {
			p.killed.Store(true)
		}
		for _, p := range procs {
			if p.cmd == nil {
				continue
			}
			select {
			case <-p.done:
				continue
			default:
			}
			// A process that has just exited refuses the signal; p.done
			// tells either way.
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(10 * time.Second):
				_ = p.cmd.Process.Kill()
				<-p.done
			}
		}
	})
	// A failure is explained by what the nodes logged: the temp dir goes
	// with the test.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		for _, id := range ids {
			b, _ := os.ReadFile(filepath.Join(c.Dir, id+".log"))
			if len(b) > 64<<10 {
				b = b[len(b)-64<<10:]
			}
			t.Logf("%s log (last %d bytes):\n%s", id, len(b), b)
		}
	})
	for _, id := range ids {
		start(id)
	}

	client := func(id string) *api.AdminClient {
		conn, err := api.Dial(api.DialConfig{Addr: procs[id].api, CertFile: certPath, KeyFile: keyPath, RootFile: tr.RootPath})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() }) // the test is over
		return api.NewAdminClient(conn)
	}
	clients := map[string]*api.AdminClient{}
	for _, id := range ids {
		clients[id] = client(id)
	}
	leaderOf := func(exclude string) string { return clustertest.LeaderVia(t, clients, exclude) }
	leaderOf("")

	var mu sync.Mutex
	var acked []string
	dead := map[string]bool{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				var target string
				for _, id := range ids {
					if !dead[id] && (target == "" || (i+w)%3 == 0) {
						target = id
					}
				}
				mu.Unlock()
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				e, err := clients[target].EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{
					SPIFFEID:  fmt.Sprintf("spiffe://example.org/w/%d/%d", w, i),
					ParentID:  "spiffe://example.org/sigil/agent/tpm/h",
					Selectors: []api.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", i)}},
				}, Force: true})
				cancel()
				if err == nil {
					mu.Lock()
					acked = append(acked, e.ID)
					mu.Unlock()
				}
			}
		}(w)
	}

	for round := 0; round < 3; round++ {
		time.Sleep(500 * time.Millisecond)
		leader := leaderOf("")
		mu.Lock()
		dead[leader] = true
		mu.Unlock()
		killedAt := time.Now()
		kill(leader)
		next := leaderOf(leader)
		t.Logf("round %d: killed %s (SIGKILL), %s leads after %v", round, leader, next, time.Since(killedAt).Round(time.Millisecond))
		start(leader)
		mu.Lock()
		dead[leader] = false
		mu.Unlock()
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d writes acknowledged across three leader kills", len(acked))
	if len(acked) < 50 {
		t.Fatalf("only %d writes acknowledged: the cluster was mostly unavailable", len(acked))
	}

	// Every node, including the restarted ones, has every acknowledged write.
	for _, id := range ids {
		clustertest.Eventually(t, 60*time.Second, id+" to hold every acknowledged write", func() bool {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			l, err := clients[id].EntryList(ctx, &api.EntryListRequest{})
			if err != nil {
				return false
			}
			have := map[string]bool{}
			for _, e := range l.Entries {
				have[e.ID] = true
			}
			for _, a := range acked {
				if !have[a] {
					return false
				}
			}
			return true
		})
	}
	v, err := clients["node-2"].AuditVerify(context.Background(), &api.Empty{})
	if err != nil || !v.Intact {
		t.Fatalf("audit chain after kills: %+v %v", v, err)
	}
}

func writeConfig(t *testing.T, dir string, cfg *node.Config) string {
	t.Helper()
	m := map[string]any{
		"node-id": cfg.NodeID, "trust-domain": cfg.TrustDomain, "data-dir": cfg.DataDir,
		"issuing-key": cfg.IssuingKey, "issuing-cert": cfg.IssuingCert, "root-certs": cfg.RootCerts,
		"cluster": map[string]any{"bind": cfg.Cluster.Bind, "bootstrap": cfg.Cluster.Bootstrap, "join": cfg.Cluster.Join,
			"heartbeat-timeout": "500ms", "election-timeout": "500ms"},
		"api":  map[string]any{"listen": cfg.API.Listen, "local-socket": cfg.API.LocalSocket},
		"http": map[string]any{"listen": cfg.HTTP.Listen},
		"log":  map[string]any{"level": "info", "format": "json"},
	}
	if cfg.HTTP.OIDCListen != "" {
		m["http"] = map[string]any{"listen": cfg.HTTP.Listen, "oidc-listen": cfg.HTTP.OIDCListen, "oidc-cert": cfg.HTTP.OIDCCert, "oidc-key": cfg.HTTP.OIDCKey}
		m["jwt"] = map[string]any{"issuer": cfg.JWT.Issuer}
	}
	b, err := yaml.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, cfg.NodeID+".yaml")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
