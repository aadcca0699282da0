package workload_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/callerid"
	wl "github.com/sigil-appliance/sigil/agent/workload"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// testCA is a trust domain's root: it signs X.509-SVIDs and, with its
// key under kid, JWT-SVIDs.
type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	kid  string
}

func newTestCA(t *testing.T, td string) *testCA {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: td + " root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{td: spiffeid.RequireTrustDomainFromString(td), cert: cert, key: k, kid: "kid-" + td + "-" + cert.SerialNumber.Text(16)}
}

// bundle is the CA's SPIFFE bundle document (X.509 root and JWT key).
func (ca *testCA) bundle(t *testing.T) []byte {
	t.Helper()
	b := spiffebundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
	if err := b.AddJWTAuthority(ca.kid, &ca.key.PublicKey); err != nil {
		t.Fatal(err)
	}
	doc, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func (ca *testCA) jwt(t *testing.T, path string, aud ...string) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: ca.key}, (&jose.SignerOptions{}).WithHeader("kid", ca.kid).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(jwt.Claims{Subject: "spiffe://" + ca.td.Name() + path, Audience: aud,
		Expiry: jwt.NewNumericDate(time.Now().Add(5 * time.Minute)), IssuedAt: jwt.NewNumericDate(time.Now())}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// fakeAppliance is the appliance's agent service as the cache sees it:
// it streams the views a test pushes and signs CSRs with our CA.
type fakeAppliance struct {
	ca      *testCA
	updates chan *api.SyncUpdate
}

func (f *fakeAppliance) SignX509SVIDs(_ context.Context, b *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	res := &api.X509SVIDBatchResult{}
	for _, r := range b.Requests {
		csr, err := x509.ParseCertificateRequest(r.CSR)
		if err != nil {
			return nil, err
		}
		der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: csr.URIs, KeyUsage: x509.KeyUsageDigitalSignature,
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}, f.ca.cert, csr.PublicKey, f.ca.key)
		if err != nil {
			return nil, err
		}
		res.Results = append(res.Results, api.X509SVIDResult{EntryID: r.EntryID, Chain: [][]byte{der}})
	}
	return res, nil
}

func (f *fakeAppliance) SignJWTSVID(context.Context, *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	return nil, errors.New("not in this test")
}

func (f *fakeAppliance) BundleAck(context.Context, *api.BundleAckRequest) (*api.Empty, error) {
	return &api.Empty{}, nil
}

func (f *fakeAppliance) Sync(ctx context.Context, _ *api.SyncRequest) (grpc.ServerStreamingClient[api.SyncUpdate], error) {
	return syncStream{ctx: ctx, updates: f.updates}, nil
}

type syncStream struct {
	grpc.ClientStream // not used by the cache
	ctx               context.Context
	updates           chan *api.SyncUpdate
}

func (s syncStream) Recv() (*api.SyncUpdate, error) {
	select {
	case <-s.ctx.Done():
		return nil, s.ctx.Err()
	case u := <-s.updates:
		return u, nil
	}
}

// fedEnv is a cache fed by a fakeAppliance and a Workload API server
// over it on a real Unix socket; this test process (uid 0) is the caller.
type fedEnv struct {
	ours   *testCA
	app    *fakeAppliance
	cache  *cache.Cache
	socket string
	rev    uint64
}

func newFedEnv(t *testing.T) *fedEnv {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e := &fedEnv{ours: newTestCA(t, "example.org")}
	e.app = &fakeAppliance{ca: e.ours, updates: make(chan *api.SyncUpdate)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	e.cache = cache.New(e.app, cache.Options{Log: log})
	dir, err := os.MkdirTemp("", "sigil-fed-")
	if err != nil {
		t.Fatal(err)
	}
	e.socket = filepath.Join(dir, "agent.sock")
	l, err := wl.Listen(e.socket, 0)
	if err != nil {
		t.Fatal(err)
	}
	srv := wl.New(e.cache, callerid.New(""), wl.Options{Log: log})
	done := make(chan struct{}, 2)
	go func() { e.cache.Run(ctx); done <- struct{}{} }()
	go func() {
		if err := srv.Serve(ctx, l); err != nil {
			t.Errorf("Serve: %v", err)
		}
		done <- struct{}{}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		<-done
		_ = os.RemoveAll(dir) // best effort
	})
	return e
}

