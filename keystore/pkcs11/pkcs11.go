// Package pkcs11 is the HSM backend of keystore: keys generated inside a
// PKCS#11 token (SoftHSM2 in tests, a network or PCIe HSM in production),
// addressed by RFC 7512 URIs, and used only through crypto.Signer.
//
// Private keys are created with CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE and
// not CKA_EXTRACTABLE, allowed to sign and nothing else, and checked after
// creation: a token that does not honour those attributes is refused.
package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/asn1"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/sigil-appliance/sigil/keystore"
)

// Options configure a KeyStore.
type Options struct {
	// SessionsPerToken bounds the session pool of each token (default 8).
	SessionsPerToken int
	// Logger receives login failures and session recoveries; never PINs.
	Logger *slog.Logger
	// PIN supplies the user PIN for tokens whose URI has no pin-source, for
	// callers that hold it only in memory (a PIN rebuilt from M-of-N shares
	// during a key ceremony). The returned slice is cleared after login.
	PIN func(ctx context.Context, token string) ([]byte, error)
	// ReadOnly opens read-only sessions (sigild --check-config looks at a
	// token a running node may be using): keys are found and used, never
	// created.
	ReadOnly bool
}

// KeyStore implements keystore.Manager over any number of tokens, opened on
// first use.
type KeyStore struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	tokens map[string]*token
	closed bool
}

var _ keystore.Manager = (*KeyStore)(nil)

// New returns a KeyStore. Tokens are opened (and logged in to) lazily.
func New(opts Options) *KeyStore {
	if opts.SessionsPerToken <= 0 {
		opts.SessionsPerToken = 8
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &KeyStore{opts: opts, log: log, tokens: map[string]*token{}}
}

// Close logs out of every token and releases the modules.
func (ks *KeyStore) Close() error {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	for k, t := range ks.tokens {
		t.close()
		delete(ks.tokens, k)
	}
	ks.closed = true
	return nil
}

func (ks *KeyStore) token(ctx context.Context, u *URI) (*token, error) {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	if ks.closed {
		return nil, fmt.Errorf("%w: key store closed", keystore.ErrUnavailable)
	}
	if t, ok := ks.tokens[u.tokenKey()]; ok {
		return t, nil
	}
	if u.PINSource == "" && ks.opts.PIN == nil {
		return nil, fmt.Errorf("%w: URI for token %q has no pin-source and the key store has no PIN provider", keystore.ErrPINSource, u.Token)
	}
	t, err := openToken(ctx, u, ks.opts, ks.log)
	if err != nil {
		return nil, err
	}
	ks.tokens[u.tokenKey()] = t
	return t, nil
}

func (ks *KeyStore) parse(ctx context.Context, raw string) (*URI, *token, error) {
	u, err := ParseURI(raw)
	if err != nil {
		return nil, nil, err
	}
	if err := u.requireObject(); err != nil {
		return nil, nil, err
	}
	t, err := ks.token(ctx, u)
	if err != nil {
		return nil, nil, err
	}
	return u, t, nil
}

// CreateKey generates a key pair in the token named by req.URI. The URI's
// object (label) is required; if it has no id, a random 16-byte CKA_ID is
// chosen. An existing object with the same label or id is never replaced.
func (ks *KeyStore) CreateKey(ctx context.Context, req keystore.CreateKeyRequest) (crypto.PublicKey, error) {
	u, err := ParseURI(req.URI)
	if err != nil {
		return nil, err
	}
	if u.Object == "" {
		return nil, fmt.Errorf("%w: creating a key needs an object (label) attribute", keystore.ErrInvalidURI)
	}
	if ks.opts.ReadOnly {
		return nil, fmt.Errorf("%w: key store opened read-only; cannot create %q", keystore.ErrUnavailable, u.Object)
	}
	pubT, privT, mech, err := keyTemplates(req.Algorithm)
	if err != nil {
		return nil, err
	}
	t, err := ks.token(ctx, u)
	if err != nil {
		return nil, err
	}
	id := u.ID
	if len(id) == 0 {
		id = make([]byte, 16)
		rand.Read(id)
	}
	common := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, u.Object),
		pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	}
	pubT = append(pubT, common...)
	privT = append(privT, common...)

	// Serialize creation per token so two creators cannot both pass the
	// existence check for the same label.
	t.createMu.Lock()
	defer t.createMu.Unlock()
	var pub crypto.PublicKey
	err = t.do(ctx, func(s pkcs11.SessionHandle) error {
		for _, attr := range []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, u.Object),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id),
		} {
			hs, err := findObjects(t.mod.ctx, s, []*pkcs11.Attribute{attr}, 1)
			if err != nil {
				return err
			}
			if len(hs) > 0 {
				what := "label " + u.Object
				if attr.Type == pkcs11.CKA_ID {
					what = fmt.Sprintf("id %x", id)
				}
				return fmt.Errorf("%w: token %q already holds an object with %s", keystore.ErrAlreadyExists, t.label, what)
			}
		}
		pubH, privH, err := t.mod.ctx.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
		if err != nil {
			return fmt.Errorf("generate %s key %q on token %q: %w", req.Algorithm, u.Object, t.label, err)
		}
		if err := checkPrivateAttrs(t.mod.ctx, s, privH); err != nil {
			// A key the token would not make as asked must not stay on it:
			// if destroying it fails too, the caller is told so.
			return errors.Join(fmt.Errorf("token %q: %w", t.label, err),
				wrapDestroy(t.label, u.Object, "private", t.mod.ctx.DestroyObject(s, privH)),
				wrapDestroy(t.label, u.Object, "public", t.mod.ctx.DestroyObject(s, pubH)))
		}
		pub, err = readPublic(t.mod.ctx, s, pubH)
		return err
	})
	if err != nil {
		return nil, err
	}
	ks.log.Info("pkcs11 key created", "token", t.label, "object", u.Object, "id", fmt.Sprintf("%x", id), "algorithm", req.Algorithm)
	return pub, nil
}

