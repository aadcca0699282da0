package state

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

const jobIssuer = "https://token.actions.githubusercontent.com"

func jobRule(name string) *JoinRule {
	return &JoinRule{Name: name, Preset: "github-actions", Issuer: jobIssuer, Audience: "spiffe://example.org",
		SPIFFEIDTemplate: "/ci/github/{{repository_owner}}/{{repository_name}}", RunTemplate: "{{run_id}}-{{run_attempt}}",
		TTL: 600, MaxTokenAge: 300, Conditions: []ClaimCondition{{Claim: "repository", Pattern: "octo-org/*"}}}
}

// jobJoin is a job.join for run of rule (at revision rev) with a replay
// key made from key, at time at.
func jobJoin(rule string, rev uint64, run, key string, at time.Time) JobJoin {
	return JobJoin{ReplayKey: fmt.Sprintf("%064x", []byte(key))[:64], ReplayUntil: at.Add(5 * time.Minute),
		Agent: Agent{ID: "spiffe://example.org/sigil/agent/job/" + rule + "/" + run + "/0123456789abcdef", AttestationType: "job",
			SerialNumber: "abc" + fmt.Sprintf("%x", at.UnixNano()), ExpiresAt: at.Add(10 * time.Minute),
			Facts: map[string]string{"repository": "octo-org/octo-repo", "actor": "octocat"},
			Job:   &JobRun{Rule: rule, RuleRevision: rev, Run: run, Key: "0123456789abcdef", SPIFFEID: "spiffe://example.org/ci/github/octo-org/octo-repo", UID: 1000, TTL: 600}}}
}

func ruleRevision(t *testing.T, f *FSM, name string) uint64 {
	t.Helper()
	r, ok := f.JoinRule(name)
	if !ok {
		t.Fatalf("no rule %s", name)
	}
	return r.Revision
}

// A run joins once per token; a fresh token of the same run renews it;
// the run's entry follows from its agent; run end and expiry remove the
// agent; used tokens are forgotten once they would be too old anyway; a
// raft snapshot carries rules, runs and used tokens, and its indexes are
// rebuilt.
func TestJobJoinCommands(t *testing.T) {
	a := newApplier(t)
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	rev := ruleRevision(t, a.fsm, "gh")
	j := jobJoin("gh", rev, "1-1", "token-1", t0)
	a.must(CmdJobJoin, j)
	ag, ok := a.fsm.Agent(j.Agent.ID)
	if !ok || ag.Job == nil || ag.Facts["repository"] != "octo-org/octo-repo" {
		t.Fatalf("job agent: %+v", ag)
	}
	e, ok := ag.JobEntry()
	if !ok || e.ID != JobEntryID(ag.ID) || e.SPIFFEID != j.Agent.Job.SPIFFEID || e.ParentID != ag.ID ||
		len(e.Selectors) != 1 || e.Selectors[0].String() != "unix:uid:1000" || e.X509TTL != 600 || e.JWTTTL != 300 {
		t.Fatalf("run entry: %+v", e)
	}
	if err := ValidateEntry(td, &e); err != nil {
		t.Fatalf("the implied entry is not a valid entry: %v", err)
	}
	// Replay: the same key, even for another run.
	again := jobJoin("gh", rev, "2-1", "token-1", t0.Add(time.Second))
	if _, err := a.apply(CmdJobJoin, t0.Add(time.Second), again); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("replayed token: %v", err)
	}
	// A fresh token of the same run renews it: same agent, new serial.
	renew := jobJoin("gh", rev, "1-1", "token-2", t0.Add(time.Minute))
	if _, err := a.apply(CmdJobJoin, t0.Add(time.Minute), renew); err != nil {
		t.Fatal(err)
	}
	if ag2, _ := a.fsm.Agent(j.Agent.ID); ag2.SerialNumber != renew.Agent.SerialNumber || !ag2.JoinedAt.Equal(t0) {
		t.Fatalf("renewed job agent: %+v", ag2)
	}
	// A raft snapshot, restored in another replica, refuses the same
	// replay and keeps the rule.
	b := atkClone(t, atkSnapshot(t, a.fsm))
	b.index = a.index
	if _, err := b.apply(CmdJobJoin, t0.Add(2*time.Minute), jobJoin("gh", rev, "3-1", "token-2", t0.Add(2*time.Minute))); err == nil ||
		!strings.Contains(err.Error(), "already used") {
		t.Fatalf("replay after a snapshot restore: %v", err)
	}
	// Expiry: after the agent's SVID expired and the token's replay
	// window passed, the next job command drops both.
	late := t0.Add(time.Hour)
	if _, err := b.apply(CmdJobJoin, late, jobJoin("gh", rev, "4-1", "token-4", late)); err != nil {
		t.Fatal(err)
	}
	if _, ok := b.fsm.Agent(j.Agent.ID); ok {
		t.Fatal("an expired job agent was kept")
	}
	if n := b.fsm.JobTokensUsed(); n != 1 {
		t.Fatalf("%d used tokens remembered after their window, want 1 (the last)", n)
	}
	// The rule changes under an in-flight join: refused.
	a.must(CmdJoinRuleDelete, EntryID{ID: "gh"})
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	if _, err := a.apply(CmdJobJoin, t0.Add(2*time.Minute), jobJoin("gh", rev, "5-1", "token-5", t0.Add(2*time.Minute))); err == nil ||
		!strings.Contains(err.Error(), "changed since") {
		t.Fatalf("join against a replaced rule: %v", err)
	}
	// Run end removes the agent.
	if _, err := a.apply(CmdJobEnd, t0.Add(3*time.Minute), JobEnd{Agent: j.Agent.ID, ExitCode: 0}); err != nil {
		t.Fatal(err)
	}
	if _, ok := a.fsm.Agent(j.Agent.ID); ok {
		t.Fatal("job agent kept after its run ended")
	}
}

