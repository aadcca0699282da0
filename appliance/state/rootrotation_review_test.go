package state

import (
	"bytes"
	"crypto/x509"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Review of issue #18's root rotation: attacks on the state machine's
// phases that the tests in rootrotation_test.go do not cover.

func nodeActorOf(n string) string { return "spiffe://example.org/sigil/node/" + n }

// switchedFixture is a rotation switched at t0+1m with both nodes staged,
// node-1 signing under the new root (it showed its staged CA and published
// a JWT key carrying it), node-2 still recorded under the old one.
func switchedFixture(t *testing.T) *rotationFixture {
	t.Helper()
	f := newRotationFixture(t)
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	f.stage(t, "node-1", f.new.nodes["node-1"])
	f.stage(t, "node-2", f.new.nodes["node-2"])
	if _, err := f.admin(t0.Add(time.Minute), CmdRootSwitch, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.as("node-1", nodeActorOf("node-1"), t0.Add(2*time.Minute), CmdNodeCAInstall, NodeCAInstall{Cert: f.new.nodes["node-1"].Raw}); err != nil {
		t.Fatalf("node-1 shows its staged CA: %v", err)
	}
	if _, err := f.as("node-1", nodeActorOf("node-1"), t0.Add(2*time.Minute), CmdJWTKeyAdd, f.new.jwtKey(t, "node-1-newnewnew", "node-1", f.new.nodes["node-1"].Raw)); err != nil {
		t.Fatalf("node-1 publishes a JWT key under its new CA: %v", err)
	}
	return f
}

// jwtKeysUnder are the KIDs of the JWT keys whose CA root signed.
func jwtKeysUnder(f *rotationFixture, root *x509.Certificate) []string {
	var out []string
	for _, k := range f.a.fsm.Bundle().JWTKeys {
		ca, err := x509.ParseCertificate(k.CA)
		if err == nil && bytes.Equal(ca.RawIssuer, root.RawSubject) && ca.CheckSignatureFrom(root) == nil {
			out = append(out, k.KID)
		}
	}
	return out
}

// TestAttackRollbackPastAddWithNodeUnderNewRoot: a rollback from added to
// no rotation removes the new root from the bundle. After a switch and a
// rollback to added, a node that has not come back under the old root
// (down, or unable to swap back) still signs under the new root: removing
// it then leaves that node signing under a root nothing trusts (every
// peer narrows its roots to the bundle's and refuses it; agents drop the
// root). Retire refuses while a member is not under the new root; the
// rollback that removes the new root must refuse, symmetrically, while a
// member is still under it.
func TestAttackRollbackPastAddWithNodeUnderNewRoot(t *testing.T) {
	f := switchedFixture(t)
	if _, err := f.admin(t0.Add(10*time.Minute), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	// node-1 has not shown an old-root CA since. Past new_signed_until
	// (t0+70m), not forced.
	_, err := f.admin(t0.Add(3*time.Hour), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour})
	if err == nil {
		for _, r := range f.a.fsm.NodeCAs() {
			if r.Node == "node-1" && r.Root == fingerprint(f.new.root.Raw) {
				t.Fatalf("the new root was removed from the bundle (roots now %v) while member node-1's recorded CA is under it", f.roots())
			}
		}
	}
	wantRefused(t, "rollback past add with node-1 under the new root", err, "node-1")
}

// TestAttackRollbackPastAddKeepsNewRootJWTKeys: retire withdraws the JWT
// keys whose CA an old root signed ("nothing trusts their chain once the
// roots are retired"); a rollback past add removes the new root but left
// the JWT keys its CAs carried in the bundle, trusted by every JWT relying
// party, and no CRL can withdraw them any more (the new root's CRLs are
// dropped with it, and a CRL of a root not in the bundle is refused).
func TestAttackRollbackPastAddKeepsNewRootJWTKeys(t *testing.T) {
	f := switchedFixture(t)
	if _, err := f.admin(t0.Add(10*time.Minute), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	// node-1 comes back under the old root, as a node that swapped back does.
	if _, err := f.as("node-1", nodeActorOf("node-1"), t0.Add(11*time.Minute), CmdNodeCAInstall, NodeCAInstall{Cert: f.old.nodes["node-1"].Raw}); err != nil {
		t.Fatalf("node-1 shows its old CA again: %v", err)
	}
	if k := jwtKeysUnder(f, f.new.root); len(k) != 1 {
		t.Fatalf("JWT keys under the new root before the rollback: %v", k)
	}
	if _, err := f.admin(t0.Add(3*time.Hour), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if f.a.fsm.RootRotation() != nil || len(f.roots()) != 1 {
		t.Fatalf("not rolled back to no rotation: roots %v", f.roots())
	}
	if k := jwtKeysUnder(f, f.new.root); len(k) != 0 {
		t.Fatalf("JWT keys whose CA only the removed new root signed are still in the bundle: %v", k)
	}
}

// TestAttackRollbackPastAddRevivesRevokedNode: a node compromised while
// switched has its new-root CA revoked by the new root's CRL, which cuts
// its commands off (checkOriginCA). A rollback past add dropped that CRL
// with the new root, so the node's recorded CA (still the revoked one) was
// no longer revoked and its commands were admitted again, over raft
// connections made before the roots changed.
func TestAttackRollbackPastAddRevivesRevokedNode(t *testing.T) {
	f := switchedFixture(t)
	if _, err := f.as("node-2", admin, t0.Add(3*time.Minute), CmdRootCRLAdd, RootCRLAdd{DER: f.new.crl(t, 1, t0.Add(3*time.Minute), t0.Add(30*24*time.Hour), "node-1")}); err != nil {
		t.Fatal(err)
	}
	agent := func(id string, at time.Time) error {
		_, err := f.as("node-1", nodeActorOf("node-1"), at, CmdAgentUpsert, AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/join/" + id,
			AttestationType: "join_token", ExpiresAt: at.Add(time.Hour)}})
		return err
	}
	wantRefused(t, "a command of the revoked node-1", agent("x1", t0.Add(4*time.Minute)), "revokes")
	if _, err := f.as("node-2", admin, t0.Add(10*time.Minute), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	// The operator rolls the rotation back past add (node-1 is still a
	// raft member: its removal is a separate step).
	_, _ = f.as("node-2", admin, t0.Add(3*time.Hour), CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour})
	if err := agent("x2", t0.Add(3*time.Hour+time.Minute)); err == nil {
		t.Fatalf("node-1, whose recorded CA the new root's CRL revoked, proposes again after the rollback removed that CRL (roots %v)", f.roots())
	}
}

// TestAttackSwitchWithRevokedStagedCert: the switch checks that every
// member has a valid staged certificate, but not that none was revoked
// since it was staged. A node whose staged certificate the new root's CRL
// revokes cannot switch (ca.Authority.CheckNext refuses it): after the
// switch it goes on signing under the old root, its JWT keys and
// checkpoints under the old CA are refused (switched away), and retire is
// blocked until someone notices.
func TestAttackSwitchWithRevokedStagedCert(t *testing.T) {
	f := newRotationFixture(t)
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	f.stage(t, "node-1", f.new.nodes["node-1"])
	f.stage(t, "node-2", f.new.nodes["node-2"])
	if _, err := f.admin(t0, CmdRootCRLAdd, RootCRLAdd{DER: f.new.crl(t, 1, t0, t0.Add(30*24*time.Hour), "node-2")}); err != nil {
		t.Fatal(err)
	}
	_, err := f.admin(t0.Add(time.Minute), CmdRootSwitch, RootPhase{Members: members, MaxTTL: time.Hour})
	wantRefused(t, "switch with node-2's staged certificate revoked", err, "node-2")
}

// TestAttackJobRejoinLosesBundleAck: a job agent renews by joining again
// (job.join with a fresh token). The state says an agent's acknowledgement
// is kept across renewals and a command's value is ignored; job.join
// replaced it with the payload's (0 from an honest node, anything from a
// crafted command). The agent acknowledges only when its bundle changes,
// so after a renewal it shows as pending, and the switch waits (or is
// forced) for an agent that has the bundle.
func TestAttackJobRejoinLosesBundleAck(t *testing.T) {
	f := newRotationFixture(t)
	f.a.must(CmdJoinRuleCreate, jobRule("gh"))
	rev := ruleRevision(t, f.a.fsm, "gh")
	// A crafted first join claiming an acknowledgement is not taken.
	first := jobJoin("gh", rev, "1-1", "token-1", t0)
	first.Agent.BundleAck = 1 << 40
	f.a.must(CmdJobJoin, first)
	if ag, _ := f.a.fsm.Agent(first.Agent.ID); ag.BundleAck != 0 {
		t.Errorf("a job.join command set the agent's acknowledged sequence to %d", ag.BundleAck)
	}
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	seq := f.a.fsm.RootRotation().Sequence
	for _, id := range []string{first.Agent.ID, "spiffe://example.org/sigil/agent/join/a1"} {
		if _, err := f.as(origin, nodeActor, t0, CmdBundleAck, BundleAck{Agent: id, Sequence: seq}); err != nil && !strings.Contains(err.Error(), "already acknowledged") {
			t.Fatalf("ack of %s: %v", id, err)
		}
	}
	if _, n := f.a.fsm.PendingAcks(seq, t0.Add(time.Minute), 10); n != 0 {
		t.Fatalf("%d agents pending after both acknowledged", n)
	}
	renew := jobJoin("gh", rev, "1-1", "token-2", t0.Add(time.Minute))
	if _, err := f.a.apply(CmdJobJoin, t0.Add(time.Minute), renew); err != nil {
		t.Fatal(err)
	}
	if pending, n := f.a.fsm.PendingAcks(seq, t0.Add(2*time.Minute), 10); n != 0 {
		t.Fatalf("the job agent's acknowledgement was lost in its renewal: %d pending (%s)", n, pending[0].ID)
	}
}

// TestRootRotationStagedLifetimes: the lifetime the switch (and a
// rollback from switched) waits for is the largest of the proposer's and
// those the nodes staged with, whichever node proposes; a staged lifetime
// out of bounds is refused.
func TestRootRotationStagedLifetimes(t *testing.T) {
	f := newRotationFixture(t)
	if _, err := f.admin(t0, CmdRootAdd, RootAdd{Root: f.new.root.Raw}); err != nil {
		t.Fatal(err)
	}
	_, err := f.as("node-1", admin, t0, CmdNodeCAStage, NodeCAStage{Cert: f.new.nodes["node-1"].Raw, MaxTTL: 2 * maxPhaseTTL})
	wantRefused(t, "a staged lifetime of two years", err, "max_ttl")
	if _, err := f.as("node-1", admin, t0, CmdNodeCAStage, NodeCAStage{Cert: f.new.nodes["node-1"].Raw, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.as("node-2", admin, t0, CmdNodeCAStage, NodeCAStage{Cert: f.new.nodes["node-2"].Raw, MaxTTL: 7 * 24 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	at := t0.Add(time.Minute)
	if _, err := f.admin(at, CmdRootSwitch, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if got := f.a.fsm.RootRotation().RetireAfter; !got.Equal(at.Add(7 * 24 * time.Hour)) {
		t.Fatalf("retire_after %s, want the switch + node-2's 7 days", got)
	}
	_, err = f.admin(at.Add(2*time.Hour), CmdRootRetire, RootPhase{Members: members, MaxTTL: time.Hour})
	wantRefused(t, "retire after the proposer's lifetime only", err, "may be valid until")
	back := t0.Add(time.Hour)
	if _, err := f.admin(back, CmdRootRollback, RootPhase{Members: members, MaxTTL: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if got := f.a.fsm.RootRotation().NewSignedUntil; !got.Equal(back.Add(7 * 24 * time.Hour)) {
		t.Fatalf("new_signed_until %s, want the rollback + node-2's 7 days", got)
	}
}

// BenchmarkPendingAcks10k is the cost of one PendingAcks over 10,000
// agents: what every sigilctl ca rotate status (polled every 2 s by a
// phase command's --wait), every RootRotate and every scrape of
// sigil_root_rotation_agents_pending pays once any rotation was ever
// added (the retired phase is kept until the next add).
func BenchmarkPendingAcks10k(b *testing.B) {
	a := &applier{fsm: newFSM(b)}
	for i := range 10000 {
		a.index++
		cmd, err := NewCommand(CmdAgentUpsert, nodeActor, t0, AgentUpsert{Agent: Agent{ID: "spiffe://example.org/sigil/agent/tpm/host-" + strconv.Itoa(i),
			AttestationType: "tpm", SerialNumber: "abcdef0123456789", ExpiresAt: t0.Add(24 * time.Hour),
			Facts: map[string]string{"ek_hash": strings.Repeat("e", 64), "hostname": "host-" + strconv.Itoa(i)}}})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := a.fsm.Apply(a.index, origin, cmd); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for range b.N {
		if _, n := a.fsm.PendingAcks(5, t0, 0); n != 10000 {
			b.Fatalf("%d pending", n)
		}
	}
}
