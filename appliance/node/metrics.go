package node

import (
	"context"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// SVID types and refusal classes of sigil_svids_issued_total and
// sigil_svids_refused_total: fixed labels, never caller-chosen text.
const (
	svidX509  = "x509"
	svidJWT   = "jwt"
	svidAgent = "agent"

	refuseBanned      = "banned"            // the calling agent is banned
	refuseUnknown     = "unknown-agent"     // the calling agent has not joined
	refuseNoEntry     = "no-entry"          // the entry does not exist
	refuseNotParent   = "not-parent"        // the entry is another agent's
	refuseBadRequest  = "bad-request"       // malformed CSR, audiences out of bounds
	refuseUnavailable = "unavailable"       // this node's own failure: no quorum, signing, commit
	refuseAtCommit    = "refused-at-commit" // the state machine refused the record (banned meanwhile)
)

// opsMetrics are the counters the services increment as they decide. A
// nil *opsMetrics counts nothing (services built by tests).
type opsMetrics struct {
	issued      *prometheus.CounterVec
	refused     *prometheus.CounterVec
	joins       *prometheus.CounterVec
	bannedCalls *prometheus.CounterVec
}

func newOpsMetrics(reg prometheus.Registerer) *opsMetrics {
	m := &opsMetrics{
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_svids_issued_total",
			Help: "SVIDs this node issued and recorded, by type (x509, jwt, agent)."}, []string{"type"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_svids_refused_total",
			Help: "SVID requests this node refused or could not serve, by type and class."}, []string{"type", "class"}),
		joins: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_join_attempts_total",
			Help: "Join and renewal calls this node received, by method (tpm-hello, tpm-prove, token, renew)."}, []string{"method"}),
		bannedCalls: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_banned_agent_calls_total",
			Help: "Calls of banned agents refused, by request (audited at most once per agent per period)."}, []string{"request"}),
	}
	if reg != nil {
		reg.MustRegister(m.issued, m.refused, m.joins, m.bannedCalls)
	}
	return m
}

func (m *opsMetrics) issue(typ string, n int) {
	if m != nil && n > 0 {
		m.issued.WithLabelValues(typ).Add(float64(n))
	}
}

func (m *opsMetrics) refuse(typ, class string) {
	if m != nil {
		m.refused.WithLabelValues(typ, class).Inc()
	}
}

func (m *opsMetrics) join(method string) {
	if m != nil {
		m.joins.WithLabelValues(method).Inc()
	}
}

func (m *opsMetrics) banned(request string) {
	if m != nil {
		m.bannedCalls.WithLabelValues(request).Inc()
	}
}

// svidType is the metric type of an issuance request name ("": none).
func svidType(what string) string {
	switch {
	case strings.HasPrefix(what, "svid.jwt"):
		return svidJWT
	case strings.HasPrefix(what, "svid.x509"):
		return svidX509
	}
	return "" // sync: not an SVID request
}

const (
	// bannedAuditEvery is how often a banned agent's refused calls are
	// audited: one record per agent per period, carrying how many calls
	// were refused since the last. A banned agent retries forever (every
	// sync backoff, every renewal), and one record per call grew the
	// replicated audit by thousands of records a day per agent.
	bannedAuditEvery = time.Hour
	// maxBannedTracked bounds the agents tracked; beyond it (all seen
	// within the period), refusals are audited one by one, as before.
	maxBannedTracked = 4096
)

type bannedTally struct {
	last       time.Time
	suppressed uint64
}

// bannedAudit decides which refusals of a banned agent are audited.
type bannedAudit struct {
	now   func() time.Time
	every time.Duration

	mu     sync.Mutex
	agents map[string]*bannedTally
}

func newBannedAudit() *bannedAudit {
	return &bannedAudit{now: time.Now, every: bannedAuditEvery, agents: map[string]*bannedTally{}}
}

// take says whether this refusal of agent is audited; if so, suppressed
// is how many were not since the last audited one. A nil *bannedAudit
// audits every refusal.
func (b *bannedAudit) take(agent string) (audit bool, suppressed uint64) {
	if b == nil {
		return true, 0
	}
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.agents[agent]
	if t == nil && len(b.agents) >= maxBannedTracked {
		for id, v := range b.agents {
			if now.Sub(v.last) >= b.every {
				delete(b.agents, id)
			}
		}
		if len(b.agents) >= maxBannedTracked {
			return true, 0
		}
	}
	if t == nil || now.Sub(t.last) >= b.every {
		if t != nil {
			suppressed = t.suppressed
		}
		b.agents[agent] = &bannedTally{last: now}
		return true, suppressed
	}
	t.suppressed++
	return false, 0
}

