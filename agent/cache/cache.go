// Package cache is the agent's store of what workloads receive: the
// registration entries this agent is parent of and the trust bundle
// (streamed from the appliance), and an X.509-SVID per entry whose key the
// agent generated itself and never sends anywhere. SVIDs are signed in
// batches and rotated at about half their lifetime, with jitter; what is
// cached keeps being served while the appliance is unreachable, until it
// expires.
package cache

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// Appliance is what the cache needs from the appliance's agent service.
type Appliance interface {
	SignX509SVIDs(context.Context, *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error)
	SignJWTSVID(context.Context, *api.JWTSVIDRequest) (*api.JWTSVIDResult, error)
	Sync(context.Context, *api.SyncRequest) (grpc.ServerStreamingClient[api.SyncUpdate], error)
	BundleAck(context.Context, *api.BundleAckRequest) (*api.Empty, error)
}

// SVID is one workload X.509-SVID with its private key.
type SVID struct {
	EntryID  string
	SPIFFEID string
	Hint     string
	Chain    []*x509.Certificate
	Key      crypto.Signer
	KeyDER   []byte // PKCS#8
	// ChainDER is the chain's certificates concatenated, as the Workload
	// API carries it.
	ChainDER []byte
	NotAfter time.Time
	rotateAt time.Time
	entryKey string
}

// Serial is the leaf's serial number in hex, as the appliance records it.
func (s *SVID) Serial() string { return s.Chain[0].SerialNumber.Text(16) }

// Snapshot is an immutable view of the cache. A new one replaces it on
// every change.
type Snapshot struct {
	Revision uint64
	// Entries are sorted by creation time, so the first match is the
	// oldest entry: a workload's default SVID does not change when
	// entries are added.
	Entries []api.Entry
	SVIDs   map[string]*SVID // by entry ID
	// selectors[i] are Entries[i]'s selectors as "type:value".
	selectors [][]string
	// Bundle is the trust domain's bundle (nil before the first sync).
	Bundle *spiffebundle.Bundle
	// Federated are the bundles of the foreign trust domains this agent's
	// entries federate with (FederatedFor picks a caller's), as of the
	// same appliance view as Entries. Never our own trust domain.
	Federated map[spiffeid.TrustDomain]*spiffebundle.Bundle
	// Revoked holds revoked leaf serials (hex): an SVID listed here is
	// replaced at once. Serials are random, so one list serves every
	// issuing node.
	Revoked map[string]bool
	// RootCRLs are the verified root CRLs (DER) as of this snapshot, for
	// the Workload API's X.509-SVID responses: a workload that checks
	// peers' chains learns which node CAs the root revoked.
	RootCRLs [][]byte
}

// Match returns the entries whose selectors the caller all has.
func (s *Snapshot) Match(has func(...string) bool) []api.Entry {
	sel := s.selectors
	if len(sel) != len(s.Entries) { // a snapshot not made by apply
		sel = selectorStrings(s.Entries)
	}
	var out []api.Entry
	for i, e := range s.Entries {
		if has(sel[i]...) {
			out = append(out, e)
		}
	}
	return out
}

// selectorStrings renders each entry's selectors as "type:value", once
// per update rather than on every Workload API call.
func selectorStrings(entries []api.Entry) [][]string {
	out := make([][]string, len(entries))
	for i, e := range entries {
		out[i] = make([]string, len(e.Selectors))
		for j, x := range e.Selectors {
			out[i][j] = x.Type + ":" + x.Value
		}
	}
	return out
}

// SVIDsFor returns the valid SVIDs for entries, in their order.
func (s *Snapshot) SVIDsFor(entries []api.Entry, now time.Time) []*SVID {
	var out []*SVID
	for _, e := range entries {
		if v := s.SVIDs[e.ID]; v != nil && now.Before(v.NotAfter) {
			out = append(out, v)
		}
	}
	return out
}

