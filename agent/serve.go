package agent

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/callerid"
	"github.com/sigil-appliance/sigil/agent/output"
	"github.com/sigil-appliance/sigil/agent/workload"
)

// Cache is the agent's workload SVID cache (filled while Serve runs).
func (a *Agent) Cache() *cache.Cache { return a.cache }

// Workload is the Workload API server (nil before Serve).
func (a *Agent) Workload() *workload.Server {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.wl
}

// Serve runs the agent until ctx ends: identity renewal, the appliance
// sync and SVID rotation, the Workload API socket, file outputs, and the
// health and metrics endpoint. Start must have succeeded first.
func (a *Agent) Serve(ctx context.Context) error {
	if a.SVID() == nil {
		return errors.New("agent has no identity: call Start first")
	}
	mode, _ := a.cfg.socketMode()
	sock := a.cfg.WorkloadAPI.Socket
	if sock == "" {
		sock = DefaultSocket
	}
	l, err := workload.Listen(sock, mode)
	if err != nil {
		return err
	}
	srv := workload.New(a.cache, callerid.New(""), workload.Options{
		Log: a.log, Limits: a.cfg.WorkloadAPI.Limits,
		AllowUnauthenticatedVerifiers: a.cfg.WorkloadAPI.AllowUnauthenticatedVerifiers,
	})
	a.mu.Lock()
	a.wl = srv
	a.mu.Unlock()

	var hl net.Listener
	if a.cfg.HealthListen != "" {
		if hl, err = net.Listen("tcp", a.cfg.HealthListen); err != nil {
			_ = l.Close() // the health listener's error is the one to report
			return err
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	run := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }
	if !a.inMemory { // an in-memory agent's owner renews it (NewInMemory)
		run(func() { a.Run(ctx) })
	}
	run(func() { a.cache.Run(ctx) })
	for _, o := range a.cfg.Outputs {
		run(func() { output.Run(ctx, a.cache, o, a.log, &a.outputStats) })
	}
	if hl != nil {
		hs := &http.Server{Handler: a.healthHandler(srv), ReadHeaderTimeout: 5 * time.Second}
		run(func() {
			// Serve returns ErrServerClosed once the Close below runs; any
			// other error stops the endpoint while the agent keeps serving.
			if err := hs.Serve(hl); !errors.Is(err, http.ErrServerClosed) {
				a.log.Error("health endpoint stopped", "listen", a.cfg.HealthListen, "err", err)
			}
		})
		run(func() {
			<-ctx.Done()
			// Shutting down: an error closing the listener or its
			// connections leaves nothing to do.
			_ = hs.Close()
		})
	}
	a.log.Info("workload API serving", "socket", sock, "health", a.cfg.HealthListen)
	err = srv.Serve(ctx, l)
	cancel()
	wg.Wait()
	a.app.close()
	return err
}

func (a *Agent) healthHandler(srv *workload.Server) http.Handler {
	reg := prometheus.NewRegistry()
	cs, ws := &a.cache.Stats, &srv.Stats
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help}, f))
	}
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
	}
	i := func(v interface{ Load() int64 }) func() float64 { return func() float64 { return float64(v.Load()) } }
	counter("sigil_agent_workload_attestations_total", "Workload API callers attested.", i(&ws.Attestations))
	counter("sigil_agent_workload_attestation_failures_total", "Workload API callers that could not be attested.", i(&ws.AttestFailures))
	counter("sigil_agent_workload_denied_total", "Workload API requests denied (no matching entry).", i(&ws.Denied))
	counter("sigil_agent_workload_limited_total", "Workload API requests refused by per-caller limits.", i(&ws.Limited))
	gauge("sigil_agent_workload_streams", "Open Workload API streams.", i(&ws.Streams))
	gauge("sigil_agent_workload_connections", "Open Workload API connections.", i(&ws.Connections))
	counter("sigil_agent_workload_connections_refused_total", "Workload API connections refused by the connection caps.", i(&ws.ConnRefused))
	counter("sigil_agent_svid_rotations_total", "Workload X.509-SVIDs signed (first issue and rotations).", i(&cs.Rotations))
	counter("sigil_agent_svid_sign_failures_total", "Failed SVID signing rounds.", i(&cs.SignFailures))
	counter("sigil_agent_sync_failures_total", "Appliance sync streams that failed or ended.", i(&cs.SyncFailures))
	counter("sigil_agent_jwt_svids_signed_total", "JWT-SVIDs fetched from the appliance.", i(&cs.JWTsSigned))
	counter("sigil_agent_jwt_svid_failures_total", "Failed JWT-SVID fetches.", i(&cs.JWTFailures))
	counter("sigil_agent_output_notifications_total", "File output notifications attempted (signals and commands).", i(&a.outputStats.Notifications))
	counter("sigil_agent_output_notify_failures_total", "File output notifications that failed (see the log for the output and why).", i(&a.outputStats.NotifyFailures))
	gauge("sigil_agent_appliance_connected", "1 while the appliance sync stream is up.", func() float64 {
		if cs.Connected.Load() {
			return 1
		}
		return 0
	})
	gauge("sigil_agent_cache_entries", "Registration entries in the cache.", func() float64 {
		s, _ := a.cache.Current()
		return float64(len(s.Entries))
	})
	gauge("sigil_agent_cache_svids", "Valid X.509-SVIDs in the cache.", func() float64 {
		s, _ := a.cache.Current()
		return float64(len(s.SVIDsFor(s.Entries, time.Now())))
	})
	gauge("sigil_agent_identity_expiry_seconds", "Seconds until the agent's own SVID expires.", func() float64 {
		if s := a.SVID(); s != nil {
			return time.Until(s.Chain[0].NotAfter).Seconds()
		}
		return 0
	})
	gauge("sigil_agent_bundle_acked_sequence", "The last trust bundle sequence the appliance took this agent's acknowledgement of (0: none since the agent started).", func() float64 {
		return float64(cs.BundleAcked.Load())
	})
	gauge("sigil_agent_banned", "1 while the appliance refuses this agent as banned (an operator must unban it).", func() float64 {
		if a.app.bannedReason() != "" {
			return 1
		}
		return 0
	})
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	// A banned agent is alive but of no use: both probes say so, with the
	// appliance's own words, so that an orchestrator stops sending it
	// workloads and an operator sees why.
	banned := func(w http.ResponseWriter) bool {
		if reason := a.app.bannedReason(); reason != "" {
			http.Error(w, "agent is banned by the appliance: "+reason, http.StatusServiceUnavailable)
			return true
		}
		return false
	}
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		if banned(w) {
			return
		}
		if s := a.SVID(); s == nil || time.Now().After(s.Chain[0].NotAfter) {
			http.Error(w, "agent identity expired", http.StatusServiceUnavailable)
			return
		}
		a.writeHealth(w, r)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if banned(w) {
			return
		}
		if s, _ := a.cache.Current(); s.Bundle == nil {
			http.Error(w, "no trust bundle yet", http.StatusServiceUnavailable)
			return
		}
		a.writeHealth(w, r)
	})
	return mux
}

// writeHealth answers a health probe with "ok". A failed write means the
// client went away: it is logged at debug level, not answered again.
func (a *Agent) writeHealth(w http.ResponseWriter, r *http.Request) {
	if _, err := w.Write([]byte("ok\n")); err != nil {
		a.log.Debug("health response not written", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
	}
}
