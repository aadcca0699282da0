package ceremony

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// issuingOU marks node issuing CA certificates and CSRs.
const issuingOU = "Sigil issuing CA"

// clockSkew backdates NotBefore so that nodes with slightly slow clocks
// accept a certificate the moment it is made.
const clockSkew = 5 * time.Minute

func serialNumber() (*big.Int, error) {
	// 128 random bits, positive (RFC 5280 allows up to 20 octets).
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// serialText writes a serial number as `openssl x509 -noout -text` does
// for the ceremony's 128-bit serials: its bytes in lower-case hex, colon
// separated, so witnesses compare them character for character (openssl
// prints serials of 8 bytes or fewer in decimal; the ceremony's are longer
// but for a 2^-63 chance).
func serialText(n *big.Int) string {
	if n == nil {
		return "none"
	}
	b := new(big.Int).Abs(n).Bytes()
	if len(b) == 0 {
		b = []byte{0}
	}
	parts := make([]string, len(b))
	for i, c := range b {
		parts[i] = hex.EncodeToString([]byte{c})
	}
	s := strings.Join(parts, ":")
	if n.Sign() < 0 {
		s = "(Negative)" + s
	}
	return s
}

func tdURL(td spiffeid.TrustDomain) *url.URL { return td.ID().URL() }

// rootTemplate builds the self-signed trust anchor: CA, path length 1 (root
// → issuing CA → leaf), certSign and cRLSign only, the trust domain's
// SPIFFE ID (signing certificates carry no path), and optionally a URI
// name constraint to the trust domain.
func rootTemplate(td spiffeid.TrustDomain, r *RootConfig, now time.Time) (*x509.Certificate, error) {
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	t := &x509.Certificate{
		SerialNumber:          sn,
		Subject:               subject(r.Subject),
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(r.Validity.Duration),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLen:            1,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{tdURL(td)},
	}
	if r.NameConstraint == nil || *r.NameConstraint {
		t.PermittedURIDomains = []string{td.Name()}
		t.PermittedDNSDomainsCritical = true
	}
	return t, nil
}

// issuingTemplate builds a node's intermediate from its CSR: CA, path
// length 0 (it signs leaves only), valid inside the root's lifetime,
// constrained to the trust domain.
func issuingTemplate(td spiffeid.TrustDomain, root *x509.Certificate, csr *x509.CertificateRequest, nodeID string, validity time.Duration, now time.Time) (*x509.Certificate, error) {
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	subj := pkix.Name{CommonName: nodeID, OrganizationalUnit: []string{issuingOU}, Organization: root.Subject.Organization}
	notBefore := now.Add(-clockSkew)
	if notBefore.Before(root.NotBefore) {
		notBefore = root.NotBefore
	}
	return &x509.Certificate{
		SerialNumber:                sn,
		Subject:                     subj,
		NotBefore:                   notBefore,
		NotAfter:                    now.Add(validity),
		IsCA:                        true,
		BasicConstraintsValid:       true,
		MaxPathLen:                  0,
		MaxPathLenZero:              true,
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                        []*url.URL{tdURL(td)},
		PermittedURIDomains:         []string{td.Name()},
		PermittedDNSDomainsCritical: true,
		PublicKey:                   csr.PublicKey,
	}, nil
}

// crlTemplate builds the CRL revoking certs: this update backdated like
// certificates, the next update validity ahead, each entry revoked now for
// cessationOfOperation (a retired node, not a compromised key).
func crlTemplate(c *CRLConfig, certs []*x509.Certificate, now time.Time) *x509.RevocationList {
	t := &x509.RevocationList{
		Number:     big.NewInt(c.Number),
		ThisUpdate: now.Add(-clockSkew),
		NextUpdate: now.Add(c.Validity.Duration),
	}
	for _, cert := range certs {
		t.RevokedCertificateEntries = append(t.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber: cert.SerialNumber, RevocationTime: now, ReasonCode: crlReasonCessation,
		})
	}
	return t
}

// crlReasonCessation is RFC 5280's cessationOfOperation.
const crlReasonCessation = 5

// outputMode is the mode outputs are created with: share files are secret
// to their officer; certificates, CSRs and CRLs are public.
func outputMode(kind string) os.FileMode {
	if kind == KindPINSplit {
		return 0o600
	}
	return 0o644
}

