package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// Federation: the leader fetches each foreign bundle endpoint on its
// bundle's refresh hint and commits what changed (federation.bundle.set);
// the state machine decides whether a bundle may replace the stored one.
// What a foreign endpoint serves is never trusted further than that: a
// fetch that fails (down, garbage, another trust domain, a rollback)
// leaves the stored bundle as it is, and is logged (rate-limited) and
// counted.
const (
	defaultBundleRefreshHint = 5 * time.Minute
	defaultFederationRefresh = 5 * time.Minute
	minFederationRefresh     = 30 * time.Second
	maxFederationRefresh     = time.Hour
	// federationFetchTimeout bounds one fetch (connect, TLS, the body).
	federationFetchTimeout = 30 * time.Second
	// federationFirstRetry is the first wait after a failed fetch; it
	// doubles (with jitter) up to the refresh interval.
	federationFirstRetry = 5 * time.Second
)

// Results of sigil_federation_fetches_total: fixed labels, never text a
// foreign endpoint chose.
const (
	fetchUpdated      = "updated"       // a new bundle committed
	fetchUnchanged    = "unchanged"     // the stored bundle is current
	fetchUnreachable  = "unreachable"   // connect, TLS (endpoint authentication) or read failure
	fetchBadStatus    = "bad_status"    // an HTTP status other than 200
	fetchTooLarge     = "too_large"     // a body over state.MaxFederatedBundle
	fetchInvalid      = "invalid"       // not a bundle the state machine accepts
	fetchRollback     = "rollback"      // the sequence would go back
	fetchNoBundle     = "no_bundle"     // https_spiffe without a bundle to authenticate the endpoint with
	fetchNotCommitted = "not_committed" // the relationship changed meanwhile, or no quorum
)

// fetchLogEvery bounds the failure lines of one relationship: a foreign
// endpoint that stays broken logs once a minute (and when the kind of
// failure changes), not at every retry.
const fetchLogEvery = time.Minute

// fetchStatus is this node's own view of one relationship's fetches.
type fetchStatus struct {
	revision    uint64 // the relationship's revision this status is of
	next        time.Time
	failures    int
	inFlight    bool
	lastFetch   time.Time
	lastErr     string
	lastSuccess time.Time
	lastLog     time.Time // of a failure line
	lastResult  string
	unlogged    int // failures since the last line
	// servedHint is the refresh hint the endpoint served last when only
	// the hint differed from the stored bundle's (not committed).
	servedHint time.Duration
}

// federationFetcher runs the leader's fetches and keeps their status.
type federationFetcher struct {
	td       spiffeid.TrustDomain
	fsm      *state.FSM
	log      *slog.Logger
	isLeader func() bool
	propose  func(ctx context.Context, typ string, payload any) ([]byte, error)
	minWait  time.Duration

	fetches *prometheus.CounterVec

	mu     sync.Mutex
	status map[string]*fetchStatus
}

func newFederationFetcher(n *Node) *federationFetcher {
	f := &federationFetcher{td: n.td, fsm: n.fsm, log: n.log.With("component", "federation"), isLeader: n.raft.IsLeader,
		propose: func(ctx context.Context, typ string, payload any) ([]byte, error) {
			return n.apply(ctx, n.actor(), typ, payload)
		},
		minWait: n.cfg.Bundle.MinFetchInterval.Duration, status: map[string]*fetchStatus{}}
	if f.minWait <= 0 {
		f.minWait = minFederationRefresh
	}
	f.fetches = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sigil_federation_fetches_total",
		Help: "Fetches of foreign bundle endpoints by this node (as leader), by trust domain and result."}, []string{"trust_domain", "result"})
	n.metrics.reg.MustRegister(f.fetches, f)
	return f
}

var bundleAgeDesc = prometheus.NewDesc("sigil_federation_bundle_refresh_age_seconds",
	"Seconds since this node last fetched a foreign trust domain's bundle successfully (as leader), by trust domain; absent until the first success.",
	[]string{"trust_domain"}, nil)

// Describe and Collect make the fetcher the collector of the age gauge,
// computed at scrape time.
func (f *federationFetcher) Describe(ch chan<- *prometheus.Desc) { ch <- bundleAgeDesc }

func (f *federationFetcher) Collect(ch chan<- prometheus.Metric) {
	// Only the leader fetches: a former leader's ages would grow for ever
	// and alert on a cluster whose bundles are current.
	if !f.isLeader() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	now := time.Now()
	for td, s := range f.status {
		if !s.lastSuccess.IsZero() {
			ch <- prometheus.MustNewConstMetric(bundleAgeDesc, prometheus.GaugeValue, now.Sub(s.lastSuccess).Seconds(), td)
		}
	}
}

