package node_test

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/appliance/state"
)

func fp(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// writeRoots writes certificates as one PEM file.
func writeRoots(t *testing.T, dir, name string, certs ...*x509.Certificate) string {
	t.Helper()
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func wantCode(t *testing.T, what string, err error, code codes.Code, text string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(err.Error(), text) {
		t.Fatalf("%s: %v, want %s containing %q", what, err, code, text)
	}
}

// TestRootRotationOnCluster runs a root rotation on three nodes through
// the admin API while an agent asks node-2 for SVIDs every few
// milliseconds: phases out of order, a certificate of another root, one
// sent to the wrong node, a switch before every node staged or every
// agent acknowledged, and a retire before the old root's SVIDs expired
// are refused with the reason. No SVID request fails from add to switch
// to rollback and back; every node follows each phase (roots trusted,
// the certificate it signs with, its TLS chain); a node restarted while
// switched comes back under the new root; after retire nothing the
// cluster serves or trusts is the old root's.
func TestRootRotationOnCluster(t *testing.T) {
	tr := clustertest.NewTrust(t, "rr", []string{"node-1", "node-2", "node-3"}, []string{"rogue-1"})
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	ic := newIssuerOn(t, tr, func(c *node.Config) {
		c.Join.AgentSVIDTTL = node.Duration{Duration: 30 * time.Second}
		// Federated peers would refetch the bundle within 10 s: the switch
		// waits that long after the add.
		c.Bundle.RefreshHint = node.Duration{Duration: 10 * time.Second}
	})
	c := ic.c
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	both := writeRoots(t, tr.Dir, "both-roots.pem", tr.Root, newRoot)
	c.ClientRoots = both
	nodes := []string{"node-1", "node-2", "node-3"}
	admin := func() *api.AdminClient { return c.Admin(c.WaitLeader(10 * time.Second)) }

	// The load: SVIDs through node-2 every 5 ms, verified against both
	// roots; the agent dials with both (as a real agent does once its
	// bundle has the new root).
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf("node-2").API.Listen, CertFile: ic.agentCert, KeyFile: ic.agentKey, RootFile: both})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ag := api.NewAgentClient(conn)
	bundle := x509bundle.FromX509Authorities(tr.TrustDomain, []*x509.Certificate{tr.Root, newRoot})
	l := startSVIDLoad(t, ag, web.ID, 5*time.Millisecond, bundle)
	t.Cleanup(l.end)
	clustertest.Eventually(t, 30*time.Second, "the load to get SVIDs", func() bool { return l.ok.Load() >= 20 })
	servedUnder := func(root *x509.Certificate) bool {
		last := l.lastIssuer.Load()
		return last != nil && last.CheckSignatureFrom(root) == nil
	}

	// Out of order, before anything.
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"})
	wantCode(t, "switch before add", err, codes.FailedPrecondition, "switch follows add")
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "retire"})
	wantCode(t, "retire before add", err, codes.FailedPrecondition, "retire follows switch")
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "rollback"})
	wantCode(t, "rollback before add", err, codes.FailedPrecondition, "no rotation")

	// Add.
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	addedAt := time.Now()
	st, err := admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM})
	if err != nil {
		t.Fatalf("add: %v", err)
	}
	if st.Phase != state.PhaseAdded || st.New != fp(newRoot) || len(st.Roots) != 2 || !slices.Equal(st.NodesNotStaged, nodes) || st.AgentsPendingCount != 1 {
		t.Fatalf("status after add: %+v", st)
	}
	addSeq, addSince := st.Sequence, st.Since
	for _, id := range nodes {
		clustertest.Eventually(t, 10*time.Second, id+" to trust the new root", func() bool {
			return slices.ContainsFunc(c.Node(id).Authority().Roots(), newRoot.Equal)
		})
	}
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM})
	wantCode(t, "a second add", err, codes.FailedPrecondition, "in progress")

	// Staging: each node its own certificate under the new root.
	issuing := map[string]*x509.Certificate{}
	pems := map[string][]byte{}
	for _, id := range nodes {
		path, cert := tr.SignIssuingBy(t, id, "2y", "root2", newRootPath)
		issuing[id] = cert
		if pems[id], err = os.ReadFile(path); err != nil {
			t.Fatal(err)
		}
	}
	_, err = c.Admin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: pems["node-2"]})
	wantCode(t, "node-2's certificate sent to node-1", err, codes.FailedPrecondition, `request is for node "node-2"`)
	roguePath, _ := tr.SignIssuingBy(t, "node-1", "1y", "rogue-root", tr.RogueRootPath)
	roguePEM, _ := os.ReadFile(roguePath)
	_, err = c.Admin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: roguePEM})
	wantCode(t, "a certificate of another root", err, codes.FailedPrecondition, "")
	r, err := c.Admin("node-1").NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: pems["node-1"]})
	if err != nil || !r.Staged {
		t.Fatalf("stage on node-1: %+v %v", r, err)
	}
	if got := c.Node("node-1").Authority().Issuing(); got.Equal(issuing["node-1"]) {
		t.Fatal("a staged certificate was installed before the switch")
	}
	// The agent has not acknowledged the add: the switch waits for it.
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"})
	wantCode(t, "switch before the agent acknowledged", err, codes.FailedPrecondition, agentID)
	if _, err := ag.BundleAck(ctx, &api.BundleAckRequest{Sequence: addSeq + 100}); err != nil {
		t.Fatal(err) // ahead of the bundle: answered, not recorded
	}
	if _, err := ag.BundleAck(ctx, &api.BundleAckRequest{Sequence: addSeq}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, "the acknowledgement to be recorded", func() bool {
		st, err := admin().RootRotation(ctx, &api.Empty{})
		return err == nil && st.AgentsPendingCount == 0
	})
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"})
	if since := time.Since(addedAt); since < 10*time.Second || status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "no valid issuing certificate") {
		wantCode(t, "switch before federated peers refetched", err, codes.FailedPrecondition, "federated trust domains fetch this bundle every 10s")
	} else {
		t.Logf("the refresh hint had passed (%s since the add on a loaded machine): its refusal not seen", since)
	}
	// The node counts from the add's command time (its own clock, later
	// than addedAt): wait from that, with a margin.
	time.Sleep(time.Until(addSince.Add(10*time.Second + 500*time.Millisecond)))
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"})
	wantCode(t, "switch with nodes not staged", err, codes.FailedPrecondition, "node-2, node-3")
	for _, id := range []string{"node-2", "node-3"} {
		if _, err := c.Admin(id).NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: pems[id]}); err != nil {
			t.Fatalf("stage on %s: %v", id, err)
		}
	}
	clustertest.Eventually(t, 10*time.Second, "the acknowledgement to be recorded", func() bool {
		st, err := admin().RootRotation(ctx, &api.Empty{})
		return err == nil && st.AgentsPendingCount == 0 && len(st.NodesNotStaged) == 0
	})
	if !servedUnder(tr.Root) {
		t.Fatal("SVIDs chain to the new root before the switch")
	}

	// Switch: every node signs under the new root, its TLS too.
	if st, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"}); err != nil {
		t.Fatalf("switch: %v", err)
	}
	if st.Phase != state.PhaseSwitched || st.RetireAfter.IsZero() {
		t.Fatalf("status after switch: %+v", st)
	}
	switchedAt := time.Now()
	for _, id := range nodes {
		clustertest.Eventually(t, 15*time.Second, id+" to sign under the new root", func() bool {
			return c.Node(id).Authority().Issuing().Equal(issuing[id])
		})
	}
	before := l.ok.Load()
	clustertest.Eventually(t, 15*time.Second, "SVIDs to chain to the new root", func() bool { return l.ok.Load() > before+10 && servedUnder(newRoot) })
	clustertest.Eventually(t, 30*time.Second, "every node's CA recorded under the new root", func() bool {
		st, err := admin().RootRotation(ctx, &api.Empty{})
		return err == nil && len(st.NodesNotStaged) == 0
	})

	// A node restarted while switched comes back under the new root (its
	// kept roots and issuing/current.pem), though its root-certs names
	// only the old root.
	c.Stop("node-3")
	c.Start("node-3")
	if got := c.Node("node-3").Authority().Issuing(); !got.Equal(issuing["node-3"]) {
		t.Fatalf("node-3 restarted with issuing serial %x, want the switched %x", got.SerialNumber, issuing["node-3"].SerialNumber)
	}

	// Rollback to added: nodes sign under the old root again; then switch
	// again once the agent acknowledged the rollback.
	if st, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "rollback"}); err != nil {
		t.Fatalf("rollback: %v", err)
	}
	if st.Phase != state.PhaseAdded {
		t.Fatalf("status after rollback: %+v", st)
	}
	for _, id := range nodes {
		clustertest.Eventually(t, 15*time.Second, id+" to sign under the old root again", func() bool {
			return c.Node(id).Authority().Issuing().CheckSignatureFrom(tr.Root) == nil
		})
	}
	before = l.ok.Load()
	clustertest.Eventually(t, 15*time.Second, "SVIDs to chain to the old root again", func() bool { return l.ok.Load() > before+10 && servedUnder(tr.Root) })
	if _, err := ag.BundleAck(ctx, &api.BundleAckRequest{Sequence: st.Sequence}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, "the acknowledgement of the rollback", func() bool {
		st, err := admin().RootRotation(ctx, &api.Empty{})
		return err == nil && st.AgentsPendingCount == 0
	})
	if st, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch"}); err != nil {
		t.Fatalf("switch again: %v", err)
	}
	for _, id := range nodes {
		clustertest.Eventually(t, 15*time.Second, id+" to sign under the new root again", func() bool {
			return c.Node(id).Authority().Issuing().Equal(issuing[id])
		})
	}
	if _, err := ag.BundleAck(ctx, &api.BundleAckRequest{Sequence: st.Sequence}); err != nil {
		t.Fatal(err)
	}

	// Retire: refused while what the old root's chain signed may be valid
	// (admin certificates of up to 24 hours here), then forced.
	_, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "retire"})
	wantCode(t, "retire before the old root's SVIDs expired", err, codes.FailedPrecondition, "may be valid until")
	if st, _ := admin().RootRotation(ctx, &api.Empty{}); st.RetireAfter.Before(switchedAt.Add(24 * time.Hour)) {
		t.Fatalf("retire allowed after %s: sooner than the 24h admin certificates signed before the switch", st.RetireAfter)
	}
	l.end()
	if l.failed.Load() > 0 {
		t.Fatalf("%d of %d SVID requests failed during the rotation; first: %v", l.failed.Load(), l.ok.Load()+l.failed.Load(), l.firstErr.Load())
	}
	if st, err = admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "retire", Force: true}); err != nil {
		t.Fatalf("forced retire: %v", err)
	}
	if st.Phase != state.PhaseRetired || len(st.Roots) != 1 || st.Roots[0].SHA256 != fp(newRoot) {
		t.Fatalf("status after retire: %+v", st)
	}
	for _, id := range nodes {
		clustertest.Eventually(t, 10*time.Second, id+" to trust the new root only", func() bool {
			roots := c.Node(id).Authority().Roots()
			return len(roots) == 1 && roots[0].Equal(newRoot)
		})
	}
	// Nothing served or trusted is the old root's: dial every node with
	// the new root alone and an admin credential of the new chain.
	c.ClientRoots = writeRoots(t, tr.Dir, "new-root.pem", newRoot)
	c.RenewAdmin(t, "node-1", issuing["node-1"], []*x509.Certificate{newRoot})
	oldFP := fp(tr.Root)
	for _, id := range nodes {
		b, err := c.Admin(id).BundleShow(ctx, &api.Empty{})
		if err != nil {
			t.Fatalf("%s under the new root alone: %v", id, err)
		}
		for _, der := range b.Bundle.Roots {
			if sum := sha256.Sum256(der); hex.EncodeToString(sum[:]) == oldFP {
				t.Fatalf("%s's bundle still has the old root", id)
			}
		}
		if len(b.Bundle.RootCRLs) != 0 {
			t.Fatalf("%s: root CRLs left after retire", id)
		}
		for _, k := range c.Node(id).State().Bundle().JWTKeys {
			kc, err := x509.ParseCertificate(k.CA)
			if err != nil || kc.CheckSignatureFrom(newRoot) != nil {
				t.Fatalf("%s: JWT key %s carries a CA not under the new root (%v)", id, k.KID, err)
			}
		}
		if tls := c.Node(id).Authority().Issuing(); !tls.Equal(issuing[id]) {
			t.Fatalf("%s signs with serial %x after retire", id, tls.SerialNumber)
		}
		for _, rec := range c.Node(id).State().NodeCAs() {
			if rec.Root != fp(newRoot) {
				t.Fatalf("%s: node CA record %+v not under the new root", id, rec)
			}
		}
		if rot := c.Node(id).State().RootRotation(); rot == nil || len(rot.Staged) != 0 {
			t.Fatalf("%s: rotation record after retire: %+v", id, rot)
		}
	}
	// The old root's agent certificate is refused now.
	_, err = ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
	if err == nil {
		t.Fatal("an agent certificate under the retired root still signs")
	}
	if got := c.Log.String(); !strings.Contains(got, "issuing CA switched") {
		t.Error("no log line of the switch")
	}
}

