package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ceremony"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// revocationFixture is a three-node cluster with a token-joined agent that
// has one entry, and the node chosen as compromised (never node-1, whose CA
// signed the test admin credential, nor the leader).
type revocationFixture struct {
	tr      *clustertest.Trust
	c       *clustertest.Cluster
	bad     string
	good    []string
	agentID string
	entryID string
	// agentCred is the real agent's own credential (from node-1).
	agentCred tls.Certificate
}

func newRevocationFixture(t *testing.T, prefix string) *revocationFixture {
	t.Helper()
	ctx := context.Background()
	f := &revocationFixture{tr: clustertest.NewTrust(t, prefix, []string{"node-1", "node-2", "node-3"}, nil)}
	f.c = clustertest.NewCluster(t, f.tr, "node-1", "node-2", "node-3")
	f.bad = "node-3"
	if f.c.WaitLeader(30*time.Second) == "node-3" {
		f.bad = "node-2"
	}
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		if id != f.bad {
			f.good = append(f.good, id)
		}
	}
	admin := f.c.Admin("node-1")
	tok, err := admin.TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	jconn, err := api.Dial(api.DialConfig{Addr: f.c.ConfigOf("node-1").API.Listen, RootFile: f.tr.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = jconn.Close() }()
	svid, err := api.NewJoinClient(jconn).Token(ctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csr})
	if err != nil {
		t.Fatalf("token join: %v", err)
	}
	f.agentID = svid.AgentID
	f.agentCred = tls.Certificate{PrivateKey: key}
	f.agentCred.Certificate = append(f.agentCred.Certificate, svid.Chain...)
	e, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/payments",
		ParentID: f.agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}})
	if err != nil {
		t.Fatal(err)
	}
	f.entryID = e.ID
	return f
}