// Crafted job commands (a node's bug, or a node's key in the wrong hands)
// are refused and change nothing.
func TestAttackCraftedJobCommands(t *testing.T) {
	a := newApplier(t)
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	rev := ruleRevision(t, a.fsm, "gh")
	a.must(CmdJobJoin, jobJoin("gh", rev, "1-1", "token-1", t0))
	// An ordinary agent, and an issuance to it.
	a.must(CmdAgentUpsert, &AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/tpm/abc", AttestationType: "tpm", SerialNumber: "aa", ExpiresAt: t0.Add(time.Hour)}})
	a.must(CmdIssue, &AuditAppend{Events: []AuditEvent{{Action: "svid.x509.issue", Target: "spiffe://example.org/web", Detail: map[string]string{
		"serial": "beef", "agent": "spiffe://example.org/sigil/agent/tpm/abc", "node": origin, "expires": t0.Add(time.Hour).Format(time.RFC3339)}}}})
	before, _ := a.fsm.Export()
	mod := func(f func(*JobJoin)) JobJoin {
		j := jobJoin("gh", rev, "2-1", "token-2", t0)
		f(&j)
		return j
	}
	for _, tc := range []struct {
		name, typ string
		payload   any
		want      string
	}{
		{"agent ID of another rule", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.ID = "spiffe://example.org/sigil/agent/job/other/2-1/0123456789abcdef" }), "want the ID"},
		{"agent ID of another key", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.ID = "spiffe://example.org/sigil/agent/job/gh/2-1/fedcba9876543210" }), "want the ID"},
		{"no key name", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Job.Key = "" }), "key name"},
		{"agent ID of a TPM host", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.ID = "spiffe://example.org/sigil/agent/tpm/abc" }), "want the ID"},
		{"run with a slash", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Job.Run = "a/b" }), "run"},
		{"identity under /sigil/", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Job.SPIFFEID = "spiffe://example.org/sigil/node/node-1" }), "not under /sigil/"},
		{"identity of another trust domain", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Job.SPIFFEID = "spiffe://evil.org/x" }), "workload ID"},
		{"TTL beyond the rule's", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Job.TTL = 86400 }), "TTL"},
		{"expiry beyond the TTL", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.ExpiresAt = t0.Add(48 * time.Hour) }), "outside the rule's TTL"},
		{"replay key forgotten too late", CmdJobJoin, mod(func(j *JobJoin) { j.ReplayUntil = t0.Add(100 * time.Hour) }), "within"},
		{"no replay key", CmdJobJoin, mod(func(j *JobJoin) { j.ReplayKey = "" }), "replay key"},
		{"unknown rule", CmdJobJoin, jobJoin("nope", rev, "2-1", "token-2", t0), "no join rule"},
		{"same run, another identity", CmdJobJoin, func() JobJoin {
			j := jobJoin("gh", rev, "1-1", "token-3", t0)
			j.Agent.Job.SPIFFEID = "spiffe://example.org/ci/github/octo-org/other-repo"
			return j
		}(), "another identity"},
		{"a ban smuggled in", CmdJobJoin, mod(func(j *JobJoin) { j.Agent.Banned = true }), "ban"},
		{"job agent by agent.upsert", CmdAgentUpsert, &AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/job/gh/9-1/0123456789abcdef", AttestationType: "job", SerialNumber: "ab"}}, "job agents are recorded by job.join only"},
		{"run by agent.upsert", CmdAgentUpsert, &AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/tpm/x", AttestationType: "tpm", SerialNumber: "ab",
			Job: &JobRun{Rule: "gh", Run: "1", SPIFFEID: "spiffe://example.org/x", TTL: 60}}}, "job agents are recorded by job.join only"},
		{"end of a TPM agent", CmdJobEnd, JobEnd{Agent: "spiffe://example.org/sigil/agent/tpm/abc"}, "not a job agent"},
		{"run end revoking another agent's SVID", CmdJobEnd, JobEnd{Agent: "spiffe://example.org/sigil/agent/job/gh/1-1/0123456789abcdef", Serials: []string{"beef"}}, "not issued to"},
		{"too many serials", CmdJobEnd, JobEnd{Agent: "spiffe://example.org/sigil/agent/job/gh/1-1/0123456789abcdef", Serials: make([]string, MaxRunEndSerials+1)}, "at most"},
		{"rule with an http issuer", CmdJoinRuleCreate, func() *JoinRule { r := jobRule("x"); r.Issuer = "http://issuer.example"; return r }(), "issuer"},
		{"rule that exists", CmdJoinRuleCreate, jobRule("gh"), "exists"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := a.apply(tc.typ, t0.Add(time.Second), tc.payload); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want a refusal naming %q", err, tc.want)
			}
		})
	}
	after, _ := a.fsm.Export()
	if !bytes.Equal(before, after) {
		t.Fatal("a refused command changed the state")
	}
}

