package jobrule

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/go-jose/go-jose/v4"
)

// KeySource finds an issuer's public key by its kid. A source that can
// refresh (Discovery) refreshes once, within its own limits, on a miss.
// A kid it does not know, even after that, is ErrUnknownKey; any other
// error means the keys could not be had at all.
type KeySource interface {
	Key(ctx context.Context, kid string) (crypto.PublicKey, error)
}

// ErrUnknownKey is a KeySource's answer for a kid the issuer's key set
// does not hold.
var ErrUnknownKey = errors.New("no key with this kid in the issuer's key set")

// MinRSABits is the smallest RSA key Verify accepts.
const MinRSABits = 2048

// StaticKeys is a key set fixed in the rule, for appliances that cannot
// reach the issuer.
type StaticKeys struct {
	keys map[string]crypto.PublicKey
}

// NewStaticKeys parses a JWKS held in a rule: at most MaxJWKSKeys keys,
// each with a kid, RSA of MinRSABits or more or EC P-256, public only.
func NewStaticKeys(jwks []byte) (*StaticKeys, error) {
	keys, err := parseKeySet(jwks, true)
	if err != nil {
		return nil, fmt.Errorf("jwks: %w", err)
	}
	return &StaticKeys{keys: keys}, nil
}

// Key returns the key kid names, or ErrUnknownKey.
func (s *StaticKeys) Key(_ context.Context, kid string) (crypto.PublicKey, error) {
	if k, ok := s.keys[kid]; ok {
		return k, nil
	}
	return nil, ErrUnknownKey
}

// parseKeySet parses a JWKS key by key, so that a bad key is reported by
// its position and kid rather than as the whole set's JSON error. A
// strict parse (a rule's own set) refuses any key it cannot use; a
// lenient one (an issuer's published set, which may also hold encryption
// or other keys) skips them. A set with a private key is refused either
// way: whoever published it has leaked the issuer's key, and a token
// signed with it proves nothing.
func parseKeySet(data []byte, strict bool) (map[string]crypto.PublicKey, error) {
	var raw struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("not a JSON key set: %v", err)
	}
	if len(raw.Keys) == 0 {
		return nil, errors.New(`no keys (want {"keys": [...]})`)
	}
	if len(raw.Keys) > MaxJWKSKeys {
		return nil, fmt.Errorf("%d keys, at most %d", len(raw.Keys), MaxJWKSKeys)
	}
	keys := make(map[string]crypto.PublicKey, len(raw.Keys))
	for i, rk := range raw.Keys {
		var priv struct {
			D string `json:"d"`
			K string `json:"k"`
		}
		if json.Unmarshal(rk, &priv) == nil && (priv.D != "" || priv.K != "") {
			return nil, fmt.Errorf("key %d is a private or secret key: a JWKS must hold public keys only", i)
		}
		k, err := parseKey(i, rk)
		if err != nil {
			if strict {
				return nil, err
			}
			continue
		}
		if _, dup := keys[k.KeyID]; dup {
			// Even leniently: which of the two a kid means is not ours to guess.
			return nil, fmt.Errorf("key %d (kid %q): kid appears twice", i, clip(k.KeyID, 64))
		}
		keys[k.KeyID] = k.Key
	}
	if len(keys) == 0 {
		return nil, errors.New("no RSA or EC P-256 signing key with a kid")
	}
	return keys, nil
}

func parseKey(i int, rk json.RawMessage) (*jose.JSONWebKey, error) {
	var k jose.JSONWebKey
	if err := k.UnmarshalJSON(rk); err != nil {
		return nil, fmt.Errorf("key %d: %v", i, err)
	}
	where := fmt.Sprintf("key %d", i)
	if k.KeyID == "" {
		return nil, fmt.Errorf("%s has no kid", where)
	}
	where = fmt.Sprintf("key %d (kid %q)", i, clip(k.KeyID, 64))
	if !k.IsPublic() {
		return nil, fmt.Errorf("%s is not a public key: a JWKS must hold public keys only", where)
	}
	if k.Use != "" && k.Use != "sig" {
		return nil, fmt.Errorf("%s is for %q, not signatures", where, clip(k.Use, 32))
	}
	if err := checkKey(k.Key); err != nil {
		return nil, fmt.Errorf("%s: %v", where, err)
	}
	// A key that names its algorithm is for that one only; the key's
	// type already says which Verify will use it with.
	if want := algFor(k.Key); k.Algorithm != "" && k.Algorithm != want {
		return nil, fmt.Errorf("%s is for alg %q, not %s", where, clip(k.Algorithm, 32), want)
	}
	return &k, nil
}

func algFor(k crypto.PublicKey) string {
	if _, ok := k.(*rsa.PublicKey); ok {
		return string(jose.RS256)
	}
	return string(jose.ES256)
}

func checkKey(k crypto.PublicKey) error {
	switch k := k.(type) {
	case *rsa.PublicKey:
		if k.N.BitLen() < MinRSABits {
			return fmt.Errorf("RSA key of %d bits, at least %d", k.N.BitLen(), MinRSABits)
		}
		return nil
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() {
			return fmt.Errorf("EC key on %s, only P-256", k.Curve.Params().Name)
		}
		return nil
	}
	return fmt.Errorf("%T is not an RSA or EC P-256 key", k)
}
