package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
)

// fastFederation makes the leader fetch foreign bundles at most every
// second, and the bundle endpoint hint 2 s, so that tests see refreshes.
func fastFederation(c *node.Config) {
	c.Bundle.MinFetchInterval = node.Duration{Duration: time.Second}
	c.Bundle.RefreshHint = node.Duration{Duration: 2 * time.Second}
}

// getBundle fetches a node's bundle endpoint without authenticating it:
// the operator's out-of-band copy that a relationship starts from.
func getBundle(t *testing.T, n *node.Node) []byte {
	t.Helper()
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	resp, err := client.Get("https://" + n.BundleAddr() + "/")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	doc, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func metricsOf(t *testing.T, n *node.Node) string {
	t.Helper()
	resp, err := http.Get("http://" + n.HTTPAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// Two appliances of different trust domains (a.example of three nodes,
// b.example of one) federate both ways over their real bundle endpoints
// (https_spiffe: each endpoint authenticated as the other's node SVID,
// against the other's bundle): each leader, and only the leader, fetches
// the other's bundle and commits it when it changes (a JWT key
// rotation); after a failover the new leader does; agents' entries may
// then federate with it.
func TestFederationBothWays(t *testing.T) {
	trA := clustertest.NewTrustIn(t, "a.example", "fda", []string{"node-1", "node-2", "node-3"}, nil)
	trB := clustertest.NewTrustIn(t, "b.example", "fdb", []string{"node-1"}, nil)
	a := clustertest.NewClusterWith(t, trA, fastFederation, "node-1", "node-2", "node-3")
	b := clustertest.NewClusterWith(t, trB, fastFederation, "node-1")
	ctx := context.Background()
	na, nb := a.Node("node-1"), b.Node("node-1")

	for _, side := range []struct {
		c        *clustertest.Cluster
		peer     *node.Node
		peerTD   string
		peerNode string
	}{{a, nb, "b.example", "spiffe://b.example/sigil/node/node-1"}, {b, na, "a.example", "spiffe://a.example/sigil/node/node-1"}} {
		doc := getBundle(t, side.peer)
		if pb, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString(side.peerTD), doc); err != nil {
			t.Fatal(err)
		} else if h, ok := pb.RefreshHint(); !ok || h != 2*time.Second {
			t.Fatalf("bundle endpoint's refresh hint %v %v, want 2s", h, ok)
		}
		rel, err := side.c.Admin("node-1").FederationAdd(ctx, &api.FederationRelationship{TrustDomain: side.peerTD,
			BundleEndpointURL: "https://" + side.peer.BundleAddr() + "/", Profile: "https_spiffe", EndpointSPIFFEID: side.peerNode, Bundle: doc})
		if err != nil {
			t.Fatal(err)
		}
		if rel.BundleSequence == 0 || rel.BundleChanges != 1 {
			t.Fatalf("added relationship: %+v", rel)
		}
	}
	// The first fetches find the bundles unchanged and succeed.
	for _, side := range []struct {
		c      *clustertest.Cluster
		peerTD string
	}{{a, "b.example"}, {b, "a.example"}} {
		// The fetch status is the answering node's own: the leader's.
		l := side.c.WaitLeader(10 * time.Second)
		clustertest.Eventually(t, 20*time.Second, "a first successful fetch of "+side.peerTD, func() bool {
			r, err := side.c.Admin(l).FederationShow(ctx, &api.IDRequest{ID: side.peerTD})
			return err == nil && !r.LastFetch.IsZero() && r.LastFetchError == ""
		})
	}

	// A change on either side reaches the other: a new JWT key.
	for _, side := range []struct {
		from, to *clustertest.Cluster
		fromTD   string
	}{{b, a, "b.example"}, {a, b, "a.example"}} {
		rot, err := side.from.Admin("node-1").JWTKeyRotate(ctx, &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		clustertest.Eventually(t, 30*time.Second, side.fromTD+"'s new JWT key to be fetched", func() bool {
			r, err := side.to.Admin("node-1").FederationShow(ctx, &api.IDRequest{ID: side.fromTD})
			if err != nil {
				return false
			}
			fb, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString(side.fromTD), r.Bundle)
			return err == nil && fb.HasJWTAuthority(rot.KID)
		})
	}
	leader := a.WaitLeader(10 * time.Second)
	for _, id := range a.Running() {
		m := metricsOf(t, a.Node(id))
		fetched := strings.Contains(m, `sigil_federation_fetches_total{result="updated",trust_domain="b.example"}`) &&
			strings.Contains(m, `sigil_federation_bundle_refresh_age_seconds{trust_domain="b.example"}`)
		if fetched != (id == leader) || id != leader && strings.Contains(m, "sigil_federation_fetches_total{") {
			t.Fatalf("%s (leader %s) federation metrics:\n%s", id, leader, grepLines(m, "federation"))
		}
	}

	// The leader goes: the new one fetches.
	a.Stop(leader)
	leader = a.WaitLeader(30 * time.Second)
	na = a.Node(leader)
	rot, err := b.Admin("node-1").JWTKeyRotate(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 30*time.Second, "the new leader to fetch b.example's new key", func() bool {
		r, err := a.Admin(leader).FederationShow(ctx, &api.IDRequest{ID: "b.example"})
		if err != nil {
			return false
		}
		fb, err := spiffebundle.Parse(spiffeid.RequireTrustDomainFromString("b.example"), r.Bundle)
		return err == nil && fb.HasJWTAuthority(rot.KID) && !r.LastFetch.IsZero()
	})

	// Entries federate with relationships only; the bundle is the agent's.
	e := entryFor(1).Entry
	e.SPIFFEID, e.ParentID = "spiffe://a.example/svc/1", "spiffe://a.example/sigil/agent/tpm/host-a"
	e.FederatesWith = []string{"c.example"}
	if _, err := a.Admin(leader).EntryCreate(ctx, &api.EntryRequest{Entry: e, Force: true}); err == nil || !strings.Contains(err.Error(), "not a federation relationship") {
		t.Fatalf("entry federating with an unknown trust domain: %v", err)
	}
	e.FederatesWith = []string{"b.example"}
	if _, err := a.Admin(leader).EntryCreate(ctx, &api.EntryRequest{Entry: e, Force: true}); err != nil {
		t.Fatal(err)
	}
	if got := na.State().FederatedBundles([]string{"b.example"}); len(got["b.example"]) == 0 {
		t.Fatal("no federated bundle for b.example")
	}
	// Deleted: the bundle goes.
	if _, err := a.Admin(leader).FederationDelete(ctx, &api.IDRequest{ID: "b.example"}); err != nil {
		t.Fatal(err)
	}
	if got := na.State().FederatedBundles([]string{"b.example"}); got != nil {
		t.Fatal("a deleted relationship's bundle stayed")
	}
}

// foreignTD is a stand-in foreign trust domain: a root, and an
// X.509-SVID of its bundle endpoint.
type foreignTD struct {
	root     *x509.Certificate
	rootKey  *ecdsa.PrivateKey
	endpoint tls.Certificate
}

func newForeignTD(t *testing.T, name, endpointID string) *foreignTD {
	t.Helper()
	rk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://" + name)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &rk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	lk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	id, _ := url.Parse(endpointID)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, URIs: []*url.URL{id}}
	ld, err := x509.CreateCertificate(rand.Reader, leaf, root, &lk.PublicKey, rk)
	if err != nil {
		t.Fatal(err)
	}
	return &foreignTD{root: root, rootKey: rk, endpoint: tls.Certificate{Certificate: [][]byte{ld}, PrivateKey: lk}}
}

func (f *foreignTD) doc(t *testing.T, name string, seq uint64, extra ...*x509.Certificate) []byte {
	t.Helper()
	b := spiffebundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(name), append([]*x509.Certificate{f.root}, extra...))
	b.SetSequenceNumber(seq)
	b.SetRefreshHint(time.Second)
	d, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// A foreign bundle endpoint that rolls its sequence back, serves garbage,
// a bundle claiming our trust domain, or is down changes nothing: the
// stored bundle stays, and the fetches are counted and shown.
func TestFederationFetchFailures(t *testing.T) {
	tr := clustertest.NewTrustIn(t, "a.example", "fdf", []string{"node-1"}, nil)
	c := clustertest.NewClusterWith(t, tr, fastFederation, "node-1")
	n := c.Node("node-1")
	ctx := context.Background()
	const foreign, endpointID = "c.example", "spiffe://c.example/bundle-endpoint"
	ftd := newForeignTD(t, foreign, endpointID)
	other := newForeignTD(t, foreign, endpointID) // another root of c.example, for a change

	var mu sync.Mutex
	serve := ftd.doc(t, foreign, 5)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		_, _ = w.Write(serve)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ftd.endpoint}}
	srv.StartTLS()
	defer srv.Close()
	setServe := func(d []byte) { mu.Lock(); serve = d; mu.Unlock() }

	admin := c.Admin("node-1")
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: foreign, BundleEndpointURL: srv.URL + "/",
		Profile: "https_spiffe", EndpointSPIFFEID: endpointID, Bundle: ftd.doc(t, foreign, 5)}); err != nil {
		t.Fatal(err)
	}
	// An archive of the relationship at sequence 5, restored at the end.
	snap, err := admin.SnapshotSave(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	show := func() *api.FederationRelationship {
		r, err := admin.FederationShow(ctx, &api.IDRequest{ID: foreign})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	// A real change is taken.
	setServe(ftd.doc(t, foreign, 6, other.root))
	clustertest.Eventually(t, 20*time.Second, "sequence 6 to be fetched", func() bool { return show().BundleSequence == 6 })
	stored := show().Bundle

	for _, tc := range []struct {
		name, result, errText string
		serve                 []byte
	}{
		{"rollback", "rollback", "older than the stored 6", ftd.doc(t, foreign, 3)},
		{"garbage", "invalid", "unable to parse JWKS", []byte("<html>not a bundle</html>")},
		{"our trust domain", "invalid", "this appliance's own", ftd.doc(t, foreign, 7, newForeignTD(t, "a.example", "spiffe://a.example/x").root)},
		{"huge", "too_large", "larger than", append([]byte(`{"keys":[],"x":"`), make([]byte, 300<<10)...)},
	} {
		setServe(tc.serve)
		clustertest.Eventually(t, 20*time.Second, tc.name+" to be reported", func() bool {
			return strings.Contains(show().LastFetchError, tc.errText) &&
				strings.Contains(metricsOf(t, n), `sigil_federation_fetches_total{result="`+tc.result+`",trust_domain="c.example"}`)
		})
		if r := show(); r.BundleSequence != 6 || string(r.Bundle) != string(stored) {
			t.Fatalf("%s changed the stored bundle: %+v", tc.name, r)
		}
	}
	// https_spiffe without a bundle cannot authenticate the endpoint; an
	// endpoint that is another trust domain's (the stand-in presents a
	// c.example SVID) fails its authentication as e.example's.
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: "d.example", BundleEndpointURL: srv.URL + "/",
		Profile: "https_spiffe", EndpointSPIFFEID: "spiffe://d.example/x"}); err != nil {
		t.Fatal(err)
	}
	eTD := newForeignTD(t, "e.example", "spiffe://e.example/x")
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: "e.example", BundleEndpointURL: srv.URL + "/",
		Profile: "https_spiffe", EndpointSPIFFEID: "spiffe://e.example/x", Bundle: eTD.doc(t, "e.example", 1)}); err != nil {
		t.Fatal(err)
	}
	for td, want := range map[string]string{"d.example": `result="no_bundle",trust_domain="d.example"`, "e.example": `result="unreachable",trust_domain="e.example"`} {
		clustertest.Eventually(t, 20*time.Second, td+"'s failure to be reported", func() bool {
			r, err := admin.FederationShow(ctx, &api.IDRequest{ID: td})
			return err == nil && r.LastFetchError != "" && strings.Contains(metricsOf(t, n), want)
		})
	}
	if r, _ := admin.FederationShow(ctx, &api.IDRequest{ID: "e.example"}); r.BundleSequence != 1 {
		t.Fatalf("another domain's endpoint changed e.example's bundle: %+v", r)
	}

	// https_web: a Web PKI endpoint, here authenticated by the roots of
	// --endpoint-ca (httptest's certificate is its own CA); no bundle is
	// needed first.
	wTD := newForeignTD(t, "w.example", "spiffe://w.example/x")
	web := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(wTD.doc(t, "w.example", 9)) }))
	defer web.Close()
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: web.Certificate().Raw})
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: "w.example", BundleEndpointURL: web.URL + "/",
		Profile: "https_web", EndpointCA: string(caPEM)}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "the https_web bundle to be fetched", func() bool {
		r, err := admin.FederationShow(ctx, &api.IDRequest{ID: "w.example"})
		return err == nil && r.BundleSequence == 9
	})
	// Without the endpoint CA, the system roots do not know it.
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: "v.example", BundleEndpointURL: web.URL + "/",
		Profile: "https_web"}); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 20*time.Second, "an unknown Web PKI certificate to be refused", func() bool {
		r, err := admin.FederationShow(ctx, &api.IDRequest{ID: "v.example"})
		return err == nil && strings.Contains(r.LastFetchError, "certificate") && len(r.Bundle) == 0
	})

	// Down.
	srv.Close()
	clustertest.Eventually(t, 20*time.Second, "a down endpoint to be reported", func() bool {
		return show().LastFetchError != "" && strings.Contains(metricsOf(t, n), `sigil_federation_fetches_total{result="unreachable",trust_domain="c.example"}`)
	})
	if r := show(); r.BundleSequence != 6 {
		t.Fatalf("a down endpoint changed the stored bundle: %+v", r)
	}

	// A restore makes the archive's relationships the state's (d and e
	// go), but the bundle stays at 6: a restore never rolls one back.
	if _, err := admin.SnapshotRestore(ctx, &api.SnapshotArchive{Archive: snap.Archive}); err != nil {
		t.Fatal(err)
	}
	l, err := admin.FederationList(ctx, &api.Empty{})
	if err != nil || len(l.Relationships) != 1 || l.Relationships[0].TrustDomain != foreign || l.Relationships[0].BundleSequence != 6 {
		t.Fatalf("relationships after the restore: %+v %v", l, err)
	}
}

