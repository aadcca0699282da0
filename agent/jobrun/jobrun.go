// Package jobrun is `sigil-agent exec`: it gives one CI/CD run's command an
// identity for its lifetime and nothing beyond. It owns the run from the
// platform's ID token to the end: it joins the appliance through Join.Job
// with a P-256 key made in memory (never written), serves the Workload API
// on a private socket (a fresh 0700 directory) through an in-memory
// agent.Agent, optionally writes the run's SVID, key, bundle and JWT-SVIDs
// to an output directory, renews by joining again with a fresh token at
// half the identity's life, runs the command with the socket in
// SPIFFE_ENDPOINT_SOCKET (its stdio passed through, its signals
// forwarded), and when it ends calls Agent.RunEnd (revoking the run's
// SVIDs, removing the job agent) and removes the socket and output files.
// Nothing is left behind: no daemon, no data directory.
package jobrun

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// Options describe one run.
type Options struct {
	// Servers are appliance API addresses (host:port), tried in order.
	Servers []string
	// RootCert is the trust domain's root certificate (PEM file).
	RootCert string
	// Rule is the join rule that admits the run; empty: the appliance
	// checks the token against the rules of its issuer.
	Rule string
	// Token gives the platform ID tokens.
	Token TokenSource
	// Out, when set, receives svid.pem, svid-key.pem, bundle.pem and a
	// jwt-<audience>.token per Audiences entry (all 0600; the directory is
	// made 0700 when missing), kept current and removed at the end.
	Out       string
	Audiences []string
	// Command and its arguments.
	Command []string
	// Env is the command's environment, SPIFFE_ENDPOINT_SOCKET added (nil:
	// this process's).
	Env []string
	// Stdin, Stdout, Stderr are passed to the command as they are.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Log is sigil-agent's own log (nil: slog.Default()).
	Log *slog.Logger
	// SVIDWait bounds the wait for the run's first X.509-SVID (0: 30 s);
	// RunEndTimeout bounds the final RunEnd call (0: 10 s).
	SVIDWait, RunEndTimeout time.Duration
}

// SocketEnv is the variable that tells the command where the Workload API
// is (go-spiffe's workloadapi.SocketEnv).
const SocketEnv = "SPIFFE_ENDPOINT_SOCKET"

