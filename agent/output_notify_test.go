package agent_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/output"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// findNginx is the nginx binary of the Debian package "nginx", or "".
func findNginx() string {
	if p, err := exec.LookPath("nginx"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
		return "/usr/sbin/nginx"
	}
	return ""
}

// A real nginx serves mutual TLS from the files an output writes. When an
// entry change rotates the SVID, the output's notification sends SIGHUP to
// the pid in nginx's pid file; nginx reloads, and a client holding its own
// SVID then gets the new certificate (new serial, chaining to the bundle
// the output wrote) and is accepted by nginx's client verification.
func TestOutputNotifyNginx(t *testing.T) {
	bin := findNginx()
	if bin == "" {
		t.Skip("nginx is not installed (Debian package nginx: apt-get install nginx): the output notification is not tested against a real server")
	}
	base, err := os.MkdirTemp("", "sigil-nginx-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(base) })
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	prefix := filepath.Join(base, "nginx")
	if err := os.Mkdir(prefix, 0o755); err != nil {
		t.Fatal(err)
	}
	outDir := filepath.Join(base, "tls")
	pidFile := filepath.Join(prefix, "nginx.pid")
	const wwwData = 33 // Debian's www-data, the uid nginx's workers run as
	e := newAgentEnv(t, "ng", func(c *agent.Config) {
		c.Outputs = []output.Config{{
			Dir: outDir, Selectors: []string{"unix:uid:33"}, UID: wwwData, GID: wwwData,
			Notify: &output.Notify{Signal: "SIGHUP", PIDFile: pidFile},
		}}
	})
	ctx := context.Background()
	srvEntry := e.entry(t, "/web/nginx", 3600, "", "unix:uid:33")
	e.entry(t, "/web/client", 3600, "", "unix:uid:0")

	leafSerial := func() string {
		b, err := os.ReadFile(filepath.Join(outDir, "svid.pem"))
		if err != nil {
			return ""
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			return ""
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return ""
		}
		return c.SerialNumber.Text(16)
	}
	clustertest.Eventually(t, 30*time.Second, "the output's files", func() bool {
		_, err := os.Stat(filepath.Join(outDir, "bundle.pem"))
		return leafSerial() != "" && err == nil
	})
	// nginx is not running yet: the first notification finds no pid file.
	clustertest.Eventually(t, 10*time.Second, "the first notification's failure counted", func() bool {
		return metric(t, e.cfg.HealthListen, "sigil_agent_output_notify_failures_total") != "0"
	})

	addr := clustertest.FreePort(t)
	conf := fmt.Sprintf(`daemon off;
master_process on;
worker_processes 1;
user www-data www-data;
pid %[1]s;
error_log stderr info;
events { worker_connections 64; }
http {
	access_log off;
	client_body_temp_path %[2]s/body;
	proxy_temp_path %[2]s/proxy;
	fastcgi_temp_path %[2]s/fastcgi;
	uwsgi_temp_path %[2]s/uwsgi;
	scgi_temp_path %[2]s/scgi;
	server {
		listen %[3]s ssl;
		ssl_certificate %[4]s/svid.pem;
		ssl_certificate_key %[4]s/svid_key.pem;
		ssl_client_certificate %[4]s/bundle.pem;
		ssl_verify_client on;
		ssl_verify_depth 4;
		location / { return 200 "verify=$ssl_client_verify\n"; }
	}
}
`, pidFile, prefix, addr, outDir)
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(prefix, "nginx.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = logf.Close() }()
	nginxLog := func() string { b, _ := os.ReadFile(logf.Name()); return string(b) }
	cmd := exec.Command(bin, "-p", prefix+"/", "-c", confPath, "-e", "stderr")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = prefix
	// Its own process group: the cleanup kills master and workers alike.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }() // it ends by our signal: its status says nothing
	t.Cleanup(func() {
		// TERM lets the master reap its workers; KILL the group if not.
		// Best effort both: nginx may be gone already.
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		if t.Failed() {
			t.Logf("nginx output:\n%s", nginxLog())
		}
	})
	clustertest.Eventually(t, 20*time.Second, "nginx's pid file", func() bool {
		b, _ := os.ReadFile(pidFile)
		return strings.TrimSpace(string(b)) == strconv.Itoa(cmd.Process.Pid)
	})

	// The client: its own SVID from the Workload API (as root), nginx's
	// identity authorized, chains checked against the bundle the output
	// wrote, as the workload sees it.
	x, err := e.client(t).FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	td := spiffeid.RequireTrustDomainFromString(strings.TrimPrefix(e.td, "spiffe://"))
	bundle, err := x509bundle.Load(td, filepath.Join(outDir, "bundle.pem"))
	if err != nil {
		t.Fatal(err)
	}
	serverID := spiffeid.RequireFromString(srvEntry.SPIFFEID)
	tlsCfg := tlsconfig.MTLSClientConfig(x.DefaultSVID(), bundle, tlsconfig.AuthorizeID(serverID))
	type reply struct {
		serial, body string
		chain        []*x509.Certificate
	}
	get := func() (reply, error) {
		d := &net.Dialer{Timeout: 5 * time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", addr, tlsCfg)
		if err != nil {
			return reply{}, err
		}
		defer func() { _ = conn.Close() }()
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return reply{}, err
		}
		if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: sigil\r\n\r\n"); err != nil {
			return reply{}, err
		}
		b, err := io.ReadAll(conn)
		if err != nil {
			return reply{}, err
		}
		chain := conn.ConnectionState().PeerCertificates
		return reply{serial: chain[0].SerialNumber.Text(16), body: string(b), chain: chain}, nil
	}
	var first reply
	clustertest.Eventually(t, 20*time.Second, "nginx serving mutual TLS", func() bool {
		first, err = get()
		return err == nil
	})
	if first.serial != leafSerial() || !strings.Contains(first.body, "verify=SUCCESS") {
		t.Fatalf("before rotation: nginx presents serial %s (file has %s), replied %q", first.serial, leafSerial(), first.body)
	}
	failures := metric(t, e.cfg.HealthListen, "sigil_agent_output_notify_failures_total")

	// An entry change makes the agent sign a new SVID at once.
	upd := *srvEntry
	upd.X509TTL = api.Seconds(3000)
	if _, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryUpdate(ctx, &api.EntryRequest{Entry: upd}); err != nil {
		t.Fatal(err)
	}
	var rotated string
	clustertest.Eventually(t, 30*time.Second, "the rotated SVID in the output", func() bool {
		rotated = leafSerial()
		return rotated != "" && rotated != first.serial
	})
	// nginx only re-reads its files on SIGHUP: the new serial on the wire
	// is the notification's doing. Workers from before the reload may
	// finish a connection or two with the old certificate.
	var now reply
	clustertest.Eventually(t, 30*time.Second, "nginx presenting the rotated certificate", func() bool {
		now, err = get()
		return err == nil && now.serial == leafSerial()
	})
	if now.serial == first.serial || !strings.Contains(now.body, "verify=SUCCESS") {
		t.Fatalf("after rotation: serial %s (before %s), replied %q", now.serial, first.serial, now.body)
	}
	id, _, err := x509svid.Verify(now.chain, bundle)
	if err != nil || id != serverID {
		t.Fatalf("rotated chain against the output's bundle: %v %v", id, err)
	}
	if f := metric(t, e.cfg.HealthListen, "sigil_agent_output_notify_failures_total"); f != failures {
		t.Fatalf("notification failures went from %s to %s", failures, f)
	}
	b, _ := os.ReadFile(pidFile)
	if strings.TrimSpace(string(b)) != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("nginx restarted instead of reloading: pid file %q, master %d", b, cmd.Process.Pid)
	}
	if !strings.Contains(nginxLog(), "signal 1 (SIGHUP) received") {
		t.Fatal("nginx's log does not show the SIGHUP")
	}
}

