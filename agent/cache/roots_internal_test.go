package cache

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// lockedBuffer is a log sink the ack loop's goroutine writes to.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// rootsUpdate is a view whose bundle lists roots (both in Bundle.Roots
// and in the SPIFFE document, as a node sends it) at sequence seq.
func rootsUpdate(t *testing.T, rev, seq uint64, roots []*x509.Certificate, crls ...[]byte) *api.SyncUpdate {
	t.Helper()
	return rootsUpdateDoc(t, rev, seq, roots, roots, crls...)
}

// rootsUpdateDoc is rootsUpdate with another set in the document.
func rootsUpdateDoc(t *testing.T, rev, seq uint64, roots, doc []*x509.Certificate, crls ...[]byte) *api.SyncUpdate {
	t.Helper()
	sb := spiffebundle.New(spiffeid.RequireTrustDomainFromString("example.org"))
	for _, r := range doc {
		sb.AddX509Authority(r)
	}
	b, err := sb.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	u := &api.SyncUpdate{Revision: rev, SPIFFE: b, Entries: []api.Entry{{ID: "e1", SPIFFEID: "spiffe://example.org/a",
		Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}}, Bundle: api.Bundle{TrustDomain: "example.org", Sequence: seq, RootCRLs: crls}}
	for _, r := range roots {
		u.Bundle.Roots = append(u.Bundle.Roots, r.Raw)
	}
	return u
}