func (o *Options) check() error {
	switch {
	case len(o.Servers) == 0:
		return errors.New("no appliance servers")
	case o.RootCert == "":
		return errors.New("no root certificate")
	case o.Token == nil:
		return errors.New("no platform token source")
	case len(o.Command) == 0:
		return errors.New("no command to run")
	}
	if _, err := jwtFileNames(o.Audiences); err != nil {
		return err
	}
	if o.Out != "" && !filepath.IsAbs(o.Out) {
		abs, err := filepath.Abs(o.Out)
		if err != nil {
			return err
		}
		o.Out = abs
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.SVIDWait <= 0 {
		o.SVIDWait = 30 * time.Second
	}
	if o.RunEndTimeout <= 0 {
		o.RunEndTimeout = 10 * time.Second
	}
	if o.Env == nil {
		o.Env = os.Environ()
	}
	// The platform token the run joined with is not the command's: kept in
	// its environment, anything that dumps the environment would hand out
	// a token that joins (it is single use, but only once used).
	if et, ok := o.Token.(*EnvToken); ok {
		o.Env = slices.DeleteFunc(slices.Clone(o.Env), func(kv string) bool { return strings.HasPrefix(kv, et.Var+"=") })
	}
	return nil
}

// TrustDomainAudience is the default audience of a run's platform token,
// the trust domain's ID (spiffe://<td>), read from the root certificate's
// URI SAN: a join rule's default audience too.
func TrustDomainAudience(rootCert string) (string, error) {
	certs, err := pemfile.ReadCerts(rootCert)
	if err != nil {
		return "", fmt.Errorf("root certificate: %w", err)
	}
	for _, u := range certs[0].URIs {
		if u.Scheme == "spiffe" && u.Host != "" {
			return "spiffe://" + u.Host, nil
		}
	}
	return "", fmt.Errorf("root certificate %s names no trust domain (no spiffe:// URI SAN): give --token-audience", rootCert)
}

// run is one run in progress.
type run struct {
	o   Options
	log *slog.Logger
	a   *agent.Agent
	key *ecdsa.PrivateKey
	uid uint32

	mu sync.Mutex
	// job is what the last join said about the run, joined when.
	job    *api.JobSVID
	joined time.Time
	// serials are the run's X.509-SVIDs seen in the cache, with their
	// expiry: RunEnd revokes those still valid.
	serials map[string]time.Time
}

// Run runs o.Command under the run's identity and returns its exit status
// (128+signal when a signal ended it). err is set when the run could not
// be set up (no command ran) or the command could not be started. Signals
// (SIGINT, SIGTERM, SIGHUP, SIGQUIT) are forwarded to the command while it
// runs, and end the setup before it does; ctx ending sends it SIGTERM.
func Run(ctx context.Context, o Options) (code int, err error) {
	if err := o.check(); err != nil {
		return 0, err
	}
	sigs := newSignals()
	defer sigs.stop()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		// Before the command runs, a signal ends the setup.
		select {
		case <-sigs.early:
			cancel()
		case <-ctx.Done():
		}
	}()

	r := &run{o: o, log: o.Log, uid: uint32(os.Getuid()), serials: map[string]time.Time{}}
	if r.key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return 0, err
	}
	sockDir, err := os.MkdirTemp("", "sigil-exec-")
	if err != nil {
		return 0, fmt.Errorf("workload API socket directory: %w", err)
	}
	defer func() {
		if rmErr := os.RemoveAll(sockDir); rmErr != nil {
			r.log.Warn("workload API socket directory not removed", "dir", sockDir, "err", rmErr)
		}
	}()
	sock := filepath.Join(sockDir, "agent.sock")
	r.a, err = agent.NewInMemory(agent.Config{Servers: o.Servers, ServerOrder: agent.ServerOrderListed, RootCert: o.RootCert,
		WorkloadAPI: agent.WorkloadAPIConfig{Socket: sock, SocketMode: "0600"}}, r.key, r.log)
	if err != nil {
		return 0, err
	}
	tok, err := o.Token.Token(ctx)
	if err != nil {
		return 0, fmt.Errorf("platform token from %s: %w", o.Token, err)
	}
	if err := r.join(ctx, tok); err != nil {
		return 0, sigs.setupErr(err)
	}
	job := r.jobInfo()
	r.log.Info("job joined", "rule", o.Rule, "run", job.RunID, "spiffe_id", job.SPIFFEID, "agent", job.AgentID, "expires", job.ExpiresAt)

	// From here on the run exists on the appliance: every way out ends it.
	code = 1
	svctx, stopServing := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	serveErr := make(chan error, 1)
	wg.Go(func() { serveErr <- r.a.Serve(svctx) })
	wg.Go(func() { r.trackSerials(svctx) })
	var out *outFiles
	defer func() {
		stopServing()
		wg.Wait()
		r.end(code)
		if out != nil {
			out.remove()
		}
	}()

	if err := r.waitSVID(ctx, serveErr); err != nil {
		return code, sigs.setupErr(err)
	}
	if o.Out != "" {
		if out, err = newOutFiles(o.Out, o.Audiences, r.log); err != nil {
			return code, err
		}
		if err := out.update(ctx, r.a.Cache(), r.entryID()); err != nil {
			return code, sigs.setupErr(err)
		}
		wg.Go(func() { out.run(svctx, r.a.Cache(), r.entryID) })
	}
	wg.Go(func() { r.renewLoop(svctx) })
	if err := ctx.Err(); err != nil {
		return code, sigs.setupErr(err)
	}
	env := append(slices.Clip(o.Env), SocketEnv+"=unix://"+sock)
	code, err = runCommand(ctx, o, env, sigs)
	return code, err
}

// join joins (or renews) through Join.Job with tok and the run's key.
func (r *run) join(ctx context.Context, tok string) error {
	var job *api.JobSVID
	err := r.a.JoinWith(ctx, func(ctx context.Context, jc *api.JoinClient) (*join.SVID, error) {
		s, j, err := join.Job(ctx, jc, r.o.Rule, tok, r.uid, r.key)
		job = j
		return s, err
	})
	if err != nil {
		return err
	}
	r.o.Token.Used(tok)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.job != nil && r.job.EntryID != job.EntryID {
		r.log.Warn("the run's entry changed on renewal", "was", r.job.EntryID, "now", job.EntryID)
	}
	r.job, r.joined = job, time.Now()
	return nil
}

func (r *run) jobInfo() *api.JobSVID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.job
}

func (r *run) entryID() string { return r.jobInfo().EntryID }

