package ctl

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/clirun"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// An admin key may live in a PKCS#11 token (an HSM, a smart card, a USB
// key): --key and admin issue --key-out then take an RFC 7512 URI, and the
// key signs inside the token. Its PIN comes from the URI's pin-source, a
// file or an environment variable, never from the command line.

func isTokenURI(s string) bool { return strings.HasPrefix(s, "pkcs11:") }

// checkTokenURI refuses a key URI that could not be used, before anything
// is created: malformed, naming no key object, or with no pin-source.
func checkTokenURI(flag, raw string) error {
	u, err := pkcs11.ParseURI(raw)
	if err != nil {
		return clirun.Usagef("--%s: %w", flag, err)
	}
	if u.Object == "" && len(u.ID) == 0 {
		return clirun.Usagef("--%s: the URI names no key: add object=NAME (or id=)", flag)
	}
	if u.PINSource == "" {
		return clirun.Usagef("--%s: the URI has no pin-source: give the token's PIN in a file (pin-source=file:/path, mode 0600) "+
			"or an environment variable (pin-source=env:NAME); sigilctl never takes a PIN on the command line", flag)
	}
	return nil
}

// dialConfig is g.dial with a token-held --key opened. The returned func
// releases the token.
func (g *globals) dialConfig(ctx context.Context) (api.DialConfig, func(), error) {
	d := g.dial
	if d.Socket != "" || !isTokenURI(d.KeyFile) {
		return d, func() {}, nil
	}
	if err := checkTokenURI("key", d.KeyFile); err != nil {
		return d, nil, err
	}
	if d.CertFile == "" {
		return d, nil, clirun.Usagef("--key is a token key: --cert must name its certificate chain")
	}
	certs, err := api.ReadCerts(d.CertFile)
	if err != nil {
		return d, nil, fmt.Errorf("--cert: %w", err)
	}
	ks := pkcs11.New(pkcs11.Options{})
	signer, err := ks.Signer(ctx, d.KeyFile)
	// ks.Close only releases the token (its session, the PKCS#11 library):
	// on a path that already fails, and after the command has used the key,
	// its error changes nothing.
	if err != nil {
		_ = ks.Close()
		return d, nil, fmt.Errorf("--key: %w", err)
	}
	if !samePublicKey(certs[0].PublicKey, signer.Public()) {
		_ = ks.Close()
		return d, nil, fmt.Errorf("--cert %s is not the certificate of the --key token key", d.CertFile)
	}
	cert := &tls.Certificate{PrivateKey: signer, Leaf: certs[0]}
	for _, c := range certs {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	d.KeyFile, d.CertFile = "", ""
	d.Certificate = func() (*tls.Certificate, error) { return cert, nil }
	return d, func() { _ = ks.Close() }, nil
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// adminKey is the key admin issue certifies: new, in a file or a token.
type adminKey struct {
	signer crypto.Signer
	// pkcs8 is the key to write to the key file (nil for a token key).
	pkcs8 []byte
	close func()
}

// newAdminKey makes an ECDSA P-256 key: in the token when keyOut is a
// pkcs11: URI (refusing an existing object), otherwise here in memory.
func newAdminKey(ctx context.Context, keyOut string) (*adminKey, error) {
	if !isTokenURI(keyOut) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		kd, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		return &adminKey{signer: key, pkcs8: kd, close: func() {}}, nil
	}
	ks := pkcs11.New(pkcs11.Options{})
	// ks.Close only releases the token, as in dialConfig: the key is a
	// token object once CreateKey returned.
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: keyOut, Algorithm: keystore.ECDSAP256}); err != nil {
		_ = ks.Close()
		if errors.Is(err, keystore.ErrAlreadyExists) {
			return nil, fmt.Errorf("--key-out: %w: admin issue makes a new key; name a new object", err)
		}
		return nil, fmt.Errorf("--key-out: %w", err)
	}
	signer, err := ks.Signer(ctx, keyOut)
	if err != nil {
		_ = ks.Close()
		return nil, fmt.Errorf("--key-out: %w", err)
	}
	return &adminKey{signer: signer, close: func() { _ = ks.Close() }}, nil
}
