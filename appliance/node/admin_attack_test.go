package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// adminCred is an admin credential as sigilctl admin issue makes it.
type adminCred struct {
	cert, key string
	leaf      *x509.Certificate
	priv      *ecdsa.PrivateKey
}

func (a adminCred) leafKey(t *testing.T) *ecdsa.PrivateKey {
	if a.priv == nil {
		t.Fatal("credential without its key")
	}
	return a.priv
}

// issueAdmin asks a node (as whoever admin is) to certify a fresh key for
// name with role.
func issueAdmin(t *testing.T, c *clustertest.Cluster, admin *api.AdminClient, file, name, role string) (adminCred, error) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := admin.AdminCertIssue(context.Background(), &api.AdminCertRequest{Name: name, CSR: csr, TTL: 3600, Role: role})
	if err != nil {
		return adminCred{}, err
	}
	return writeCred(t, c, file, key, chain.Chain), nil
}

func writeCred(t *testing.T, c *clustertest.Cluster, file string, key *ecdsa.PrivateKey, chain [][]byte) adminCred {
	t.Helper()
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		t.Fatal(err)
	}
	cp, kp := clustertest.WriteCredential(t, c.Dir, file, tls.Certificate{Certificate: chain, PrivateKey: key, Leaf: leaf})
	return adminCred{cert: cp, key: kp, leaf: leaf, priv: key}
}

// local is root on a node's local admin socket.
func local(t *testing.T, c *clustertest.Cluster, id string) *api.AdminClient {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Socket: c.ConfigOf(id).API.LocalSocket})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return api.NewAdminClient(conn)
}

// catchUp makes every node's replica current (a linearizable read there).
func catchUp(t *testing.T, c *clustertest.Cluster) {
	t.Helper()
	for _, id := range c.Running() {
		if _, err := c.Admin(id).AuditList(context.Background(), &api.AuditRequest{Limit: 1}); err != nil {
			t.Fatalf("read on %s: %v", id, err)
		}
	}
}

// An admin certifies a key of its own under another admin's name (or
// gives itself a bigger role): refused before anything is signed, the
// refusal audited, nothing else recorded. What a plain admin may do (renew
// itself) and an issuer may do (issue any name) still works.
func TestAttackAdminCertForOtherAdmin(t *testing.T) {
	tr := clustertest.NewTrust(t, "ao", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	alice, err := issueAdmin(t, c, local(t, c, "node-1"), "alice", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	asAlice := c.Client("node-2", alice.cert, alice.key)
	head, err := c.Admin("node-2").AuditList(ctx, &api.AuditRequest{Limit: 1})
	if err != nil {
		t.Fatal(err)
	}

	// The attack.
	if _, err := issueAdmin(t, c, asAlice, "bob", "bob", ""); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("alice issuing a certificate for bob: %v, want PermissionDenied (the attack succeeded)", err)
	} else {
		t.Logf("refused: %v", err)
	}
	if _, err := issueAdmin(t, c, asAlice, "alice-issuer", "alice", api.AdminRoleIssuer); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("alice giving herself role %s: %v, want PermissionDenied", api.AdminRoleIssuer, err)
	}

	// Nothing recorded but the two refusals, on every node.
	catchUp(t, c)
	for _, id := range c.Running() {
		if rec, ok, err := c.Node(id).State().Admin("bob"); err != nil || ok {
			t.Fatalf("%s records bob: %+v %v", id, rec, err)
		}
		if rec, _, _ := c.Node(id).State().Admin("alice"); rec.Role != api.AdminRoleAdmin || len(rec.Certs) != 1 {
			t.Fatalf("%s: alice's record changed: %+v", id, rec)
		}
	}
	recs, err := c.Admin("node-3").AuditList(ctx, &api.AuditRequest{After: head.Head})
	if err != nil {
		t.Fatal(err)
	}
	var refusals []string
	for _, r := range recs.Records {
		if strings.HasPrefix(r.Action, "admin.") || strings.Contains(r.Target, "/sigil/admin/") {
			if r.Action != "admin.cert.refuse" || r.Actor != "spiffe://example.org/sigil/admin/alice" {
				t.Fatalf("recorded besides the refusals: %+v", r)
			}
			refusals = append(refusals, r.Target+" "+r.Detail["role"])
		}
	}
	if len(refusals) != 2 || refusals[0] != "spiffe://example.org/sigil/admin/bob admin" || refusals[1] != "spiffe://example.org/sigil/admin/alice admin-issuer" {
		t.Fatalf("refusal audit records: %q", refusals)
	}

	// Alice may renew herself; an issuer may issue bob.
	if _, err := issueAdmin(t, c, asAlice, "alice2", "alice", ""); err != nil {
		t.Fatalf("alice renewing herself: %v", err)
	}
	ivy, err := issueAdmin(t, c, local(t, c, "node-3"), "ivy", "ivy", api.AdminRoleIssuer)
	if err != nil {
		t.Fatal(err)
	}
	bob, err := issueAdmin(t, c, c.Client("node-1", ivy.cert, ivy.key), "bob", "bob", "")
	if err != nil {
		t.Fatalf("issuer issuing bob: %v", err)
	}
	if _, err := c.Client("node-3", bob.cert, bob.key).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("bob: %v", err)
	}
	l, err := asAlice.AdminList(ctx, &api.Empty{})
	if err != nil || len(l.Admins) != 3 || l.Admins[0].Name != "alice" || len(l.Admins[0].Certs) != 2 || l.Admins[1].Name != "bob" ||
		l.Admins[2].Role != api.AdminRoleIssuer || l.Admins[1].IssuedBy != "spiffe://example.org/sigil/admin/ivy" {
		t.Fatalf("admin list: %+v %v", l, err)
	}
}