// waitSVID waits, bounded by SVIDWait, until the cache holds the run's
// X.509-SVID: the command must find it at once.
func (r *run) waitSVID(ctx context.Context, serveErr <-chan error) error {
	deadline := time.NewTimer(r.o.SVIDWait)
	defer deadline.Stop()
	for {
		snap, next := r.a.Cache().Current()
		if v := snap.SVIDs[r.entryID()]; v != nil && time.Now().Before(v.NotAfter) && snap.Bundle != nil {
			return nil
		}
		select {
		case <-next:
		case err := <-serveErr:
			return fmt.Errorf("workload API: %w", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("the run's X.509-SVID (%s, entry %s) did not arrive within %s: see the log above for sync or signing errors",
				r.jobInfo().SPIFFEID, r.entryID(), r.o.SVIDWait)
		}
	}
}

// trackSerials records every X.509-SVID of the run the cache held.
func (r *run) trackSerials(ctx context.Context) {
	for {
		snap, next := r.a.Cache().Current()
		r.mu.Lock()
		for _, v := range snap.SVIDs {
			r.serials[v.Serial()] = v.NotAfter
		}
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-next:
		}
	}
}

// liveSerials are the run's SVIDs still valid, latest expiry first, at
// most api.MaxRunEndSerials.
func (r *run) liveSerials() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	var out []string
	for s, exp := range r.serials {
		if now.Before(exp) {
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b string) int { return r.serials[b].Compare(r.serials[a]) })
	if len(out) > api.MaxRunEndSerials {
		out = out[:api.MaxRunEndSerials]
	}
	return out
}

// end tells the appliance the run is over (bounded; a failure is logged:
// the run's SVIDs then expire with the rule's TTL).
func (r *run) end(code int) {
	ctx, cancel := context.WithTimeout(context.Background(), r.o.RunEndTimeout)
	defer cancel()
	serials := r.liveSerials()
	if err := r.a.RunEnd(ctx, &api.RunEndRequest{Serials: serials, ExitCode: code}); err != nil {
		exp := time.Time{}
		if s := r.a.SVID(); s != nil {
			exp = s.Chain[0].NotAfter
		}
		r.log.Error("run end not recorded by the appliance: the run's identity stays valid until it expires", "err", err,
			"run", r.jobInfo().RunID, "expires", exp)
		return
	}
	r.log.Info("run ended", "run", r.jobInfo().RunID, "exit_code", code, "revoked", len(serials))
}

// renewLoop joins again with a fresh platform token at half the run
// identity's life; when no fresh token can be had it says when the
// identity ends and carries on until then.
func (r *run) renewLoop(ctx context.Context) {
	failures := 0
	told := false
	for {
		// Half the life left at the join: the certificate's NotBefore
		// is backdated for clock skew, which a one-minute TTL feels.
		r.mu.Lock()
		joined := r.joined
		r.mu.Unlock()
		na := r.a.SVID().Chain[0].NotAfter
		wait := time.Until(joined.Add(na.Sub(joined) / 2))
		if failures > 0 {
			wait = retryWait(failures, time.Until(na))
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(wait, 0)):
		}
		tok, err := r.o.Token.Token(ctx)
		if errors.Is(err, ErrNoFreshToken) {
			if !told {
				told = true
				r.log.Warn("no fresh platform token to renew the run's identity: it ends then", "source", r.o.Token.String(),
					"expires", na, "refreshable", r.o.Token.Refreshable())
			}
			if !r.o.Token.Refreshable() {
				<-ctx.Done()
				return
			}
			failures++
			continue
		}
		if err == nil {
			err = r.join(ctx, tok)
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			failures++
			r.log.Warn("run identity not renewed; will retry", "err", err, "failures", failures, "expires", na)
			continue
		}
		failures, told = 0, false
		// The run's SVIDs were cut at the agent's previous expiry (see
		// cache.holdIfCut): re-sign them for the new one.
		r.a.Cache().Rotate()
		r.log.Info("run identity renewed", "run", r.jobInfo().RunID, "expires", r.a.SVID().Chain[0].NotAfter)
	}
}

// retryWait doubles from 1 s to 30 s, never more than a quarter of what is
// left of the identity while some is left.
func retryWait(failures int, left time.Duration) time.Duration {
	d := min(time.Second<<min(failures-1, 5), 30*time.Second)
	if left > 0 {
		d = min(d, left/4)
	}
	return max(d, time.Second)
}

// cacheSource is what outFiles needs from the agent's cache.
type cacheSource interface {
	Current() (*cache.Snapshot, <-chan struct{})
	JWTSVID(ctx context.Context, e api.Entry, audience []string) (string, time.Time, error)
}
