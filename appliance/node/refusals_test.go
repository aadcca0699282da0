package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/peer"

	"github.com/sigil-appliance/sigil/appliance/state"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func fromIP(ip string) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000}})
}

// The summarizer's memory is bounded whatever the number of sources, its
// summary is deterministic and adds up, counts survive a failed commit,
// and the node log is rate-limited per class.
func TestRefusalSummaryBounded(t *testing.T) {
	var logBuf syncBuffer
	var commits [][]state.AuditEvent
	fail := true
	reg := prometheus.NewRegistry()
	r := newRefusals(slog.New(slog.NewJSONHandler(&logBuf, nil)), time.Hour, reg, func(_ context.Context, ev []state.AuditEvent) error {
		if fail {
			return errors.New("no quorum")
		}
		commits = append(commits, ev)
		return nil
	})
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	r.now = func() time.Time { return now }

	// 3000 sources, two classes each: 6000 refusals in the same second.
	const sources = 3000
	for i := 0; i < sources; i++ {
		ctx := fromIP(fmt.Sprintf("10.%d.%d.1", i/250, i%250))
		r.note(ctx, "token", classTokenUnknown, "", errors.New("unknown join token"))
		r.note(ctx, "tpm", classEKUntrusted, "", errors.New("EK public area: garbage"))
	}
	r.mu.Lock()
	keys := len(r.counts)
	r.mu.Unlock()
	if keys > maxRefusalSources+2 {
		t.Fatalf("%d keys held for %d sources; the bound is %d (+ one %q per class)", keys, sources, maxRefusalSources, refusalOther)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	byClass := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == "sigil_join_refusals_total" && len(m.GetLabel()) == 1 {
				byClass[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			}
		}
	}
	if byClass[classTokenUnknown] != sources || byClass[classEKUntrusted] != sources || len(byClass) != 2 {
		t.Fatalf("sigil_join_refusals_total: %v", byClass)
	}
	// The log took 20 lines per class this second, not 6000.
	if n := strings.Count(logBuf.String(), `"msg":"join refused"`); n != 2*refusalLogPerSecond {
		t.Fatalf("%d refusal lines logged in one second", n)
	}

	// A failed commit keeps the counts; the next one has them all.
	if err := r.flush(context.Background()); err == nil {
		t.Fatal("flush with a failing commit succeeded")
	}
	if !strings.Contains(logBuf.String(), `"suppressed":2980`) {
		t.Fatalf("suppressed lines not counted in the log:\n%s", tailOf(logBuf.String(), 2000))
	}
	now = now.Add(2 * time.Second)
	r.note(fromIP("10.0.0.1"), "token", classTokenUnknown, "", errors.New("unknown join token"))
	fail = false
	if err := r.flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(commits) != 1 {
		t.Fatalf("%d commits", len(commits))
	}
	ev := commits[0]
	if len(ev) > maxRefusalSources+2 {
		t.Fatalf("summary of %d events", len(ev))
	}
	var total uint64
	other := 0
	for i, e := range ev {
		if e.Action != summaryAction || len(e.Detail) != 4 {
			t.Fatalf("event %d: %+v", i, e)
		}
		if i > 0 {
			p := ev[i-1]
			if p.Target > e.Target || p.Target == e.Target && p.Detail["class"] >= e.Detail["class"] {
				t.Fatalf("events not sorted at %d: %s/%s after %s/%s", i, e.Target, e.Detail["class"], p.Target, p.Detail["class"])
			}
		}
		n, err := strconv.ParseUint(e.Detail["count"], 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if e.Target == refusalOther {
			other++
		}
		for _, f := range []string{"first", "last"} {
			if _, err := time.Parse(time.RFC3339, e.Detail[f]); err != nil {
				t.Fatalf("event %d %s: %v", i, f, err)
			}
		}
		if e.Target == "10.0.0.1" && e.Detail["class"] == classTokenUnknown && (n != 2 || e.Detail["last"] != "2026-01-02T03:04:07Z" || e.Detail["first"] != "2026-01-02T03:04:05Z") {
			t.Fatalf("re-merged tally: %+v", e)
		}
	}
	if total != 2*sources+1 || other != 2 {
		t.Fatalf("summary counts %d refusals (want %d), %d %q keys", total, 2*sources+1, other, refusalOther)
	}
	// Nothing to say: nothing committed.
	if err := r.flush(context.Background()); err != nil || len(commits) != 1 {
		t.Fatalf("empty flush: %v, %d commits", err, len(commits))
	}
	// close commits what is left and returns.
	go r.run()
	r.note(fromIP("192.0.2.7"), "tpm", classBadSecret, "ek", errors.New("wrong secret"))
	r.close()
	if len(commits) != 2 || len(commits[1]) != 1 || commits[1][0].Target != "192.0.2.7" {
		t.Fatalf("last summary at close: %+v", commits[1:])
	}
}

func tailOf(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func TestAuditFieldBounds(t *testing.T) {
	long := strings.Repeat("é", 300) // 600 bytes
	if got := auditReason(long); len(got) > maxReasonBytes || !utf8.ValidString(got) || !strings.HasSuffix(got, "...") {
		t.Fatalf("auditReason: %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
	if got := auditReason("short"); got != "short" {
		t.Fatal(got)
	}
	if got := auditReason("bad \xff byte"); !utf8.ValidString(got) {
		t.Fatalf("auditReason kept invalid UTF-8: %q", got)
	}
	for in, want := range map[string]string{
		"0a1b2c3d-aaaa-bbbb-cccc-0123456789ab": "0a1b2c3d-aaaa-bbbb-cccc-0123456789ab",
		"ab\x00\n\x1b[31mcd\xff":               "ab???[31mcd?",
		strings.Repeat("x", 64):                strings.Repeat("x", 64),
		strings.Repeat("x", 65):                strings.Repeat("x", 61) + "...",
		strings.Repeat("ü", 10000):             strings.Repeat("ü", 61) + "...",
	} {
		if got := shownID(in); got != want {
			t.Errorf("shownID(%.20q) = %q, want %q", in, got, want)
		}
	}

	ok := [][]string{{"db"}, {"a", "b", "c", "d", "e", "f", "g", "h"}, {strings.Repeat("a", 256)},
		{strings.Repeat("a", 256), strings.Repeat("b", 256), strings.Repeat("c", 256), strings.Repeat("d", 256),
			strings.Repeat("e", 256), strings.Repeat("f", 256), strings.Repeat("g", 256), strings.Repeat("h", 256)}}
	for _, aud := range ok {
		if err := validAudience(aud); err != nil {
			t.Errorf("validAudience(%d audiences): %v", len(aud), err)
		}
	}
	for _, tc := range []struct {
		aud  []string
		want string
	}{
		{nil, "audience is required"},
		{[]string{"a", "b", "c", "d", "e", "f", "g", "h", "i"}, "9 audiences: at most 8"},
		{[]string{"db", strings.Repeat("a", 300)}, "audience 2 is 300 bytes: at most 256"},
		{[]string{strings.Repeat("a", 2000), strings.Repeat("b", 100)}, "2100 bytes in total: at most 2048"},
		{[]string{"db", " "}, "audience 2 is empty"},
		{[]string{"db\n"}, "control characters"},
		{[]string{"d\x7fb"}, "control characters"},
		{[]string{"d\xffb"}, "not valid UTF-8"},
	} {
		err := validAudience(tc.aud)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("validAudience(%.40q): %v, want %q", tc.aud, err, tc.want)
		}
		if err != nil && len(err.Error()) > 80 {
			t.Errorf("validAudience error is %d bytes: %s", len(err.Error()), err)
		}
	}
}