// Options tune the cache.
type Options struct {
	Log *slog.Logger
	// BatchSize caps CSRs per signing request (default 64).
	BatchSize int
	// MaxBackoff caps the retry delay while the appliance is unreachable
	// (default 30 s).
	MaxBackoff time.Duration
	// MaxJWTs caps cached JWT-SVIDs (default 4096).
	MaxJWTs int
	// Roots are the trust domain roots the agent was configured with,
	// trusted until it keeps the roots of an applied bundle (roots.go).
	Roots []*x509.Certificate
	// RootsFile keeps the roots of the last bundle applied across
	// restarts ("": kept in memory only).
	RootsFile string
	// OnRootsChanged is called (outside the cache's locks) when the
	// trusted roots changed: a connection verified against a root no
	// longer trusted is to be left.
	OnRootsChanged func()
	// CRLFile persists the verified root CRLs ("": kept in memory only).
	CRLFile string
	// OnRevoked is called (outside the cache's locks) when a root CRL
	// revokes a certificate the cache did not know revoked.
	OnRevoked func()
	// CutAt, when set, is when the appliance cuts every SVID it signs for
	// this agent (a job agent's own expiry: its workload SVIDs never
	// outlive it). An SVID that ends there is kept until it expires
	// instead of rotating at half its life, since a new one would end
	// there too; the agent calls Rotate once its own SVID was renewed.
	CutAt func() time.Time
}

// Stats are counters for metrics.
type Stats struct {
	Rotations    atomic.Int64 // SVIDs signed
	SignFailures atomic.Int64 // failed signing requests
	SyncFailures atomic.Int64 // sync streams that failed or ended
	JWTsSigned   atomic.Int64
	JWTFailures  atomic.Int64
	Connected    atomic.Bool // the sync stream is up
	// BundleAcked is the last bundle sequence the appliance took this
	// process's acknowledgement of (0: none yet).
	BundleAcked atomic.Uint64
}

// Cache holds the agent's entries, bundle and workload SVIDs.
type Cache struct {
	app  Appliance
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	snap    *Snapshot
	changed chan struct{}
	force   bool

	kick  chan struct{}
	Stats Stats

	jwtMu sync.Mutex
	jwts  map[string]jwtItem

	crlMu      sync.Mutex // serializes CRL updates and their file
	crls       atomic.Pointer[crlSet]
	crlSkipped map[[32]byte]bool // SHA-256 of CRLs skipped; guarded by crlMu

	fedMu      sync.Mutex
	fedSkipped map[[32]byte]bool // federated bundles dropped and logged (federated.go)

	roots        atomic.Pointer[rootSet]
	rootsMu      sync.Mutex // serializes root changes and their file
	rootsSaved   bool       // the file holds the trusted roots; guarded by rootsMu
	rootsRefused [32]byte   // the last roots refused and logged; guarded by rootsMu

	ackMu   sync.Mutex
	ackable ackTarget // the latest bundle applied with its roots kept; guarded by ackMu
	ackKick chan struct{}
}

type jwtItem struct {
	token     string
	issued    time.Time
	expiresAt time.Time
}

// New returns an empty cache; Run fills it.
func New(app Appliance, opts Options) *Cache {
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.BatchSize <= 0 {
		opts.BatchSize = 64
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 30 * time.Second
	}
	if opts.MaxJWTs <= 0 {
		opts.MaxJWTs = 4096
	}
	c := &Cache{
		app: app, opts: opts, log: opts.Log,
		snap:    &Snapshot{SVIDs: map[string]*SVID{}},
		changed: make(chan struct{}),
		kick:    make(chan struct{}, 1),
		jwts:    map[string]jwtItem{},

		crlSkipped: map[[32]byte]bool{},
		fedSkipped: map[[32]byte]bool{},
		ackKick:    make(chan struct{}, 1),
	}
	c.loadRoots()
	c.loadCRLs()
	c.snap.RootCRLs = c.RootCRLs()
	return c
}

// Current returns the snapshot and a channel closed at the next change.
func (c *Cache) Current() (*Snapshot, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.snap, c.changed
}

// update replaces the snapshot under the lock and wakes every watcher.
func (c *Cache) update(f func(s *Snapshot)) {
	c.mu.Lock()
	next := *c.snap
	next.SVIDs = make(map[string]*SVID, len(c.snap.SVIDs))
	for k, v := range c.snap.SVIDs {
		next.SVIDs[k] = v
	}
	f(&next)
	c.snap = &next
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

// Rotate re-signs every SVID now (after a suspected key compromise, or to
// measure rotation).
func (c *Cache) Rotate() {
	c.mu.Lock()
	c.force = true
	c.mu.Unlock()
	c.wake()
}

func (c *Cache) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Run syncs and rotates until ctx ends.
func (c *Cache) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); c.syncLoop(ctx) }()
	go func() { defer wg.Done(); c.rotateLoop(ctx) }()
	go func() { defer wg.Done(); c.ackLoop(ctx) }()
	wg.Wait()
}