// selfSigned is a certificate naming id; a CA when ca is set.
func selfSigned(t *testing.T, id string, ca bool) *x509.Certificate {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(id)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: id}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), BasicConstraintsValid: true, IsCA: ca}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func fileRoots(t *testing.T, file string) []*x509.Certificate {
	t.Helper()
	certs, err := pemfile.ReadCerts(file)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

const staleRootCert = "the configured root-cert holds none of the trust bundle's roots"

// The roots of an applied bundle become the trusted ones (root CRLs are
// checked against them, a CRL of a root the same update adds included),
// are kept in the roots file (0644) and trusted again after a restart;
// when root-cert holds none of them the operator is told, once per
// change. A retired root's CRL goes with it.
func TestKeptRoots(t *testing.T) {
	p := newTwoRootsPKI(t)
	A, B := p.roots[0], p.roots[1]
	dir := t.TempDir()
	file, crlFile := filepath.Join(dir, "roots.pem"), filepath.Join(dir, "root-crls.pem")
	var logs bytes.Buffer
	changed := 0
	opts := Options{Roots: []*x509.Certificate{A}, RootsFile: file, CRLFile: crlFile, OnRootsChanged: func() { changed++ },
		Log: slog.New(slog.NewTextHandler(&logs, nil))}
	c := New(nil, opts)
	if c.KeptRoots() || !sameRoots(c.Roots(), []*x509.Certificate{A}) {
		t.Fatal("a new cache does not trust the configured roots")
	}

	// Add: B joins the bundle, with its CRL revoking its node CA, and A's
	// revoking A's.
	crlA, crlB := p.crl(t, 0, 1, p.cas[0]), p.crl(t, 1, 1, p.cas[1])
	if err := c.apply(rootsUpdate(t, 1, 5, []*x509.Certificate{A, B}, crlA, crlB)); err != nil {
		t.Fatal(err)
	}
	if !c.KeptRoots() || !sameRoots(c.Roots(), []*x509.Certificate{A, B}) || !sameRoots(fileRoots(t, file), []*x509.Certificate{A, B}) {
		t.Fatalf("after the add: kept %v, %d trusted roots", c.KeptRoots(), len(c.Roots()))
	}
	if st, err := os.Stat(file); err != nil || st.Mode().Perm() != 0o644 {
		t.Fatalf("roots file: %v %v", st, err)
	}
	if changed != 1 || !c.Revoked([]*x509.Certificate{p.cas[1]}) || len(c.RootCRLs()) != 2 {
		t.Fatalf("OnRootsChanged %d times; B's CRL adopted: %v; %d CRLs", changed, c.Revoked([]*x509.Certificate{p.cas[1]}), len(c.RootCRLs()))
	}
	if c.ackable.seq != 5 {
		t.Fatalf("bundle %d applied for acknowledgement, want 5", c.ackable.seq)
	}
	// The same roots again: nothing changes, nothing is written or logged.
	st1, _ := os.Stat(file)
	if err := c.apply(rootsUpdate(t, 2, 6, []*x509.Certificate{B, A}, crlA, crlB)); err != nil {
		t.Fatal(err)
	}
	if st2, _ := os.Stat(file); changed != 1 || !os.SameFile(st1, st2) || strings.Count(logs.String(), "trust bundle roots kept") != 1 {
		t.Fatalf("an unchanged set of roots: OnRootsChanged %d, file rewritten %v, log:\n%s", changed, !os.SameFile(st1, st2), logs.String())
	}
	if c.ackable.seq != 6 {
		t.Fatalf("bundle %d applied for acknowledgement, want 6", c.ackable.seq)
	}
	if strings.Contains(logs.String(), staleRootCert) {
		t.Fatal("warned that root-cert is stale while it holds a bundle root")
	}

	// Retire: A leaves. It is no longer trusted, its CRL goes, root-cert
	// (A) is stale: said once, however many updates follow.
	for i := range 3 {
		if err := c.apply(rootsUpdate(t, uint64(3+i), uint64(7+i), []*x509.Certificate{B}, crlB)); err != nil {
			t.Fatal(err)
		}
	}
	if !sameRoots(c.Roots(), []*x509.Certificate{B}) || !sameRoots(fileRoots(t, file), []*x509.Certificate{B}) || changed != 2 {
		t.Fatalf("after the retire: %d trusted roots, OnRootsChanged %d", len(c.Roots()), changed)
	}
	if c.Revoked([]*x509.Certificate{p.cas[0]}) || !c.Revoked([]*x509.Certificate{p.cas[1]}) || len(c.RootCRLs()) != 1 {
		t.Fatal("the retired root's CRL was kept, or B's lost")
	}
	if n := strings.Count(logs.String(), staleRootCert); n != 1 {
		t.Fatalf("stale root-cert said %d times, want once:\n%s", n, logs.String())
	}

	// A restart trusts the kept roots before any sync, checks the stored
	// CRLs against them, and says again that root-cert is stale.
	var logs2 bytes.Buffer
	opts.Log = slog.New(slog.NewTextHandler(&logs2, nil))
	d := New(nil, opts)
	if !d.KeptRoots() || !sameRoots(d.Roots(), []*x509.Certificate{B}) {
		t.Fatalf("restarted: kept %v, %d roots", d.KeptRoots(), len(d.Roots()))
	}
	if !d.Revoked([]*x509.Certificate{p.cas[1]}) || len(d.RootCRLs()) != 1 || strings.Contains(logs2.String(), "stored root CRL ignored") {
		t.Fatalf("restarted: B's CRL not reloaded against the kept roots:\n%s", logs2.String())
	}
	if n := strings.Count(logs2.String(), staleRootCert); n != 1 {
		t.Fatalf("restarted: stale root-cert said %d times, want once", n)
	}

	// Kept roots of another trust domain (a data dir reused): root-cert
	// is trusted instead.
	if err := os.WriteFile(file, pemCerts(selfSigned(t, "spiffe://other.org", true)), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs3 bytes.Buffer
	opts.Log = slog.New(slog.NewTextHandler(&logs3, nil))
	if e := New(nil, opts); e.KeptRoots() || !sameRoots(e.Roots(), []*x509.Certificate{A}) || !strings.Contains(logs3.String(), "other.org") {
		t.Fatalf("roots of another trust domain trusted: kept %v; log:\n%s", e.KeptRoots(), logs3.String())
	}
	// Without a file (an in-memory agent) they are kept in memory only.
	m := New(nil, Options{Roots: []*x509.Certificate{A}})
	if err := m.apply(rootsUpdate(t, 1, 5, []*x509.Certificate{A, B})); err != nil || !m.KeptRoots() || m.ackable.seq != 5 {
		t.Fatalf("in memory: %v, kept %v, applied %d", err, m.KeptRoots(), m.ackable.seq)
	}
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

// A bundle whose roots the cache cannot use changes no trusted root and
// no file, and is not acknowledged; the rest of the update applies (as
// with a CRL it cannot verify). Each is logged once however often it
// comes.
func TestBundleRootsRefused(t *testing.T) {
	p := newTwoRootsPKI(t)
	A, B := p.roots[0], p.roots[1]
	other := selfSigned(t, "spiffe://other.org", true)
	leaf := selfSigned(t, "spiffe://example.org", false)
	unparseable := rootsUpdate(t, 2, 9, []*x509.Certificate{A})
	unparseable.Bundle.Roots[0] = []byte("not DER")
	for name, u := range map[string]*api.SyncUpdate{
		"no roots":             rootsUpdateDoc(t, 2, 9, nil, []*x509.Certificate{A}),
		"unparseable":          unparseable,
		"not the document's":   rootsUpdateDoc(t, 2, 9, []*x509.Certificate{A, B}, []*x509.Certificate{A}),
		"not a CA":             rootsUpdate(t, 2, 9, []*x509.Certificate{A, leaf}),
		"another trust domain": rootsUpdate(t, 2, 9, []*x509.Certificate{A, other}),
		"no root in common":    rootsUpdate(t, 2, 9, []*x509.Certificate{B}), // TestAttackBundleSwapsEveryRoot
	} {
		t.Run(name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "roots.pem")
			var logs bytes.Buffer
			c := New(nil, Options{Roots: []*x509.Certificate{A}, RootsFile: file, Log: slog.New(slog.NewTextHandler(&logs, nil))})
			if err := c.apply(rootsUpdate(t, 1, 8, []*x509.Certificate{A})); err != nil {
				t.Fatal(err)
			}
			before, _ := os.ReadFile(file)
			set := c.roots.Load()
			for range 3 {
				if err := c.apply(u); err != nil {
					t.Fatalf("the update was refused: %v", err)
				}
			}
			if s, _ := c.Current(); s.Revision != 2 {
				t.Fatalf("revision %d: the rest of the update was not applied", s.Revision)
			}
			after, _ := os.ReadFile(file)
			if c.roots.Load() != set || !bytes.Equal(before, after) {
				t.Fatal("the trusted roots or their file changed")
			}
			if c.ackable.seq != 8 {
				t.Fatalf("bundle %d offered for acknowledgement, want 8 (the last whose roots were kept)", c.ackable.seq)
			}
			if n := strings.Count(logs.String(), "trust bundle roots from the appliance not kept"); n != 1 {
				t.Fatalf("logged %d times, want once:\n%s", n, logs.String())
			}
		})
	}
}

// ackAppliance records the cache's BundleAck calls and answers them from
// errs (nil: success); block, when set, holds each call until it is read.
type ackAppliance struct {
	mu    sync.Mutex
	calls []uint64
	errs  []error
	block chan struct{}
}

func (a *ackAppliance) BundleAck(ctx context.Context, r *api.BundleAckRequest) (*api.Empty, error) {
	a.mu.Lock()
	a.calls = append(a.calls, r.Sequence)
	var err error
	if len(a.errs) > 0 {
		err, a.errs = a.errs[0], a.errs[1:]
	}
	block := a.block
	a.mu.Unlock()
	if block != nil {
		<-block
	}
	if err != nil {
		return nil, err
	}
	return &api.Empty{}, nil
}

func (a *ackAppliance) seen() []uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]uint64(nil), a.calls...)
}

