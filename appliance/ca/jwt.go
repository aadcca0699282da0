package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/cryptosigner"

	"github.com/sigil-appliance/sigil/keystore"
)

// JWTKeyStore makes and opens the HSM keys JWT-SVIDs are signed with
// (keystore.Manager has these methods).
type JWTKeyStore interface {
	CreateKey(ctx context.Context, req keystore.CreateKeyRequest) (crypto.PublicKey, error)
	Signer(ctx context.Context, uri string) (crypto.Signer, error)
}

// PublishedJWTKey is a JWT key as the replicated trust bundle holds it.
type PublishedJWTKey struct {
	KID  string
	Node string
	// PublicKey is PKIX DER.
	PublicKey []byte
	// NotAfter: the key leaves the bundle then.
	NotAfter time.Time
	// CA is the DER of the issuing CA that published the key: a root CRL
	// revoking that CA withdraws the key.
	CA []byte
}

// JWTPublisher is the replicated bundle: a key signs nothing before
// Publish has committed it.
type JWTPublisher interface {
	// Published lists the keys the bundle holds now (every node's).
	Published() []PublishedJWTKey
	Publish(ctx context.Context, k PublishedJWTKey) error
	Withdraw(ctx context.Context, kid string) error
}

// JWTConfig is what JWT key rotation needs beyond the authority.
type JWTConfig struct {
	Keys      JWTKeyStore
	Publisher JWTPublisher
	// KeyURI addresses the HSM key of a kid.
	KeyURI func(kid string) (string, error)
	// Algorithm is the type of the keys made: keystore.ECDSAP256 (ES256,
	// the default) or keystore.RSA2048 (RS256). A key of another type
	// already published by this node is not adopted at restart: the next
	// key made is of this type.
	Algorithm keystore.Algorithm
	// Rotate is how long a key signs.
	Rotate time.Duration
	// MaxTokenLife bounds every token's lifetime, and so how long a key
	// stays published after it stops signing.
	MaxTokenLife time.Duration
	// Ready reports whether the bundle can take changes now (a raft
	// leader is known); Maintain skips its round otherwise.
	Ready  func() bool
	Logger *slog.Logger
}

// JWTKeys manages this node's JWT signing keys. A key is made in the
// node's HSM and published in the replicated bundle before it signs
// anything; it signs for one rotation period, then stays published until
// every token it could have signed has expired (NotAfter = publication +
// rotation period + the longest token life), and is then retired.
type JWTKeys struct {
	a   *Authority
	cfg JWTConfig

	mu      sync.Mutex
	current *JWTKey
}

// JWTKeys returns the JWT key manager of this authority's node. Keys it
// publishes name this authority's issuing CA.
func (a *Authority) JWTKeys(cfg JWTConfig) *JWTKeys {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Algorithm == "" {
		cfg.Algorithm = keystore.ECDSAP256
	}
	return &JWTKeys{a: a, cfg: cfg}
}

// JWTKey signs JWT-SVIDs with one HSM key: JWS compact serialization,
// ES256 for a P-256 key (ES384 for P-384), RS256 for an RSA key, with kid
// and typ "JWT" in the protected header.
type JWTKey struct {
	kid       string
	signUntil time.Time
	jws       jose.Signer
}

// KID is the key's ID in the bundle and in the tokens' header.
func (k *JWTKey) KID() string { return k.kid }

// newJWTKey wraps an HSM signer for JWS. Only ECDSA P-256 and P-384 keys
// and RSA keys of 2048 to 4096 bits sign: those are the algorithms SPIFFE
// JWT-SVID validators accept from this appliance (and RS256, PKCS#1 v1.5
// with SHA-256, is the one every cloud token service accepts).
func newJWTKey(kid string, s crypto.Signer, signUntil time.Time) (*JWTKey, error) {
	alg, err := JWTAlgorithm(s.Public())
	if err != nil {
		return nil, fmt.Errorf("JWT key %s: %w", kid, err)
	}
	opaque := cryptosigner.Opaque(s)
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), kid)
	jws, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: opaque}, opts)
	if err != nil {
		return nil, fmt.Errorf("JWT key %s: %w", kid, err)
	}
	return &JWTKey{kid: kid, signUntil: signUntil, jws: jws}, nil
}

