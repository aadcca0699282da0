package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"time"
	"unicode/utf8"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The leaf encoder below writes the one certificate shape this authority
// issues (an end-entity SVID) and signs it with the HSM key without
// verifying every signature, as x509.CreateCertificate does: in profiles
// of the issuance benchmarks that verification was 30% of all CPU, more
// than the HSM signature itself. Verifying catches a signer that returns
// wrong signatures (a faulty HSM, a key handle that changed under the
// node, a fault injected to attack the key). What stands in for it: New
// proves the HSM key against the issuing certificate before anything is
// signed; one signature in verifyEvery is verified, and after a wrong one
// every signature is, until the node restarts; the HSM's own fault
// protections are relied on for the rest (see SECURITY.md). RSA issuing
// keys keep x509.CreateCertificate and its check on every signature.
// TestLeafMatchesCreateCertificate shows the bytes are what
// x509.CreateCertificate makes of the same template.

// leafTemplate is everything in an SVID's to-be-signed part.
type leafTemplate struct {
	serial              *big.Int
	notBefore, notAfter time.Time
	subject             []byte // DER Name
	publicKey           crypto.PublicKey
	keyUsage            x509.KeyUsage
	uris                []*url.URL
	dnsNames            []string
	ipAddresses         []net.IP
}

var (
	oidExtKeyUsage     = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtExtKeyUsage  = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidExtBasic        = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtAuthKeyID    = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidExtSAN          = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidServerAuth      = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 1}
	oidClientAuth      = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 2}
	oidECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidECDSAWithSHA384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}
	oidECDSAWithSHA512 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 4}
)

// ecdsaAlgorithm is the signature algorithm x509 uses for an ECDSA key:
// the hash that matches the curve.
func ecdsaAlgorithm(pub *ecdsa.PublicKey) (asn1.ObjectIdentifier, crypto.Hash, error) {
	switch pub.Curve {
	case elliptic.P256():
		return oidECDSAWithSHA256, crypto.SHA256, nil
	case elliptic.P384():
		return oidECDSAWithSHA384, crypto.SHA384, nil
	case elliptic.P521():
		return oidECDSAWithSHA512, crypto.SHA512, nil
	}
	return nil, 0, fmt.Errorf("issuing key curve %s is not supported", pub.Curve.Params().Name)
}

// verifyEvery: one leaf signature in this many is verified (see above).
const verifyEvery = 64

// errBadSignature marks a signature the HSM returned that does not verify.
var errBadSignature = errors.New("the HSM returned a signature that does not verify with the issuing CA's key")

// signLeaf encodes t as issued by issuer and signs it with signer, whose
// public key is issuer's ECDSA key; verify checks the signature before the
// certificate is made.
func signLeaf(t *leafTemplate, issuer *x509.Certificate, signer crypto.Signer, verify bool) ([]byte, error) {
	pub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok {
		return nil, errors.New("the fast leaf encoder signs with ECDSA keys only")
	}
	alg, hash, err := ecdsaAlgorithm(pub)
	if err != nil {
		return nil, err
	}
	tbs, err := leafTBS(t, issuer, alg)
	if err != nil {
		return nil, err
	}
	h := hash.New()
	h.Write(tbs)
	digest := h.Sum(nil)
	sig, err := signer.Sign(rand.Reader, digest, hash)
	if err != nil {
		return nil, err
	}
	if verify {
		ipub, ok := issuer.PublicKey.(*ecdsa.PublicKey)
		if !ok || !ecdsa.VerifyASN1(ipub, digest, sig) {
			return nil, errBadSignature
		}
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		addAlgorithm(b, alg)
		b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) {
			b.AddUint8(0)
			b.AddBytes(sig)
		})
	})
	return b.Bytes()
}

func addAlgorithm(b *cryptobyte.Builder, alg asn1.ObjectIdentifier) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddASN1ObjectIdentifier(alg) })
}

