package jobrun

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
)

// Forwarded are the signals passed on to the command while it runs.
var Forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

// signals catches Forwarded from the start of Run to its end: before the
// command runs the first one ends the setup (early), while it runs each
// is sent to it, after it ended they are ignored while the run is cleaned
// up.
type signals struct {
	ch    chan os.Signal
	early chan struct{}

	mu   sync.Mutex
	proc *os.Process
	got  os.Signal // the first signal that came while no command ran
	// pending came after the command started but before attach: the
	// command may already be running (and waiting for it).
	pending  []os.Signal
	started  bool
	detached bool
}

func newSignals() *signals {
	s := &signals{ch: make(chan os.Signal, 8), early: make(chan struct{})}
	signal.Notify(s.ch, Forwarded...)
	go s.loop()
	return s
}

func (s *signals) loop() {
	for sig := range s.ch {
		s.mu.Lock()
		switch {
		case s.proc != nil:
			// The command may have exited a moment ago: nothing to tell.
			_ = s.proc.Signal(sig)
		case s.started && !s.detached:
			s.pending = append(s.pending, sig)
		case s.got == nil:
			s.got = sig
			close(s.early)
		}
		s.mu.Unlock()
	}
}

// stop ends the catching (signal.Stop delivers nothing once it returned).
func (s *signals) stop() {
	signal.Stop(s.ch)
	close(s.ch)
}

// starting marks the command as about to start: signals from here to
// attach are held for it, not taken as the end of the setup.
func (s *signals) starting() {
	s.mu.Lock()
	s.started = true
	s.mu.Unlock()
}

// attach sends the command the signals held since starting, then each
// that comes.
func (s *signals) attach(p *os.Process) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.proc = p
	for _, sig := range s.pending {
		_ = p.Signal(sig)
	}
	s.pending = nil
}

// detach stops forwarding: the command has ended (or never started).
func (s *signals) detach() {
	s.mu.Lock()
	s.proc, s.pending, s.detached = nil, nil, true
	s.mu.Unlock()
}

// first is the signal that came before the command ran (nil: none).
func (s *signals) first() os.Signal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got
}

// setupErr names the signal that interrupted the setup, if one did.
func (s *signals) setupErr(err error) error {
	if sig := s.first(); sig != nil {
		return fmt.Errorf("interrupted by %v before the command ran: %w", sig, err)
	}
	return err
}

// runCommand runs o.Command with env and returns its exit status: its
// exit code, or 128+signal when a signal ended it. A command that cannot
// be started returns 127 (not found) or 126, as a shell would, and the
// error. ctx ending sends the command the signal that ended the setup,
// else SIGTERM, and waits for it.
func runCommand(ctx context.Context, o Options, env []string, sigs *signals) (int, error) {
	cmd := exec.Command(o.Command[0], o.Command[1:]...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	// The command can run (and wait for a signal) before Start returns
	// here: a signal from now on is held for it.
	sigs.starting()
	if err := cmd.Start(); err != nil {
		sigs.detach()
		code := 126
		if errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) {
			code = 127
		}
		return code, fmt.Errorf("command not started: %w", err)
	}
	sigs.attach(cmd.Process)
	done := make(chan struct{})
	var werr error
	go func() { werr = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		sig := sigs.first()
		if sig == nil {
			sig = syscall.SIGTERM
		}
		_ = cmd.Process.Signal(sig) // it may have exited meanwhile
		<-done
	}
	sigs.detach()
	ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok {
		return 1, fmt.Errorf("command ended without a wait status: %w", werr)
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal()), nil
	}
	return ws.ExitStatus(), nil
}
