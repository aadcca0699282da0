package agent_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
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

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// The attack tests' workload processes. Each role prints its result as
// the last line "ROLE RESULT" (TestWorkloadHelper); roles that start a
// helper also print "HELPER PID" so the test can clean it up.
func attackRun(ctx context.Context, role string) string {
	sock := strings.TrimPrefix(os.Getenv("SPIFFE_ENDPOINT_SOCKET"), "unix://")
	switch role {
	case "attack-exec-helper":
		// Connect, hand a copy of the connection to a helper, then become
		// the target binary: the helper asks for the target's SVID.
		f, err := connectServed(ctx, sock)
		if err != nil {
			return "ERR " + err.Error()
		}
		target := os.Getenv("SIGIL_TARGET")
		pid, err := startChild("attack-fd-fetch", f, "SIGIL_WAIT_EXE="+target)
		if err != nil {
			return "ERR helper: " + err.Error()
		}
		fmt.Println("HELPER", pid)
		return "ERR exec: " + execAs(target, "attack-idle").Error()
	case "attack-exec-self":
		// Connect, then become the target binary keeping the connection:
		// the target's code asks on a connection the attacker opened.
		f, err := connectServed(ctx, sock)
		if err != nil {
			return "ERR " + err.Error()
		}
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFD, 0); err != nil {
			return "ERR " + err.Error()
		}
		if err := os.Setenv("SIGIL_FD", strconv.Itoa(int(f.Fd()))); err != nil {
			return "ERR " + err.Error()
		}
		return "ERR exec: " + execAs(os.Getenv("SIGIL_TARGET"), "attack-fd-fetch").Error()
	case "attack-fd-fetch":
		if want := os.Getenv("SIGIL_WAIT_EXE"); want != "" {
			// Ask only once the process that connected runs the target.
			for {
				if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", os.Getppid())); exe == want {
					break
				}
				if ctx.Err() != nil {
					return "ERR parent never ran " + want
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		fd := 3
		if v := os.Getenv("SIGIL_FD"); v != "" {
			fd, _ = strconv.Atoi(v)
		}
		cc, err := inheritedClient(fd)
		if err != nil {
			return "ERR " + err.Error()
		}
		defer func() { _ = cc.Close() }()
		s, err := openX509Stream(ctx, cc)
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		r, err := s.Recv()
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		return "OK " + r.Svids[0].SpiffeId
	case "attack-idle":
		<-ctx.Done()
		return "done"
	case "attack-stream-share":
		// The legitimate target opens a stream, then a helper keeps a copy
		// of its connection after the target is gone.
		c, err := net.Dial("unix", sock)
		if err != nil {
			return "ERR " + err.Error()
		}
		f, err := c.(*net.UnixConn).File()
		if err != nil {
			return "ERR " + err.Error()
		}
		cc, err := connClient(c)
		if err != nil {
			return "ERR " + err.Error()
		}
		s, err := openX509Stream(ctx, cc)
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		r, err := s.Recv()
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		fmt.Println("attack-stream-share FIRST", serialOf(r))
		pid, err := startChild("attack-raw-reader", f)
		if err != nil {
			return "ERR helper: " + err.Error()
		}
		fmt.Println("HELPER", pid)
		for {
			r, err := s.Recv()
			if err != nil {
				return "END " + status.Code(err).String()
			}
			fmt.Println("attack-stream-share RECV", serialOf(r))
		}
	case "attack-stream-exec":
		// The legitimate target opens a stream, then execs another binary
		// that keeps the connection.
		c, err := net.Dial("unix", sock)
		if err != nil {
			return "ERR " + err.Error()
		}
		f, err := c.(*net.UnixConn).File()
		if err != nil {
			return "ERR " + err.Error()
		}
		cc, err := connClient(c)
		if err != nil {
			return "ERR " + err.Error()
		}
		s, err := openX509Stream(ctx, cc)
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		r, err := s.Recv()
		if err != nil {
			return "ERR " + status.Code(err).String()
		}
		fmt.Println("attack-stream-exec FIRST", serialOf(r))
		if _, err := unix.FcntlInt(f.Fd(), unix.F_SETFD, 0); err != nil {
			return "ERR " + err.Error()
		}
		if err := os.Setenv("SIGIL_FD", strconv.Itoa(int(f.Fd()))); err != nil {
			return "ERR " + err.Error()
		}
		return "ERR exec: " + execAs(os.Getenv("SIGIL_TARGET"), "attack-frame-reader").Error()
	case "attack-frame-reader":
		// Read the HTTP/2 frames the agent sends on the inherited
		// connection until the stream ends: each message (DATA) pushed
		// is reported by the serial of the SVID it carries, then how the
		// stream ended ("DATA 1a2b END").
		f := os.NewFile(uintptr(envInt("SIGIL_FD")), "agent")
		c, err := net.FileConn(f)
		_ = f.Close() // FileConn has its own copy of the descriptor
		if err != nil {
			return "ERR " + err.Error()
		}
		fmt.Println("attack-frame-reader READY")
		if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return "ERR " + err.Error()
		}
		return readFrames(c)
	case "attack-raw-reader":
		// Wait for the process that opened the stream to die, then see
		// whether the agent still sends on the connection: a message, the
		// trailers, or the connection left open. Frames sent before the
		// death may still be unread in the socket; those without an SVID
		// in them (the transport's PINGs) are legitimate, and readFrames
		// skips them.
		ppid := os.Getppid()
		f := os.NewFile(3, "agent")
		c, err := net.FileConn(f)
		_ = f.Close() // FileConn has its own copy of the descriptor
		if err != nil {
			return "ERR " + err.Error()
		}
		fmt.Println("attack-raw-reader READY")
		for os.Getppid() == ppid {
			if ctx.Err() != nil {
				return "ERR parent never died"
			}
			time.Sleep(5 * time.Millisecond)
		}
		if err := c.SetReadDeadline(time.Now().Add(8 * time.Second)); err != nil {
			return "ERR " + err.Error()
		}
		return readFrames(c)
	case "attack-flood":
		return flood(sock, envInt("SIGIL_FLOOD_N"), time.Duration(envInt("SIGIL_FLOOD_MS"))*time.Millisecond)
	}
	return "ERR unknown role"
}