// sync pushes a view to the cache and waits until it is applied and
// every entry's SVID is signed.
func (e *fedEnv) sync(t *testing.T, federated map[string][]byte, entries ...api.Entry) {
	t.Helper()
	e.rev++
	e.app.updates <- &api.SyncUpdate{Revision: e.rev, Entries: entries, SPIFFE: e.ours.bundle(t),
		Bundle: api.Bundle{TrustDomain: e.ours.td.Name()}, Federated: federated}
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, changed := e.cache.Current()
		if s.Revision == e.rev && len(s.SVIDsFor(s.Entries, time.Now())) == len(s.Entries) {
			return
		}
		select {
		case <-changed:
		case <-time.After(time.Until(deadline)):
			t.Fatalf("view %d not applied and signed in time", e.rev)
		}
	}
}

func (e *fedEnv) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+e.socket))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// raw is the Workload API's generated client with the security header,
// which shows responses as sent (federated_bundles as a field).
func (e *fedEnv) raw(t *testing.T) (workload.SpiffeWorkloadAPIClient, context.Context) {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true"), 30*time.Second)
	t.Cleanup(func() { cancel(); _ = conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn), ctx
}

func entry(id, path string, federatesWith ...string) api.Entry {
	return api.Entry{ID: id, SPIFFEID: "spiffe://example.org" + path, FederatesWith: federatesWith, CreatedAt: time.Now(),
		Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}
}

// A caller whose entry federates with partner.test gets partner.test's
// bundle over the Workload API, as go-spiffe's client sees it: in
// FetchX509SVID's federated_bundles (the X.509 authorities' DER), in
// FetchX509Bundles and FetchJWTBundles beside our own; ValidateJWTSVID
// accepts partner.test's tokens, with the audience checked, and refuses
// those of a trust domain the caller does not federate with (even one the
// agent has a bundle of, for another entry). An open stream sends again
// when partner.test's bundle changes and when it leaves.
func TestWorkloadAPIFederatedBundles(t *testing.T) {
	e := newFedEnv(t)
	partner, other, stranger := newTestCA(t, "partner.test"), newTestCA(t, "other.test"), newTestCA(t, "stranger.test")
	fed := map[string][]byte{"partner.test": partner.bundle(t), "other.test": other.bundle(t)}
	// other.test is federated with by an entry of another caller only.
	otherCaller := api.Entry{ID: "e-other", SPIFFEID: "spiffe://example.org/other", FederatesWith: []string{"other.test"},
		Selectors: []api.Selector{{Type: "unix", Value: "uid:4242"}}}
	e.sync(t, fed, entry("e1", "/front", "partner.test", "absent.test"), otherCaller)
	ctx := context.Background()
	c := e.client(t)
	wc, hdr := e.raw(t)

	stream, err := wc.FetchX509SVID(hdr, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(r.FederatedBundles) != 1 || string(r.FederatedBundles["spiffe://partner.test"]) != string(partner.cert.Raw) {
		t.Fatalf("federated_bundles %v, want partner.test's root", keys(r.FederatedBundles))
	}

	t.Run("X.509 context", func(t *testing.T) {
		x, err := c.FetchX509Context(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if x.Bundles.Len() != 2 {
			t.Fatalf("%d bundles, want ours and partner.test's", x.Bundles.Len())
		}
		pb, ok := x.Bundles.Get(partner.td)
		if !ok || !pb.HasX509Authority(partner.cert) {
			t.Fatal("no partner.test bundle in the X.509 context")
		}
		// A partner SVID verifies against what the caller got; a
		// stranger's does not.
		for _, ca := range []*testCA{partner, stranger} {
			leaf := leafOf(t, ca, "/back")
			_, _, err := x509svid.Verify([]*x509.Certificate{leaf}, x.Bundles)
			if (ca == partner) != (err == nil) {
				t.Errorf("%s leaf: %v", ca.td, err)
			}
		}
	})

	t.Run("bundles", func(t *testing.T) {
		xb, err := c.FetchX509Bundles(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if xb.Len() != 2 || !xb.Has(partner.td) || !xb.Has(e.ours.td) {
			t.Fatalf("X.509 bundles: %d", xb.Len())
		}
		jb, err := c.FetchJWTBundles(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pj, ok := jb.Get(partner.td)
		if jb.Len() != 2 || !ok || !pj.HasJWTAuthority(partner.kid) {
			t.Fatalf("JWT bundles: %d, partner.test's: %v", jb.Len(), ok)
		}
	})

	t.Run("ValidateJWTSVID", func(t *testing.T) {
		s, err := c.ValidateJWTSVID(ctx, partner.jwt(t, "/back", "front"), "front")
		if err != nil || s.ID.String() != "spiffe://partner.test/back" {
			t.Fatalf("partner token: %v %v", s, err)
		}
		if _, err := c.ValidateJWTSVID(ctx, partner.jwt(t, "/back", "someone-else"), "front"); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("partner token for another audience: %v", err)
		}
		for _, ca := range []*testCA{other, stranger} {
			if _, err := c.ValidateJWTSVID(ctx, ca.jwt(t, "/x", "front"), "front"); status.Code(err) != codes.InvalidArgument {
				t.Fatalf("%s token, a trust domain the caller does not federate with: %v", ca.td, err)
			}
		}
	})

	t.Run("a bundle change reaches the open stream", func(t *testing.T) {
		rotated := newTestCA(t, "partner.test")
		jwtStream, err := wc.FetchJWTBundles(hdr, &workload.JWTBundlesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if jr, err := jwtStream.Recv(); err != nil || !strings.Contains(string(jr.Bundles["spiffe://partner.test"]), partner.kid) {
			t.Fatalf("JWT bundles stream: %v %v", jr, err)
		}
		e.sync(t, map[string][]byte{"partner.test": rotated.bundle(t), "other.test": other.bundle(t)}, entry("e1", "/front", "partner.test"), otherCaller)
		r := recvUntil(t, stream, func(r *workload.X509SVIDResponse) bool {
			return string(r.FederatedBundles["spiffe://partner.test"]) == string(rotated.cert.Raw)
		})
		if len(r.FederatedBundles) != 1 {
			t.Fatalf("federated_bundles %v", keys(r.FederatedBundles))
		}
		jr, err := jwtStream.Recv()
		if err != nil || !strings.Contains(string(jr.Bundles["spiffe://partner.test"]), rotated.kid) || len(jr.Bundles) != 2 {
			t.Fatalf("JWT bundles stream after the change: %v %v", jr, err)
		}
		if _, err := c.ValidateJWTSVID(ctx, partner.jwt(t, "/back", "front"), "front"); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("a token of partner.test's old key: %v", err)
		}
		if _, err := c.ValidateJWTSVID(ctx, rotated.jwt(t, "/back", "front"), "front"); err != nil {
			t.Fatalf("a token of partner.test's new key: %v", err)
		}
		// The relationship ends: the bundle leaves the stream.
		e.sync(t, map[string][]byte{"other.test": other.bundle(t)}, entry("e1", "/front", "partner.test"), otherCaller)
		recvUntil(t, stream, func(r *workload.X509SVIDResponse) bool { return len(r.FederatedBundles) == 0 })
		if _, err := c.ValidateJWTSVID(ctx, rotated.jwt(t, "/back", "front"), "front"); status.Code(err) != codes.InvalidArgument {
			t.Fatalf("a token of a trust domain no longer federated with: %v", err)
		}
	})
}

// A caller whose entries federate with nothing gets what it got before
// federation: no federated_bundles, our bundle alone, and foreign tokens
// refused, though the agent holds foreign bundles for other callers.
func TestWorkloadAPIWithoutFederation(t *testing.T) {
	e := newFedEnv(t)
	partner := newTestCA(t, "partner.test")
	e.sync(t, map[string][]byte{"partner.test": partner.bundle(t)}, entry("e1", "/plain"),
		api.Entry{ID: "e2", SPIFFEID: "spiffe://example.org/fed", FederatesWith: []string{"partner.test"},
			Selectors: []api.Selector{{Type: "unix", Value: "uid:4242"}}})
	ctx := context.Background()
	c := e.client(t)
	wc, hdr := e.raw(t)
	stream, err := wc.FetchX509SVID(hdr, &workload.X509SVIDRequest{})
	if err != nil {
		t.Fatal(err)
	}
	r, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if r.FederatedBundles != nil || len(r.Svids) != 1 {
		t.Fatalf("federated_bundles %v, %d SVIDs", keys(r.FederatedBundles), len(r.Svids))
	}
	xb, err := wc.FetchX509Bundles(hdr, &workload.X509BundlesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	xr, err := xb.Recv()
	if err != nil || len(xr.Bundles) != 1 || string(xr.Bundles["spiffe://example.org"]) != string(e.ours.cert.Raw) {
		t.Fatalf("X.509 bundles %v %v", xr, err)
	}
	jb, err := c.FetchJWTBundles(ctx)
	if err != nil || jb.Len() != 1 || !jb.Has(e.ours.td) {
		t.Fatalf("JWT bundles: %v", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, partner.jwt(t, "/back", "plain"), "plain"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("partner token for a caller that does not federate: %v", err)
	}
}

func recvUntil(t *testing.T, s grpc.ServerStreamingClient[workload.X509SVIDResponse], ok func(*workload.X509SVIDResponse) bool) *workload.X509SVIDResponse {
	t.Helper()
	for {
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("stream: %v", err)
		}
		if ok(r) {
			return r
		}
	}
}

func leafOf(t *testing.T, ca *testCA, path string) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://" + ca.td.Name() + path)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(2), URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature,
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour)}, ca.cert, k.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
