package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/peer"
)

// The table's bookkeeping (the end-to-end flood over gRPC with real TPMs
// is TestAttackJoinChallengeFlood).
func TestJoinChallengeTable(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var replaced []string
	tb := newChallengeTable(30*time.Second, 8, 3, func(r string) { replaced = append(replaced, r) })
	mk := func(nonce, ek, src string) *challenge { return &challenge{nonce: nonce, ekHash: ek, source: src} }
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	// A second hello for an EK from the same source replaces the first;
	// from other sources it does not, however many.
	must(tb.add(t0, mk("n1", "ek1", "a")))
	must(tb.add(t0, mk("n2", "ek1", "a")))
	if tb.take("n1") != nil || tb.len() != 1 {
		t.Fatalf("replaced challenge still held (%d held)", tb.len())
	}
	must(tb.add(t0, mk("n3", "ek1", "b")))
	if tb.len() != 2 {
		t.Fatalf("a hello from b replaced a's challenge for the same EK (%d held)", tb.len())
	}
	must(tb.add(t0, mk("n4", "ek1", "c")))
	if tb.len() != 3 || tb.take("n2") == nil || tb.take("n3") == nil {
		t.Fatal("a third source's hello for ek1 replaced another source's challenge")
	}
	if c := tb.take("n4"); c == nil || c.expires != t0.Add(30*time.Second) {
		t.Fatalf("newest challenge for ek1: %+v", c)
	}
	if tb.take("n4") != nil {
		t.Fatal("a challenge was taken twice")
	}

	// A source holds at most 3; its newest replaces its oldest.
	for i := range 5 {
		must(tb.add(t0, mk(fmt.Sprint("s", i), fmt.Sprint("ek-s", i), "a")))
	}
	if tb.len() != 3 || tb.take("s0") != nil || tb.take("s1") != nil {
		t.Fatalf("source a holds %d challenges, want its newest 3", tb.len())
	}
	// The same EK again from the same source at its bound replaces only
	// that EK's challenge.
	must(tb.add(t0, mk("s4b", "ek-s4", "a")))
	if tb.len() != 3 || tb.take("s4") != nil || tb.take("s2") == nil {
		t.Fatal("a same-EK hello at the source bound dropped another challenge")
	}

	// The table is full at 8: a new EK from a new source is refused and
	// changes nothing; the same EK still replaces its own.
	tb = newChallengeTable(30*time.Second, 8, 3, nil)
	for i := range 8 {
		must(tb.add(t0, mk(fmt.Sprint("f", i), fmt.Sprint("ek-f", i), fmt.Sprint("src", i))))
	}
	var full errTableFull
	if err := tb.add(t0, mk("x", "ek-x", "src-x")); !errors.As(err, &full) || tb.len() != 8 {
		t.Fatalf("add to a full table: %v (%d held)", err, tb.len())
	}
	must(tb.add(t0, mk("f0b", "ek-f0", "src0")))
	if tb.len() != 8 || tb.take("f0") != nil || tb.take("f0b") == nil {
		t.Fatal("same-EK replacement in a full table")
	}

	// Expired challenges are swept by the next add.
	if err := tb.add(t0.Add(31*time.Second), mk("late", "ek-late", "src-late")); err != nil || tb.len() != 1 {
		t.Fatalf("after expiry: %v, %d held, want 1", err, tb.len())
	}
	if len(tb.byEKSource) != 1 || len(tb.bySource) != 1 || tb.order.Len() != 1 {
		t.Fatalf("indexes not cleaned: %d EK-source pairs, %d sources, %d ordered", len(tb.byEKSource), len(tb.bySource), tb.order.Len())
	}
	if want := []string{"same-ek", "source-full", "source-full", "same-ek"}; !slices.Equal(replaced, want) {
		t.Fatalf("replacements counted %v, want %v", replaced, want)
	}
}

func TestHelloLimiter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	l := newSourceLimiter(5, 20, 4)
	for i := range 20 {
		if ok, _ := l.allow("a", t0); !ok {
			t.Fatalf("hello %d of the burst refused", i)
		}
	}
	ok, retry := l.allow("a", t0)
	if ok || retry != 200*time.Millisecond {
		t.Fatalf("after the burst: %v, retry %v", ok, retry)
	}
	if ok, retry := l.peek("a", t0.Add(100*time.Millisecond)); ok || retry != 100*time.Millisecond {
		t.Fatalf("peek after the burst: %v, retry %v", ok, retry)
	}
	if ok, _ := l.peek("new", t0); !ok || l.len() != 1 {
		t.Fatal("peek at an untracked source refused it or tracked it")
	}
	if ok, _ := l.allow("b", t0); !ok {
		t.Fatal("another source is limited by a's bucket")
	}
	if ok, _ := l.allow("a", t0.Add(200*time.Millisecond)); !ok {
		t.Fatal("no token after 1/rate")
	}
	// A proven hello gives its token back.
	if ok, _ := l.allow("a", t0.Add(200*time.Millisecond)); ok {
		t.Fatal("a token before 1/rate")
	}
	l.refund("a")
	if ok, _ := l.allow("a", t0.Add(200*time.Millisecond)); !ok {
		t.Fatal("no token after a refund")
	}
	// Bounded: 100 sources leave at most 4 tracked.
	for i := range 100 {
		l.allow(fmt.Sprint("src", i), t0.Add(time.Second))
	}
	if n := l.len(); n != 4 {
		t.Fatalf("%d sources tracked, want 4", n)
	}
	// Idle sources expire (their bucket is full again after 4 s).
	l.allow("z", t0.Add(10*time.Second))
	if n := l.len(); n != 1 {
		t.Fatalf("%d sources tracked after the others went idle, want 1", n)
	}
}