func envInt(k string) int { v, _ := strconv.Atoi(os.Getenv(k)); return v }

// serial is the serial of the SVID the agent's cache holds for an entry
// ("" while it has none).
func (e *agentEnv) serial(entryID string) string {
	s, _ := e.a.Cache().Current()
	if v := s.SVIDs[entryID]; v != nil {
		return v.Serial()
	}
	return ""
}

// readFrames reads the server side of an HTTP/2 connection carrying one
// FetchX509SVID stream: "DATA <serial>" for each message, then END (the
// trailers), EOF (closed) or OPEN (still open at the read deadline).
// Frames that carry no message (SETTINGS, PING, WINDOW_UPDATE, GOAWAY)
// are skipped: the transport sends them whenever it likes.
func readFrames(c net.Conn) string {
	var out []string
	var msg []byte // the gRPC length-prefixed messages not yet decoded
	hdr := make([]byte, 9)
	for {
		if _, err := io.ReadFull(c, hdr); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return strings.Join(append(out, "OPEN"), " ")
			}
			return strings.Join(append(out, "EOF"), " ")
		}
		n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
		payload := make([]byte, n)
		if _, err := io.ReadFull(c, payload); err != nil {
			return strings.Join(append(out, "EOF"), " ")
		}
		switch {
		case hdr[3] == 0: // DATA
			if hdr[4]&0x8 != 0 { // PADDED: pad length, data, padding
				if n == 0 || int(payload[0]) >= n {
					return strings.Join(append(out, "BADFRAME"), " ")
				}
				payload = payload[1 : n-int(payload[0])]
			}
			msg = append(msg, payload...)
			// A message may span DATA frames: decode each one complete.
			for len(msg) >= 5 {
				l := int(binary.BigEndian.Uint32(msg[1:5]))
				if len(msg) < 5+l {
					break
				}
				var r workload.X509SVIDResponse
				if msg[0] != 0 || proto.Unmarshal(msg[5:5+l], &r) != nil || len(r.Svids) == 0 {
					out = append(out, "DATA unparsable")
				} else {
					out = append(out, "DATA "+serialOf(&r))
				}
				msg = msg[5+l:]
			}
		case hdr[3] == 1 && hdr[4]&1 != 0: // HEADERS, END_STREAM: trailers
			return strings.Join(append(out, "END"), " ")
		}
	}
}