// bannedDetail adds the count of unaudited refusals to an audit detail.
func bannedDetail(d map[string]string, suppressed uint64, every time.Duration) map[string]string {
	if suppressed > 0 {
		d["refused_since_last_record"] = strconv.FormatUint(suppressed, 10)
	}
	d["recorded_at_most_every"] = every.String()
	return d
}

// registerNodeGauges adds what an operator watches of the node's view of
// the cluster and of its certificates.
func registerNodeGauges(n *Node, reg *prometheus.Registry) {
	reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sigil_raft_leader_changes_total",
			Help: "Leaders this node learned of since it started (elections won by any node)."},
			func() float64 { return float64(n.raft.LeaderChanges()) }),
		peerCollector{n},
		nodeCACollector{n},
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_root_ca_expiry_seconds",
			Help: "Seconds until the first of the trust bundle's root certificates expires."},
			func() float64 {
				var first time.Time
				for _, r := range n.auth.Roots() {
					if first.IsZero() || r.NotAfter.Before(first) {
						first = r.NotAfter
					}
				}
				return time.Until(first).Seconds()
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_root_rotation_phase",
			Help: "The root rotation's phase: 0 none, 1 added, 2 switched, 3 retired."},
			func() float64 {
				if rot := n.fsm.RootRotation(); rot != nil {
					return float64(map[string]int{state.PhaseAdded: 1, state.PhaseSwitched: 2, state.PhaseRetired: 3}[rot.Phase])
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_root_rotation_agents_pending",
			Help: "Agents that have not acknowledged the bundle sequence the root rotation's last phase committed (0: no rotation)."},
			func() float64 { return float64(n.pendingAcks.count(n.fsm)) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_state_bytes",
			Help: "Size of this node's state database file: entries, agents and the retained audit records, most of it the audit (-1: not readable)."},
			func() float64 {
				fi, err := os.Stat(n.statePath())
				if err != nil {
					return -1
				}
				return float64(fi.Size())
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sigil_jwt_key_expiry_seconds",
			Help: "Seconds until the newest JWT key this node published expires (negative or absent key: none published)."},
			func() float64 { return time.Until(newestJWTKey(n.fsm.Bundle(), n.cfg.NodeID)).Seconds() }),
	)
}

// newestJWTKey is when the newest of node's published JWT keys expires
// (zero: none).
func newestJWTKey(b state.Bundle, node string) time.Time {
	var last time.Time
	for _, k := range b.JWTKeys {
		if k.Node == node && k.NotAfter.After(last) {
			last = k.NotAfter
		}
	}
	return last
}

var descNodeCAExpiry = prometheus.NewDesc("sigil_node_issuing_ca_expiry_seconds",
	"Seconds until each node's issuing CA expires, as the replicated state records it (the CA it last showed: a JWT key, a checkpoint, an install). Every node reports every node, so one scrape sees a node that is down.",
	[]string{"node", "serial"}, nil)

// nodeCACollector reports every node's recorded issuing CA expiry. The
// records are bounded (state.MaxNodeCAs) and change only when a CA does,
// so the label set stays small.
type nodeCACollector struct{ n *Node }

func (nodeCACollector) Describe(ch chan<- *prometheus.Desc) { ch <- descNodeCAExpiry }

func (c nodeCACollector) Collect(ch chan<- prometheus.Metric) {
	for _, r := range c.n.fsm.NodeCAs() {
		if r.NotAfter.IsZero() {
			continue // recorded before expiries were kept, until the node shows its CA again
		}
		ch <- prometheus.MustNewConstMetric(descNodeCAExpiry, prometheus.GaugeValue, time.Until(r.NotAfter).Seconds(), r.Node, r.Serial)
	}
}

var descPeerReachable = prometheus.NewDesc("sigil_raft_peer_reachable",
	"1 if this node heard from the peer recently, 0 if not. The leader reports every member; a follower reports itself and the leader (it does not talk to other followers).",
	[]string{"peer"}, nil)

// peerCollector reports peer reachability from this node's raft view.
// Peer IDs are the cluster's node IDs: a bounded label set.
type peerCollector struct{ n *Node }

func (peerCollector) Describe(ch chan<- *prometheus.Desc) { ch <- descPeerReachable }

func (c peerCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st := c.n.raft.Status(ctx)
	// The raft view decides (heard from within three heartbeat timeouts,
	// the bound cluster status and sigil_raft_peers_reachable use); a peer
	// this node cannot judge (a follower's view of the other followers, a
	// new leader's before the first answers) is left out, not reported 0.
	for _, p := range st.Peers {
		if p.Reachable == nil {
			continue
		}
		v := 0.0
		if *p.Reachable {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descPeerReachable, prometheus.GaugeValue, v, p.ID)
	}
}