// adminMethods lists every method of the admin service, unary and
// streaming, as the server registers them.
func adminMethods(t *testing.T) (unary []string, streams []grpc.StreamDesc) {
	var reg capture
	api.RegisterAdmin(&reg, nil)
	for _, m := range reg.desc.Methods {
		unary = append(unary, m.MethodName)
	}
	if len(unary) < 25 || len(reg.desc.Streams) < 3 {
		t.Fatalf("admin service has %d methods and %d streams", len(unary), len(reg.desc.Streams))
	}
	return unary, reg.desc.Streams
}

type capture struct{ desc *grpc.ServiceDesc }

func (c *capture) RegisterService(d *grpc.ServiceDesc, _ any) { c.desc = d }

// callAll calls every admin method on a node with a credential and
// returns each one's error.
func callAll(t *testing.T, c *clustertest.Cluster, node string, cred adminCred) map[string]error {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(node).API.Listen, CertFile: cred.cert, KeyFile: cred.key, RootFile: c.Trust.RootPath})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	unary, streams := adminMethods(t)
	out := map[string]error{}
	for _, m := range unary {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var resp json.RawMessage
		out[m] = conn.Invoke(ctx, "/"+api.AdminService+"/"+m, &api.Empty{}, &resp, grpc.ForceCodec(api.Codec{}))
		cancel()
	}
	for _, sd := range streams {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, err := conn.NewStream(ctx, &sd, "/"+api.AdminService+"/"+sd.StreamName, grpc.ForceCodec(api.Codec{}))
		if err == nil && sd.ServerStreams {
			err = s.SendMsg(&api.Empty{})
		}
		if err == nil {
			err = s.CloseSend()
		}
		if err == nil {
			for {
				var m json.RawMessage
				if err = s.RecvMsg(&m); err != nil {
					break
				}
			}
			if errors.Is(err, io.EOF) {
				err = nil
			}
		}
		out[sd.StreamName] = err
		cancel()
	}
	return out
}