// JWTAlgorithm is the JWS algorithm a JWT key of this appliance signs
// with: ES256 or ES384 for ECDSA P-256 or P-384, RS256 for RSA of 2048 to
// 4096 bits. Any other key is refused (the replicated state refuses to
// publish it too: state.checkJWTKey).
func JWTAlgorithm(pub crypto.PublicKey) (jose.SignatureAlgorithm, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return jose.ES256, nil
		case elliptic.P384():
			return jose.ES384, nil
		}
		return "", fmt.Errorf("ECDSA curve %s is not P-256 or P-384", k.Curve.Params().Name)
	case *rsa.PublicKey:
		if b := k.N.BitLen(); b < 2048 || b > 4096 {
			return "", fmt.Errorf("RSA key of %d bits: want 2048 to 4096", b)
		}
		return jose.RS256, nil
	}
	return "", fmt.Errorf("key type %T is not ECDSA P-256 or P-384 or RSA", pub)
}

// algorithmOf is the keystore algorithm a key of this node was made with.
func algorithmOf(pub crypto.PublicKey) keystore.Algorithm {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() {
			return keystore.ECDSAP256
		}
	case *rsa.PublicKey:
		if k.N.BitLen() == 2048 {
			return keystore.RSA2048
		}
	}
	return ""
}

// JWTClaims are what a JWT-SVID says.
type JWTClaims struct {
	// Issuer is the iss claim, the cluster's OIDC issuer URL (jwt.issuer);
	// empty: no iss claim (SPIFFE JWT-SVIDs need none).
	Issuer   string
	Subject  string
	Audience []string
	IssuedAt time.Time
	Expiry   time.Time
	ID       string
}

// Sign makes a JWT-SVID: the claims sub, aud (always an array), iat, exp
// (seconds) and jti, and iss when the claims name an issuer.
func (k *JWTKey) Sign(c JWTClaims) (string, error) {
	claims := map[string]any{"sub": c.Subject, "aud": c.Audience,
		"iat": c.IssuedAt.Unix(), "exp": c.Expiry.Unix(), "jti": c.ID}
	if c.Issuer != "" {
		claims["iss"] = c.Issuer
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	sig, err := k.jws.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("sign JWT with key %s: %w", k.kid, err)
	}
	return sig.CompactSerialize()
}

// Current returns the key to sign with now, making and publishing one if
// this node has none that may still sign.
func (j *JWTKeys) Current(ctx context.Context) (*JWTKey, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.current != nil && time.Now().Before(j.current.signUntil) {
		return j.current, nil
	}
	if k := j.adopt(ctx); k != nil {
		j.current = k
		return k, nil
	}
	k, err := j.create(ctx, j.newKID())
	if err != nil {
		return nil, err
	}
	j.current = k
	return k, nil
}

// adopt picks up a key this node published before a restart.
func (j *JWTKeys) adopt(ctx context.Context) *JWTKey {
	var best *PublishedJWTKey
	for _, k := range j.cfg.Publisher.Published() {
		if k.Node != j.a.nodeID || !time.Now().Before(k.NotAfter.Add(-j.cfg.MaxTokenLife)) {
			continue
		}
		// A key of the type configured before jwt.key-type changed keeps
		// validating its tokens but signs no more.
		if pub, err := x509.ParsePKIXPublicKey(k.PublicKey); err != nil || algorithmOf(pub) != j.cfg.Algorithm {
			continue
		}
		if best == nil || k.NotAfter.After(best.NotAfter) {
			kk := k
			best = &kk
		}
	}
	if best == nil {
		return nil
	}
	uri, err := j.cfg.KeyURI(best.KID)
	if err != nil {
		return nil
	}
	s, err := j.cfg.Keys.Signer(ctx, uri)
	if err == nil {
		var k *JWTKey
		if k, err = newJWTKey(best.KID, s, best.NotAfter.Add(-j.cfg.MaxTokenLife)); err == nil {
			return k
		}
	}
	j.cfg.Logger.Warn("published JWT key not usable; making a new one", "kid", best.KID, "err", err)
	return nil
}

// newKID names a new key of this node.
func (j *JWTKeys) newKID() string {
	b := make([]byte, 12)
	rand.Read(b)
	return j.a.nodeID + "-" + hex.EncodeToString(b)
}