func TestHelloSource(t *testing.T) {
	for addr, want := range map[string]string{
		"192.0.2.7:443":              "192.0.2.7",
		"[::ffff:192.0.2.7]:443":     "192.0.2.7",
		"[2001:db8:1:2:3:4:5:6]:443": "2001:db8:1:2::/64",
		"[2001:db8:1:2:ff::1]:9":     "2001:db8:1:2::/64",
		"[fe80::1%eth0]:9":           "fe80::/64",
	} {
		a, err := net.ResolveTCPAddr("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := helloSource(peer.NewContext(context.Background(), &peer.Peer{Addr: a})); got != want {
			t.Errorf("%s: source %q, want %q", addr, got, want)
		}
	}
	if got := helloSource(context.Background()); got != "unknown" {
		t.Errorf("no peer: %q", got)
	}
}

// Someone who knows a host's EK public area (it is in the host's EK
// certificate) sends hellos for it from many sources (IPv6 /64s are
// cheap) between the host's hello and its proof. The host's challenge
// stays: a hello replaces only the challenge for the same EK from the
// same source.
func TestAttackEKChallengeEvictionFromManySources(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tb := newChallengeTable(challengeTTL, maxPending, maxPendingPerSource, nil)
	if err := tb.add(t0, &challenge{nonce: "host", ekHash: "ek-host", source: "192.0.2.7"}); err != nil {
		t.Fatal(err)
	}
	const sources = 64
	for i := range sources {
		at := t0.Add(time.Duration(i) * time.Millisecond)
		for j := range 3 { // and repeatedly from each
			ch := &challenge{nonce: fmt.Sprint("attacker-", i, "-", j), ekHash: "ek-host", source: fmt.Sprintf("2001:db8:%x::/64", i)}
			if err := tb.add(at, ch); err != nil {
				t.Fatalf("hello %d from source %d: %v", j, i, err)
			}
		}
	}
	if ch := tb.take("host"); ch == nil {
		t.Fatalf("hellos for the host's EK from %d other sources evicted the host's challenge (%d held)", sources, tb.len())
	}
	// Memory stays bounded by source: one challenge per (EK, source).
	if n := tb.len(); n != sources {
		t.Fatalf("%d challenges held for one EK from %d sources, want one per source", n, sources)
	}
}

// Concurrent callers share a read barrier, but only one that started
// after they arrived.
func TestReadGroup(t *testing.T) {
	var g readGroup
	ctx := context.Background()
	var started atomic.Int64
	gate := make(chan error)
	read := func(context.Context) error { started.Add(1); return <-gate }
	waitStarted := func(n int64) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); started.Load() != n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d barriers started, want %d", started.Load(), n)
			}
		}
	}

	first := make(chan error, 1)
	go func() { first <- g.do(ctx, read) }()
	waitStarted(1)
	// Callers arriving while the first barrier runs wait for the next.
	const late = 50
	results := make(chan error, late)
	for range late {
		go func() { results <- g.do(ctx, read) }()
	}
	// One of them gives up while waiting.
	cctx, cancel := context.WithCancel(ctx)
	gaveUp := make(chan error, 1)
	go func() { gaveUp <- g.do(cctx, read) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-gaveUp; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: %v", err)
	}
	gate <- nil
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-results:
		t.Fatalf("a caller that arrived during the first barrier was answered by it (%v)", err)
	default:
	}
	waitStarted(2)
	boom := errors.New("no quorum")
	gate <- boom
	for range late {
		if err := <-results; err != boom {
			t.Fatalf("shared barrier: %v, want its error", err)
		}
	}
	if n := started.Load(); n != 2 || g.reads.Load() != 2 {
		t.Fatalf("%d barriers (%d counted) for %d callers, want 2", n, g.reads.Load(), late+1)
	}
	// Nothing running or pending: the next caller starts its own.
	go func() { gate <- nil }()
	if err := g.do(ctx, read); err != nil || started.Load() != 3 {
		t.Fatalf("after the group went idle: %v, %d barriers", err, started.Load())
	}
}