// A revoked admin's certificate, still within its validity, is refused
// by every method of every node as soon as the revocation returns; a
// certificate issued for the name afterwards works.
func TestAttackRevokedAdmin(t *testing.T) {
	tr := clustertest.NewTrust(t, "ar", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	alice, err := issueAdmin(t, c, local(t, c, "node-1"), "alice", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	ivy, err := issueAdmin(t, c, local(t, c, "node-2"), "ivy", "ivy", api.AdminRoleIssuer)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range c.Running() {
		if _, err := c.Client(id, alice.cert, alice.key).EntryList(ctx, &api.EntryListRequest{}); err != nil {
			t.Fatalf("alice on %s before revocation: %v", id, err)
		}
	}
	// A plain admin may not revoke another.
	if _, err := c.Client("node-1", alice.cert, alice.key).AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "ivy"}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("alice revoking ivy: %v, want PermissionDenied", err)
	}

	rec, err := c.Client("node-3", ivy.cert, ivy.key).AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "alice"})
	if err != nil {
		t.Errorf("revoke alice: %v", err)
	} else if rec.RevokedAt.IsZero() || rec.RevokedBy != "spiffe://example.org/sigil/admin/ivy" {
		t.Errorf("revocation record: %+v", rec)
	}

	// The attack, right after the revocation returned, before followers
	// need have applied it: alice's reads and writes on every node. Reads
	// are checked after their read index, writes at commit.
	for i, id := range []string{"node-1", "node-2", "node-3"} {
		asAlice := c.Client(id, alice.cert, alice.key)
		e := entryFor(100 + i).Entry
		_, err := asAlice.EntryCreate(ctx, &api.EntryRequest{Entry: e, Force: true})
		want := func(what string, err error) {
			if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
				t.Errorf("revoked alice: %s on %s: %v, want Unauthenticated (revoked)", what, id, err)
			}
		}
		want("entry create", err)
		_, err = asAlice.TokenCreate(ctx, &api.TokenRequest{TTL: 60})
		want("token create", err)
		_, err = asAlice.EntryList(ctx, &api.EntryListRequest{})
		want("entry list", err)
		_, err = asAlice.AdminCertIssue(ctx, &api.AdminCertRequest{Name: "alice", CSR: agentCSR(t, alice.leafKey(t))})
		want("admin cert issue", err)
	}
	if l, err := c.Admin("node-1").EntryList(ctx, &api.EntryListRequest{}); err != nil || len(l.Entries) != 0 {
		t.Fatalf("entries after revoked alice's writes: %+v %v", l, err)
	}
	// Then every method, unary and streaming, on every node.
	catchUp(t, c)
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		for m, err := range callAll(t, c, id, alice) {
			if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
				t.Errorf("revoked alice calling %s on %s: %v, want Unauthenticated (revoked)", m, id, err)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if !strings.Contains(c.Log.String(), "admin call refused: certificate revoked") {
		t.Fatal("refusals not logged")
	}

	// Other admins are unaffected; a new certificate for alice works, the
	// old one stays refused.
	if _, err := c.Admin("node-2").EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatal(err)
	}
	alice2, err := issueAdmin(t, c, local(t, c, "node-3"), "alice2", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client("node-1", alice2.cert, alice2.key).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("alice's new certificate: %v", err)
	}
	if _, err := c.Client("node-1", alice.cert, alice.key).EntryList(ctx, &api.EntryListRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("alice's old certificate after re-issuance: %v", err)
	}
	// A name whose certificates were made outside the API (the test
	// harness's) can be revoked too.
	if _, err := local(t, c, "node-1").AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "test-admin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Admin("node-3").EntryList(ctx, &api.EntryListRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("revoked test-admin: %v", err)
	}
}

// joinByToken admits an agent by a join token and returns its credential.
func joinByToken(t *testing.T, c *clustertest.Cluster, node string) (adminCred, *ecdsa.PrivateKey) {
	t.Helper()
	ctx := context.Background()
	tok, err := c.Admin(node).TokenCreate(ctx, &api.TokenRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(node).API.Listen, RootFile: c.Trust.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	svid, err := api.NewJoinClient(conn).Token(ctx, &api.JoinTokenRequest{Token: tok.Token, CSR: agentCSR(t, key)})
	if err != nil {
		t.Fatal(err)
	}
	return writeCred(t, c, "agent-0", key, svid.Chain), key
}

func agentCSR(t *testing.T, key *ecdsa.PrivateKey) []byte {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

func renew(t *testing.T, c *clustertest.Cluster, node string, cred adminCred, key *ecdsa.PrivateKey) (*api.AgentSVID, error) {
	t.Helper()
	conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(node).API.Listen, CertFile: cred.cert, KeyFile: cred.key, RootFile: c.Trust.RootPath})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return api.NewJoinClient(conn).Renew(ctx, &api.RenewRequest{CSR: agentCSR(t, key)})
}