// TestAttackRevokedNodeCA: a compromised node mints an admin credential, a
// certificate in a real agent's name and a node certificate with its
// HSM-held issuing CA. The root ceremony then revokes that CA with a CRL,
// an admin adds the CRL and removes the node. The remaining nodes must
// refuse every one of those certificates (admin API, agent API, raft),
// also right after a restart (before raft has replayed the log), and the
// node's JWT keys must leave the trust bundle.
func TestAttackRevokedNodeCA(t *testing.T) {
	f := newRevocationFixture(t, "rv")
	c, bad := f.c, f.bad
	ctx := context.Background()

	// The compromised node publishes a JWT key (it signs JWT-SVIDs with it).
	kid, err := c.Node(bad).JWTRotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, "the bad node's JWT key on every node", func() bool {
		for _, id := range f.good {
			if !hasKID(c.Node(id).State().Bundle().JWTKeys, kid) {
				return false
			}
		}
		return true
	})
	// What an attacker holding the node's HSM session mints.
	auth := c.Node(bad).Authority()
	adminCert := clustertest.ClientCert(t, auth, "/sigil/admin/mallory")
	adminPath, adminKey := clustertest.WriteCredential(t, t.TempDir(), "mallory", adminCert)
	agentPath := strings.TrimPrefix(f.agentID, "spiffe://example.org")
	agentCert := clustertest.ClientCert(t, auth, agentPath)
	nodeCert := clustertest.ClientCert(t, auth, "/sigil/node/"+bad)
	// Before the revocation the minted admin credential works: it is a
	// valid chain to the root.
	if _, err := c.Client(f.good[0], adminPath, adminKey).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("minted admin credential refused before any revocation: %v", err)
	}

	// The ceremony revokes the node's issuing CA; an admin adds the CRL and
	// removes the node.
	crl := f.tr.RootCRL(t, 1, bad)
	res := addRootCRL(t, c.Admin("node-1"), crl)
	if want := f.tr.Nodes[bad].Issuing.SerialNumber.Text(16); len(res.CRL.Revoked) != 1 || res.CRL.Revoked[0] != want ||
		len(res.WithdrawnJWTKeys) != 1 || res.WithdrawnJWTKeys[0] != kid {
		t.Fatalf("root CRL stored as %+v, want serial %s revoked and JWT key %s withdrawn", res, want, kid)
	}
	if _, err := c.Admin("node-1").ClusterRemove(ctx, &api.IDRequest{ID: bad}); err != nil {
		t.Fatal(err)
	}
	c.Stop(bad)
	c.WaitLeader(30 * time.Second)

	for _, id := range f.good {
		n := c.Node(id)
		// The admin credential minted by the revoked CA, on a real mTLS
		// call that would change the state.
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := c.Client(id, adminPath, adminKey).EntryCreate(cctx, &api.EntryRequest{Entry: api.Entry{
			SPIFFEID: "spiffe://example.org/mallory-" + id, ParentID: f.agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}})
		cancel()
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s accepted an admin credential minted by %s's revoked CA (entry created)", id, bad)
		}
		if got := n.State().EntriesBySPIFFEID("spiffe://example.org/mallory-" + id); len(got) != 0 {
			t.Errorf("%s: the refused admin call changed the state: %v", id, got)
		}
		// The agent certificate in the real agent's name.
		if res, err := agentSign(ctx, f, id, &agentCert); err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s served %d SVID(s) to a certificate minted by %s's revoked CA in agent %s's name", id, len(res.Results), bad, f.agentID)
		}
		// The node certificate: raft refuses it (it would rejoin the
		// cluster with a self-join).
		if err := raftSelfJoin(c.ConfigOf(id).Cluster.Bind, bad, nodeCert); err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s let %s rejoin raft with its revoked CA", id, bad)
		}
		// The revoked node's JWT keys are out of the bundle.
		if hasKID(n.State().Bundle().JWTKeys, kid) {
			t.Errorf("ATTACK SUCCEEDED: %s still publishes %s's JWT key %s", id, bad, kid)
		}
		b, err := c.Admin(id).BundleShow(ctx, &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		if len(b.Bundle.RootCRLs) != 1 {
			t.Errorf("%s's bundle carries %d root CRLs, want 1", id, len(b.Bundle.RootCRLs))
		}
		if strings.Contains(string(b.SPIFFE), kid) {
			t.Errorf("ATTACK SUCCEEDED: %s serves %s's JWT key %s in the SPIFFE bundle", id, bad, kid)
		}
	}
	// The membership did not change: the revoked node did not rejoin.
	st, err := c.Admin(f.good[0]).ClusterStatus(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Peers {
		if p.ID == bad {
			t.Errorf("ATTACK SUCCEEDED: %s is a member again: %+v", bad, st.Peers)
		}
	}
	// The real agent (a credential from a good node) is still served.
	if _, err := agentSign(ctx, f, f.good[0], nil); err != nil {
		t.Errorf("the real agent is refused after the revocation: %v", err)
	}
	checkRevocationLogged(t, c, f)

	// A restarted node refuses the revoked CA from its first handshake,
	// before raft has replayed the log into its fresh state file.
	restarted := f.good[len(f.good)-1]
	c.Stop(restarted)
	n := c.Start(restarted)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = c.Client(restarted, adminPath, adminKey).EntryCreate(cctx, &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: "spiffe://example.org/mallory-restart", ParentID: f.agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}})
	cancel()
	if err == nil {
		t.Errorf("ATTACK SUCCEEDED: %s, just restarted, accepted the revoked CA's admin credential", restarted)
	}
	c.WaitLeader(30 * time.Second)
	clustertest.Eventually(t, 10*time.Second, "the restarted node replays the CRL", func() bool { return len(n.State().RootCRLs()) == 1 })
	if got := c.Node(f.good[0]).State().EntriesBySPIFFEID("spiffe://example.org/mallory-restart"); len(got) != 0 {
		t.Errorf("the restarted node let the revoked admin create %v", got)
	}
}

func hasKID(keys []state.JWTKey, kid string) bool {
	for _, k := range keys {
		if k.KID == kid {
			return true
		}
	}
	return false
}

// agentSign asks node id for the fixture entry's SVID, presenting cert
// (nil: the real agent's own credential).
func agentSign(ctx context.Context, f *revocationFixture, id string, cert *tls.Certificate) (*api.X509SVIDBatchResult, error) {
	if cert == nil {
		cert = &f.agentCred
	}
	conn, err := api.Dial(api.DialConfig{Addr: f.c.ConfigOf(id).API.Listen, RootFile: f.tr.RootPath,
		Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		return nil, err
	}
	defer func() { _ = conn.Close() }()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	res, err := api.NewAgentClient(conn).SignX509SVIDs(cctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: f.entryID, CSR: csr}}})
	if err != nil {
		return nil, err
	}
	for _, r := range res.Results {
		if r.Error != "" {
			return res, fmt.Errorf("entry %s: %s", r.EntryID, r.Error)
		}
	}
	return res, nil
}

