package node

import (
	"container/list"
	"context"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/peer"
)

// Bounds on what anonymous TPM hellos can make a node hold. A hello that
// passes the EK and AK checks costs the node a credential (an RSA or ECDH
// encryption) and a pending challenge until the proof or expiry; anyone
// who has seen an allowlisted or certified EK's public area can send one,
// no TPM needed. So:
//   - one challenge per EK and source: a new hello for the same EK (by
//     key hash) from the same source replaces the old one, so a public
//     area is worth one slot per source however often it is sent. There
//     is no bound per EK across sources: with one, an attacker who knows
//     a host's EK public area (it is in the EK certificate) could evict
//     the host's challenge from as many addresses as the bound, before
//     the host proves it. Per source and in all bound memory anyway;
//   - at most maxPendingPerSource per source, the newest replacing the
//     oldest, so one address cannot fill the table with many EKs;
//   - a token bucket per source (helloRate, helloBurst) for hellos that
//     would get a challenge; a successful proof gives its token back, so
//     hosts that really join (a fleet behind one NAT address) are not
//     slowed, while hellos never proven (no TPM behind them) are;
//   - maxPending in all, refused (not evicted) when reached: evicting
//     under genuine load would fail every join instead of the newest;
//   - a second, larger token bucket per source (refusedRate,
//     refusedBurst) for hellos refused on their evidence: each costs a
//     certificate-chain verification and a read barrier (to confirm the
//     refusal against the latest policy), and concurrent refusals share
//     their read barriers (readGroup).
const (
	// challengeTTL bounds a TPM join's two calls. The agent makes its EK
	// and AK before the hello; between hello and proof a real TPM does
	// TPM2_Certify, ActivateCredential (up to ~1 s on slow parts) and,
	// with a PCR policy, a quote: a few seconds at worst. 30 s leaves a
	// tenfold margin for a busy TPM or host and halves how long an
	// abandoned challenge holds a slot.
	challengeTTL = 30 * time.Second
	// maxPending bounds all challenges on a node (each is a few KB).
	maxPending = 10000
	// maxPendingPerSource: hosts behind one NAT address share it; at
	// helloRate a source cannot have more than about this many joins
	// within a real TPM's proof time (a few seconds) anyway.
	maxPendingPerSource = 16
	// helloRate and helloBurst are a source's token bucket for hellos
	// that would get a challenge and are not (yet) proven: a host hellos
	// once per join, and the burst covers a rack of hosts behind one NAT
	// booting together.
	helloRate  = 5.0 // per second
	helloBurst = 20
	// refusedRate and refusedBurst are a source's bucket for hellos
	// refused on their evidence (untrusted EK, unusable AK): a host not
	// yet allowlisted retries every few seconds, so even a large site
	// behind one address stays far below it, while a flood of garbage is
	// cut to this rate after the burst.
	refusedRate  = 50.0 // per second
	refusedBurst = 200
	// maxHelloSources bounds the limiter's map; the least recently seen
	// source is dropped first (a source idle for helloBurst/helloRate
	// seconds has a full bucket, so dropping it loses nothing).
	maxHelloSources = 4096
)

// classRateLimited is the refusal class of hellos over a source's rate
// (refusals.go counts and summarizes it like the other anonymous
// refusals).
const classRateLimited = "rate-limited"

// challengeTable holds pending TPM join challenges, indexed by nonce (the
// proof's lookup), by EK hash and source, and by source (the limits
// above).
type challengeTable struct {
	ttl            time.Duration
	max, perSource int
	onReplace      func(reason string) // counts replaced challenges; may be nil

	mu         sync.Mutex
	byNonce    map[string]*challenge
	byEKSource map[ekSource]*challenge
	bySource   map[string][]*challenge // oldest first
	order      *list.List              // all, oldest first: the expiry order, as the TTL is fixed
}

type ekSource struct{ ekHash, source string }

func newChallengeTable(ttl time.Duration, max, perSource int, onReplace func(string)) *challengeTable {
	return &challengeTable{ttl: ttl, max: max, perSource: perSource, onReplace: onReplace,
		byNonce: map[string]*challenge{}, byEKSource: map[ekSource]*challenge{}, bySource: map[string][]*challenge{}, order: list.New()}
}

