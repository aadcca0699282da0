package state

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"
)

// TestJWTKeyTypes: the bundle admits the JWT keys nodes make (ECDSA P-256,
// P-384 and, for jwt.key-type rsa-2048, RSA) and refuses every other key
// type, naming what is wrong.
func TestJWTKeyTypes(t *testing.T) {
	p := newCRLPKI(t)
	a := newApplier(t)
	a.must(CmdBundleSetRoots, BundleRoots{Roots: [][]byte{p.root.Raw}})
	gen := func(f func() (crypto.Signer, error)) crypto.PublicKey {
		k, err := f()
		if err != nil {
			t.Fatal(err)
		}
		return k.Public()
	}
	rsaKey := func(bits int) crypto.PublicKey {
		return gen(func() (crypto.Signer, error) { return rsa.GenerateKey(rand.Reader, bits) })
	}
	ecKey := func(c elliptic.Curve) crypto.PublicKey {
		return gen(func() (crypto.Signer, error) { return ecdsa.GenerateKey(c, rand.Reader) })
	}
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	rsa3 := *rsaKey(2048).(*rsa.PublicKey)
	rsa3.E = 3
	for i, tc := range []struct {
		name string
		pub  crypto.PublicKey
		want string // "" admitted
	}{
		{"ECDSA P-256", ecKey(elliptic.P256()), ""},
		{"ECDSA P-384", ecKey(elliptic.P384()), ""},
		{"RSA-2048", rsaKey(2048), ""},
		{"RSA-1024", rsaKey(1024), "RSA key of 1024 bits: want 2048 to 4096"},
		{"RSA exponent 3", &rsa3, "RSA public exponent 3: want 65537"},
		{"ECDSA P-521", ecKey(elliptic.P521()), "ECDSA curve P-521: want P-256 or P-384"},
		{"Ed25519", edPub, "unsupported key type ed25519.PublicKey"},
	} {
		der, err := x509.MarshalPKIXPublicKey(tc.pub)
		if err != nil {
			t.Fatal(err)
		}
		k := &JWTKey{KID: "node-1-type000" + string(rune('a'+i)), Node: "node-1", PublicKey: der,
			NotAfter: t0.Add(48 * time.Hour), CA: p.nodes["node-1"].Raw}
		_, err = a.apply(CmdJWTKeyAdd, t0, k)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v, want it admitted", tc.name, err)
		case tc.want != "" && (!errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want a refusal saying %q", tc.name, err, tc.want)
		}
	}
}