// addRootCRL submits a root CRL as an admin (PEM, as the ceremony wrote
// it) and returns what the appliance stored.
func addRootCRL(t *testing.T, admin *api.AdminClient, der []byte) *api.RootCRLResult {
	t.Helper()
	res, err := admin.RootCRLAdd(context.Background(), &api.RootCRLRequest{CRL: pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})})
	if err != nil {
		t.Fatalf("root CRL refused: %v", err)
	}
	return res
}

// checkRevocationLogged: every refusal says why (revoked), and the CRL's
// addition is in the audit log.
func checkRevocationLogged(t *testing.T, c *clustertest.Cluster, f *revocationFixture) {
	t.Helper()
	logs := c.Log.String()
	for _, want := range []string{"root CRL added", "certificate chain refused: revoked by a root CRL", "is on its issuer's CRL"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q", want)
		}
	}
	recs, err := c.Admin(f.good[0]).AuditList(context.Background(), &api.AuditRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, r := range recs.Records {
		if r.Action == state.CmdRootCRLAdd {
			found = true
			if r.Detail["number"] != "1" || r.Detail["revoked"] == "" || !strings.Contains(r.Detail["jwt_keys_withdrawn"], f.bad+"-") {
				t.Errorf("audit record of the CRL: %+v", r)
			}
		}
	}
	if !found {
		t.Error("the root CRL's addition is not in the audit log")
	}
}

func raftSelfJoin(addr, nodeID string, cert tls.Certificate) error {
	conn, err := tls.Dial("tcp", addr, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	req, _ := json.Marshal(map[string]any{"Op": "join", "NodeID": nodeID, "Addr": "127.0.0.1:1", "Self": true})
	msg := []byte{0x02} // the raft package's RPC protocol byte
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(req)))
	if _, err := conn.Write(append(msg, req...)); err != nil {
		return err
	}
	var hdr [4]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	if _, err := io.ReadFull(conn, body); err != nil {
		return err
	}
	var resp struct{ Err string }
	if err := json.Unmarshal(body, &resp); err != nil {
		return err
	}
	if resp.Err != "" {
		return fmt.Errorf("raft: %s", resp.Err)
	}
	return nil
}

// TestAttackForgedCRL: a root CRL that the root did not sign (a key
// posing under the root's name, or a node's own issuing CA), an older CRL
// replacing a newer one, or a CRL that drops a revocation is refused with
// a clear error and changes nothing: the bundle, the stored CRLs and the
// audit log stay as they were, and the "revoked" node's credentials keep
// working.
func TestAttackForgedCRL(t *testing.T) {
	f := newRevocationFixture(t, "fc")
	c := f.c
	ctx := context.Background()
	admin := c.Admin("node-1")
	victim := f.good[len(f.good)-1] // a node the forger wants cut off
	victimCA := f.tr.Nodes[victim].Issuing
	victimAdmin := clustertest.ClientCert(t, c.Node(victim).Authority(), "/sigil/admin/victim-admin")
	vPath, vKey := clustertest.WriteCredential(t, t.TempDir(), "victim", victimAdmin)

	// A legitimate CRL number 2 (revoking nothing) is in place first.
	addRootCRL(t, admin, f.tr.RootCRL(t, 2))

	tmpl := func(number int64) *x509.RevocationList {
		return &x509.RevocationList{Number: big.NewInt(number), ThisUpdate: time.Now().Add(-time.Minute), NextUpdate: time.Now().Add(24 * time.Hour),
			RevokedCertificateEntries: []x509.RevocationListEntry{{SerialNumber: victimCA.SerialNumber, RevocationTime: time.Now()}}}
	}
	// A key that is not the root's, under the root's name and key ID.
	fakeKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	posing := *f.tr.Root
	forgedName, err := x509.CreateRevocationList(rand.Reader, tmpl(3), &posing, fakeKey)
	if err != nil {
		t.Fatal(err)
	}
	// Another node's issuing CA (HSM-held, chains to the root) signing a
	// "CRL" of its peer.
	forgedNode, err := c.Node(f.bad).Authority().CRL(3, []*big.Int{victimCA.SerialNumber}, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	// Rollback: the root's own CRL number 1 after number 2.
	stale := f.tr.RootCRL(t, 1, victim)

	before := snapshotRevocationState(t, c, f)
	for _, tc := range []struct {
		name, want string
		crl        []byte
	}{
		{"key posing as the root", "is not signed by a root of the trust bundle", forgedName},
		{"node issuing CA", "is not signed by a root of the trust bundle", forgedNode},
		{"older root CRL", "is not newer than the stored CRL number 2", stale},
		{"garbage", "not an X.509 CRL", []byte("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")},
	} {
		_, err := admin.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: tc.crl})
		if err == nil {
			t.Errorf("ATTACK SUCCEEDED: %s: CRL accepted", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: refused with %v, want %q", tc.name, err, tc.want)
		}
	}
	after := snapshotRevocationState(t, c, f)
	if before != after {
		t.Errorf("refused CRLs changed the state:\nbefore %s\nafter  %s", before, after)
	}
	// The victim's credentials still work everywhere.
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		if _, err := c.Client(id, vPath, vKey).EntryList(ctx, &api.EntryListRequest{}); err != nil {
			t.Errorf("%s refused %s's admin credential after forged CRLs: %v", id, victim, err)
		}
	}
	if logs := c.Log.String(); !strings.Contains(logs, "is not signed by a root of the trust bundle") {
		t.Error("the refusal is not logged")
	}
}