// PublicKey returns the public key of the key pair named by uri.
func (ks *KeyStore) PublicKey(ctx context.Context, uri string) (crypto.PublicKey, error) {
	u, t, err := ks.parse(ctx, uri)
	if err != nil {
		return nil, err
	}
	var pub crypto.PublicKey
	err = t.do(ctx, func(s pkcs11.SessionHandle) error {
		h, err := findKey(t, s, u, pkcs11.CKO_PUBLIC_KEY)
		if err != nil {
			return err
		}
		pub, err = readPublic(t.mod.ctx, s, h)
		return err
	})
	return pub, err
}

// Signer returns a crypto.Signer for the private key named by uri. The
// signer stays valid across token resets: it finds its key again and logs
// in again when the session was lost.
func (ks *KeyStore) Signer(ctx context.Context, uri string) (crypto.Signer, error) {
	u, t, err := ks.parse(ctx, uri)
	if err != nil {
		return nil, err
	}
	var pub crypto.PublicKey
	err = t.do(ctx, func(s pkcs11.SessionHandle) error {
		if _, err := findKey(t, s, u, pkcs11.CKO_PRIVATE_KEY); err != nil {
			return err
		}
		h, err := findKey(t, s, u, pkcs11.CKO_PUBLIC_KEY)
		if err != nil {
			return fmt.Errorf("private key has no public key object: %w", err)
		}
		pub, err = readPublic(t.mod.ctx, s, h)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &signer{tok: t, uri: u, pub: pub}, nil
}

func keyTemplates(alg keystore.Algorithm) (pub, priv []*pkcs11.Attribute, mech uint, err error) {
	priv = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		// SoftHSM (and others) default private keys to decrypt and unwrap
		// too; a CA key must do nothing but sign.
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	pub = []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
	}
	switch alg {
	case keystore.ECDSAP256, keystore.ECDSAP384:
		oid := oidP256
		if alg == keystore.ECDSAP384 {
			oid = oidP384
		}
		params, _ := asn1.Marshal(oid)
		pub = append(pub, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC), pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, params))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC))
		return pub, priv, pkcs11.CKM_EC_KEY_PAIR_GEN, nil
	case keystore.RSA3072, keystore.RSA2048:
		bits := 3072
		if alg == keystore.RSA2048 {
			bits = 2048
		}
		pub = append(pub,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, bits),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}))
		priv = append(priv, pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA))
		return pub, priv, pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil
	}
	return nil, nil, 0, fmt.Errorf("%w: %q (pkcs11 backend: %s, %s, %s, %s)", keystore.ErrUnsupportedAlgorithm, alg, keystore.ECDSAP256, keystore.ECDSAP384, keystore.RSA3072, keystore.RSA2048)
}

var (
	oidP256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384 = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
)

