package node

import (
	"context"
	"fmt"
	"net/http"
	"regexp"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics is per node (a registry of its own, not the global one), so
// several nodes in one test process do not collide.
type metrics struct {
	reg       *prometheus.Registry
	apply     *prometheus.HistogramVec
	applyErrs *prometheus.CounterVec
	ops       *opsMetrics // counted by the services (metrics.go)
}

func newMetrics(n *Node) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.apply = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "sigil_raft_apply_seconds",
		Help:    "Time to commit and apply a command through raft, from this node.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	}, []string{"command"})
	m.applyErrs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sigil_raft_apply_errors_total",
		Help: "Commands that did not commit, by command and kind: refused_by_state (the state machine refused it: a duplicate, a banned agent, an operator's mistake) or commit_failed (no quorum, timeout, shutdown: the cluster's failure).",
	}, []string{"command", "kind"})
	status := func(f func(s statusView) float64) func() float64 {
		return func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			st := n.raft.Status(ctx)
			return f(statusView{leader: st.State == "leader", term: st.Term, last: st.LastIndex, commit: st.CommitIndex, applied: st.AppliedIndex, known: st.LeaderID != "", peers: len(st.Peers)})
		}
	}
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	m.reg.MustRegister(m.apply, m.applyErrs,
		gauge("sigil_raft_is_leader", "1 if this node is the raft leader.", status(func(s statusView) float64 { return b2f(s.leader) })),
		gauge("sigil_raft_leader_known", "1 if this node knows a leader (it is ready).", status(func(s statusView) float64 { return b2f(s.known) })),
		gauge("sigil_raft_term", "Current raft term.", status(func(s statusView) float64 { return float64(s.term) })),
		gauge("sigil_raft_last_index", "Last raft log index.", status(func(s statusView) float64 { return float64(s.last) })),
		gauge("sigil_raft_commit_index", "Raft commit index.", status(func(s statusView) float64 { return float64(s.commit) })),
		gauge("sigil_raft_applied_index", "Last index applied to the state.", status(func(s statusView) float64 { return float64(s.applied) })),
		gauge("sigil_raft_peers", "Voters in the raft configuration.", status(func(s statusView) float64 { return float64(s.peers) })),
		gauge("sigil_entries", "Registration entries.", func() float64 { e, _, _ := n.fsm.Counts(); return float64(e) }),
		gauge("sigil_agents", "Attested agents.", func() float64 { _, a, _ := n.fsm.Counts(); return float64(a) }),
		gauge("sigil_audit_records", "Audit records retained in the replicated state.", func() float64 { _, _, r := n.fsm.Counts(); return float64(r) }),
		gauge("sigil_audit_head_seq", "Sequence number of the newest audit record.", func() float64 { s, _ := n.fsm.AuditHead(); return float64(s) }),
		gauge("sigil_audit_first_seq", "First retained audit record (older ones are in exported segments).", func() float64 { return float64(n.fsm.AuditFirst()) }),
		gauge("sigil_audit_last_checkpoint_seq", "Newest audit record covered by an HSM-signed checkpoint.", func() float64 { return float64(n.fsm.LastCheckpoint()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sigil_audit_export_failures_total",
			Help: "Audit segments this node failed to write before a prune (the records remain in other nodes' segments)."},
			func() float64 { return float64(n.fsm.ExportFailures()) }),
		gauge("sigil_bundle_sequence", "Trust bundle sequence number.", func() float64 { return float64(n.fsm.Bundle().Sequence) }),
		gauge("sigil_issuing_ca_expiry_seconds", "Seconds until this node's issuing CA expires.", func() float64 {
			return time.Until(n.auth.Issuing().NotAfter).Seconds()
		}),
		limitsCollector{n},
	)
	// The process's own figures (heap, goroutines, descriptors, CPU): what
	// a fleet costs a node shows here. go_gc_heap_live_bytes is the heap
	// the last GC found live, steadier than the allocation counters
	// between collections.
	m.reg.MustRegister(
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/gc/heap/live:bytes$`)})),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	registerNodeGauges(n, m.reg)
	m.ops = newOpsMetrics(m.reg)
	return m
}

// limitsCollector reports the listeners' connection bounds (limits.go):
// what is held now and what was refused, so a flood shows on a dashboard
// rather than only in rate-limited log lines.
type limitsCollector struct{ n *Node }

var (
	descConns = prometheus.NewDesc("sigil_listener_connections",
		"Open connections per listener: all, still in their handshake (or idle HTTP keep-alive), without a client certificate.",
		[]string{"listener", "state"}, nil)
	descConnsRefused = prometheus.NewDesc("sigil_listener_connections_refused_total",
		"Connections closed by a listener's bounds: over max-connections, the oldest in its handshake dropped for a new one, over max-anonymous-connections (in all or from one source), anonymous ones at their maximum age.",
		[]string{"listener", "reason"}, nil)
	descHandshakes = prometheus.NewDesc("sigil_listener_handshakes_total",
		"Connections that completed their handshake, per listener (TLS; on a plain HTTP listener, the first request).",
		[]string{"listener"}, nil)
	descCallsRefused = prometheus.NewDesc("sigil_api_calls_refused_total",
		"API calls refused by method and TLS role, or over max-anonymous-calls, before their message was read.",
		[]string{"reason"}, nil)
)

func (limitsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descConns
	ch <- descConnsRefused
	ch <- descHandshakes
	ch <- descCallsRefused
}

func (c limitsCollector) Collect(ch chan<- prometheus.Metric) {
	for name, l := range map[string]*connLimiter{"api": c.n.apiLim, "http": c.n.httpLim, "bundle": c.n.bundleLim, "oidc": c.n.oidcLim} {
		if l == nil {
			continue
		}
		st := l.stats()
		for state, v := range map[string]int{"open": st.Open, "handshake": st.Pending, "anonymous": st.Anonymous} {
			ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(v), name, state)
		}
		for reason, v := range map[string]uint64{"max-connections": st.RefusedMax, "handshake-evicted": st.Evicted, "max-anonymous-connections": st.RefusedAnonymous, "max-anonymous-connections-per-source": st.RefusedAnonymousSource, "anonymous-max-age": st.AgedOut} {
			ch <- prometheus.MustNewConstMetric(descConnsRefused, prometheus.CounterValue, float64(v), name, reason)
		}
		ch <- prometheus.MustNewConstMetric(descHandshakes, prometheus.CounterValue, float64(st.Handshakes), name)
	}
	if c.n.gate != nil {
		for reason, v := range c.n.gate.refusals() {
			ch <- prometheus.MustNewConstMetric(descCallsRefused, prometheus.CounterValue, float64(v), reason)
		}
	}
}

type statusView struct {
	leader, known               bool
	term, last, commit, applied uint64
	peers                       int
}

func (m *metrics) observeApply(cmd string, d time.Duration, err error) {
	if m == nil {
		return
	}
	m.apply.WithLabelValues(cmd).Observe(d.Seconds())
	switch {
	case err == nil:
	case refused(err):
		m.applyErrs.WithLabelValues(cmd, "refused_by_state").Inc()
	default:
		m.applyErrs.WithLabelValues(cmd, "commit_failed").Inc()
	}
}

// httpHandler serves liveness, readiness (a leader is known, so writes can
// commit) and Prometheus metrics. Nothing here is secret.
func (n *Node) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		_, err := fmt.Fprintln(w, "ok")
		n.responseWritten(r, err)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		st := n.raft.Status(r.Context())
		if st.LeaderID == "" {
			http.Error(w, "not ready: no raft leader known", http.StatusServiceUnavailable)
			return
		}
		_, err := fmt.Fprintf(w, "ready: leader %s, term %d, applied %d\n", st.LeaderID, st.Term, st.AppliedIndex)
		n.responseWritten(r, err)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.metrics.reg, promhttp.HandlerOpts{}))
	return mux
}

// responseWritten logs a failed response write at debug level: the client
// went away, and there is no one left to tell.
func (n *Node) responseWritten(r *http.Request, err error) {
	if err != nil {
		n.log.Debug("http response not written", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
	}
}

// bundleHandler serves the SPIFFE bundle (federation, https_spiffe
// profile) and this node's CRL of revoked leaves.
func (n *Node) bundleHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r)
			return
		}
		doc, err := spiffeBundleDoc(n.td, n.fsm.Bundle(), n.cfg.Bundle.RefreshHint.Duration)
		if err != nil {
			http.Error(w, "bundle unavailable", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, err = w.Write(doc)
		n.responseWritten(r, err)
	})
	mux.HandleFunc("GET /crl", func(w http.ResponseWriter, r *http.Request) {
		der, err := n.crl()
		if err != nil {
			n.log.Error("CRL", "err", err)
			http.Error(w, "CRL unavailable", http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/pkix-crl")
		_, err = w.Write(der)
		n.responseWritten(r, err)
	})
	return mux
}