// create makes the key kid in the HSM and publishes it; only a committed
// key is returned.
func (j *JWTKeys) create(ctx context.Context, kid string) (*JWTKey, error) {
	uri, err := j.cfg.KeyURI(kid)
	if err != nil {
		return nil, err
	}
	pub, err := j.cfg.Keys.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: j.cfg.Algorithm})
	if err != nil {
		return nil, fmt.Errorf("create JWT key in the HSM: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	notAfter := time.Now().Add(j.cfg.Rotate + j.cfg.MaxTokenLife).UTC().Truncate(time.Second)
	s, err := j.cfg.Keys.Signer(ctx, uri)
	if err != nil {
		return nil, err
	}
	k, err := newJWTKey(kid, s, notAfter.Add(-j.cfg.MaxTokenLife))
	if err != nil {
		return nil, err
	}
	if err := j.cfg.Publisher.Publish(ctx, PublishedJWTKey{KID: kid, Node: j.a.nodeID, PublicKey: der, NotAfter: notAfter,
		CA: j.a.Issuing().Raw}); err != nil {
		return nil, fmt.Errorf("publish JWT key %s: %w", kid, err)
	}
	j.cfg.Logger.Info("JWT key published", "kid", kid, "signs_until", k.signUntil, "published_until", notAfter)
	return k, nil
}

// Rotate makes and publishes a new key now and signs with it from then on.
func (j *JWTKeys) Rotate(ctx context.Context) (string, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	k, err := j.create(ctx, j.newKID())
	if err != nil {
		return "", err
	}
	j.current = k
	return k.kid, nil
}

// ErrTooManyJWTKeys is RotateOnDemand's refusal: this node already has as
// many keys in the bundle as an on-demand rotation may leave there.
var ErrTooManyJWTKeys = errors.New("too many JWT keys")

// OnDemand bounds and records a rotation an operator asked for
// (RotateOnDemand).
type OnDemand struct {
	// MaxKeys: the rotation is refused while this node already has this
	// many keys in the bundle (published and not yet retired, whether
	// they still sign, still validate tokens, or await retirement).
	MaxKeys int
	// Sync makes the bundle that Published reads current (a linearizable
	// read barrier), so that the count includes every key this node
	// published before, wherever the commit was applied first.
	Sync func(context.Context) error
	// Record is called with the new key's kid after the bound is checked
	// and before the key is made (an audit record of who asked): when it
	// fails, nothing is made.
	Record func(ctx context.Context, kid string) error
}

// RotateOnDemand is Rotate for an operator's request: every key stays in
// the replicated bundle, which every agent holds, until the tokens it
// signed have expired, so a caller asking again and again would grow the
// bundle without bound. It is refused, with an error wrapping
// ErrTooManyJWTKeys, while this node has o.MaxKeys keys in the bundle.
// Rotations of this node (scheduled and on demand) take one lock, and the
// count is taken under it after o.Sync, so concurrent requests cannot
// together pass the bound.
func (j *JWTKeys) RotateOnDemand(ctx context.Context, o OnDemand) (string, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := o.Sync(ctx); err != nil {
		return "", err
	}
	n, oldest := 0, time.Time{}
	for _, k := range j.cfg.Publisher.Published() {
		if k.Node != j.a.nodeID {
			continue
		}
		n++
		if oldest.IsZero() || k.NotAfter.Before(oldest) {
			oldest = k.NotAfter
		}
	}
	if n >= o.MaxKeys {
		return "", fmt.Errorf("%w: node %s has %d in the trust bundle, and a rotation on demand is refused from %d on "+
			"(each key stays until every token it signed has expired); the first of them leaves the bundle after %s",
			ErrTooManyJWTKeys, j.a.nodeID, n, o.MaxKeys, oldest.UTC().Format(time.RFC3339))
	}
	kid := j.newKID()
	if err := o.Record(ctx, kid); err != nil {
		return "", err
	}
	k, err := j.create(ctx, kid)
	if err != nil {
		return "", err
	}
	j.current = k
	return k.kid, nil
}

// Maintain rotates before the current key's signing window closes and
// retires this node's keys whose tokens have all expired, until ctx ends.
func (j *JWTKeys) Maintain(ctx context.Context) {
	tick := time.NewTicker(min(j.cfg.Rotate/10, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if !j.cfg.Ready() {
			continue
		}
		j.mu.Lock()
		due := j.current != nil && time.Until(j.current.signUntil) < j.cfg.Rotate/10
		j.mu.Unlock()
		if due {
			if kid, err := j.Rotate(ctx); err != nil {
				j.cfg.Logger.Error("JWT key rotation failed", "err", err)
			} else {
				j.cfg.Logger.Info("JWT key rotated", "kid", kid)
			}
		}
		for _, k := range j.cfg.Publisher.Published() {
			if k.Node == j.a.nodeID && time.Now().After(k.NotAfter) {
				if err := j.cfg.Publisher.Withdraw(ctx, k.KID); err != nil {
					j.cfg.Logger.Warn("retiring JWT key failed", "kid", k.KID, "err", err)
				}
			}
		}
	}
}
