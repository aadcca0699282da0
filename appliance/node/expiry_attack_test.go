package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// An agent whose own SVID has expired, and which does not renew, keeps
// the connection it opened while the SVID was valid: TLS verified the
// certificate at the handshake only, and the Sync stream lived as long as
// the connection, so the agent went on receiving its entries and the
// bundle. Here a token-joined agent (SVIDs of 4 s) opens a connection and
// a Sync stream on a follower, lets its SVID expire, and an entry is then
// created for it: the stream must have ended at expiry, with
// Unauthenticated saying the SVID expired, without delivering the entry;
// and every call on that connection (signing, a new Sync) is refused the
// same way.
func TestAttackExpiredAgentSVIDKeepsSyncing(t *testing.T) {
	errDelivered := errors.New("delivered after expiry")
	const ttl = 4 * time.Second // NotAfter is issuance + ttl (NotBefore 30 s before issuance)
	tr := clustertest.NewTrust(t, "xp", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) { cfg.Join.AgentSVIDTTL = node.Duration{Duration: ttl} },
		"node-1", "node-2", "node-3")
	ctx := context.Background()
	admin := c.Admin("node-1")
	addr := c.ConfigOf("node-2").API.Listen

	tok, err := admin.TokenCreate(ctx, &api.TokenRequest{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	jconn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: tr.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	svid, err := api.NewJoinClient(jconn).Token(ctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csr})
	_ = jconn.Close() // one call per join connection, as the agent does
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(svid.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("agent %s: SVID valid %s to %s (%v left)", svid.AgentID, leaf.NotBefore.Format(time.RFC3339), leaf.NotAfter.Format(time.RFC3339),
		time.Until(leaf.NotAfter).Round(time.Millisecond))
	cert := &tls.Certificate{Certificate: svid.Chain, PrivateKey: key, Leaf: leaf}
	// The connection presents this SVID for good: the agent never renews.
	conn, err := api.Dial(api.DialConfig{Addr: addr, RootFile: tr.RootPath,
		Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ag := api.NewAgentClient(conn)

	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	stream, err := ag.Sync(sctx, &api.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	type received struct {
		u   *api.SyncUpdate
		err error
		at  time.Time
	}
	got := make(chan received, 256)
	go func() {
		for {
			u, err := stream.Recv()
			got <- received{u, err, time.Now()}
			if err != nil {
				return
			}
		}
	}()
	newEntry := func(path string) api.Entry {
		t.Helper()
		e, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org" + path, ParentID: svid.AgentID,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}, X509TTL: 600}})
		if err != nil {
			t.Fatal(err)
		}
		return *e
	}
	waitEntry := func(id string) {
		t.Helper()
		deadline := time.After(10 * time.Second)
		for {
			select {
			case r := <-got:
				if r.err != nil {
					t.Fatalf("Sync stream ended while the SVID was valid: %v", r.err)
				}
				if slices.ContainsFunc(r.u.Entries, func(e api.Entry) bool { return e.ID == id }) {
					return
				}
			case <-deadline:
				t.Fatalf("entry %s not delivered while the SVID was valid", id)
			}
		}
	}

	// While the SVID is valid the stream delivers, and the agent signs.
	before := newEntry("/expiry/before")
	waitEntry(before.ID)
	res, err := ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: before.ID, CSR: csrFor(t, "")}}})
	if err != nil || res.Results[0].Error != "" {
		t.Fatalf("signing while the SVID was valid: %v %+v", err, res)
	}
	if left := time.Until(leaf.NotAfter); left <= 0 {
		t.Fatalf("setup outlasted the SVID (%v): the attack did not start while it was valid", left)
	}

	// The SVID expires; the agent does not renew and keeps its connection.
	time.Sleep(time.Until(leaf.NotAfter) + 500*time.Millisecond)
	after := newEntry("/expiry/after")
	clustertest.Eventually(t, 10*time.Second, "node-2 to apply the entry", func() bool {
		_, ok := c.Node("node-2").State().Entry(after.ID)
		return ok
	})
	expired := func(what string, err error) {
		t.Helper()
		st, _ := status.FromError(err)
		if st.Code() != codes.Unauthenticated || !strings.Contains(st.Message(), "agent SVID "+svid.AgentID+" expired") ||
			!strings.Contains(st.Message(), "renew") {
			t.Errorf("%s after the agent SVID expired: %v, want Unauthenticated saying the agent SVID expired and must be renewed", what, err)
		}
	}
	var end received
	for deadline := time.After(10 * time.Second); end.err == nil; {
		select {
		case r := <-got:
			if r.err == nil && slices.ContainsFunc(r.u.Entries, func(e api.Entry) bool { return e.ID == after.ID }) {
				t.Errorf("%v after the agent SVID expired (%s), its Sync stream delivered the entry created since (%s)",
					r.at.Sub(leaf.NotAfter).Round(time.Millisecond), leaf.NotAfter.Format(time.RFC3339), after.ID)
				end.err = errDelivered
				continue
			}
			end = r
		case <-deadline:
			t.Fatal("the Sync stream neither ended nor delivered the entry")
		}
	}
	if end.err != errDelivered {
		expired("the Sync stream's end", end.err)
		if end.at.Before(leaf.NotAfter) {
			t.Errorf("the Sync stream ended at %s, before the SVID expired (%s)", end.at.Format(time.RFC3339Nano), leaf.NotAfter.Format(time.RFC3339Nano))
		}
		t.Logf("Sync stream ended %v after NotAfter: %v", end.at.Sub(leaf.NotAfter).Round(time.Millisecond), end.err)
	}

	// Calls on the same connection are refused with the same status.
	_, err = ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: after.ID, CSR: csrFor(t, "")}}})
	expired("SignX509SVIDs on the connection", err)
	_, err = ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: after.ID, Audience: []string{"db"}})
	expired("SignJWTSVID on the connection", err)
	if again, err := ag.Sync(sctx, &api.SyncRequest{}); err != nil {
		expired("a new Sync on the connection", err)
	} else {
		_, err = again.Recv()
		expired("a new Sync on the connection", err)
	}
	// The node logs the stream's end and the refusals, naming the agent.
	lines := strings.Split(c.Log.String(), "\n")
	for _, want := range [][]string{
		{`"msg":"stream ended: the caller's certificate expired"`, `"node":"node-2"`, `"method":"` + api.AgentMethodSync + `"`, `"caller":"` + svid.AgentID + `"`},
		{`"msg":"api call refused: the caller's certificate expired after the connection was opened"`, `"caller":"` + svid.AgentID + `"`},
	} {
		if !slices.ContainsFunc(lines, func(l string) bool {
			return !slices.ContainsFunc(want, func(w string) bool { return !strings.Contains(l, w) })
		}) {
			t.Errorf("node log has no line with %s", strings.Join(want, " and "))
		}
	}
}