// leafTBS is the DER TBSCertificate, laid out as x509.CreateCertificate
// lays out the same template: extensions key usage, extended key usage,
// basic constraints, authority key ID, subject alternative names (critical
// when the subject is empty; DNS names, IP addresses, URIs), in that
// order.
func leafTBS(t *leafTemplate, issuer *x509.Certificate, alg asn1.ObjectIdentifier) ([]byte, error) {
	spki, err := x509.MarshalPKIXPublicKey(t.publicKey)
	if err != nil {
		return nil, err
	}
	ku, err := keyUsageBits(t.keyUsage)
	if err != nil {
		return nil, err
	}
	for _, d := range t.dnsNames {
		if !ia5(d) {
			// x509 refuses these before signing; so must we, or an HSM
			// signature is spent on a certificate nothing can parse.
			return nil, fmt.Errorf("DNS name %q is not ASCII", d)
		}
	}
	ips := make([][]byte, len(t.ipAddresses))
	for i, ip := range t.ipAddresses {
		// As x509's marshalSANs: IPv4 in 4 bytes, IPv6 in 16; anything
		// else x509 would write as given, which nothing parses back.
		if ips[i] = ip.To4(); ips[i] == nil {
			if ips[i] = ip.To16(); ips[i] == nil {
				return nil, fmt.Errorf("IP address %v is neither IPv4 nor IPv6", []byte(ip))
			}
		}
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) { b.AddASN1Int64(2) })
		b.AddASN1BigInt(t.serial)
		addAlgorithm(b, alg)
		b.AddBytes(issuer.RawSubject)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, t.notBefore)
			addTime(b, t.notAfter)
		})
		b.AddBytes(t.subject)
		b.AddBytes(spki)
		b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				addExtension(b, oidExtKeyUsage, true, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) { b.AddBytes(ku) })
				})
				addExtension(b, oidExtExtKeyUsage, false, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
						b.AddASN1ObjectIdentifier(oidServerAuth)
						b.AddASN1ObjectIdentifier(oidClientAuth)
					})
				})
				addExtension(b, oidExtBasic, true, func(b *cryptobyte.Builder) {
					b.AddASN1(cbasn1.SEQUENCE, func(*cryptobyte.Builder) {})
				})
				// As x509 does: no authority key ID on a certificate
				// whose subject is its issuer's.
				if len(issuer.SubjectKeyId) > 0 && !bytes.Equal(issuer.RawSubject, t.subject) {
					addExtension(b, oidExtAuthKeyID, false, func(b *cryptobyte.Builder) {
						b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
							b.AddASN1(cbasn1.Tag(0).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(issuer.SubjectKeyId) })
						})
					})
				}
				if len(t.dnsNames) > 0 || len(ips) > 0 || len(t.uris) > 0 {
					emptySubject := len(t.subject) == 2 // SEQUENCE {}
					addExtension(b, oidExtSAN, emptySubject, func(b *cryptobyte.Builder) {
						b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
							for _, d := range t.dnsNames {
								b.AddASN1(cbasn1.Tag(2).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes([]byte(d)) })
							}
							for _, ip := range ips {
								b.AddASN1(cbasn1.Tag(7).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(ip) })
							}
							for _, u := range t.uris {
								b.AddASN1(cbasn1.Tag(6).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes([]byte(u.String())) })
							}
						})
					})
				}
			})
		})
	})
	return b.Bytes()
}

func addExtension(b *cryptobyte.Builder, oid asn1.ObjectIdentifier, critical bool, value func(*cryptobyte.Builder)) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oid)
		if critical {
			b.AddASN1Boolean(true)
		}
		b.AddASN1(cbasn1.OCTET_STRING, value)
	})
}

// ia5 reports whether s is an IA5String (ASCII), as a dNSName must be.
func ia5(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// addTime writes t as x509 does: UTCTime for 1950-2049, else
// GeneralizedTime.
func addTime(b *cryptobyte.Builder, t time.Time) {
	t = t.UTC()
	if y := t.Year(); y >= 1950 && y < 2050 {
		b.AddASN1UTCTime(t)
		return
	}
	b.AddASN1GeneralizedTime(t)
}

// keyUsageBits is the content of the key usage BIT STRING (unused-bits
// count first), as short as the highest bit set allows, as x509 writes it.
func keyUsageBits(ku x509.KeyUsage) ([]byte, error) {
	if ku <= 0 || ku >= 1<<9 {
		return nil, fmt.Errorf("key usage %d is not a leaf's", ku)
	}
	// Bit i of KeyUsage is bit i of the BIT STRING, counted from the most
	// significant bit of the first byte.
	var bits [2]byte
	n := 0
	for i := 0; i < 9; i++ {
		if ku&(1<<i) != 0 {
			bits[i/8] |= 0x80 >> (i % 8)
			n = i + 1
		}
	}
	nbytes := (n + 7) / 8
	return append([]byte{byte(nbytes*8 - n)}, bits[:nbytes]...), nil
}