// A busy CI for a day: 20,000 runs, a new one every 4.32 s, each with a
// 10 min identity and a 5 min replay window. What the state keeps is what
// the last TTL and window hold, not the day.
func TestJobStateBounded(t *testing.T) {
	a := newApplier(t)
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	rev := ruleRevision(t, a.fsm, "gh")
	const runs = 20000
	step := 24 * time.Hour / runs
	for i := range runs {
		at := t0.Add(time.Duration(i) * step)
		if _, err := a.apply(CmdJobJoin, at, jobJoin("gh", rev, fmt.Sprintf("%d-1", i), fmt.Sprintf("token-%d", i), at)); err != nil {
			t.Fatal(err)
		}
	}
	agents, used := len(a.fsm.Agents()), a.fsm.JobTokensUsed()
	// 10 min / 4.32 s = 139 agents; 5 min = 70 tokens (plus the second).
	if agents > 150 || used > 80 {
		t.Fatalf("after %d runs: %d job agents and %d used tokens kept", runs, agents, used)
	}
	t.Logf("after %d runs over a day: %d job agents, %d used tokens", runs, agents, used)
}

// A run end revokes the run's SVIDs: the bundle's sequence (and each
// node's CRL) moves, but only the run's own agent is woken, not the
// fleet: a CI ending a run a second would otherwise send every agent a
// new view a second.
func TestJobEndWakesOnlyItsAgent(t *testing.T) {
	a := newApplier(t)
	a.must(CmdJoinRuleCreate, jobRule("gh"))
	j := jobJoin("gh", ruleRevision(t, a.fsm, "gh"), "1-1", "token-1", t0)
	a.must(CmdJobJoin, j)
	host := "spiffe://example.org/sigil/agent/tpm/abc"
	a.must(CmdAgentUpsert, &AgentUpsert{Agent: Agent{ID: host, AttestationType: "tpm", SerialNumber: "aa", ExpiresAt: t0.Add(time.Hour)}})
	a.must(CmdIssue, &AuditAppend{Events: []AuditEvent{{Action: "svid.x509.issue", Target: "spiffe://example.org/ci/github/octo-org/octo-repo", Detail: map[string]string{
		"serial": "beef", "agent": j.Agent.ID, "node": origin, "expires": t0.Add(10 * time.Minute).Format(time.RFC3339)}}}})
	seq := a.fsm.Bundle().Sequence
	hostWatch, runWatch := a.fsm.AgentChanged(host), a.fsm.AgentChanged(j.Agent.ID)
	a.must(CmdJobEnd, JobEnd{Agent: j.Agent.ID, Serials: []string{"beef"}})
	b := a.fsm.Bundle()
	if b.Sequence != seq+1 || len(b.Revoked) != 1 || b.Revoked[0].Serial != "beef" {
		t.Fatalf("after the run end: sequence %d (was %d), revoked %+v", b.Sequence, seq, b.Revoked)
	}
	select {
	case <-runWatch:
	default:
		t.Fatal("the run's agent was not woken")
	}
	select {
	case <-hostWatch:
		t.Fatal("another agent was woken by a run's end")
	default:
	}
}
