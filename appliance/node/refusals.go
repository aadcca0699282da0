package node

import (
	"cmp"
	"context"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/peer"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// Reason classes of anonymous join refusals: short fixed labels (they are
// metric label values and summary keys, so never caller-chosen text).
const (
	classEKUntrusted     = "ek-untrusted"     // EK unparsable, not allowlisted, or not chained to a trusted EK CA
	classAKInvalid       = "ak-invalid"       // AK public area unusable as an attestation key
	classMalformed       = "malformed"        // request that does not parse (CSR, credential inputs)
	classBusy            = "busy"             // too many TPM challenges pending on this node
	classNonceUnknown    = "nonce-unknown"    // proof for a challenge this node does not hold
	classNonceExpired    = "nonce-expired"    // proof after the challenge expired
	classCertifyMismatch = "certify-mismatch" // TPM2_Certify does not cover the presented agent key
	classBadSecret       = "bad-secret"       // credential activation returned the wrong secret
	classQuotePolicy     = "quote-policy"     // PCR quote missing or not matching the policy
	classCSRMismatch     = "csr-mismatch"     // CSR not for the attested key
	classTokensDisabled  = "tokens-disabled"  // join tokens off (config or policy)
	classTokenUnknown    = "token-unknown"
	classTokenUsed       = "token-used"
	classTokenExpired    = "token-expired"
	classTokenRefused    = "token-refused" // any other refusal of a token redemption
)

// Reason classes of refusals of a proven identity (an agent renewing,
// a banned agent whose evidence checked out): counted in the same metric,
// audited by the join service itself (join.go).
const (
	classBanned        = "banned"           // the agent is banned (or gone)
	classNotCurrent    = "not-current"      // a renewal with an older certificate than the agent's latest
	classKeyMismatch   = "key-mismatch"     // renewal CSR unparsable or for another key
	classRefusedCommit = "refused-by-state" // any other refusal by the state machine
)

// provenClass classifies a refusal of a proven identity by its reason.
func provenClass(reason string) string {
	switch {
	case strings.Contains(reason, "banned"):
		return classBanned
	case strings.Contains(reason, "not the agent's current certificate"):
		return classNotCurrent
	case strings.HasPrefix(reason, "CSR"):
		return classKeyMismatch
	}
	return classRefusedCommit
}

// classNoQuorum is the log budget of this node's own failures (no quorum)
// met while serving anonymous joins; it is not a refusal class.
const classNoQuorum = "no-quorum"

const (
	// maxRefusalSources bounds the (source, class) keys counted between
	// two summaries; refusals from further sources are counted under
	// refusalOther (one key per class).
	maxRefusalSources = 1024
	refusalOther      = "other"
	// refusalLogPerSecond is how many refusal lines per reason class the
	// node log takes per second; the rest are counted and the count is
	// logged.
	refusalLogPerSecond = 20
	// refusalStopWait bounds the last summary at shutdown.
	refusalStopWait = 2 * time.Second
	// summaryAction is the audit action of a summary record.
	summaryAction = "join.refuse.summary"
)

type refusalKey struct{ source, class string }

type refusalTally struct {
	count       uint64
	first, last time.Time
}

type refusalLogWindow struct {
	start      time.Time
	lines      int
	suppressed uint64
}

// refusals counts anonymous join refusals instead of auditing each one: an
// anonymous caller must not be able to grow the replicated audit log. Each
// refusal is logged (rate-limited per class) and counted per (source IP,
// class) in a bounded map; every interval the node commits one audit.append
// with one "join.refuse.summary" event per key, and a last one at Stop.
type refusals struct {
	log      *slog.Logger
	interval time.Duration
	commit   func(context.Context, []state.AuditEvent) error
	total    *prometheus.CounterVec
	now      func() time.Time

	mu     sync.Mutex
	counts map[refusalKey]*refusalTally
	logs   map[string]*refusalLogWindow

	ctx       context.Context // cancelled by close: ends an in-flight periodic commit
	cancel    context.CancelFunc
	quit      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

func newRefusals(log *slog.Logger, interval time.Duration, reg prometheus.Registerer, commit func(context.Context, []state.AuditEvent) error) *refusals {
	if interval <= 0 {
		interval = defaultRefusalSummaryInterval
	}
	r := &refusals{log: log, interval: interval, commit: commit, now: time.Now,
		counts: map[refusalKey]*refusalTally{}, logs: map[string]*refusalLogWindow{},
		quit: make(chan struct{}), done: make(chan struct{})}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.total = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sigil_join_refusals_total",
		Help: "Join refusals on this node, by reason class: anonymous ones (summarized in the audit log, not recorded one by one) and those of a proven agent (banned, not-current, key-mismatch, refused-by-state: audited by the join service, a banned agent at most once per period).",
	}, []string{"class"})
	if reg != nil {
		reg.MustRegister(r.total)
	}
	return r
}