// h2Preface is what a gRPC client sends on connecting: the HTTP/2 client
// preface and an empty SETTINGS frame. A connection that sent it and
// nothing more is an idle gRPC connection.
var h2Preface = append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)

// connectServed connects and waits (without consuming it) for the agent's
// first HTTP/2 frame, so the agent has accepted and identified the
// connection before the caller changes; it returns a dup of the socket.
func connectServed(ctx context.Context, sock string) (*os.File, error) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		return nil, err
	}
	defer func() { _ = c.Close() }() // the caller gets a dup (File)
	raw, err := c.(*net.UnixConn).SyscallConn()
	if err != nil {
		return nil, err
	}
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return nil, err
	}
	var n int
	var rerr error
	if err := raw.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), make([]byte, 9), unix.MSG_PEEK)
		return rerr != unix.EAGAIN
	}); err != nil {
		return nil, err
	}
	if rerr != nil || n == 0 {
		return nil, fmt.Errorf("agent closed the connection: %v", rerr)
	}
	return c.(*net.UnixConn).File()
}

// startChild runs this binary in role with f as its fd 3, writing to our
// stdout. It has no parent-death signal: it is meant to outlive us.
func startChild(role string, f *os.File, env ...string) (int, error) {
	self, err := os.Executable()
	if err != nil {
		return 0, err
	}
	cmd := exec.Command(self, "-test.run=^TestWorkloadHelper$")
	cmd.Env = append(roleEnv(role), env...)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	return cmd.Process.Pid, nil
}

func roleEnv(role string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	return append(env, helperEnv+"="+role)
}

// execAs replaces this process with bin running role.
func execAs(bin, role string) error {
	return syscall.Exec(bin, []string{bin, "-test.run=^TestWorkloadHelper$"}, roleEnv(role))
}

// inheritedClient speaks gRPC over an inherited connection fd.
func inheritedClient(fd int) (*grpc.ClientConn, error) {
	f := os.NewFile(uintptr(fd), "agent")
	c, err := net.FileConn(f)
	_ = f.Close() // FileConn has its own copy of the descriptor
	if err != nil {
		return nil, err
	}
	return connClient(c)
}

// connClient speaks gRPC over c and never dials anything else.
func connClient(c net.Conn) (*grpc.ClientConn, error) {
	var used atomic.Bool
	return grpc.NewClient("passthrough:///agent", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) {
			if used.Swap(true) {
				return nil, errors.New("the inherited connection is gone")
			}
			return c, nil
		}))
}

func openX509Stream(ctx context.Context, cc *grpc.ClientConn) (grpc.ServerStreamingClient[workload.X509SVIDResponse], error) {
	ctx = metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
	return workload.NewSpiffeWorkloadAPIClient(cc).FetchX509SVID(ctx, &workload.X509SVIDRequest{})
}

func serialOf(r *workload.X509SVIDResponse) string {
	s, err := x509svid.ParseRaw(r.Svids[0].X509Svid, r.Svids[0].X509SvidKey)
	if err != nil {
		return "unparsable"
	}
	return s.Certificates[0].SerialNumber.Text(16)
}