// snapshotRevocationState renders what a CRL could change on every node.
func snapshotRevocationState(t *testing.T, c *clustertest.Cluster, f *revocationFixture) string {
	t.Helper()
	if _, err := c.Admin("node-1").AuditList(context.Background(), &api.AuditRequest{Limit: 1}); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		// The applied index moves just before the caches are refreshed:
		// wait for the CRLs themselves too.
		clustertest.Eventually(t, 10*time.Second, id+" caught up", func() bool {
			s, ref := c.Node(id).State(), c.Node("node-1").State()
			return s.AppliedIndex() >= ref.AppliedIndex() && len(s.RootCRLs()) == len(ref.RootCRLs()) &&
				s.Bundle().Sequence == ref.Bundle().Sequence
		})
		s := c.Node(id).State()
		bd := s.Bundle()
		var crls []string
		for _, r := range s.RootCRLs() {
			crls = append(crls, r.Root[:8]+"#"+r.Number+"="+strings.Join(r.Revoked, ","))
		}
		fmt.Fprintf(&b, "%s: seq %d jwt %d crls %v; ", id, bd.Sequence, len(bd.JWTKeys), crls)
	}
	recs, err := c.Admin("node-1").AuditList(context.Background(), &api.AuditRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs.Records {
		if strings.HasPrefix(r.Action, "bundle.") {
			fmt.Fprintf(&b, "%s#%s ", r.Action, r.Detail["number"])
		}
	}
	return b.String()
}