// refreshInterval is how long a bundle stands before the next fetch: its
// hint, bounded.
func (f *federationFetcher) refreshInterval(r *state.Federation) time.Duration {
	d := r.RefreshHint.Duration()
	if d <= 0 {
		d = defaultFederationRefresh
	}
	return min(max(d, f.minWait), maxFederationRefresh)
}

// run fetches due relationships while this node leads; every node runs
// it. A relationship added or changed is fetched at once. The
// relationships are read again only when one of them (or a foreign
// bundle) changed: a read decodes every stored bundle, and other changes
// (an agent's renewal, a job's join) come many a second.
func (f *federationFetcher) run(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	var rels []state.Federation
	for reload := true; ; {
		changed := f.fsm.FederationsChanged()
		if reload {
			rels = f.fsm.Federations()
			f.forgetDeleted(rels)
			reload = false
		}
		if f.isLeader() {
			for _, r := range f.due(rels, time.Now()) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					f.fetchOnce(ctx, &r)
				}()
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-changed:
			reload = true
		}
	}
}

// forgetDeleted drops the status and metrics of relationships gone.
func (f *federationFetcher) forgetDeleted(rels []state.Federation) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for name := range f.status {
		if !slices.ContainsFunc(rels, func(r state.Federation) bool { return r.TrustDomain == name }) {
			delete(f.status, name)
			f.fetches.DeletePartialMatch(prometheus.Labels{"trust_domain": name})
		}
	}
}

// due returns the relationships whose fetch is due at now and marks them
// in flight.
func (f *federationFetcher) due(rels []state.Federation, now time.Time) []state.Federation {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []state.Federation
	for _, r := range rels {
		s := f.status[r.TrustDomain]
		if s == nil || s.revision != r.Revision {
			s = &fetchStatus{revision: r.Revision}
			f.status[r.TrustDomain] = s
		}
		if r.BundleEndpointURL == "" || s.inFlight || now.Before(s.next) {
			continue
		}
		s.inFlight = true
		out = append(out, r)
	}
	return out
}

// fetchOnce fetches one relationship, proposes what changed and records
// the outcome.
func (f *federationFetcher) fetchOnce(ctx context.Context, r *state.Federation) {
	result, err := f.fetch(ctx, r)
	now := time.Now()
	f.fetches.WithLabelValues(r.TrustDomain, result).Inc()
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.status[r.TrustDomain]
	if s == nil || s.revision != r.Revision {
		return // deleted or changed meanwhile: the next round starts afresh
	}
	s.inFlight, s.lastFetch = false, now
	interval := f.refreshInterval(r)
	if s.servedHint > 0 {
		interval = min(max(s.servedHint, f.minWait), maxFederationRefresh)
	}
	if err == nil {
		s.lastErr, s.failures, s.lastSuccess, s.lastResult = "", 0, now, result
		if result == fetchUpdated {
			// The new bundle's hint applies from the next round.
			s.servedHint = 0
			if cur, ok := f.fsm.Federation(r.TrustDomain); ok {
				interval = f.refreshInterval(&cur)
			}
		}
		s.next = now.Add(interval)
		return
	}
	if ctx.Err() != nil {
		return
	}
	// What a foreign endpoint sent (a status line, a certificate's names)
	// reaches admins' terminals through FederationShow: no control
	// characters, bounded.
	s.lastErr = printableText(err.Error(), 512)
	s.failures++
	wait := federationFirstRetry << min(s.failures-1, 16)
	wait = min(wait, interval)
	// Jitter: -25% to +0%, so that retries spread and never exceed the hint.
	wait -= time.Duration(rand.Int64N(int64(wait)/4 + 1))
	s.next = now.Add(wait)
	if result == s.lastResult && now.Sub(s.lastLog) < fetchLogEvery {
		s.unlogged++
		return
	}
	f.log.Warn("federation: fetch of a foreign bundle failed; the stored bundle stays", "trust_domain", r.TrustDomain,
		"endpoint", r.BundleEndpointURL, "result", result, "failures", s.failures, "retry_in", wait.Round(time.Second),
		"failures_not_logged", s.unlogged, "err", err)
	s.lastLog, s.lastResult, s.unlogged = now, result, 0
}