// flood keeps n idle gRPC connections (preface, no request) open for d,
// opening a new one whenever the agent closes one, and reports how the
// agent treated them: refused (closed before sending anything), closed
// later (the idle timeout), or still open when the flood ended.
func flood(sock string, n int, d time.Duration) string {
	end := time.Now().Add(d)
	var mu sync.Mutex
	var refused, closed, open, dialErrs int
	minLife, maxLife := time.Hour, time.Duration(0)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4096)
			for time.Now().Before(end) {
				t0 := time.Now()
				c, err := net.Dial("unix", sock)
				if err != nil {
					mu.Lock()
					dialErrs++
					mu.Unlock()
					time.Sleep(20 * time.Millisecond)
					continue
				}
				// A refused connection may be closed before the write: the
				// read below sees that, so its error is not needed here.
				_, _ = c.Write(h2Preface)
				if err := c.SetReadDeadline(end.Add(3 * time.Second)); err != nil {
					// Not measurable without a deadline: count it as a
					// connection that failed on our side.
					_ = c.Close()
					mu.Lock()
					dialErrs++
					mu.Unlock()
					time.Sleep(20 * time.Millisecond)
					continue
				}
				got, timedOut := 0, false
				for {
					k, err := c.Read(buf)
					got += k
					if err != nil {
						timedOut = errors.Is(err, os.ErrDeadlineExceeded)
						break
					}
				}
				_ = c.Close() // done with it: the agent may have closed it first
				life := time.Since(t0)
				mu.Lock()
				switch {
				case timedOut:
					open++
				case got == 0:
					refused++
				default:
					closed++
					minLife, maxLife = min(minLife, life), max(maxLife, life)
				}
				mu.Unlock()
				if got == 0 {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond)
	fmt.Println("FLOODING")
	wg.Wait()
	return fmt.Sprintf("refused=%d closed=%d open=%d dialerrs=%d minlife=%d maxlife=%d",
		refused, closed, open, dialErrs, minLife.Milliseconds(), maxLife.Milliseconds())
}

// attackProc is a workload process started by an attack test, with every
// line that it and its helpers print.
type attackProc struct {
	cmd     *exec.Cmd
	lines   chan string
	pending []string
}

// startAttack runs bin as uid in role. Its stdout is a pipe the test owns,
// so helpers that outlive the process can still report.
func startAttack(t *testing.T, uid int, bin, socket, role string, env ...string) *attackProc {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestWorkloadHelper$")
	cmd.Env = append([]string{helperEnv + "=" + role, "SPIFFE_ENDPOINT_SOCKET=unix://" + socket, "PATH=/usr/bin:/bin", "TMPDIR=/tmp"}, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}, Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = w, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil { // the child holds the write end now
		t.Fatal(err)
	}
	p := &attackProc{cmd: cmd, lines: make(chan string, 256)}
	var helpers []int
	var mu sync.Mutex
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			l := sc.Text()
			if v, ok := strings.CutPrefix(l, "HELPER "); ok {
				pid, _ := strconv.Atoi(v)
				mu.Lock()
				helpers = append(helpers, pid)
				mu.Unlock()
			}
			p.lines <- l
		}
		close(p.lines)
	}()
	t.Cleanup(func() {
		// Best effort: any of them may have exited already, and Wait
		// reports the kill.
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		mu.Lock()
		for _, pid := range helpers {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		mu.Unlock()
		_ = r.Close()
	})
	return p
}

// line returns the rest of the first line starting with prefix.
func (p *attackProc) line(t *testing.T, prefix string, timeout time.Duration) string {
	t.Helper()
	for i, l := range p.pending {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			p.pending = append(p.pending[:i], p.pending[i+1:]...)
			return v
		}
	}
	deadline := time.After(timeout)
	for {
		select {
		case l, ok := <-p.lines:
			if !ok {
				t.Fatalf("workload output ended without a %q line (saw %q)", prefix, p.pending)
			}
			if v, ok := strings.CutPrefix(l, prefix); ok {
				return v
			}
			p.pending = append(p.pending, l)
		case <-deadline:
			t.Fatalf("no %q line within %v (saw %q)", prefix, timeout, p.pending)
		}
	}
}