// TestAttackRevokedNodeKeepsRaftConnection: a compromised node (a member,
// not removed) has warm raft connections to the leader when the root's CRL
// revokes its issuing CA. Raft checks a peer only at the TLS handshake, so
// unless the connections are dropped when the revoked set changes, the
// node goes on forwarding writes (as any admin name it likes) over the
// connections it opened before. Two attackers: one holding the node's key
// and speaking raft's RPC itself over a connection opened before the CRL
// (it ignores the CRL), and the node's own local socket. After the CRL
// neither may commit anything, and the cluster goes on working without the
// node.
func TestAttackRevokedNodeKeepsRaftConnection(t *testing.T) {
	f := newRevocationFixture(t, "rk")
	c, bad := f.c, f.bad
	ctx := context.Background()
	entry := func(name string) *api.EntryRequest {
		return &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/" + name, ParentID: f.agentID,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}}
	}
	leader := c.WaitLeader(30 * time.Second)
	if leader == bad {
		t.Fatalf("the compromised node %s leads", bad)
	}
	// The attacker's connection: the node's certificate (its CA is in the
	// attacker's hands), raft's RPC protocol, opened and used before the
	// CRL.
	nodeCert := clustertest.ClientCert(t, c.Node(bad).Authority(), "/sigil/node/"+bad)
	conn, err := tls.Dial("tcp", c.ConfigOf(leader).Cluster.Bind, &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: []tls.Certificate{nodeCert}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	if _, err := conn.Write([]byte{0x02}); err != nil { // the raft package's RPC protocol byte
		t.Fatal(err)
	}
	forward := func(name string) error {
		cmd, err := state.NewCommand(state.CmdEntryCreate, "local:uid=0@"+bad, time.Now(), &state.Entry{ID: "rk-" + name,
			SPIFFEID: "spiffe://example.org/" + name, ParentID: f.agentID, Selectors: []state.Selector{{Type: "unix", Value: "uid:0"}}})
		if err != nil {
			t.Fatal(err)
		}
		if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			return err
		}
		return raftRPC(conn, map[string]any{"Op": "apply", "Cmd": cmd})
	}
	if err := forward("raw-warm"); err != nil {
		t.Fatalf("the attacker's warm-up write before the CRL: %v", err)
	}
	// The node's own path: a write through its local socket before the
	// CRL (its pooled connection to the leader).
	for i := range 3 {
		if _, err := local(t, c, bad).EntryCreate(ctx, entry(fmt.Sprintf("warm-%d", i))); err != nil {
			t.Fatalf("warm-up write through %s: %v", bad, err)
		}
	}
	crl := f.tr.RootCRL(t, 1, bad)
	addRootCRL(t, c.Admin(f.good[0]), crl)
	clustertest.Eventually(t, 10*time.Second, "the CRL on the good nodes", func() bool {
		for _, id := range f.good {
			if len(c.Node(id).State().RootCRLs()) != 1 {
				return false
			}
		}
		return true
	})

	// The attacks. The node has published no JWT key and signed no
	// checkpoint, so the state machine knows no CA of its (state's
	// checkOriginCA does not apply): the dropped connections are what
	// stops it.
	if err := forward("raw-after-crl"); err == nil {
		t.Errorf("ATTACK SUCCEEDED: a raft connection of %s opened before the CRL revoking its CA still commits writes", bad)
	}
	cctx, cancel := context.WithTimeout(ctx, 6*time.Second)
	_, err = local(t, c, bad).EntryCreate(cctx, entry("after-crl"))
	cancel()
	if err == nil {
		t.Errorf("ATTACK SUCCEEDED: %s, whose CA the root revoked, committed a write through its local socket", bad)
	}
	// The good nodes go on working without it, and nothing of the attack
	// committed anywhere.
	if _, err := c.Admin(f.good[0]).EntryCreate(ctx, entry("legit")); err != nil {
		t.Fatalf("write through a good node after the CRL: %v", err)
	}
	for _, id := range f.good {
		if _, err := c.Admin(id).AuditList(ctx, &api.AuditRequest{Limit: 1}); err != nil {
			t.Fatalf("read on %s: %v", id, err)
		}
		s := c.Node(id).State()
		for _, name := range []string{"after-crl", "raw-after-crl"} {
			if got := s.EntriesBySPIFFEID("spiffe://example.org/" + name); len(got) != 0 {
				t.Errorf("ATTACK SUCCEEDED: %s holds the revoked node's write %s: %v", id, name, got)
			}
		}
		if got := s.EntriesBySPIFFEID("spiffe://example.org/legit"); len(got) != 1 {
			t.Errorf("%s lacks the good write: %v", id, got)
		}
	}
	if logs := c.Log.String(); !strings.Contains(logs, "raft connections dropped") {
		t.Error("the connection reset is not logged")
	}
}

// raftRPC sends one request over a raft RPC connection and reads the
// answer; an error answer is an error.
func raftRPC(conn net.Conn, req map[string]any) error {
	b, _ := json.Marshal(req)
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(b)))
	if _, err := conn.Write(append(msg, b...)); err != nil {
		return err
	}
	var hdr [4]byte
	if _, err := io.ReadFull(conn, hdr[:]); err != nil {
		return err
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[:]))
	if _, err := io.ReadFull(conn, body); err != nil {
		return err
	}
	var resp struct {
		Err       string
		NotLeader bool
	}
	if err := json.Unmarshal(body, &resp); err != nil {
		return err
	}
	if resp.Err != "" || resp.NotLeader {
		return fmt.Errorf("raft rpc: %q (not leader: %v)", resp.Err, resp.NotLeader)
	}
	return nil
}

