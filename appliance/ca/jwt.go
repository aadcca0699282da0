package node

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// jwtKeys manages this node's JWT signing keys. A key is made in the
// node's HSM and published in the replicated bundle before it signs
// anything; it signs for one rotation period, then stays published until
// every token it could have signed has expired (NotAfter = publication +
// rotation period + the longest JWT TTL), and is then retired.
type jwtKeys struct {
	n      *Node
	rotate time.Duration

	mu      sync.Mutex
	current *jwtKey
}

type jwtKey struct {
	kid       string
	signer    crypto.Signer
	signUntil time.Time
}

// maxJWTLife bounds every token's lifetime, and so how long a retired key
// must stay in the bundle.
const maxJWTLife = state.MaxJWTTTL

func (j *jwtKeys) keyURI(kid string) (string, error) {
	u, err := pkcs11.ParseURI(j.n.cfg.IssuingKey)
	if err != nil {
		return "", err
	}
	u.Object, u.ID = "sigil-jwt-"+kid, nil
	return u.String(), nil
}

// signer returns the key to sign with now, making and publishing one if
// this node has none that may still sign.
func (j *jwtKeys) signer(ctx context.Context) (*jwtKey, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.current != nil && time.Now().Before(j.current.signUntil) {
		return j.current, nil
	}
	if k := j.adopt(ctx); k != nil {
		j.current = k
		return k, nil
	}
	k, err := j.create(ctx)
	if err != nil {
		return nil, err
	}
	j.current = k
	return k, nil
}

// adopt picks up a key this node published before a restart.
func (j *jwtKeys) adopt(ctx context.Context) *jwtKey {
	var best *state.JWTKey
	for _, k := range j.n.fsm.Bundle().JWTKeys {
		if k.Node != j.n.cfg.NodeID || !time.Now().Before(k.NotAfter.Add(-maxJWTLife)) {
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
	uri, err := j.keyURI(best.KID)
	if err != nil {
		return nil
	}
	s, err := j.n.ks.Signer(ctx, uri)
	if err != nil {
		j.n.log.Warn("published JWT key not usable; making a new one", "kid", best.KID, "err", err)
		return nil
	}
	return &jwtKey{kid: best.KID, signer: s, signUntil: best.NotAfter.Add(-maxJWTLife)}
}

// create makes a key in the HSM and publishes it; only a committed key is
// returned.
func (j *jwtKeys) create(ctx context.Context) (*jwtKey, error) {
	b := make([]byte, 12)
	rand.Read(b)
	kid := j.n.cfg.NodeID + "-" + hex.EncodeToString(b)
	uri, err := j.keyURI(kid)
	if err != nil {
		return nil, err
	}
	pub, err := j.n.ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256})
	if err != nil {
		return nil, fmt.Errorf("create JWT key in the HSM: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	k := state.JWTKey{KID: kid, Node: j.n.cfg.NodeID, PublicKey: der, NotAfter: now.Add(j.rotate + maxJWTLife).UTC().Truncate(time.Second),
		CA: j.n.auth.Issuing().Raw} // a root CRL revoking this CA withdraws the key
	if _, err := j.n.apply(ctx, j.n.actor(), state.CmdJWTKeyAdd, &k); err != nil {
		return nil, fmt.Errorf("publish JWT key %s: %w", kid, err)
	}
	s, err := j.n.ks.Signer(ctx, uri)
	if err != nil {
		return nil, err
	}
	j.n.log.Info("JWT key published", "kid", kid, "signs_until", k.NotAfter.Add(-maxJWTLife), "published_until", k.NotAfter)
	return &jwtKey{kid: kid, signer: s, signUntil: k.NotAfter.Add(-maxJWTLife)}, nil
}

// Rotate makes and publishes a new key now and signs with it from then on.
func (j *jwtKeys) Rotate(ctx context.Context) (string, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	k, err := j.create(ctx)
	if err != nil {
		return "", err
	}
	j.current = k
	return k.kid, nil
}

// maintain rotates before the current key's signing window closes and
// retires this node's keys whose tokens have all expired.
func (j *jwtKeys) maintain(ctx context.Context) {
	tick := time.NewTicker(min(j.rotate/10, time.Minute))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if !j.n.raftReady() {
			continue
		}
		j.mu.Lock()
		due := j.current != nil && time.Until(j.current.signUntil) < j.rotate/10
		j.mu.Unlock()
		if due {
			if kid, err := j.Rotate(ctx); err != nil {
				j.n.log.Error("JWT key rotation failed", "err", err)
			} else {
				j.n.log.Info("JWT key rotated", "kid", kid)
			}
		}
		for _, k := range j.n.fsm.Bundle().JWTKeys {
			if k.Node == j.n.cfg.NodeID && time.Now().After(k.NotAfter) {
				if _, err := j.n.apply(ctx, j.n.actor(), state.CmdJWTKeyRemove, state.JWTKeyRemove{KID: k.KID}); err != nil {
					j.n.log.Warn("retiring JWT key failed", "kid", k.KID, "err", err)
				}
			}
		}
	}
}

// signJWT makes a JWT-SVID (JWS compact, ES256).
func signJWT(k *jwtKey, sub string, aud []string, iat, exp time.Time, jti string) (string, error) {
	hdr, _ := json.Marshal(map[string]string{"alg": "ES256", "kid": k.kid, "typ": "JWT"})
	claims, _ := json.Marshal(map[string]any{"sub": sub, "aud": aud, "iat": iat.Unix(), "exp": exp.Unix(), "jti": jti})
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString(hdr) + "." + enc.EncodeToString(claims)
	digest := sha256.Sum256([]byte(signing))
	der, err := k.signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return "", err
	}
	// JWS wants r||s, 32 bytes each, not ASN.1.
	var sig struct{ R, S *big.Int }
	if _, err := asn1.Unmarshal(der, &sig); err != nil {
		return "", err
	}
	if _, ok := k.signer.Public().(*ecdsa.PublicKey); !ok {
		return "", errors.New("JWT key is not ECDSA")
	}
	raw := make([]byte, 64)
	sig.R.FillBytes(raw[:32])
	sig.S.FillBytes(raw[32:])
	return signing + "." + enc.EncodeToString(raw), nil
}

// Bounds of a JWT-SVID request's audiences: they go into the token and its
// audit record.
const (
	maxAudiences        = 8
	maxAudienceBytes    = 256
	maxAudienceTotalLen = 2048
)

// validAudience checks the audiences against the bounds. Errors say which
// limit was hit and never echo the audiences themselves.
func validAudience(aud []string) error {
	if len(aud) == 0 {
		return errors.New("audience is required")
	}
	if len(aud) > maxAudiences {
		return fmt.Errorf("%d audiences: at most %d are allowed", len(aud), maxAudiences)
	}
	total := 0
	for _, a := range aud {
		total += len(a)
	}
	if total > maxAudienceTotalLen {
		return fmt.Errorf("audiences are %d bytes in total: at most %d are allowed", total, maxAudienceTotalLen)
	}
	for i, a := range aud {
		switch {
		case strings.TrimSpace(a) == "":
			return fmt.Errorf("audience %d is empty", i+1)
		case len(a) > maxAudienceBytes:
			return fmt.Errorf("audience %d is %d bytes: at most %d are allowed", i+1, len(a), maxAudienceBytes)
		case !utf8.ValidString(a):
			return fmt.Errorf("audience %d is not valid UTF-8", i+1)
		case strings.ContainsFunc(a, unicode.IsControl):
			return fmt.Errorf("audience %d contains control characters", i+1)
		}
	}
	return nil
}