// backoff is the wait before retrying after the n-th consecutive failure:
// anywhere from nothing to 2 s doubling (30 s at most). The whole range,
// not its upper half: when a node dies, its agents all fail at the same
// moment, and the retry is what spreads their reconnections over the
// nodes left (BenchmarkFleet: 3,334 agents reconnecting within half a
// second overflowed the survivors' handshake queues).
func (c *Cache) backoff(n int) time.Duration {
	d := min(2*time.Second<<min(n, 8), c.opts.MaxBackoff)
	return time.Duration(mrand.Int64N(int64(d) + 1))
}

// ErrReconnect ends a Sync stream that the Appliance closed on purpose to
// reconnect (the agent has a new SVID, and the nodes serve a connection
// only while the SVID it was opened with is valid): the cache opens it
// again at once, and does not count it as a failure.
var ErrReconnect = errors.New("the agent reconnects to the appliance")

func (c *Cache) syncLoop(ctx context.Context) {
	fails := 0
	for ctx.Err() == nil {
		snap, _ := c.Current()
		err := c.syncOnce(ctx, snap.Revision, &fails)
		c.Stats.Connected.Store(false)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrReconnect) {
			c.log.Debug("appliance sync stream reopened on a new connection", "err", err)
			continue
		}
		c.Stats.SyncFailures.Add(1)
		c.log.Warn("appliance sync stream ended; serving from cache", "err", err, "retry", fails)
		select {
		case <-ctx.Done():
			return
		case <-time.After(c.backoff(fails)):
		}
		fails++
	}
}

func (c *Cache) syncOnce(ctx context.Context, rev uint64, fails *int) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.app.Sync(sctx, &api.SyncRequest{Revision: rev})
	if err != nil {
		return err
	}
	for {
		u, err := stream.Recv()
		if err != nil {
			return err
		}
		if err := c.apply(u); err != nil {
			// A view we cannot use is not applied: the old one stays.
			return fmt.Errorf("update at revision %d refused: %w", u.Revision, err)
		}
		*fails = 0
		c.Stats.Connected.Store(true)
	}
}

// apply installs an appliance view. Entries of other parents, or with IDs
// outside the bundle's trust domain, cannot be signed anyway and are
// dropped with a log line.
func (c *Cache) apply(u *api.SyncUpdate) error {
	td, err := spiffeid.TrustDomainFromString(u.Bundle.TrustDomain)
	if err != nil {
		return fmt.Errorf("bundle trust domain: %w", err)
	}
	b, err := spiffebundle.Parse(td, u.SPIFFE)
	if err != nil {
		return fmt.Errorf("bundle document: %w", err)
	}
	if len(b.X509Authorities()) == 0 {
		return errors.New("bundle has no X.509 authorities")
	}
	// The roots before the CRLs: a CRL of a root this update adds is
	// checked against it.
	rootsKept := c.keepRoots(td, u.Bundle.Roots, b)
	// A CRL the agent cannot verify is skipped, never the update: a node
	// (or a root the agent does not trust yet) must not be able to
	// keep entries, bundle changes and the other CRLs from the agent.
	revokedMore := c.addCRLs(u.Bundle.RootCRLs)
	crls := c.RootCRLs()
	entries := make([]api.Entry, 0, len(u.Entries))
	for _, e := range u.Entries {
		id, err := spiffeid.FromString(e.SPIFFEID)
		if err != nil || id.TrustDomain() != td || len(e.Selectors) == 0 {
			c.log.Warn("entry ignored", "entry", e.ID, "spiffe_id", e.SPIFFEID, "err", err)
			continue
		}
		entries = append(entries, e)
	}
	// apply runs on the sync loop only, so the snapshot read here is the
	// one the update replaces as far as federated bundles go.
	prev, _ := c.Current()
	fed := c.federated(td, u.Federated, prev.Federated)
	sort.SliceStable(entries, func(i, j int) bool {
		if !entries[i].CreatedAt.Equal(entries[j].CreatedAt) {
			return entries[i].CreatedAt.Before(entries[j].CreatedAt)
		}
		return entries[i].ID < entries[j].ID
	})
	c.update(func(s *Snapshot) {
		s.Revision, s.Entries, s.Bundle, s.RootCRLs = u.Revision, entries, b, crls
		s.Federated = fed
		s.selectors = selectorStrings(entries)
		s.Revoked = map[string]bool{}
		for _, r := range u.Bundle.Revoked {
			s.Revoked[r.Serial] = true
		}
		live := map[string]bool{}
		for _, e := range entries {
			live[e.ID] = true
		}
		for id, v := range s.SVIDs {
			// An SVID whose issuing CA the root revoked is refused by
			// every node: it is not served while a new one is signed.
			if !live[id] || c.Revoked(v.Chain) {
				delete(s.SVIDs, id)
			}
		}
	})
	c.log.Debug("appliance view applied", "revision", u.Revision, "entries", len(entries), "bundle_sequence", u.Bundle.Sequence, "federated", len(u.Federated))
	c.wake()
	// Only now, with the roots on disk and the workload streams woken
	// with the bundle (update closed their channel), may the appliance be
	// told that this agent applied it.
	if rootsKept {
		c.bundleApplied(u.Bundle.Sequence)
	}
	if revokedMore && c.opts.OnRevoked != nil {
		c.opts.OnRevoked()
	}
	return nil
}