// Item 8 of the hardening issue: a process connects, hands the connection
// to a helper and execs a binary that has an entry; neither the helper nor
// the exec'd binary gets that entry's SVID over a connection the attacker
// opened, and a stream whose process died is ended instead of receiving
// further rotations through a copy of its connection.
func TestAttackExecAfterConnect(t *testing.T) {
	e := newAgentEnv(t, "wlexec", nil)
	// The attacker runs this test binary under another name and hash.
	b, err := os.ReadFile(e.w.bin)
	if err != nil {
		t.Fatal(err)
	}
	attacker := filepath.Join(e.w.dir, "attacker")
	if err := os.WriteFile(attacker, append(b, make([]byte, 64)...), 0o755); err != nil {
		t.Fatal(err)
	}
	target := e.w.bin
	en := e.entry(t, "/attack/target", 0, "", "unix:uid:1001", "unix:path:"+target, "unix:sha256:"+e.w.binSum)
	clustertest.Eventually(t, 20*time.Second, "the target's SVID cached", func() bool {
		s, _ := e.a.Cache().Current()
		return len(s.SVIDsFor(s.Entries, time.Now())) == 1
	})

	t.Run("helper holding the connection after exec", func(t *testing.T) {
		p := startAttack(t, 1001, attacker, e.w.socket, "attack-exec-helper", "SIGIL_TARGET="+target)
		got := p.line(t, "attack-fd-fetch ", 30*time.Second)
		if strings.HasPrefix(got, "OK") {
			t.Errorf("the helper got the target's SVID through the attacker's connection: %q", got)
		} else if got != "ERR Unavailable" && got != "ERR PermissionDenied" {
			t.Errorf("helper: %q", got)
		}
		clustertest.Eventually(t, 5*time.Second, "the refusal logged", func() bool {
			return strings.Contains(e.c.Log.String(), "workload API connection used by a process other than the one that connected")
		})
	})

	t.Run("exec'd binary on the attacker's connection", func(t *testing.T) {
		p := startAttack(t, 1001, attacker, e.w.socket, "attack-exec-self", "SIGIL_TARGET="+target)
		if got := p.line(t, "attack-fd-fetch ", 30*time.Second); got != "ERR PermissionDenied" {
			t.Errorf("the exec'd target on the attacker's connection: %q", got)
		}
		clustertest.Eventually(t, 5*time.Second, "the refusal logged", func() bool {
			return strings.Contains(e.c.Log.String(), "caller's executable changed since it connected")
		})
	})

	t.Run("stream of a dead process ends", func(t *testing.T) {
		p := startAttack(t, 1001, target, e.w.socket, "attack-stream-share")
		p.line(t, "attack-stream-share FIRST ", 30*time.Second)
		p.line(t, "attack-raw-reader READY", 10*time.Second)
		if err := p.cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		// The target is a zombie now (we have not reaped it): dead to the
		// agent, while the helper still holds the connection.
		time.Sleep(300 * time.Millisecond)
		before := e.serial(en.ID)
		e.a.Cache().Rotate()
		// The rotation must have landed before the next subtest: one
		// landing while that subtest's process has not exec'd yet is
		// pushed to it, legitimately.
		clustertest.Eventually(t, 20*time.Second, "the rotation landed", func() bool { return e.serial(en.ID) != before })
		if got := p.line(t, "attack-raw-reader ", 30*time.Second); got != "EOF" {
			t.Errorf("after its process died the connection got %q (want it closed with no message or trailers sent)", got)
		}
		clustertest.Eventually(t, 5*time.Second, "no stream left", func() bool { return e.a.Workload().Stats.Streams.Load() == 0 })
	})

	t.Run("stream of a process that exec'd ends", func(t *testing.T) {
		p := startAttack(t, 1001, target, e.w.socket, "attack-stream-exec", "SIGIL_TARGET="+attacker)
		first := p.line(t, "attack-stream-exec FIRST ", 30*time.Second)
		// READY comes from the exec'd binary: the exec is done. A cache
		// change between the stream's first message and the exec was
		// pushed, checked, to the process that connected, and may still
		// wait unread in the socket for the new binary. It carries an
		// SVID the cache had by now; any SVID signed after this point
		// (the rotation below) reaching the connection is the attack.
		p.line(t, "attack-frame-reader READY", 30*time.Second)
		preExec := map[string]bool{first: true, e.serial(en.ID): true}
		e.a.Cache().Rotate()
		clustertest.Eventually(t, 20*time.Second, "the rotation landed", func() bool { return !preExec[e.serial(en.ID)] })
		got := p.line(t, "attack-frame-reader ", 30*time.Second)
		f := strings.Fields(got)
		if len(f) == 0 || f[len(f)-1] != "END" {
			t.Errorf("after its process exec'd another binary the stream got %q (want it ended)", got)
		}
		for i := 0; i+1 < len(f); i += 2 {
			if f[i] != "DATA" || !preExec[f[i+1]] {
				t.Errorf("after its process exec'd another binary the stream got %q: %s %s was not pushed before the exec (SVIDs then: %v)", got, f[i], f[i+1], preExec)
			} else {
				t.Logf("pushed before the exec, read after it: SVID %s", f[i+1])
			}
		}
	})

	// The target started as itself still gets its SVID.
	if got := e.w.result(t, 1001, "fetch"); got != "OK "+en.SPIFFEID+"#" {
		t.Fatalf("the target itself: %q", got)
	}
}