// errTableFull is returned by add when maxPending challenges are pending.
type errTableFull struct{ pending int }

func (e errTableFull) Error() string {
	return fmt.Sprintf("too many joins in progress on this node (%d challenges pending); retry later", e.pending)
}

// add stores ch (nonce, ekHash and source set), first dropping expired
// challenges, the previous challenge for ch's EK from ch's source, and
// the oldest of ch's source's challenges when it is at its bound. A full
// table refuses ch and changes nothing.
func (t *challengeTable) add(now time.Time, ch *challenge) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweepLocked(now)
	var victims []*challenge
	var reasons []string
	same := t.byEKSource[ekSource{ch.ekHash, ch.source}]
	if same != nil {
		victims, reasons = append(victims, same), append(reasons, "same-ek")
	}
	// With same dropped the source is below its bound (it never holds
	// more), so the oldest dropped here is never same.
	if fromSource := t.bySource[ch.source]; len(fromSource)-len(victims) >= t.perSource {
		victims, reasons = append(victims, fromSource[0]), append(reasons, "source-full")
	}
	if len(t.byNonce)-len(victims) >= t.max {
		return errTableFull{pending: len(t.byNonce)}
	}
	for i, c := range victims {
		t.removeLocked(c)
		if t.onReplace != nil {
			t.onReplace(reasons[i])
		}
	}
	ch.expires = now.Add(t.ttl)
	ch.elem = t.order.PushBack(ch)
	t.byNonce[ch.nonce] = ch
	t.byEKSource[ekSource{ch.ekHash, ch.source}] = ch
	t.bySource[ch.source] = append(t.bySource[ch.source], ch)
	return nil
}

// take removes and returns the challenge for nonce (single use), or nil.
// The caller checks its expiry.
func (t *challengeTable) take(nonce string) *challenge {
	t.mu.Lock()
	defer t.mu.Unlock()
	ch := t.byNonce[nonce]
	if ch != nil {
		t.removeLocked(ch)
	}
	return ch
}

// len is the number of challenges held, expired ones not yet swept
// included.
func (t *challengeTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.byNonce)
}

func (t *challengeTable) sweepLocked(now time.Time) {
	for e := t.order.Front(); e != nil; e = t.order.Front() {
		ch := e.Value.(*challenge)
		if !now.After(ch.expires) {
			return
		}
		t.removeLocked(ch)
	}
}

func (t *challengeTable) removeLocked(ch *challenge) {
	t.order.Remove(ch.elem)
	delete(t.byNonce, ch.nonce)
	delete(t.byEKSource, ekSource{ch.ekHash, ch.source})
	unindex(t.bySource, ch.source, ch)
}

// unindex removes ch from m[key], and the key when nothing is left.
func unindex(m map[string][]*challenge, key string, ch *challenge) {
	rest := slices.DeleteFunc(slices.Clone(m[key]), func(c *challenge) bool { return c == ch })
	if len(rest) == 0 {
		delete(m, key)
	} else {
		m[key] = rest
	}
}

// sourceLimiter is a token bucket per source in a bounded map: the least
// recently used source is dropped when the map is full, and sources idle
// long enough for their bucket to be full again are dropped as they are
// passed (their state is the same as a new source's).
type sourceLimiter struct {
	rate, burst float64
	max         int

	mu  sync.Mutex
	m   map[string]*list.Element // of *bucket
	lru *list.List               // most recently used first
}

type bucket struct {
	key    string
	tokens float64
	last   time.Time
}

func newSourceLimiter(rate float64, burst, max int) *sourceLimiter {
	return &sourceLimiter{rate: rate, burst: float64(burst), max: max, m: map[string]*list.Element{}, lru: list.New()}
}