// checkCA is run on the template before the HSM signs and again on the
// parsed result after: a CA certificate that is not exactly what the trust
// model says is never signed, and never written.
func checkCA(c *x509.Certificate, parent *x509.Certificate, td spiffeid.TrustDomain, pathLen int) error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if !c.IsCA || !c.BasicConstraintsValid {
		bad("not marked as a CA (basicConstraints cA)")
	}
	if c.MaxPathLen != pathLen || (pathLen == 0 && !c.MaxPathLenZero) {
		bad("path length %d, want %d", c.MaxPathLen, pathLen)
	}
	if c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		bad("key usage %b, want certSign and cRLSign only (SPIFFE signing certificates do not set digitalSignature)", c.KeyUsage)
	}
	if len(c.ExtKeyUsage) != 0 || len(c.UnknownExtKeyUsage) != 0 {
		bad("has extended key usages; a signing certificate must not restrict its leaves by EKU")
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != td.IDString() {
		bad("URI SANs %v, want exactly %s", c.URIs, td.IDString())
	}
	if len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses) != 0 {
		bad("has DNS, IP or email SANs")
	}
	if len(c.PermittedURIDomains) > 0 && !slices.Equal(c.PermittedURIDomains, []string{td.Name()}) {
		bad("URI name constraint %v, want [%s]", c.PermittedURIDomains, td.Name())
	}
	if !c.NotAfter.After(c.NotBefore) {
		bad("validity ends (%s) before it starts (%s)", c.NotAfter, c.NotBefore)
	}
	if parent != nil {
		if c.NotBefore.Before(parent.NotBefore) || c.NotAfter.After(parent.NotAfter) {
			bad("validity %s..%s is not inside the issuer's %s..%s", c.NotBefore.Format(time.RFC3339), c.NotAfter.Format(time.RFC3339),
				parent.NotBefore.Format(time.RFC3339), parent.NotAfter.Format(time.RFC3339))
		}
		if len(c.PermittedURIDomains) == 0 {
			bad("an issuing CA must carry the trust domain's URI name constraint")
		}
	}
	if c.SerialNumber == nil || c.SerialNumber.Sign() <= 0 {
		bad("serial number must be positive")
	}
	return errors.Join(errs...)
}

// checkCSR accepts only what sigil-ceremony issuing-csr produces for this
// trust domain and node: a valid self-signature, a strong key, the node ID
// as common name, and the trust domain as the only SAN.
func checkCSR(csr *x509.CertificateRequest, td spiffeid.TrustDomain, nodeID string) error {
	if err := csr.CheckSignature(); err != nil {
		return fmt.Errorf("CSR signature does not verify: %v", err)
	}
	if err := checkKeyStrength(csr.PublicKey); err != nil {
		return fmt.Errorf("CSR key: %v", err)
	}
	if csr.Subject.CommonName != nodeID || !slices.Equal(csr.Subject.OrganizationalUnit, []string{issuingOU}) {
		return fmt.Errorf("CSR is for %q, not node %q (subject %s)", csr.Subject.CommonName, nodeID, csr.Subject)
	}
	if len(csr.URIs) != 1 || !td.IsZero() && csr.URIs[0].String() != td.IDString() {
		return fmt.Errorf("CSR URI SANs %v, want exactly %s", csr.URIs, td.IDString())
	}
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
		return errors.New("CSR asks for DNS, IP or email SANs")
	}
	return nil
}

func checkKeyStrength(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("curve %s, want P-256 or P-384", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 3072 {
			return fmt.Errorf("RSA-%d is weaker than RSA-3072", k.N.BitLen())
		}
	default:
		return fmt.Errorf("key type %T is not accepted", pub)
	}
	return nil
}

func subject(s Subject) pkix.Name {
	n := pkix.Name{CommonName: s.CommonName}
	if s.Organization != "" {
		n.Organization = []string{s.Organization}
	}
	if s.Country != "" {
		n.Country = []string{s.Country}
	}
	return n
}

// fingerprint is the SHA-256 of DER, as witnesses compare it with openssl.
func fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// spkiFingerprint is the SHA-256 of the SubjectPublicKeyInfo: the key's
// identity, stable across re-issued certificates.
func spkiFingerprint(pub crypto.PublicKey) string {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "unknown"
	}
	return fingerprint(der)
}

func samePublicKey(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