// Item 10 of the hardening issue: one uid holding many idle connections
// runs into its own connection cap and the idle timeout, and another uid
// is still served meanwhile; the total cap bounds all uids together.
func TestAttackWorkloadConnectionFlood(t *testing.T) {
	const perUID, total = 8, 12
	e := newAgentEnv(t, "wlflood", func(c *agent.Config) {
		c.WorkloadAPI.Limits.ConnectionsPerCaller = perUID
		c.WorkloadAPI.Limits.Connections = total
		c.WorkloadAPI.Limits.IdleTimeout = time.Second
	})
	e.entry(t, "/wl/b", 0, "", "unix:uid:1002")
	clustertest.Eventually(t, 20*time.Second, "the SVID cached", func() bool {
		s, _ := e.a.Cache().Current()
		return len(s.SVIDsFor(s.Entries, time.Now())) == 1
	})

	var peak atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			if n := e.a.Workload().Stats.Connections.Load(); n > peak.Load() {
				peak.Store(n)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	p := startAttack(t, 1001, e.w.bin, e.w.socket, "attack-flood", "SIGIL_FLOOD_N=40", "SIGIL_FLOOD_MS=6000")
	p.line(t, "FLOODING", 20*time.Second)

	if got := e.w.result(t, 1002, "fetch"); got != "OK "+e.td+"/wl/b#" {
		t.Errorf("uid 1002 during the flood: %q", got)
	}
	close(stop)
	<-sampled
	if n := peak.Load(); n > perUID+1 {
		t.Errorf("%d connections open at once with one uid flooding (cap %d per uid, plus uid 1002's)", n, perUID)
	}

	// The total cap: root's connections fit its own cap but not the total.
	var admitted, refused int
	for range perUID - 2 {
		c, err := net.Dial("unix", e.w.socket)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		// A refused connection may be closed before the write: the read
		// below tells admitted from refused.
		_, _ = c.Write(h2Preface)
		if err := c.SetReadDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		if k, _ := c.Read(make([]byte, 64)); k > 0 {
			admitted++
		} else {
			refused++
		}
	}
	if refused == 0 || e.a.Workload().Stats.Connections.Load() > total {
		t.Errorf("total cap %d: root had %d connections admitted, %d refused, %d open", total, admitted, refused, e.a.Workload().Stats.Connections.Load())
	}

	res := p.line(t, "attack-flood ", 30*time.Second)
	var ref, closed, open, dialErrs, minLife, maxLife int
	if _, err := fmt.Sscanf(res, "refused=%d closed=%d open=%d dialerrs=%d minlife=%d maxlife=%d", &ref, &closed, &open, &dialErrs, &minLife, &maxLife); err != nil {
		t.Fatalf("flood result %q: %v", res, err)
	}
	t.Logf("flood: %s", res)
	if ref == 0 {
		t.Errorf("no connection over the per-uid cap was refused: %s", res)
	}
	if open != 0 || closed == 0 || minLife < 500 || maxLife > 5000 {
		t.Errorf("idle connections were not closed after the 1 s idle timeout: %s", res)
		for l := range strings.SplitSeq(e.c.Log.String(), "\n") {
			if strings.Contains(l, "workload") && !strings.Contains(l, "connection refused") {
				t.Log(l)
			}
		}
	}
	if !strings.Contains(e.c.Log.String(), "workload API connection refused") {
		t.Error("the agent log does not say why connections were refused")
	}
}