// allow takes a token from key's bucket; when there is none it says how
// long until there is.
func (l *sourceLimiter) allow(key string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	idle := time.Duration(l.burst / l.rate * float64(time.Second))
	for e := l.lru.Back(); e != nil; e = l.lru.Back() {
		b := e.Value.(*bucket)
		if b.key == key || now.Sub(b.last) < idle {
			break
		}
		l.lru.Remove(e)
		delete(l.m, b.key)
	}
	var b *bucket
	if e := l.m[key]; e != nil {
		b = e.Value.(*bucket)
		l.lru.MoveToFront(e)
		if el := now.Sub(b.last); el > 0 {
			b.tokens = math.Min(l.burst, b.tokens+el.Seconds()*l.rate)
		}
		b.last = now
	} else {
		for len(l.m) >= l.max {
			e := l.lru.Back()
			l.lru.Remove(e)
			delete(l.m, e.Value.(*bucket).key)
		}
		b = &bucket{key: key, tokens: l.burst, last: now}
		l.m[key] = l.lru.PushFront(b)
	}
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) / l.rate * float64(time.Second))
}

// peek says whether key has a token, taking none: hellos are checked
// against it before their evidence (a certificate chain to verify) and
// charged only once they would get a challenge, so a source that has
// used up its bucket costs the node no more verification, while refused
// hellos from others do not eat into their source's bucket.
func (l *sourceLimiter) peek(key string, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[key]
	if e == nil {
		return true, 0
	}
	b := e.Value.(*bucket)
	tokens := b.tokens
	if el := now.Sub(b.last); el > 0 {
		tokens = math.Min(l.burst, tokens+el.Seconds()*l.rate)
	}
	if tokens >= 1 {
		return true, 0
	}
	return false, time.Duration((1 - tokens) / l.rate * float64(time.Second))
}

// refund gives key a token back (a hello whose challenge was proven), up
// to the burst. A source no longer tracked has a full bucket anyway.
func (l *sourceLimiter) refund(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e := l.m[key]; e != nil {
		b := e.Value.(*bucket)
		b.tokens = math.Min(l.burst, b.tokens+1)
	}
}

// len is the number of sources tracked.
func (l *sourceLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}

// helloSource is the key the join limits use for the caller: its IPv4
// address, or its IPv6 /64 (one host or site commonly has a whole /64,
// so per-address limits would be no limit). IPv4-mapped IPv6 addresses
// count as IPv4. The API's per-source bounds on anonymous connections and
// calls (limits.go) use the same key.
func helloSource(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "unknown"
	}
	return sourceKey(p.Addr)
}

// sourceKey is helloSource for an address.
func sourceKey(addr net.Addr) string {
	if addr == nil {
		return "unknown"
	}
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
			ip = ap.Addr()
		}
	}
	if !ip.IsValid() {
		return "unknown"
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return ip.String()
	}
	pfx, err := ip.Prefix(64)
	if err != nil {
		return "unknown"
	}
	return pfx.String()
}

// readGroup shares read barriers between concurrent callers without
// weakening them: a caller joins only a barrier that has not started yet
// (so it starts after the caller's own local read, and what it confirms
// covers that read), and at most one runs at a time. Under a flood of
// refusals the node then takes about one barrier per barrier round trip
// instead of one per call.
type readGroup struct {
	mu      sync.Mutex
	idle    chan struct{} // closed when the running barrier ends; nil while none runs
	pending *readCall     // the next barrier, not started: joined by every caller until it starts
	reads   atomic.Uint64 // barriers run, for metrics
}

type readCall struct {
	done chan struct{}
	err  error
}

// do waits for a barrier begun after it was called. read runs in one of
// the callers' goroutines, detached from that caller's cancellation (the
// others wait on it too); it must bound its own time.
func (g *readGroup) do(ctx context.Context, read func(context.Context) error) error {
	g.mu.Lock()
	c := g.pending
	if c == nil {
		c = &readCall{done: make(chan struct{})}
		g.pending = c
	}
	for g.idle != nil && g.pending == c {
		idle := g.idle
		g.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return ctx.Err()
		}
		g.mu.Lock()
	}
	if g.pending != c { // another caller started it
		g.mu.Unlock()
		select {
		case <-c.done:
			return c.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	g.pending = nil
	idle := make(chan struct{})
	g.idle = idle
	g.mu.Unlock()

	g.reads.Add(1)
	c.err = read(context.WithoutCancel(ctx))
	close(c.done)
	g.mu.Lock()
	g.idle = nil
	g.mu.Unlock()
	close(idle)
	return c.err
}
