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
//     area is worth one slot per source however often it is sent; an EK
//     holds at most maxPendingPerEK in all, its newest replacing its
//     oldest. Keying by source too means that an attacker who knows a
//     host's EK public area cannot, from one address, keep replacing the
//     host's own challenge before the host proves it;
//   - at most maxPendingPerSource per source, the newest replacing the
//     oldest, so one address cannot fill the table with many EKs;
//   - a token bucket per source (helloRate, helloBurst) for hellos that
//     would get a challenge; a successful proof gives its token back, so
//     hosts that really join (a fleet behind one NAT address) are not
//     slowed, while hellos never proven (no TPM behind them) are;
//   - maxPending in all, refused (not evicted) when reached: evicting
//     under genuine load would fail every join instead of the newest.
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
	// maxPendingPerEK: one per source, and a few sources at most (a host
	// that changed address, retrying).
	maxPendingPerEK = 4
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
// proof's lookup), by EK hash and by source (the limits above).
type challengeTable struct {
	ttl                   time.Duration
	max, perEK, perSource int
	onReplace             func(reason string) // counts replaced challenges; may be nil

	mu       sync.Mutex
	byNonce  map[string]*challenge
	byEK     map[string][]*challenge // oldest first
	bySource map[string][]*challenge // oldest first
	order    *list.List              // all, oldest first: the expiry order, as the TTL is fixed
}

func newChallengeTable(ttl time.Duration, max, perEK, perSource int, onReplace func(string)) *challengeTable {
	return &challengeTable{ttl: ttl, max: max, perEK: perEK, perSource: perSource, onReplace: onReplace,
		byNonce: map[string]*challenge{}, byEK: map[string][]*challenge{}, bySource: map[string][]*challenge{}, order: list.New()}
}

// errTableFull is returned by add when maxPending challenges are pending.
type errTableFull struct{ pending int }

func (e errTableFull) Error() string {
	return fmt.Sprintf("too many joins in progress on this node (%d challenges pending); retry later", e.pending)
}

// add stores ch (nonce, ekHash and source set), first dropping expired
// challenges, the previous challenge for ch's EK from ch's source, and
// the oldest of ch's EK's and of ch's source's challenges when either is
// at its bound. A full table refuses ch and changes nothing.
func (t *challengeTable) add(now time.Time, ch *challenge) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.sweepLocked(now)
	var victims []*challenge
	var reasons []string
	drop := func(c *challenge, reason string) {
		victims, reasons = append(victims, c), append(reasons, reason)
	}
	dropped := func(c *challenge) bool { return slices.Contains(victims, c) }
	// oldestKept drops the oldest of list not already dropped when more
	// than bound-1 would remain.
	oldestKept := func(list []*challenge, bound int, reason string) {
		kept := 0
		for _, c := range list {
			if !dropped(c) {
				kept++
			}
		}
		if kept < bound {
			return
		}
		for _, c := range list {
			if !dropped(c) {
				drop(c, reason)
				return
			}
		}
	}
	for _, c := range t.byEK[ch.ekHash] {
		if c.source == ch.source {
			drop(c, "same-ek")
		}
	}
	oldestKept(t.byEK[ch.ekHash], t.perEK, "ek-full")
	oldestKept(t.bySource[ch.source], t.perSource, "source-full")
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
	t.byEK[ch.ekHash] = append(t.byEK[ch.ekHash], ch)
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
	unindex(t.byEK, ch.ekHash, ch)
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
// count as IPv4.
func helloSource(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return "unknown"
	}
	var ip netip.Addr
	switch a := p.Addr.(type) {
	case *net.TCPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		if ap, err := netip.ParseAddrPort(p.Addr.String()); err == nil {
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