// fetch gets the endpoint's bundle and proposes it if it changed.
func (f *federationFetcher) fetch(ctx context.Context, r *state.Federation) (string, error) {
	tr, err := f.fetchTransport(r)
	if err != nil {
		if errors.Is(err, errNoBundleYet) {
			return fetchNoBundle, err
		}
		return fetchInvalid, err
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: federationFetchTimeout,
		// A redirect could lead anywhere (http, another host): the
		// endpoint is the URL configured.
		CheckRedirect: func(*http.Request, []*http.Request) error { return errors.New("redirects are not followed") }}
	ctx, cancel := context.WithTimeout(ctx, federationFetchTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.BundleEndpointURL, nil)
	if err != nil {
		return fetchInvalid, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fetchUnreachable, err
	}
	defer func() { _ = resp.Body.Close() }() // read-only: nothing to lose
	if resp.StatusCode != http.StatusOK {
		return fetchBadStatus, fmt.Errorf("bundle endpoint answered %s", resp.Status)
	}
	doc, err := io.ReadAll(io.LimitReader(resp.Body, state.MaxFederatedBundle+1))
	if err != nil {
		return fetchUnreachable, fmt.Errorf("reading the bundle: %w", err)
	}
	if len(doc) > state.MaxFederatedBundle {
		return fetchTooLarge, fmt.Errorf("bundle larger than %d bytes", state.MaxFederatedBundle)
	}
	cur, ok := f.fsm.Federation(r.TrustDomain)
	if !ok || cur.Revision != r.Revision {
		return fetchNotCommitted, errors.New("the relationship changed during the fetch")
	}
	switch next, err := state.NextBundle(f.td, &cur, doc); {
	case errors.Is(err, state.ErrBundleUnchanged):
		return fetchUnchanged, nil
	case err == nil && state.SameTrust(next, cur.Bundle):
		// Only the refresh hint changed: not worth a commit (and a view to
		// every agent) each time a foreign endpoint varies it. The served
		// hint paces the next fetches all the same (fetchOnce).
		if h, ok := next.RefreshHint(); ok {
			f.mu.Lock()
			if st := f.status[r.TrustDomain]; st != nil && st.revision == r.Revision {
				st.servedHint = h
			}
			f.mu.Unlock()
		}
		return fetchUnchanged, nil
	case errors.Is(err, state.ErrBundleRollback):
		return fetchRollback, err
	case err != nil:
		return fetchInvalid, err
	}
	if _, err := f.propose(ctx, state.CmdFederationBundleSet, state.FederationBundleSet{TrustDomain: r.TrustDomain, Bundle: doc, Revision: r.Revision}); err != nil {
		return fetchNotCommitted, fmt.Errorf("committing the fetched bundle: %w", err)
	}
	seq, _ := bundleSequence(r.TrustDomain, doc)
	f.log.Info("federation: foreign bundle updated", "trust_domain", r.TrustDomain, "sequence", seq)
	return fetchUpdated, nil
}

func bundleSequence(name string, doc []byte) (uint64, bool) {
	td, err := spiffeid.TrustDomainFromString(name)
	if err != nil {
		return 0, false
	}
	b, err := spiffebundle.Parse(td, doc)
	if err != nil {
		return 0, false
	}
	return b.SequenceNumber()
}

var errNoBundleYet = errors.New("https_spiffe: no bundle of the foreign trust domain to authenticate its endpoint with (set one: sigilctl federation bundle-set)")

// fetchTransport is an https transport that authenticates the endpoint
// as its profile says: https_spiffe an X.509-SVID of the endpoint's
// SPIFFE ID, verified against the foreign bundle we hold; https_web Web
// PKI (system roots, or the relationship's endpoint CA).
func (f *federationFetcher) fetchTransport(r *state.Federation) (*http.Transport, error) {
	var cfg *tls.Config
	switch r.Profile {
	case state.ProfileHTTPSSPIFFE:
		if len(r.Bundle) == 0 {
			return nil, errNoBundleYet
		}
		td, err := spiffeid.TrustDomainFromString(r.TrustDomain)
		if err != nil {
			return nil, err
		}
		b, err := spiffebundle.Parse(td, r.Bundle)
		if err != nil {
			return nil, err
		}
		id, err := spiffeid.FromString(r.EndpointSPIFFEID)
		if err != nil {
			return nil, err
		}
		cfg = tlsconfig.TLSClientConfig(b, tlsconfig.AuthorizeID(id))
	case state.ProfileHTTPSWeb:
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
		if len(r.EndpointCA) > 0 {
			certs, err := state.ParseEndpointCA(r.EndpointCA)
			if err != nil {
				return nil, err
			}
			pool := x509.NewCertPool()
			for _, c := range certs {
				pool.AddCert(c)
			}
			cfg.RootCAs = pool
		}
	default:
		return nil, fmt.Errorf("profile %q", r.Profile)
	}
	return &http.Transport{TLSClientConfig: cfg, Proxy: http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		TLSHandshakeTimeout: 10 * time.Second, ResponseHeaderTimeout: 15 * time.Second,
		MaxResponseHeaderBytes: 64 << 10, DisableKeepAlives: true}, nil
}

