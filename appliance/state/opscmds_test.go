package state

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestTokenRevoke(t *testing.T) {
	a := newApplier(t)
	id, used := strings.Repeat("ab", 32), strings.Repeat("ac", 32)
	agent := "spiffe://example.org/sigil/agent/join_token/" + id[:16]
	if _, err := a.apply(CmdTokenRevoke, t0, TokenRevoke{ID: id}); err == nil || !strings.Contains(err.Error(), "no join token") {
		t.Fatalf("revoke of an unknown token: %v", err)
	}
	if _, err := a.apply(CmdTokenRevoke, t0, TokenRevoke{ID: id[:12]}); err == nil || !strings.Contains(err.Error(), "64 lowercase hex digits") {
		t.Fatalf("revoke by a prefix in the state: %v", err)
	}
	a.must(CmdTokenCreate, TokenCreate{ID: id, ExpiresAt: t0.Add(time.Hour)})
	a.must(CmdTokenCreate, TokenCreate{ID: used, ExpiresAt: t0.Add(time.Hour)})
	if _, err := a.apply(CmdTokenRevoke, t0.Add(time.Minute), TokenRevoke{ID: id}); err != nil {
		t.Fatal(err)
	}
	tok, _ := a.fsm.Token(id)
	if tok.RevokedBy != admin || !tok.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("revoked token: %+v", tok)
	}
	if _, err := a.apply(CmdTokenUse, t0.Add(2*time.Minute), TokenUse{ID: id, Agent: agent}); err == nil || !strings.Contains(err.Error(), "was revoked") {
		t.Fatalf("use of a revoked token: %v", err)
	}
	if _, err := a.apply(CmdTokenRevoke, t0.Add(2*time.Minute), TokenRevoke{ID: id}); err == nil || !strings.Contains(err.Error(), "already revoked") {
		t.Fatalf("second revoke: %v", err)
	}
	a.must(CmdTokenUse, TokenUse{ID: used, Agent: agent})
	if _, err := a.apply(CmdTokenRevoke, t0, TokenRevoke{ID: used}); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("revoke of a used token: %v", err)
	}
	late := strings.Repeat("ad", 32)
	a.must(CmdTokenCreate, TokenCreate{ID: late, ExpiresAt: t0.Add(time.Hour)})
	if _, err := a.apply(CmdTokenRevoke, t0.Add(2*time.Hour), TokenRevoke{ID: late}); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("revoke of an expired token: %v", err)
	}
	if n := len(a.fsm.Tokens()); n != 3 {
		t.Fatalf("Tokens: %d, want 3", n)
	}
	for _, r := range a.fsm.Audit(0, 0) {
		if r.Action == CmdTokenRevoke && r.Target != id[:12] {
			t.Fatalf("token.revoke record: %+v", r)
		}
	}
}

func TestAgentRemove(t *testing.T) {
	a := newApplier(t)
	ag := &Agent{ID: "spiffe://example.org/sigil/agent/tpm/cc", AttestationType: "tpm"}
	if _, err := a.apply(CmdAgentRemove, t0, AgentRemove{ID: ag.ID}); err == nil || !strings.Contains(err.Error(), "no agent") {
		t.Fatalf("remove of an unknown agent: %v", err)
	}
	a.must(CmdAgentUpsert, ag)
	a.must(CmdEntryCreate, entry("e0000001", "spiffe://example.org/a", "unix:uid:1"))
	e := entry("e0000002", "spiffe://example.org/b", "unix:uid:2")
	e.ParentID = ag.ID
	a.must(CmdEntryCreate, e)
	if _, err := a.apply(CmdAgentRemove, t0, AgentRemove{ID: ag.ID}); err == nil || !strings.Contains(err.Error(), "parent of 1 entries (e0000002)") {
		t.Fatalf("remove of a parent: %v", err)
	}
	if _, ok := a.fsm.Agent(ag.ID); !ok {
		t.Fatal("a refused remove removed the agent")
	}
	a.must(CmdAgentRemove, AgentRemove{ID: ag.ID, Force: true})
	if _, ok := a.fsm.Agent(ag.ID); ok {
		t.Fatal("the agent is still there")
	}
	if got := a.fsm.EntriesByParent(ag.ID); len(got) != 1 {
		t.Fatalf("entries kept: %+v", got)
	}
	recs := a.fsm.Audit(0, 0)
	last := recs[len(recs)-1]
	if last.Action != CmdAgentRemove || last.Target != ag.ID || last.Detail["kept_entries"] != "e0000002" {
		t.Fatalf("agent.remove record: %+v", last)
	}
	// The agent may join again.
	a.must(CmdAgentUpsert, ag)
}

