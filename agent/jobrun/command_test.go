package jobrun

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

func testOptions(cmd ...string) Options {
	return Options{Command: cmd, Stdin: strings.NewReader("in\n")}
}

// The command's exit status is passed on: its code, or 128+signal.
func TestCommandExitStatus(t *testing.T) {
	for _, tc := range []struct {
		cmd  []string
		code int
	}{
		{[]string{"sh", "-c", "exit 0"}, 0},
		{[]string{"sh", "-c", "exit 3"}, 3},
		{[]string{"sh", "-c", "kill -TERM $$"}, 128 + int(syscall.SIGTERM)},
		{[]string{"sh", "-c", "kill -KILL $$"}, 128 + int(syscall.SIGKILL)},
	} {
		sigs := newSignals()
		code, err := runCommand(context.Background(), testOptions(tc.cmd...), nil, sigs)
		sigs.stop()
		if err != nil || code != tc.code {
			t.Errorf("%q: exit %d (%v), want %d", tc.cmd, code, err, tc.code)
		}
	}
	sigs := newSignals()
	defer sigs.stop()
	if code, err := runCommand(context.Background(), testOptions("/nonexistent/command"), nil, sigs); code != 127 || err == nil {
		t.Errorf("missing command: %d %v", code, err)
	}
	if code, err := runCommand(context.Background(), testOptions(t.TempDir()), nil, sigs); code != 126 || err == nil {
		t.Errorf("a directory as command: %d %v", code, err)
	}
}

// stdin, stdout, stderr and the environment reach the command as given.
func TestCommandStdioAndEnv(t *testing.T) {
	var out, errb bytes.Buffer
	o := Options{Command: []string{"sh", "-c", `read x; echo "got $x $SPIFFE_ENDPOINT_SOCKET"; echo oops >&2; exit 5`},
		Stdin: strings.NewReader("hello\n"), Stdout: &out, Stderr: &errb}
	sigs := newSignals()
	defer sigs.stop()
	code, err := runCommand(context.Background(), o, []string{"PATH=" + os.Getenv("PATH"), SocketEnv + "=unix:///x.sock"}, sigs)
	if err != nil || code != 5 || out.String() != "got hello unix:///x.sock\n" || errb.String() != "oops\n" {
		t.Fatalf("exit %d %v, stdout %q stderr %q", code, err, out.String(), errb.String())
	}
}

// SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to sigil-agent reach the
// command, which decides what they mean; sigil-agent lives on to clean up.
func TestCommandSignalsForwarded(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		// The command reports the signal it got by its exit code.
		script := `trap 'exit 10' INT; trap 'exit 11' TERM; trap 'exit 12' HUP; trap 'exit 13' QUIT; echo ready; while :; do sleep 0.05; done`
		o := Options{Command: []string{"sh", "-c", script}, Stdout: w}
		sigs := newSignals()
		done := make(chan int, 1)
		go func() {
			code, err := runCommand(context.Background(), o, nil, sigs)
			if err != nil {
				t.Error(err)
			}
			done <- code
		}()
		line, err := bufio.NewReader(r).ReadString('\n')
		if err != nil || line != "ready\n" {
			t.Fatalf("command did not start: %q %v", line, err)
		}
		if err := syscall.Kill(os.Getpid(), sig); err != nil {
			t.Fatal(err)
		}
		want := map[syscall.Signal]int{syscall.SIGINT: 10, syscall.SIGTERM: 11, syscall.SIGHUP: 12, syscall.SIGQUIT: 13}[sig]
		select {
		case code := <-done:
			if code != want {
				t.Errorf("%v: exit %d, want %d", sig, code, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%v: command did not end", sig)
		}
		sigs.stop()
		_ = w.Close()
		_ = r.Close()
	}
}

// A signal before the command runs ends the setup; ctx ending sends the
// command SIGTERM.
func TestSignalBeforeCommandAndCancel(t *testing.T) {
	sigs := newSignals()
	defer sigs.stop()
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sigs.early:
	case <-time.After(5 * time.Second):
		t.Fatal("signal before the command not seen")
	}
	if err := sigs.setupErr(context.Canceled); err == nil || !strings.Contains(err.Error(), "hangup") {
		t.Fatalf("setup error %v", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	s2 := newSignals()
	defer s2.stop()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	go func() {
		// Cancel once the command's trap is set.
		_, _ = bufio.NewReader(r).ReadString('\n')
		cancel()
	}()
	o := Options{Command: []string{"sh", "-c", "trap 'exit 21' TERM; echo ready; while :; do sleep 0.05; done"}, Stdout: w}
	code, err := runCommand(ctx, o, nil, s2)
	_ = w.Close()
	if err != nil || code != 21 {
		t.Fatalf("cancelled: %d %v", code, err)
	}
}