func (a *ackAppliance) SignX509SVIDs(context.Context, *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	return nil, errors.New("not in this test")
}

func (a *ackAppliance) SignJWTSVID(context.Context, *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	return nil, errors.New("not in this test")
}

func (a *ackAppliance) Sync(context.Context, *api.SyncRequest) (grpc.ServerStreamingClient[api.SyncUpdate], error) {
	return nil, errors.New("not in this test")
}

// The ack loop's own rules, which a healthy appliance does not exercise
// (TestAgentAcksBundleOncePerChange runs it against a real node): a failed
// call is retried with the cache's backoff; bundles applied meanwhile are
// folded into the latest; an appliance without the method is not asked
// again for the same bundle; a bundle whose roots changed is acknowledged
// even at a lower sequence (a node restored to an earlier state).
func TestBundleAckLoop(t *testing.T) {
	p := newTwoRootsPKI(t)
	A, B := p.roots[0], p.roots[1]
	app := &ackAppliance{errs: []error{status.Error(codes.Unavailable, "down"), status.Error(codes.Unavailable, "down")}}
	var logs lockedBuffer
	c := New(app, Options{Roots: []*x509.Certificate{A}, MaxBackoff: 20 * time.Millisecond, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.ackLoop(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitCalls := func(want ...uint64) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) && len(app.seen()) < len(want) {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(50 * time.Millisecond) // nothing more may follow
		if got := app.seen(); !slices.Equal(got, want) {
			t.Fatalf("BundleAck calls %v, want %v", got, want)
		}
	}
	rev := uint64(0)
	apply := func(seq uint64, roots ...*x509.Certificate) {
		t.Helper()
		rev++
		if err := c.apply(rootsUpdate(t, rev, seq, roots)); err != nil {
			t.Fatal(err)
		}
	}

	apply(3, A)
	waitCalls(3, 3, 3) // two failures, then taken
	if c.Stats.BundleAcked.Load() != 3 || strings.Count(logs.String(), "trust bundle acknowledgement failed; will retry") != 2 {
		t.Fatalf("acked %d; log:\n%s", c.Stats.BundleAcked.Load(), logs.String())
	}
	apply(3, A) // the same bundle again (an entries-only view)
	apply(4, A)
	waitCalls(3, 3, 3, 4)

	// Folded: 6 fails while 7 and 8 are applied; the retry is for 8.
	app.mu.Lock()
	app.block, app.errs = make(chan struct{}), []error{status.Error(codes.Unavailable, "down")}
	app.mu.Unlock()
	apply(6, A)
	for len(app.seen()) < 5 {
		time.Sleep(5 * time.Millisecond)
	}
	apply(7, A)
	apply(8, A)
	app.mu.Lock()
	close(app.block)
	app.block = nil
	app.mu.Unlock()
	waitCalls(3, 3, 3, 4, 6, 8)
	if c.Stats.BundleAcked.Load() != 8 {
		t.Fatalf("acked %d, want 8", c.Stats.BundleAcked.Load())
	}

	// An appliance without the method: asked once for the bundle.
	app.mu.Lock()
	app.errs = []error{status.Error(codes.Unimplemented, "unknown method")}
	app.mu.Unlock()
	apply(9, A)
	waitCalls(3, 3, 3, 4, 6, 8, 9)
	if c.Stats.BundleAcked.Load() != 8 || !strings.Contains(logs.String(), "does not take trust bundle acknowledgements") {
		t.Fatalf("acked %d after Unimplemented", c.Stats.BundleAcked.Load())
	}

	// New roots at a lower sequence: acknowledged; the same again: not.
	apply(2, A, B)
	apply(2, A, B)
	waitCalls(3, 3, 3, 4, 6, 8, 9, 2)
}

// TestAttackBundleSwapsEveryRoot: a node (compromised, or another
// appliance's) sends a bundle whose roots share none with those the agent
// trusts, to lock it out of the honest nodes (it would keep the set on
// disk and trust nothing else after a restart). The set is refused and
// nothing changes; the phases of a real rotation (A; A and B; B) are
// kept, each overlapping the last.
func TestAttackBundleSwapsEveryRoot(t *testing.T) {
	p := newTwoRootsPKI(t)
	A, B := p.roots[0], p.roots[1]
	file := filepath.Join(t.TempDir(), "roots.pem")
	c := New(nil, Options{Roots: []*x509.Certificate{A}, RootsFile: file, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := c.apply(rootsUpdate(t, 1, 8, []*x509.Certificate{A})); err != nil {
		t.Fatal(err)
	}
	if err := c.apply(rootsUpdate(t, 2, 9, []*x509.Certificate{B})); err != nil {
		t.Fatal(err)
	}
	if r := c.Roots(); len(r) != 1 || !r[0].Equal(A) {
		t.Fatalf("a bundle of B alone replaced the trusted roots: %d roots", len(r))
	}
	for i, set := range [][]*x509.Certificate{{A, B}, {B}} {
		if err := c.apply(rootsUpdate(t, uint64(3+i), uint64(10+i), set)); err != nil {
			t.Fatal(err)
		}
		if r := c.Roots(); !sameRoots(r, set) {
			t.Fatalf("rotation step %d not kept: %d roots", i, len(r))
		}
	}
}