// An agent's sync stream carries the bundles of the trust domains its
// entries federate with, and a change to one (set out of band here)
// wakes it; a deleted relationship's bundle leaves its view.
func TestFederationSync(t *testing.T) {
	ic := newIssuer(t, "fsy")
	ctx := context.Background()
	const foreign = "other.example"
	ftd := newForeignTD(t, foreign, "spiffe://other.example/x")
	doc1, doc2 := ftd.doc(t, foreign, 1), ftd.doc(t, foreign, 2, newForeignTD(t, foreign, "spiffe://other.example/x").root)
	admin := ic.c.Admin("node-1")
	if _, err := admin.FederationAdd(ctx, &api.FederationRelationship{TrustDomain: foreign, Bundle: doc1}); err != nil {
		t.Fatal(err)
	}
	ic.entry(t, "spiffe://example.org/plain", agentID)
	if _, err := admin.EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/fed", ParentID: agentID,
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1001"}}, FederatesWith: []string{foreign}}, Force: true}); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := ic.agent(t, "node-3").Sync(sctx, &api.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	recvUntil := func(what string, ok func(u *api.SyncUpdate) bool) {
		t.Helper()
		deadline := time.AfterFunc(10*time.Second, cancel)
		defer deadline.Stop()
		for {
			u, err := stream.Recv()
			if err != nil {
				t.Fatalf("sync: waiting for %s: %v", what, err)
			}
			if ok(u) {
				return
			}
		}
	}
	recvUntil("the federated bundle", func(u *api.SyncUpdate) bool {
		return len(u.Entries) == 2 && string(u.Federated[foreign]) == string(doc1) && len(u.Federated) == 1
	})
	if _, err := admin.FederationBundleSet(ctx, &api.FederationBundle{TrustDomain: foreign, Bundle: doc2}); err != nil {
		t.Fatal(err)
	}
	recvUntil("the new federated bundle", func(u *api.SyncUpdate) bool { return string(u.Federated[foreign]) == string(doc2) })
	// A rollback set out of band is refused before it is proposed.
	if _, err := admin.FederationBundleSet(ctx, &api.FederationBundle{TrustDomain: foreign, Bundle: doc1}); err == nil || !strings.Contains(err.Error(), "rollback") {
		t.Fatalf("a rollback set by an admin: %v", err)
	}
	if _, err := admin.FederationDelete(ctx, &api.IDRequest{ID: foreign}); err != nil {
		t.Fatal(err)
	}
	recvUntil("the bundle to leave", func(u *api.SyncUpdate) bool { return len(u.Entries) == 2 && len(u.Federated) == 0 })
}