// newNodeRefusals wires the summarizer to the node: its metrics registry,
// and summaries committed as the node's own audit.append.
func newNodeRefusals(n *Node) *refusals {
	return newRefusals(n.log, n.cfg.Audit.RefusalSummaryInterval.Duration, n.metrics.reg,
		func(ctx context.Context, events []state.AuditEvent) error {
			_, err := n.apply(ctx, n.actor(), state.CmdAudit, state.AuditAppend{Events: events})
			return err
		})
}

// note records one anonymous refusal: counted, and logged unless this
// class has used up its log lines for this second.
func (r *refusals) note(ctx context.Context, method, class, subject string, err error) {
	addr, source := peerSource(ctx)
	now := r.now()
	r.total.WithLabelValues(class).Inc()
	r.mu.Lock()
	r.count(refusalKey{source, class}, &refusalTally{count: 1, first: now, last: now})
	logIt, suppressed := r.logAllowed(class, now)
	r.mu.Unlock()
	if suppressed > 0 {
		r.log.Warn("join refusals left out of the log", "class", class, "suppressed", suppressed, "per_second", refusalLogPerSecond)
	}
	if logIt {
		r.log.Warn("join refused", "method", method, "class", class, "remote", addr, "subject", subject, "reason", auditReason(err.Error()))
	}
}

// countOnly counts a refusal the caller audits itself (a proven agent's).
func (r *refusals) countOnly(class string) {
	if r != nil {
		r.total.WithLabelValues(class).Inc()
	}
}

// logFailure logs a failure of this node's own (no quorum, say) met while
// serving an anonymous caller, within class's log budget: such callers
// can ask as often as they like, and the log must not grow with them. It
// is not counted as a refusal: the caller was not refused for its evidence.
func (r *refusals) logFailure(class, msg string, args ...any) {
	r.mu.Lock()
	logIt, suppressed := r.logAllowed(class, r.now())
	r.mu.Unlock()
	if suppressed > 0 {
		r.log.Warn("join refusals left out of the log", "class", class, "suppressed", suppressed, "per_second", refusalLogPerSecond)
	}
	if logIt {
		r.log.Error(msg, args...)
	}
}

// count adds t to a key's tally (with r.mu held). A new source beyond the
// bound is counted under refusalOther.
func (r *refusals) count(k refusalKey, t *refusalTally) {
	c := r.counts[k]
	if c == nil && len(r.counts) >= maxRefusalSources {
		k.source = refusalOther
		c = r.counts[k]
	}
	if c == nil {
		c = &refusalTally{first: t.first, last: t.last}
		r.counts[k] = c
	} else {
		if t.first.Before(c.first) {
			c.first = t.first
		}
		if t.last.After(c.last) {
			c.last = t.last
		}
	}
	c.count += t.count
}

// logAllowed takes a log line from class's budget for this second (with
// r.mu held); suppressed is the count of lines dropped in the previous
// window, to be logged once.
func (r *refusals) logAllowed(class string, now time.Time) (ok bool, suppressed uint64) {
	w := r.logs[class]
	if w == nil {
		w = &refusalLogWindow{start: now}
		r.logs[class] = w
	}
	if now.Sub(w.start) >= time.Second {
		suppressed = w.suppressed
		*w = refusalLogWindow{start: now}
	}
	if w.lines < refusalLogPerSecond {
		w.lines++
		return true, suppressed
	}
	w.suppressed++
	return false, suppressed
}