// TestAttackRemoveLiftsBan: an operator (or a compromised admin) removes a
// banned agent; the ban lived on the record, so the host could join again
// as a fresh agent. A banned agent is not removed.
func TestAttackRemoveLiftsBan(t *testing.T) {
	a := newApplier(t)
	ag := &Agent{ID: "spiffe://example.org/sigil/agent/tpm/dd", AttestationType: "tpm"}
	a.must(CmdAgentUpsert, ag)
	a.must(CmdAgentBan, AgentID{ID: ag.ID})
	before := len(a.fsm.Audit(0, 0))
	_, err := a.apply(CmdAgentRemove, t0, AgentRemove{ID: ag.ID, Force: true})
	if err == nil || !strings.Contains(err.Error(), "is banned: removing it would lift the ban") {
		t.Fatalf("ATTACK SUCCEEDED: removing a banned agent: %v", err)
	}
	if got, ok := a.fsm.Agent(ag.ID); !ok || !got.Banned {
		t.Fatalf("the banned agent's record changed: %+v %v", got, ok)
	}
	if _, err := a.apply(CmdAgentUpsert, t0, ag); err == nil {
		t.Fatal("ATTACK SUCCEEDED: the banned agent joined again")
	}
	if n := len(a.fsm.Audit(0, 0)); n != before {
		t.Fatalf("refused commands wrote %d audit records", n-before)
	}
	a.must(CmdAgentUnban, AgentID{ID: ag.ID})
	a.must(CmdAgentRemove, AgentRemove{ID: ag.ID})
}

// TestAttackCommandTimeOutOfRange: a member stamps a command with a time
// whose UTC year is 10000; the audit record's hash could not be computed
// and every replica would fail on that entry at every replay. It is
// refused and changes nothing.
func TestAttackCommandTimeOutOfRange(t *testing.T) {
	a := newApplier(t)
	before := len(a.fsm.Audit(0, 0))
	// Go's encoder refuses such a time, so the member writes the bytes.
	at := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	cmd := testCommand(t, CmdEntryCreate, admin, "", at, entry("e0000009", "spiffe://example.org/far", "unix:uid:9"))
	forged := bytes.Replace(cmd, []byte(`"2001-02-03T04:05:06Z"`), []byte(`"9999-12-31T23:59:59-01:00"`), 1)
	if bytes.Equal(forged, cmd) {
		t.Fatalf("no time to replace in %s", cmd)
	}
	a.index++
	_, err := a.fsm.Apply(a.index, origin, forged)
	if err == nil || !strings.Contains(err.Error(), "outside years 1 to 9999") {
		t.Fatalf("ATTACK SUCCEEDED: a command dated 9999-12-31T23:59:59-01:00: %v", err)
	}
	if _, ok := a.fsm.Entry("e0000009"); ok {
		t.Fatal("the entry was stored")
	}
	if n := len(a.fsm.Audit(0, 0)); n != before {
		t.Fatalf("the refused command wrote %d audit records", n-before)
	}
}

// AuditScan walks pages in both directions, from any point, and stops at
// its bound.
func TestAuditScan(t *testing.T) {
	a := newApplier(t)
	const n = 2*auditPage + 100
	for done := 0; done < n; {
		var ev []AuditEvent
		for ; done < n && len(ev) < MaxEventsPerCommand; done++ {
			ev = append(ev, AuditEvent{Action: "test.event", Target: fmt.Sprint(done)})
		}
		a.must(CmdAudit, AuditAppend{Events: ev})
	}
	head, _ := a.fsm.AuditHead()
	if head != n {
		t.Fatalf("head %d, want %d", head, n)
	}
	collect := func(after, before uint64, desc bool, max int) ([]uint64, uint64, bool) {
		var seqs []uint64
		last, end := a.fsm.AuditScan(after, before, desc, max, func(r *AuditRecord) bool {
			seqs = append(seqs, r.Seq)
			return true
		})
		return seqs, last, end
	}
	check := func(what string, seqs []uint64, from uint64, count int, desc bool) {
		t.Helper()
		if len(seqs) != count {
			t.Fatalf("%s: %d records, want %d", what, len(seqs), count)
		}
		for i, s := range seqs {
			want := from + uint64(i)
			if desc {
				want = from - uint64(i)
			}
			if s != want {
				t.Fatalf("%s: record %d is %d, want %d", what, i, s, want)
			}
		}
	}
	seqs, last, end := collect(0, 0, false, n+10)
	check("ascending", seqs, 1, n, false)
	if last != n || !end {
		t.Fatalf("ascending: last %d end %v", last, end)
	}
	seqs, last, end = collect(0, 0, true, n+10)
	check("descending", seqs, n, n, true)
	if last != 1 || !end {
		t.Fatalf("descending: last %d end %v", last, end)
	}
	seqs, last, end = collect(0, n-5, true, auditPage+3)
	check("descending, bounded", seqs, n-6, auditPage+3, true)
	if end || last != n-6-auditPage-2 {
		t.Fatalf("descending, bounded: last %d end %v", last, end)
	}
	seqs, _, end = collect(n-10, 0, true, n)
	check("descending above after", seqs, n, 10, true)
	if !end {
		t.Fatal("descending above after: not at the end")
	}
	seqs, last, end = collect(7, 0, false, auditPage+1)
	check("ascending, bounded", seqs, 8, auditPage+1, false)
	if end || last != 8+auditPage {
		t.Fatalf("ascending, bounded: last %d end %v", last, end)
	}
	stopped := 0
	last, end = a.fsm.AuditScan(0, 0, true, n, func(*AuditRecord) bool { stopped++; return stopped < 3 })
	if stopped != 3 || end || last != n-2 {
		t.Fatalf("stopped by fn: %d visits, last %d, end %v", stopped, last, end)
	}
}