// checkPrivateAttrs reads back what the token actually made: a token that
// silently ignores CKA_SENSITIVE or CKA_EXTRACTABLE must not hold a CA key.
func checkPrivateAttrs(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle) error {
	want := map[uint]bool{
		pkcs11.CKA_TOKEN:             true,
		pkcs11.CKA_PRIVATE:           true,
		pkcs11.CKA_SENSITIVE:         true,
		pkcs11.CKA_ALWAYS_SENSITIVE:  true,
		pkcs11.CKA_EXTRACTABLE:       false,
		pkcs11.CKA_NEVER_EXTRACTABLE: true,
		pkcs11.CKA_LOCAL:             true,
		pkcs11.CKA_SIGN:              true,
		pkcs11.CKA_DECRYPT:           false,
		pkcs11.CKA_UNWRAP:            false,
		pkcs11.CKA_DERIVE:            false,
	}
	var tmpl []*pkcs11.Attribute
	for typ := range want {
		tmpl = append(tmpl, pkcs11.NewAttribute(typ, nil))
	}
	attrs, err := c.GetAttributeValue(s, h, tmpl)
	if err != nil {
		return fmt.Errorf("read attributes of new private key: %w", err)
	}
	for _, a := range attrs {
		got := len(a.Value) == 1 && a.Value[0] != 0
		if got != want[a.Type] {
			return fmt.Errorf("new private key has attribute 0x%x = %v, want %v; refusing the key", a.Type, got, want[a.Type])
		}
	}
	return nil
}

func findObjects(c *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	hs, _, err := c.FindObjects(s, max)
	if ferr := c.FindObjectsFinal(s); err == nil {
		err = ferr
	}
	return hs, err
}

func findKey(t *token, s pkcs11.SessionHandle, u *URI, class uint) (pkcs11.ObjectHandle, error) {
	tmpl := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}
	if u.Object != "" {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_LABEL, u.Object))
	}
	if len(u.ID) > 0 {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_ID, u.ID))
	}
	hs, err := findObjects(t.mod.ctx, s, tmpl, 2)
	if err != nil {
		return 0, err
	}
	kind := "private"
	if class == pkcs11.CKO_PUBLIC_KEY {
		kind = "public"
	}
	switch len(hs) {
	case 0:
		return 0, fmt.Errorf("%w: no %s key with object=%q id=%x on token %q", keystore.ErrNotFound, kind, u.Object, u.ID, t.label)
	case 1:
		return hs[0], nil
	}
	return 0, fmt.Errorf("%w: several %s keys match object=%q id=%x on token %q; name the id", keystore.ErrInvalidURI, kind, u.Object, u.ID, t.label)
}

func readPublic(c *pkcs11.Ctx, s pkcs11.SessionHandle, h pkcs11.ObjectHandle) (crypto.PublicKey, error) {
	attrs, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
	if err != nil {
		return nil, fmt.Errorf("read key type: %w", err)
	}
	kt := bytesToUint(attrs[0].Value)
	switch kt {
	case pkcs11.CKK_EC:
		attrs, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil),
			pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("read EC public key: %w", err)
		}
		var oid asn1.ObjectIdentifier
		if _, err := asn1.Unmarshal(attrs[0].Value, &oid); err != nil {
			return nil, fmt.Errorf("parse CKA_EC_PARAMS: %w", err)
		}
		var curve elliptic.Curve
		switch {
		case oid.Equal(oidP256):
			curve = elliptic.P256()
		case oid.Equal(oidP384):
			curve = elliptic.P384()
		default:
			return nil, fmt.Errorf("%w: EC curve %v", keystore.ErrUnsupportedAlgorithm, oid)
		}
		// CKA_EC_POINT is a DER OCTET STRING by the standard; some tokens
		// return the bare point.
		point := attrs[1].Value
		var inner []byte
		if rest, err := asn1.Unmarshal(point, &inner); err == nil && len(rest) == 0 {
			point = inner
		}
		return ecdsa.ParseUncompressedPublicKey(curve, point)
	case pkcs11.CKK_RSA:
		attrs, err := c.GetAttributeValue(s, h, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("read RSA public key: %w", err)
		}
		e := new(big.Int).SetBytes(attrs[1].Value)
		if !e.IsInt64() || e.Int64() > 1<<31 {
			return nil, fmt.Errorf("RSA public exponent out of range")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(attrs[0].Value), E: int(e.Int64())}, nil
	}
	return nil, fmt.Errorf("%w: PKCS#11 key type 0x%x", keystore.ErrUnsupportedAlgorithm, kt)
}

// bytesToUint decodes a CK_ULONG attribute (native byte order, little endian
// on every platform we ship).
func bytesToUint(b []byte) uint {
	var v uint
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint(b[i])
	}
	return v
}

// wrapDestroy says which half of a generated key pair could not be
// destroyed, or is nil.
func wrapDestroy(label, object, half string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("token %q: the %s key of %q could not be removed: %w", label, half, object, err)
}
