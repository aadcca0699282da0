package jobrule

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// MaxDiscoveryBytes bounds each discovery response (the configuration
// document and the key set).
const MaxDiscoveryBytes = 256 << 10

// DiscoveryOptions tune a Discovery; zero fields take their defaults.
type DiscoveryOptions struct {
	// Timeout bounds each fetch, both requests together (default 5 s).
	Timeout time.Duration
	// MinRefresh is the shortest time between fetches that a kid miss or
	// a failed fetch can cause (default 10 s): tokens with made-up kids
	// must not turn the appliance into a load on the issuer.
	MinRefresh time.Duration
	// MaxAge is how long fetched keys are used before the next use
	// refetches them (default 1 h), so that keys the issuer withdrew
	// stop working.
	MaxAge time.Duration
	// OnFetch, if set, is told each fetch's outcome (nil: success), for
	// metrics and logs. It must not block.
	OnFetch func(err error)
	// Now is the clock for MinRefresh and MaxAge (default time.Now).
	Now func() time.Time
}

// Discovery is an issuer's keys found by OIDC discovery and cached.
// It is safe for concurrent use: callers that need a fetch at the same
// time share one.
type Discovery struct {
	issuer string
	client *http.Client
	opts   DiscoveryOptions

	mu        sync.Mutex
	keys      map[string]crypto.PublicKey
	fetchedAt time.Time // of keys
	triedAt   time.Time // of the last fetch, successful or not
	lastErr   error     // of the last fetch
	call      *fetchCall
}

type fetchCall struct {
	done chan struct{}
	err  error
}

// NewDiscovery returns the keys of issuer, fetched over TLS checked
// against roots (nil: the system's) when first needed.
func NewDiscovery(issuer string, roots *x509.CertPool, opts DiscoveryOptions) *Discovery {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Second
	}
	if opts.MinRefresh <= 0 {
		opts.MinRefresh = 10 * time.Second
	}
	if opts.MaxAge <= 0 {
		opts.MaxAge = time.Hour
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		TLSClientConfig:       &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   opts.Timeout,
		ResponseHeaderTimeout: opts.Timeout,
		MaxIdleConns:          2,
		IdleConnTimeout:       time.Minute,
		ForceAttemptHTTP2:     true,
	}
	client := &http.Client{
		Transport: tr,
		Timeout:   opts.Timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if req.URL.Scheme != "https" {
				return fmt.Errorf("redirect to %s is not https", req.URL.Redacted())
			}
			if len(via) >= 3 {
				return errors.New("more than 3 redirects")
			}
			return nil
		},
	}
	return &Discovery{issuer: issuer, client: client, opts: opts}
}

// KeysFor returns the rule's key source: its static JWKS, or discovery
// from its issuer over TLS checked against its IssuerCA.
func KeysFor(s Spec, opts DiscoveryOptions) (KeySource, error) {
	if len(s.JWKS) > 0 {
		return NewStaticKeys(s.JWKS)
	}
	var roots *x509.CertPool
	if len(s.IssuerCA) > 0 {
		var err error
		if roots, err = ParseRoots(s.IssuerCA); err != nil {
			return nil, fmt.Errorf("issuer_ca: %w", err)
		}
	}
	return NewDiscovery(s.Issuer, roots, opts), nil
}

// Key returns the key kid names. Keys older than MaxAge are refetched;
// a kid the cached set lacks refetches once, unless a fetch happened
// within MinRefresh.
func (d *Discovery) Key(ctx context.Context, kid string) (crypto.PublicKey, error) {
	d.mu.Lock()
	now := d.opts.Now()
	fresh := d.keys != nil && now.Sub(d.fetchedAt) < d.opts.MaxAge
	if fresh {
		if k, ok := d.keys[kid]; ok {
			d.mu.Unlock()
			return k, nil
		}
	}
	c := d.call
	if c == nil {
		if !d.triedAt.IsZero() && now.Sub(d.triedAt) < d.opts.MinRefresh {
			err := d.lastErr
			d.mu.Unlock()
			if err != nil {
				return nil, err
			}
			if fresh {
				return nil, ErrUnknownKey
			}
		} else {
			c = &fetchCall{done: make(chan struct{})}
			d.call = c
			d.triedAt = now
			// The fetch outlives a caller that gives up: others may be
			// waiting on it, and its result is cached for all.
			go d.fetch(context.WithoutCancel(ctx), c)
			d.mu.Unlock()
		}
	} else {
		d.mu.Unlock()
	}
	if c != nil {
		select {
		case <-c.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for %s's keys: %w", d.issuer, ctx.Err())
		}
		if c.err != nil {
			return nil, c.err
		}
	}
	d.mu.Lock()
	k, ok := d.keys[kid]
	d.mu.Unlock()
	if !ok {
		return nil, ErrUnknownKey
	}
	return k, nil
}

func (d *Discovery) fetch(ctx context.Context, c *fetchCall) {
	ctx, cancel := context.WithTimeout(ctx, d.opts.Timeout)
	keys, err := d.fetchKeys(ctx)
	cancel()
	d.mu.Lock()
	if err == nil {
		d.keys, d.fetchedAt = keys, d.opts.Now()
	}
	d.lastErr = err
	d.call = nil
	c.err = err
	d.mu.Unlock()
	// Told before the waiters are released, so that whoever saw a fetch's
	// result can count on its report having been made.
	if d.opts.OnFetch != nil {
		d.opts.OnFetch(err)
	}
	close(c.done)
}

func (d *Discovery) fetchKeys(ctx context.Context) (map[string]crypto.PublicKey, error) {
	if err := checkIssuer(d.issuer); err != nil {
		return nil, fmt.Errorf("issuer: %v", err)
	}
	confURL := strings.TrimSuffix(d.issuer, "/") + "/.well-known/openid-configuration"
	body, err := d.get(ctx, confURL)
	if err != nil {
		return nil, err
	}
	var conf struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(body, &conf); err != nil {
		return nil, fmt.Errorf("%s: not an OpenID configuration: %v", confURL, err)
	}
	// The document must be the issuer's own: an issuer that names another
	// would have its tokens checked with someone else's keys.
	if conf.Issuer != d.issuer {
		return nil, fmt.Errorf("%s: names issuer %q, not %q", confURL, clip(conf.Issuer, 256), d.issuer)
	}
	u, err := url.Parse(conf.JWKSURI)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("%s: jwks_uri %q is not an https URL", confURL, clip(conf.JWKSURI, 256))
	}
	jwksURL := u.String()
	body, err = d.get(ctx, jwksURL)
	if err != nil {
		return nil, err
	}
	keys, err := parseKeySet(body, false)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", u.Redacted(), err)
	}
	return keys, nil
}

func (d *Discovery) get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", u, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := d.client.Do(req)
	if err != nil {
		// The client's errors already name the URL.
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }() // the body is read (bounded) below; nothing to report
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: HTTP status %s", u, resp.Status)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxDiscoveryBytes+1))
	if err != nil {
		return nil, fmt.Errorf("%s: reading: %v", u, err)
	}
	if len(body) > MaxDiscoveryBytes {
		return nil, fmt.Errorf("%s: response larger than %d KiB", u, MaxDiscoveryBytes>>10)
	}
	return body, nil
}