// TestRevokedRotatedCA: a node whose issuing CA was re-issued (a new
// certificate for its key, as a CA rotation ceremony makes) before the old
// certificate is revoked. The state recorded the old CA for it when it
// published a JWT key, so after the CRL its commands are refused; the node
// notices, publishes a key with its current CA, and is accepted again.
func TestRevokedRotatedCA(t *testing.T) {
	f := newRevocationFixture(t, "rr")
	c, node := f.c, f.bad
	ctx := context.Background()
	if _, err := c.Node(node).JWTRotate(ctx); err != nil {
		t.Fatal(err)
	}
	// The ceremony signs the node's CSR again: same key, new certificate.
	tr := f.tr
	newCert := filepath.Join(tr.Dir, node+"-issuing-2.pem")
	script := fmt.Sprintf("kind: sign-issuing\ntrust-domain: example.org\ntranscript: %s\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: root\nsign-issuing:\n  root-certificate: %s\n  csr: %s\n  node-id: %s\n  validity: 1y\n  output: %s\n",
		filepath.Join(tr.Dir, "transcript.jsonl"), tr.Module, tr.RootToken.Label, tr.RootToken.PINFile, tr.RootPath,
		filepath.Join(tr.Dir, node+".csr"), node, newCert)
	cfgc, err := ceremony.Parse([]byte(script), ceremony.KindSignIssuing)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := cfgc.Validate(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if err := ceremony.Run(ctx, plan, ceremony.Options{}); err != nil {
		t.Fatal(err)
	}
	c.Stop(node)
	c.ConfigOf(node).IssuingCert = newCert
	c.Start(node)
	c.WaitLeader(30 * time.Second)
	if c.Node(node).Authority().Issuing().SerialNumber.Cmp(tr.Nodes[node].Issuing.SerialNumber) == 0 {
		t.Fatal("the node still signs with its old CA certificate")
	}

	// The old certificate is revoked.
	addRootCRL(t, c.Admin(f.good[0]), tr.RootCRL(t, 1, node))
	clustertest.Eventually(t, 20*time.Second, node+" shows its current CA and writes again", func() bool {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		_, err := local(t, c, node).EntryCreate(cctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/rotated",
			ParentID: f.agentID, Selectors: []api.Selector{{Type: "unix", Value: "uid:7"}}}})
		return err == nil
	})
	// The node may already have shown its new CA before the CRL (a JWT key
	// published at start); either way it writes again, which is the property.
	t.Logf("shown again after the CRL: %v", strings.Contains(c.Log.String(), "this node's issuing CA shown again"))
}

// TestAttackRevokedChainOnOpenConnection: a certificate minted by a node's
// issuing CA makes calls on one long-lived connection, so that the node
// has verified its chain and keeps the verification (ca.Classify caches
// verified chains). The root then revokes that CA. The next call on the
// same connection, with nothing re-handshaken, must be refused: the cache
// spares the signature checks, never the CRL check.
func TestAttackRevokedChainOnOpenConnection(t *testing.T) {
	f := newRevocationFixture(t, "rcc")
	ctx := context.Background()
	agentPath := strings.TrimPrefix(f.agentID, "spiffe://example.org")
	minted := clustertest.ClientCert(t, f.c.Node(f.bad).Authority(), agentPath)
	target := f.good[0]
	conn, err := api.Dial(api.DialConfig{Addr: f.c.ConfigOf(target).API.Listen, RootFile: f.tr.RootPath,
		Certificate: func() (*tls.Certificate, error) { return &minted, nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	cl := api.NewAgentClient(conn)
	sign := func() error {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_, err := cl.SignX509SVIDs(cctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: f.entryID, CSR: csr}}})
		return err
	}
	for i := 0; i < 3; i++ {
		if err := sign(); err != nil {
			t.Fatalf("call %d before the revocation: %v", i, err)
		}
	}
	addRootCRL(t, f.c.Admin("node-1"), f.tr.RootCRL(t, 1, f.bad))
	clustertest.Eventually(t, 10*time.Second, target+" to hold the CRL", func() bool {
		return sign() != nil
	})
	for i := 0; i < 3; i++ {
		if err := sign(); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("ATTACK SUCCEEDED: call %d on the open connection after the revocation: %v", i, err)
		}
	}
}