// view is this node's fetch status of a relationship (zero when none).
func (f *federationFetcher) view(name string, revision uint64) (last time.Time, lastErr string) {
	if f == nil {
		return time.Time{}, ""
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.status[name]; s != nil && s.revision == revision {
		return s.lastFetch, s.lastErr
	}
	return time.Time{}, ""
}

// apiFederation is a stored relationship as the API serves it, with this
// node's fetch status.
func (a *admin) apiFederation(r state.Federation) api.FederationRelationship {
	out := api.FederationRelationship{TrustDomain: r.TrustDomain, BundleEndpointURL: r.BundleEndpointURL, Profile: r.Profile,
		EndpointSPIFFEID: r.EndpointSPIFFEID, EndpointCA: string(r.EndpointCA), Bundle: r.Bundle, BundleSequence: r.BundleSequence,
		BundleChanges: r.BundleChanges, RefreshHint: api.Seconds(r.RefreshHint), BundleUpdatedAt: r.BundleUpdatedAt,
		CreatedBy: r.CreatedBy, CreatedAt: r.CreatedAt, Revision: r.Revision}
	out.LastFetch, out.LastFetchError = a.fed.view(r.TrustDomain, r.Revision)
	return out
}

func (a *admin) refuseEarly(ctx context.Context, what string, err error) error {
	a.log.Warn("admin request refused", "request", what, "actor", callerFrom(ctx).Actor, "reason", err.Error())
	return status.Error(codes.InvalidArgument, err.Error())
}

func (a *admin) FederationAdd(ctx context.Context, r *api.FederationRelationship) (*api.FederationRelationship, error) {
	f := state.Federation{TrustDomain: r.TrustDomain, BundleEndpointURL: r.BundleEndpointURL, Profile: r.Profile,
		EndpointSPIFFEID: r.EndpointSPIFFEID, EndpointCA: []byte(r.EndpointCA), Bundle: r.Bundle}
	if err := state.CheckFederation(a.td, &f); err != nil {
		return nil, a.refuseEarly(ctx, state.CmdFederationAdd, err)
	}
	if len(f.Bundle) > 0 {
		if _, err := state.ParseForeignBundle(a.td, f.TrustDomain, f.Bundle); err != nil {
			return nil, a.refuseEarly(ctx, state.CmdFederationAdd, err)
		}
	}
	out, err := write[state.Federation](ctx, a, state.CmdFederationAdd, &f)
	if err != nil {
		return nil, err
	}
	res := a.apiFederation(*out)
	return &res, nil
}

func (a *admin) FederationList(ctx context.Context, _ *api.Empty) (*api.FederationList, error) {
	if err := a.read(ctx, "federation list"); err != nil {
		return nil, err
	}
	out := &api.FederationList{Relationships: []api.FederationRelationship{}}
	for _, r := range a.state.Federations() {
		out.Relationships = append(out.Relationships, a.apiFederation(r))
	}
	return out, nil
}

func (a *admin) FederationShow(ctx context.Context, r *api.IDRequest) (*api.FederationRelationship, error) {
	if err := a.read(ctx, "federation show"); err != nil {
		return nil, err
	}
	f, ok := a.state.Federation(r.ID)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no federation with %q", shownID(r.ID))
	}
	out := a.apiFederation(f)
	return &out, nil
}

func (a *admin) FederationDelete(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdFederationDelete, state.FederationDelete{TrustDomain: r.ID})
}

func (a *admin) FederationBundleSet(ctx context.Context, r *api.FederationBundle) (*api.FederationRelationship, error) {
	if _, err := state.ParseForeignBundle(a.td, r.TrustDomain, r.Bundle); err != nil {
		return nil, a.refuseEarly(ctx, state.CmdFederationBundleSet, err)
	}
	out, err := write[state.Federation](ctx, a, state.CmdFederationBundleSet, state.FederationBundleSet{TrustDomain: r.TrustDomain, Bundle: r.Bundle, Force: r.Force})
	if err != nil {
		return nil, err
	}
	res := a.apiFederation(*out)
	return &res, nil
}

// printableText is s without control characters (each replaced by '?'),
// cut to at most n bytes on a rune boundary.
func printableText(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || r == utf8.RuneError {
			return '?'
		}
		return r
	}, s)
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
