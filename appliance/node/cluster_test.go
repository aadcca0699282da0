package node_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

func entryFor(i int) *api.EntryRequest {
	return &api.EntryRequest{Entry: api.Entry{
		SPIFFEID:  fmt.Sprintf("spiffe://example.org/svc/%d", i),
		ParentID:  "spiffe://example.org/sigil/agent/tpm/host-a",
		Selectors: []api.Selector{{Type: "unix", Value: fmt.Sprintf("uid:%d", 1000+i)}},
	}, Force: true} // host-a never joins
}

func follower(c *clustertest.Cluster, leader string) string {
	for _, id := range c.Running() {
		if id != leader {
			return id
		}
	}
	return ""
}

// The whole life of a cluster: writes through a follower, leader loss,
// failover with no acknowledged write lost, a restarted node catching up.
func TestClusterFailoverLosesNothing(t *testing.T) {
	tr := clustertest.NewTrust(t, "fo", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	leader := c.WaitLeader(30 * time.Second)
	st, err := c.Admin(leader).ClusterStatus(ctx, &api.Empty{})
	if err != nil || len(st.Peers) != 3 {
		t.Fatalf("status: %+v %v", st, err)
	}

	// Writes sent to a follower are forwarded, not refused.
	f := follower(c, leader)
	var acked []string
	for i := 0; i < 20; i++ {
		e, err := c.Admin(f).EntryCreate(ctx, entryFor(i))
		if err != nil {
			t.Fatalf("write %d via follower %s: %v", i, f, err)
		}
		acked = append(acked, e.ID)
	}
	// A linearizable read on the other follower sees them all at once.
	other := ""
	for _, id := range c.Running() {
		if id != leader && id != f {
			other = id
		}
	}
	if l, err := c.Admin(other).EntryList(ctx, &api.EntryListRequest{}); err != nil || len(l.Entries) != 20 {
		t.Fatalf("read on %s right after the writes: %d entries, %v", other, len(l.Entries), err)
	}

	// Keep writing from several clients while the leader dies.
	var mu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				target := c.Running()[0]
				if target == leader {
					target = follower(c, leader)
				}
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				e, err := c.Admin(target).EntryCreate(cctx, entryFor(1000+w*10000+i))
				cancel()
				if err == nil {
					mu.Lock()
					acked = append(acked, e.ID)
					mu.Unlock()
				}
			}
		}(w)
	}
	time.Sleep(300 * time.Millisecond)
	c.Stop(leader)
	newLeader := c.WaitLeader(30 * time.Second)
	if newLeader == leader {
		t.Fatal("the stopped node is still the leader")
	}
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("leader %s stopped, %s elected; %d writes acknowledged", leader, newLeader, len(acked))

	// Every acknowledged write is on every survivor.
	for _, id := range c.Running() {
		l, err := c.Admin(id).EntryList(ctx, &api.EntryListRequest{})
		if err != nil {
			t.Fatal(err)
		}
		have := map[string]bool{}
		for _, e := range l.Entries {
			have[e.ID] = true
		}
		for _, id2 := range acked {
			if !have[id2] {
				t.Fatalf("acknowledged entry %s lost on %s", id2, id)
			}
		}
	}

	// The old leader comes back and catches up.
	c.Start(leader)
	clustertest.Eventually(t, 30*time.Second, "restarted node to catch up", func() bool {
		have := map[string]bool{}
		for _, e := range c.Node(leader).State().Entries() {
			have[e.ID] = true
		}
		for _, id := range acked {
			if !have[id] {
				return false
			}
		}
		return true
	})
	v, err := c.Admin(leader).AuditVerify(ctx, &api.Empty{})
	if err != nil || !v.Intact {
		t.Fatalf("audit after failover: %+v %v", v, err)
	}
}