// run commits a summary every interval, and a last one when closed.
func (r *refusals) run() {
	defer close(r.done)
	tick := time.NewTicker(r.interval)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			ctx, cancel := context.WithTimeout(r.ctx, quorumWait)
			_ = r.flush(ctx) // logged there; the counts wait for the next summary
			cancel()
		case <-r.quit:
			ctx, cancel := context.WithTimeout(context.Background(), refusalStopWait)
			_ = r.flush(ctx) // logged there (the log is all that is left)
			cancel()
			return
		}
	}
}

// close commits the last summary (best effort, bounded) and stops run.
// Call it while raft still runs.
func (r *refusals) close() {
	r.closeOnce.Do(func() {
		r.cancel()
		close(r.quit)
	})
	<-r.done
}

// flush commits what was counted since the last summary. Counts that
// could not be committed go back into the map for the next one.
func (r *refusals) flush(ctx context.Context) error {
	r.mu.Lock()
	counts := r.counts
	r.counts = map[refusalKey]*refusalTally{}
	suppressed := map[string]uint64{}
	for class, w := range r.logs {
		if w.suppressed > 0 {
			suppressed[class] = w.suppressed
			w.suppressed = 0
		}
	}
	r.mu.Unlock()
	for class, n := range suppressed {
		r.log.Warn("join refusals left out of the log", "class", class, "suppressed", n, "per_second", refusalLogPerSecond)
	}
	if len(counts) == 0 {
		return nil
	}
	events, total := summaryEvents(counts)
	if err := r.commit(ctx, events); err != nil {
		r.mu.Lock()
		for k, t := range counts {
			r.count(k, t)
		}
		r.mu.Unlock()
		r.log.Error("join refusal summary not committed; kept for the next one", "keys", len(events), "refusals", total, "err", err)
		return err
	}
	r.log.Info("join refusals summarized in the audit log", "keys", len(events), "refusals", total)
	return nil
}

// summaryEvents renders counts as audit events, sorted by source, then
// class.
func summaryEvents(counts map[refusalKey]*refusalTally) ([]state.AuditEvent, uint64) {
	keys := make([]refusalKey, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b refusalKey) int {
		return cmp.Or(strings.Compare(a.source, b.source), strings.Compare(a.class, b.class))
	})
	events := make([]state.AuditEvent, 0, len(keys))
	var total uint64
	for _, k := range keys {
		t := counts[k]
		total += t.count
		events = append(events, state.AuditEvent{Action: summaryAction, Target: k.source, Detail: map[string]string{
			"class": k.class, "count": strconv.FormatUint(t.count, 10),
			"first": t.first.UTC().Format(time.RFC3339), "last": t.last.UTC().Format(time.RFC3339)}})
	}
	return events, total
}

// peerSource is the caller's address (for the log) and IP (the summary's
// source).
func peerSource(ctx context.Context) (addr, source string) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return "", "unknown"
	}
	addr = p.Addr.String()
	switch a := p.Addr.(type) {
	case *net.TCPAddr:
		return addr, a.IP.String()
	case *net.UDPAddr:
		return addr, a.IP.String()
	}
	if host, _, err := net.SplitHostPort(addr); err == nil && net.ParseIP(host) != nil {
		return addr, host
	}
	return addr, "unknown"
}

// maxReasonBytes bounds the reason of every refusal audit event.
const maxReasonBytes = 256

// auditReason cuts a refusal reason to maxReasonBytes (at a character
// boundary, marked with "..."): every refusal event in this package passes
// its reason through here.
func auditReason(s string) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) <= maxReasonBytes {
		return s
	}
	cut := maxReasonBytes - len("...")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// maxShownID bounds how much of a caller-supplied ID is echoed.
const maxShownID = 64

// shownID is a caller-supplied ID fit to echo in errors, logs and audit
// records: non-printable characters (and invalid UTF-8) replaced by '?',
// at most maxShownID characters (longer ones end in "...").
func shownID(s string) string {
	var b strings.Builder
	n := 0
	for _, c := range s {
		if n == maxShownID {
			// One more character than fits: cut back to make room for
			// the marker.
			out := []rune(b.String())
			return string(out[:maxShownID-3]) + "..."
		}
		if c == utf8.RuneError || !unicode.IsPrint(c) {
			c = '?'
		}
		b.WriteRune(c)
		n++
	}
	return b.String()
}