// TestRootRotationRestartReplay restarts a node while the rotation is
// switched and again after it retired. A node's replica is rebuilt at
// every start (an empty state file, then raft's snapshot and log), so for
// a moment it passes through every earlier phase: the node must not act
// on those (a "rollback" to its old-root certificate), and after the
// retire it must come back signing under the new root, trusted by its
// peers, every time.
func TestRootRotationRestartReplay(t *testing.T) {
	tr := clustertest.NewTrust(t, "rrr", []string{"node-1", "node-2", "node-3"}, nil)
	newRootPath, newRoot := tr.NewRoot(t, "root2", "3y")
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	c.ClientRoots = writeRoots(t, tr.Dir, "both-roots.pem", tr.Root, newRoot)
	ctx := context.Background()
	nodes := []string{"node-1", "node-2", "node-3"}
	admin := func() *api.AdminClient { return c.Admin(c.WaitLeader(10 * time.Second)) }
	rootPEM, err := os.ReadFile(newRootPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "add", Root: rootPEM}); err != nil {
		t.Fatalf("add: %v", err)
	}
	issuing := map[string]*x509.Certificate{}
	for _, id := range nodes {
		path, cert := tr.SignIssuingBy(t, id, "2y", "root2", newRootPath)
		issuing[id] = cert
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		clustertest.Eventually(t, 10*time.Second, id+" to trust the new root", func() bool {
			return slices.ContainsFunc(c.Node(id).Authority().Roots(), newRoot.Equal)
		})
		if _, err := c.Admin(id).NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{PEM: b}); err != nil {
			t.Fatalf("stage on %s: %v", id, err)
		}
	}
	if _, err := admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "switch", Force: true}); err != nil {
		t.Fatalf("switch: %v", err)
	}
	for _, id := range nodes {
		clustertest.Eventually(t, 15*time.Second, id+" to sign under the new root", func() bool {
			return c.Node(id).Authority().Issuing().Equal(issuing[id])
		})
	}
	clustertest.Eventually(t, 30*time.Second, "every node's CA recorded under the new root", func() bool {
		st, err := admin().RootRotation(ctx, &api.Empty{})
		return err == nil && len(st.NodesNotStaged) == 0
	})
	rolledBack := func() int {
		return strings.Count(c.Log.String(), `"msg":"issuing CA switched: the rotation rolled back`)
	}
	restart := func(when string) {
		t.Helper()
		before := rolledBack()
		c.Stop("node-3")
		c.Start("node-3")
		clustertest.Eventually(t, 20*time.Second, "node-3 caught up "+when, func() bool {
			st, err := c.Admin("node-3").RootRotation(ctx, &api.Empty{})
			return err == nil && st.Sequence > 0 && c.Node("node-3").State().RootRotation() != nil &&
				c.Node("node-3").State().RootRotation().Sequence == st.Sequence
		})
		time.Sleep(time.Second) // the loop acts on what it saw
		if n := rolledBack() - before; n > 0 {
			t.Errorf("node-3 restarted %s rolled back %d times on its way through the replayed log", when, n)
		}
		if got := c.Node("node-3").Authority().Issuing(); !got.Equal(issuing["node-3"]) {
			t.Fatalf("node-3 restarted %s signs with serial %x (issuer %s), want the new root's %x", when, got.SerialNumber, got.Issuer, issuing["node-3"].SerialNumber)
		}
	}
	restart("while switched")
	if _, err := admin().RootRotate(ctx, &api.RootRotateRequest{Phase: "retire", Force: true}); err != nil {
		t.Fatalf("retire: %v", err)
	}
	for _, id := range nodes {
		clustertest.Eventually(t, 10*time.Second, id+" to trust the new root only", func() bool {
			roots := c.Node(id).Authority().Roots()
			return len(roots) == 1 && roots[0].Equal(newRoot)
		})
	}
	c.ClientRoots = writeRoots(t, tr.Dir, "new-root.pem", newRoot)
	c.RenewAdmin(t, "node-1", issuing["node-1"], []*x509.Certificate{newRoot})
	for i := range 3 {
		restart(fmt.Sprintf("after the retire (%d)", i+1))
		roots := c.Node("node-3").Authority().Roots()
		if len(roots) != 1 || !roots[0].Equal(newRoot) {
			t.Fatalf("node-3 trusts %d roots after the restart", len(roots))
		}
		if _, err := c.Admin("node-3").BundleShow(ctx, &api.Empty{}); err != nil {
			t.Fatalf("node-3 under the new root alone after a restart: %v", err)
		}
	}
}