func TestAccessControl(t *testing.T) {
	tr := clustertest.NewTrust(t, "ac", []string{"node-1", "node-2"}, []string{"node-x"})
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()

	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			t.Errorf("close key store: %v", err)
		}
	}()
	a2 := tr.Authority(t, ks, "node-2")

	// An agent (or any non-admin) certificate is refused by the admin API.
	agentCert, agentKey := clustertest.WriteCredential(t, c.Dir, "agent", clustertest.ClientCert(t, a2, "/sigil/agent/tpm/abc"))
	_, err := c.Client("node-1", agentCert, agentKey).EntryList(ctx, &api.EntryListRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("agent calling admin API: %v, want PermissionDenied", err)
	}
	// A node certificate is not an admin either.
	nodeCert, nodeKey := clustertest.WriteCredential(t, c.Dir, "node", clustertest.ClientCert(t, a2, "/sigil/node/node-2"))
	if _, err := c.Client("node-1", nodeCert, nodeKey).EntryList(ctx, &api.EntryListRequest{}); err == nil {
		t.Fatal("node certificate accepted on the admin API")
	}
	if !strings.Contains(c.Log.String(), "not an admin") {
		t.Fatal("refusal was not logged")
	}
	// The admin works.
	if _, err := c.Admin("node-1").EntryCreate(ctx, entryFor(1)); err != nil {
		t.Fatal(err)
	}

	// A node whose issuing CA another root signed cannot join: its
	// certificate does not chain to the cluster's root.
	rogue := c.Config("node-x")
	rogue.Cluster.Join = []string{c.ConfigOf("node-1").Cluster.Bind}
	rn, err := c.StartWith(rogue)
	if err != nil {
		t.Fatalf("rogue node did not start with its own root: %v", err)
	}
	jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rn.Raft().JoinCluster(jctx, c.ConfigOf("node-1").Cluster.Bind); err == nil {
		t.Fatal("rogue node joined")
	}
	time.Sleep(time.Second)
	st, _ := c.Admin("node-1").ClusterStatus(ctx, &api.Empty{})
	for _, p := range st.Peers {
		if p.ID == "node-x" {
			t.Fatal("rogue node is a cluster member")
		}
	}

	// The local socket serves root on this host, and is how the first
	// admin credential is made.
	conn, err := api.Dial(api.DialConfig{Socket: c.ConfigOf("node-1").API.LocalSocket})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if st, err := os.Stat(c.ConfigOf("node-1").API.LocalSocket); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("local socket mode: %v %v", st.Mode(), err)
	}
	if _, err := api.NewAdminClient(conn).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("local socket: %v", err)
	}
	recs, _ := c.Admin("node-1").AuditList(ctx, &api.AuditRequest{})
	if len(recs.Records) == 0 || !strings.HasPrefix(recs.Records[len(recs.Records)-1].Actor, "spiffe://example.org/sigil/admin/test-admin") {
		t.Fatalf("audit records do not name the admin: %+v", recs.Records)
	}

	// Health, readiness and metrics.
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + c.Node("node-1").HTTPAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("/readyz %d", code)
	}
	code, body := get("/metrics")
	for _, m := range []string{"sigil_raft_is_leader 1", "sigil_entries 1", "sigil_raft_apply_seconds_bucket"} {
		if code != 200 || !strings.Contains(body, m) {
			t.Fatalf("/metrics lacks %q", m)
		}
	}
}

func TestSnapshotSaveRestore(t *testing.T) {
	tr := clustertest.NewTrust(t, "sn", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	adm := c.Admin("node-2")
	for i := 0; i < 5; i++ {
		if _, err := adm.EntryCreate(ctx, entryFor(i)); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := adm.SnapshotSave(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := adm.EntryCreate(ctx, entryFor(99)); err != nil {
		t.Fatal(err)
	}
	before, _ := adm.EntryList(ctx, &api.EntryListRequest{})

	// Truncated or altered archives are refused and change nothing.
	flipped := append([]byte(nil), snap.Archive...)
	flipped[len(flipped)/3] ^= 1
	for name, bad := range map[string][]byte{
		"truncated": snap.Archive[:len(snap.Archive)-40],
		"altered":   flipped,
		"empty":     nil,
	} {
		_, err := adm.SnapshotRestore(ctx, &api.SnapshotArchive{Archive: bad})
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%s snapshot: %v, want InvalidArgument", name, err)
		}
	}
	after, _ := adm.EntryList(ctx, &api.EntryListRequest{})
	if len(after.Entries) != len(before.Entries) {
		t.Fatal("a refused snapshot changed the state")
	}

	// The good one restores everywhere.
	if _, err := c.Admin("node-3").SnapshotRestore(ctx, &api.SnapshotArchive{Archive: snap.Archive}); err != nil {
		t.Fatal(err)
	}
	for _, id := range c.Running() {
		l, err := c.Admin(id).EntryList(ctx, &api.EntryListRequest{})
		if err != nil || len(l.Entries) != 5 {
			t.Fatalf("%s after restore: %d entries, %v", id, len(l.Entries), err)
		}
	}
	v, err := adm.AuditVerify(ctx, &api.Empty{})
	if err != nil || !v.Intact {
		t.Fatalf("audit after restore: %+v %v", v, err)
	}
	recs, _ := adm.AuditList(ctx, &api.AuditRequest{})
	if last := recs.Records[len(recs.Records)-1]; last.Action != "state.restore" || last.Detail["archive_sha256"] != snap.SHA256 {
		t.Fatalf("last audit record %+v", last)
	}
}