// A copy of a token-joined agent's key and certificate (stolen: a backup
// of its data directory, say) renews beside the real agent: once the agent
// has renewed twice, or once more than state.RenewGrace ago, the copy
// renews nowhere, and the agent's current certificate still does. Within
// the grace of the agent's last renewal, the copy's certificate is the one
// that renewal replaced, which may renew again because a renewal's answer
// can be lost (the node answering killed after the commit): the copy then
// renews once, and the real agent's next renewal is refused and audited,
// which exposes it.
func TestAttackRenewWithOldSerial(t *testing.T) {
	tr := clustertest.NewTrust(t, "rn", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	stolen, key := joinByToken(t, c, "node-1")

	// The real agent renews on node-2, then on node-3.
	svid, err := renew(t, c, "node-2", stolen, key)
	if err != nil {
		t.Fatal(err)
	}
	agentID := svid.AgentID
	if svid, err = renew(t, c, "node-3", writeCred(t, c, "agent-1", key, svid.Chain), key); err != nil {
		t.Fatal(err)
	}
	current := writeCred(t, c, "agent-2", key, svid.Chain)

	// The attack, on every node, at once.
	for _, id := range []string{"node-3", "node-1", "node-2"} {
		if _, err := renew(t, c, id, stolen, key); status.Code(err) != codes.PermissionDenied {
			t.Fatalf("old certificate (serial %x) renewing on %s: %v, want PermissionDenied (the attack succeeded)", stolen.leaf.SerialNumber, id, err)
		} else {
			t.Logf("%s: %v", id, err)
		}
	}
	catchUp(t, c)
	for _, id := range c.Running() {
		if a, _ := c.Node(id).State().Agent(agentID); a.SerialNumber != current.leaf.SerialNumber.Text(16) {
			t.Fatalf("%s: the agent's current serial is %s, want %x", id, a.SerialNumber, current.leaf.SerialNumber)
		}
	}
	refusedRenewals := func() int {
		recs, err := c.Admin("node-1").AuditList(ctx, &api.AuditRequest{})
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, r := range recs.Records {
			if r.Action == "join.renew.refuse" && r.Target == agentID && strings.Contains(r.Detail["reason"], "not the agent's current certificate") {
				n++
			}
		}
		return n
	}
	if n := refusedRenewals(); n != 3 {
		t.Fatalf("%d refused renewals audited, want 3", n)
	}

	// A copy of the current certificate, taken just before the agent's
	// next renewal, renews within that renewal's grace: the copy gets a
	// certificate, and the real agent is then refused (exposed).
	copied := current
	next, err := renew(t, c, "node-3", current, key)
	if err != nil {
		t.Fatalf("current certificate: %v", err)
	}
	if _, err := renew(t, c, "node-1", copied, key); err != nil {
		t.Fatalf("the replaced certificate within its grace: %v", err)
	}
	if _, err := renew(t, c, "node-2", writeCred(t, c, "agent-3", key, next.Chain), key); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("the real agent after the copy renewed in its grace: %v, want PermissionDenied", err)
	}
	if n := refusedRenewals(); n != 4 {
		t.Fatalf("%d refused renewals audited, want 4 (the real agent's)", n)
	}
	recs, err := c.Admin("node-1").AuditList(ctx, &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	nextLeaf, err := x509.ParseCertificate(next.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	exposed := false
	for _, r := range recs.Records {
		exposed = exposed || r.Action == "agent.upsert" && r.Target == agentID && r.Detail["replaced_undelivered"] == nextLeaf.SerialNumber.Text(16)
	}
	if !exposed {
		t.Fatal("no audit record names the certificate the copy's renewal replaced")
	}
}

// A node's CA (a compromised node, or its HSM PIN) mints an admin
// certificate directly, valid for longer than admin-cert-max-ttl: refused
// on every node. One within the limit is accepted.
func TestAttackLongLivedAdminCert(t *testing.T) {
	tr := clustertest.NewTrust(t, "al", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	mint := func(file string, ttl time.Duration) adminCred {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		a := c.Node("node-2").Authority()
		chain, err := a.SignAdmin(ca.Leaf{ID: spiffeid.RequireFromPath(a.TrustDomain(), "/sigil/admin/mallory"), PublicKey: &key.PublicKey, TTL: ttl,
			Subject: pkix.Name{CommonName: "mallory"}})
		if err != nil {
			t.Fatal(err)
		}
		var raw [][]byte
		for _, x := range chain {
			raw = append(raw, x.Raw)
		}
		return writeCred(t, c, file, key, raw)
	}
	max := c.ConfigOf("node-1").API.AdminCertMaxTTL.Duration
	long := mint("mallory-long", 30*24*time.Hour)
	if got := long.leaf.NotAfter.Sub(long.leaf.NotBefore); got <= max {
		t.Fatalf("minted certificate valid for %v, not longer than %v", got, max)
	}
	for _, id := range c.Running() {
		_, err := c.Client(id, long.cert, long.key).EntryList(ctx, &api.EntryListRequest{})
		if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "admin-cert-max-ttl") {
			t.Fatalf("30-day admin certificate on %s: %v, want Unauthenticated (admin-cert-max-ttl) (the attack succeeded)", id, err)
		}
		t.Logf("%s: %v", id, err)
	}
	for m, err := range callAll(t, c, "node-1", long) {
		if status.Code(err) != codes.Unauthenticated {
			t.Fatalf("30-day admin certificate calling %s: %v", m, err)
		}
	}
	ok := mint("mallory-ok", max)
	if _, err := c.Client("node-3", ok.cert, ok.key).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("admin certificate of admin-cert-max-ttl: %v", err)
	}
}

// A node that restarts (or lags) authenticates a call against its replica
// as it is: a certificate whose name was revoked and then re-issued while
// the node was down passes there, and at commit the name's record, which
// holds a certificate issued since the revocation, used to let it through.
// The command now names its certificate (actor_serial) and the state
// machine checks that one: refused, nothing committed.
func TestAttackRevokedAdminThroughRestartedNode(t *testing.T) {
	tr := clustertest.NewTrust(t, "rr", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	leader := c.WaitLeader(30 * time.Second)
	victim, other := "", ""
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		switch {
		case id == leader:
		case victim == "":
			victim = id
		default:
			other = id
		}
	}
	alice, err := issueAdmin(t, c, local(t, c, leader), "alice", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	catchUp(t, c)
	if _, err := c.Client(victim, alice.cert, alice.key).EntryList(ctx, &api.EntryListRequest{}); err != nil {
		t.Fatalf("alice on %s before: %v", victim, err)
	}

	// While the victim is down: alice is revoked and re-issued.
	c.Stop(victim)
	if _, err := local(t, c, leader).AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	alice2, err := issueAdmin(t, c, local(t, c, other), "alice2", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client(other, alice.cert, alice.key).EntryList(ctx, &api.EntryListRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("old certificate on a current node: %v", err)
	}

	// The attack: the old certificate, through the victim as soon as it is
	// back, before it has applied the revocation.
	n := c.Start(victim)
	rec, known, _ := n.State().Admin("alice")
	stale := !known || rec.RevokedAt.IsZero()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	e := entryFor(7).Entry
	e.ID = "a11ce-01d-cert"
	_, err = c.Client(victim, alice.cert, alice.key).EntryCreate(cctx, &api.EntryRequest{Entry: e, Force: true})
	t.Logf("%s's replica knew the revocation when the call came: %v; call: %v", victim, !stale, err)
	if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("old certificate through restarted %s: %v, want Unauthenticated (revoked) (the attack succeeded)", victim, err)
	}
	c.WaitLeader(30 * time.Second)
	catchUp(t, c)
	for _, id := range c.Running() {
		if _, ok := c.Node(id).State().Entry(e.ID); ok {
			t.Errorf("%s: the revoked certificate's entry was committed", id)
		}
	}
	recs, err := c.Admin(victim).AuditList(ctx, &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs.Records {
		if r.Action == "entry.create" {
			t.Errorf("audit: %+v", r)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	// Alice's new certificate works through the victim.
	if _, err := c.Client(victim, alice2.cert, alice2.key).EntryCreate(ctx, entryFor(8)); err != nil {
		t.Fatalf("alice's new certificate through %s: %v", victim, err)
	}
}

// Roles belonged to names: "ops" issued as a plain admin (certificate C1),
// then re-issued as an admin-issuer (C2), and C1 could issue issuer
// certificates for anyone; the harness's unrecorded test-admin certificate
// became an issuer once the name test-admin was issued as one. A role now
// belongs to the certificate it was issued with; an unrecorded certificate
// is a plain admin.
func TestAttackAdminRoleByName(t *testing.T) {
	tr := clustertest.NewTrust(t, "rn", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	ctx := context.Background()
	c1, err := issueAdmin(t, c, local(t, c, "node-1"), "ops-c1", "ops", api.AdminRoleAdmin)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := issueAdmin(t, c, local(t, c, "node-2"), "ops-c2", "ops", api.AdminRoleIssuer)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := issueAdmin(t, c, local(t, c, "node-3"), "unused", "test-admin", api.AdminRoleIssuer); err != nil {
		t.Fatal(err)
	}
	catchUp(t, c)

	// The attack, on every node: C1 and the harness certificate issue an
	// issuer certificate for bob and revoke another name.
	for _, id := range []string{"node-1", "node-2", "node-3"} {
		for name, cl := range map[string]*api.AdminClient{"ops C1": c.Client(id, c1.cert, c1.key), "test-admin (unrecorded)": c.Admin(id)} {
			if _, err := issueAdmin(t, c, cl, "bob-"+id, "bob", api.AdminRoleIssuer); status.Code(err) != codes.PermissionDenied {
				t.Errorf("%s issuing an issuer certificate for bob on %s: %v, want PermissionDenied (the attack succeeded)", name, id, err)
			} else {
				t.Logf("%s on %s: %v", name, id, err)
			}
			if _, err := cl.AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "carol"}); status.Code(err) != codes.PermissionDenied {
				t.Errorf("%s revoking carol on %s: %v, want PermissionDenied", name, id, err)
			}
		}
	}
	catchUp(t, c)
	for _, id := range c.Running() {
		for _, name := range []string{"bob", "carol"} {
			if rec, ok, err := c.Node(id).State().Admin(name); ok || err != nil {
				t.Errorf("%s records %s: %+v %v", id, name, rec, err)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	// What each certificate may do still works: C1 renews itself as a
	// plain admin (asking for no role: it keeps its own), C2 issues bob.
	c3, err := issueAdmin(t, c, c.Client("node-3", c1.cert, c1.key), "ops-c3", "ops", "")
	if err != nil {
		t.Fatalf("C1 renewing itself: %v", err)
	}
	catchUp(t, c)
	if rec, _, _ := c.Node("node-1").State().Admin("ops"); len(rec.Certs) != 3 || rec.Certs[2].Serial != c3.leaf.SerialNumber.Text(16) || rec.Certs[2].Role != api.AdminRoleAdmin {
		t.Fatalf("C1's renewal: %+v", rec)
	}
	if _, err := issueAdmin(t, c, c.Client("node-3", c2.cert, c2.key), "bob", "bob", api.AdminRoleIssuer); err != nil {
		t.Fatalf("C2 (issuer) issuing bob: %v", err)
	}
}

// Refused admin certificates call at will: each refusal was logged, one
// line per call. They are now logged at most once a second per reason. An
// admin certificate whose name is not an admin name (made outside the API:
// the admin table cannot record or revoke it) is refused.
func TestAttackAdminRefusalLogFlood(t *testing.T) {
	tr := clustertest.NewTrust(t, "lf", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	alice, err := issueAdmin(t, c, local(t, c, "node-1"), "alice", "alice", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := local(t, c, "node-1").AdminRevoke(ctx, &api.AdminRevokeRequest{Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	a := c.Node("node-1").Authority()
	chain, err := a.SignAdmin(ca.Leaf{ID: spiffeid.RequireFromPath(a.TrustDomain(), "/sigil/admin/Mallory.Admin"), PublicKey: &key.PublicKey, TTL: time.Hour,
		Subject: pkix.Name{CommonName: "mallory"}})
	if err != nil {
		t.Fatal(err)
	}
	bad := writeCred(t, c, "malformed-name", key, [][]byte{chain[0].Raw, chain[1].Raw})
	if _, err := c.Client("node-1", bad.cert, bad.key).EntryList(ctx, &api.EntryListRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("admin certificate with a malformed name: %v, want Unauthenticated (the attack succeeded)", err)
	}

	const calls = 300
	before := strings.Count(c.Log.String(), "admin call refused")
	start := time.Now()
	asAlice := c.Client("node-1", alice.cert, alice.key)
	for range calls {
		if _, err := asAlice.EntryList(ctx, &api.EntryListRequest{}); status.Code(err) != codes.Unauthenticated {
			t.Fatalf("revoked alice: %v", err)
		}
	}
	lines := strings.Count(c.Log.String(), "admin call refused") - before
	allowed := int(time.Since(start)/time.Second) + 2
	t.Logf("%d refused calls in %v: %d log lines", calls, time.Since(start).Round(time.Millisecond), lines)
	if lines > allowed {
		t.Fatalf("%d refused calls logged %d lines, want at most %d (one a second) (the attack succeeded)", calls, lines, allowed)
	}
}