// The notify fields as an operator writes them, through the agent's
// strict config parser and validation.
func TestOutputNotifyConfig(t *testing.T) {
	head := "servers: [a:1]\nroot-cert: /etc/sigil/root.pem\ndata-dir: /var/lib/sigil-agent\ntpm: /dev/tpmrm0\n" +
		"outputs:\n  - dir: /run/sigil/out/a\n    selectors: [\"unix:uid:33\"]\n    uid: 33\n    gid: 33\n    notify:\n"
	c, err := agent.ParseConfig([]byte(head + "      signal: SIGHUP\n      pid-file: /run/nginx.pid\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if n := c.Outputs[0].Notify; n == nil || n.Signal != "SIGHUP" || n.PIDFile != "/run/nginx.pid" {
		t.Fatalf("notify: %+v", n)
	}
	c, err = agent.ParseConfig([]byte(head + "      command: [/usr/sbin/nginx, -s, reload]\n      timeout: 20s\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if n := c.Outputs[0].Notify; len(n.Command) != 3 || n.Timeout != 20*time.Second {
		t.Fatalf("notify: %+v", n)
	}
	for name, body := range map[string]string{
		"unknown field":     "      signal: SIGHUP\n      pid-file: /run/nginx.pid\n      pidfile: /x\n",
		"bare seconds":      "      command: [/bin/true]\n      timeout: 20\n",
		"unknown signal":    "      signal: SIGBOGUS\n      pid-file: /run/nginx.pid\n",
		"relative pid file": "      signal: SIGHUP\n      pid-file: nginx.pid\n",
		"relative command":  "      command: [nginx, -s, reload]\n",
		"timeout too long":  "      command: [/bin/true]\n      timeout: 1h\n",
	} {
		c, err := agent.ParseConfig([]byte(head + body))
		if err == nil {
			err = c.Validate()
		}
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