// entryKey is what an SVID's content depends on: a change re-signs it.
func entryKey(e api.Entry) string {
	return fmt.Sprintf("%s|%d|%s|%s|%s", e.SPIFFEID, e.X509TTL, strings.Join(e.DNSNames, ","), strings.Join(e.IPAddresses, ","), e.Hint)
}

// due lists entries whose SVID is missing, outdated, revoked, expired or
// past its rotation time, when the next one falls due, and whether a
// forced rotation was asked for (kept if the signing fails).
func (c *Cache) due(now time.Time) ([]api.Entry, time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.snap
	var out []api.Entry
	next := now.Add(time.Hour)
	for _, e := range s.Entries {
		v := s.SVIDs[e.ID]
		if c.force || v == nil || v.entryKey != entryKey(e) || !now.Before(v.rotateAt) || s.Revoked[v.Serial()] || c.Revoked(v.Chain) {
			out = append(out, e)
			continue
		}
		if v.rotateAt.Before(next) {
			next = v.rotateAt
		}
	}
	forced := c.force
	c.force = false
	return out, next, forced
}

func (c *Cache) rotateLoop(ctx context.Context) {
	fails := 0
	for {
		wait := time.Hour
		if ctx.Err() != nil {
			return
		}
		snap, _ := c.Current()
		if snap.Bundle != nil {
			due, next, forced := c.due(time.Now())
			wait = time.Until(next)
			if len(due) > 0 {
				if err := c.sign(ctx, due); err != nil {
					c.Stats.SignFailures.Add(1)
					c.log.Warn("SVID signing failed; cached SVIDs stay in use", "err", err, "due", len(due))
					c.mu.Lock()
					c.force = c.force || forced
					c.mu.Unlock()
					wait = c.backoff(fails)
					fails++
				} else {
					fails = 0
					continue
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-c.kick:
		case <-time.After(max(wait, 10*time.Millisecond)):
		}
	}
}

// sign gets SVIDs for entries, in batches, with fresh keys.
func (c *Cache) sign(ctx context.Context, entries []api.Entry) error {
	for batch := range slices.Chunk(entries, c.opts.BatchSize) {
		keys := make(map[string]*ecdsa.PrivateKey, len(batch))
		req := &api.X509SVIDBatch{}
		for _, e := range batch {
			k, csr, err := newCSR(e.SPIFFEID)
			if err != nil {
				return err
			}
			keys[e.ID] = k
			req.Requests = append(req.Requests, api.X509SVIDRequest{EntryID: e.ID, CSR: csr})
		}
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		res, err := c.app.SignX509SVIDs(sctx, req)
		cancel()
		if err != nil {
			return err
		}
		byID := map[string]api.Entry{}
		for _, e := range batch {
			byID[e.ID] = e
		}
		got := map[string]*SVID{}
		var refused []string
		for _, r := range res.Results {
			e, ok := byID[r.EntryID]
			if !ok {
				continue
			}
			if r.Error != "" {
				refused = append(refused, r.EntryID+": "+r.Error)
				continue
			}
			v, err := newSVID(e, keys[e.ID], r)
			if err == nil && c.Revoked(v.Chain) {
				err = errors.New("signed by an issuing CA the root revoked")
			}
			if err != nil {
				refused = append(refused, r.EntryID+": "+err.Error())
				continue
			}
			got[e.ID] = v
		}
		if len(got) > 0 {
			c.update(func(s *Snapshot) {
				for id, v := range got {
					if _, live := entryIn(s.Entries, id); live {
						c.holdIfCut(v)
						s.SVIDs[id] = v
					}
				}
			})
			c.Stats.Rotations.Add(int64(len(got)))
		}
		if len(refused) > 0 {
			return fmt.Errorf("appliance refused %d of %d: %s", len(refused), len(batch), strings.Join(refused, "; "))
		}
	}
	return nil
}

// holdIfCut keeps v until it expires when the appliance cut it at
// Options.CutAt: rotating at half of what is left would re-sign ever
// faster, each new SVID ending at the same limit, until the agent's own
// expiry.
func (c *Cache) holdIfCut(v *SVID) {
	if c.opts.CutAt == nil {
		return
	}
	// The appliance truncates lifetimes to the second.
	if cut := c.opts.CutAt(); !cut.IsZero() && !v.NotAfter.Before(cut.Add(-time.Second)) {
		v.rotateAt = v.NotAfter
	}
}

func entryIn(es []api.Entry, id string) (api.Entry, bool) {
	for _, e := range es {
		if e.ID == id {
			return e, true
		}
	}
	return api.Entry{}, false
}

func newCSR(id string) (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	u, err := url.Parse(id)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, k)
	return k, csr, err
}

// newSVID checks what the appliance returned before it is served: the
// leaf must carry the entry's ID and the key we generated.
func newSVID(e api.Entry, k *ecdsa.PrivateKey, r api.X509SVIDResult) (*SVID, error) {
	if len(r.Chain) == 0 {
		return nil, errors.New("empty chain")
	}
	v := &SVID{EntryID: e.ID, SPIFFEID: e.SPIFFEID, Hint: e.Hint, Key: k, entryKey: entryKey(e)}
	for _, der := range r.Chain {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		v.Chain = append(v.Chain, cert)
		v.ChainDER = append(v.ChainDER, der...)
	}
	leaf := v.Chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != e.SPIFFEID {
		return nil, fmt.Errorf("leaf is for %v, entry for %s", leaf.URIs, e.SPIFFEID)
	}
	if !k.PublicKey.Equal(leaf.PublicKey) {
		return nil, errors.New("leaf certifies another key")
	}
	var err error
	if v.KeyDER, err = x509.MarshalPKCS8PrivateKey(k); err != nil {
		return nil, err
	}
	v.NotAfter = leaf.NotAfter
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	v.rotateAt = leaf.NotBefore.Add(life/2 - time.Duration(mrand.Int64N(int64(life/10)+1)))
	return v, nil
}

// JWTSVID returns a JWT-SVID for entry and audience, signed by the
// appliance, reusing a cached token while more than half its life is left.
func (c *Cache) JWTSVID(ctx context.Context, e api.Entry, audience []string) (string, time.Time, error) {
	aud := slices.Clone(audience)
	sort.Strings(aud)
	key := e.ID + "\x00" + e.SPIFFEID + "\x00" + strings.Join(aud, "\x00")
	now := time.Now()
	c.jwtMu.Lock()
	if it, ok := c.jwts[key]; ok && now.Before(it.issued.Add(it.expiresAt.Sub(it.issued)/2)) {
		c.jwtMu.Unlock()
		return it.token, it.expiresAt, nil
	}
	c.jwtMu.Unlock()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	r, err := c.app.SignJWTSVID(sctx, &api.JWTSVIDRequest{EntryID: e.ID, Audience: aud})
	if err != nil {
		c.Stats.JWTFailures.Add(1)
		return "", time.Time{}, err
	}
	if r.SPIFFEID != e.SPIFFEID {
		c.Stats.JWTFailures.Add(1)
		return "", time.Time{}, fmt.Errorf("appliance signed %s for entry %s (%s)", r.SPIFFEID, e.ID, e.SPIFFEID)
	}
	c.Stats.JWTsSigned.Add(1)
	c.jwtMu.Lock()
	defer c.jwtMu.Unlock()
	if len(c.jwts) >= c.opts.MaxJWTs {
		for k, it := range c.jwts {
			if !now.Before(it.issued.Add(it.expiresAt.Sub(it.issued) / 2)) {
				delete(c.jwts, k)
			}
		}
		if len(c.jwts) >= c.opts.MaxJWTs {
			clear(c.jwts)
		}
	}
	c.jwts[key] = jwtItem{token: r.Token, issued: now, expiresAt: r.ExpiresAt}
	return r.Token, r.ExpiresAt, nil
}
