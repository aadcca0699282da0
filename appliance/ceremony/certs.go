package ceremony

import (
	"bytes"
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
// → issuing CA → leaf; 2 when root.path-length says so, leaving room for
// a cross certificate to a successor root), certSign and cRLSign only, the
// trust domain's SPIFFE ID (signing certificates carry no path), and
// optionally a URI name constraint to the trust domain.
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
		MaxPathLen:            rootPathLen(r),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{tdURL(td)},
	}
	if r.NameConstraint == nil || *r.NameConstraint {
		t.PermittedURIDomains = []string{td.Name()}
		t.PermittedDNSDomainsCritical = true
	}
	return t, nil
}

// rootPathLen is the root's path length: root.path-length, default 1.
func rootPathLen(r *RootConfig) int {
	if r.PathLength != nil {
		return *r.PathLength
	}
	return 1
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

// rootProblems says what keeps cert from being a root of td as kind root
// makes them, valid at now: self-signed, a CA of path length 1 or 2,
// certSign and cRLSign only, no EKU, the trust domain's SPIFFE ID as its
// only SAN, no name constraint but the trust domain's URI one, a strong
// key. The cross-sign ceremony refuses both its inputs on any of these.
func rootProblems(cert *x509.Certificate, td spiffeid.TrustDomain, now time.Time) []string {
	var out []string
	bad := func(format string, a ...any) { out = append(out, fmt.Sprintf(format, a...)) }
	if !bytes.Equal(cert.RawSubject, cert.RawIssuer) {
		bad("is not self-signed: it was issued by %s to %s, so it is not a root", cert.Issuer, cert.Subject)
	} else if err := cert.CheckSignatureFrom(cert); err != nil {
		bad("is not self-signed: its signature does not verify under its own key (%v)", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		bad("is not a CA certificate (basicConstraints cA)")
	} else if cert.MaxPathLen != 1 && cert.MaxPathLen != 2 {
		bad("has path length %d; a Sigil root has 1 or 2 (root.path-length)", cert.MaxPathLen)
	}
	if cert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		bad("has key usage %b, want certSign and cRLSign only", cert.KeyUsage)
	}
	if len(cert.ExtKeyUsage)+len(cert.UnknownExtKeyUsage) != 0 {
		bad("has extended key usages; a root does not restrict its chains by EKU")
	}
	var uris []string
	for _, u := range cert.URIs {
		uris = append(uris, u.String())
	}
	if !td.IsZero() && !slices.Equal(uris, []string{td.IDString()}) {
		bad("is for %v, not trust domain %s (want the URI SAN %s only)", uris, td.Name(), td.IDString())
	}
	if len(cert.DNSNames)+len(cert.IPAddresses)+len(cert.EmailAddresses) != 0 {
		bad("has DNS, IP or email SANs")
	}
	if len(cert.PermittedURIDomains) > 0 && !td.IsZero() && !slices.Equal(cert.PermittedURIDomains, []string{td.Name()}) {
		bad("has URI name constraint %v, want [%s]", cert.PermittedURIDomains, td.Name())
	}
	if len(cert.ExcludedURIDomains)+len(cert.PermittedDNSDomains)+len(cert.ExcludedDNSDomains)+len(cert.PermittedIPRanges)+
		len(cert.ExcludedIPRanges)+len(cert.PermittedEmailAddresses)+len(cert.ExcludedEmailAddresses) != 0 {
		bad("has name constraints other than the trust domain's URI one")
	}
	if err := checkKeyStrength(cert.PublicKey); err != nil {
		bad("key: %v", err)
	}
	switch {
	case now.After(cert.NotAfter):
		bad("expired on %s", cert.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(cert.NotBefore):
		bad("is not valid before %s", cert.NotBefore.UTC().Format(time.RFC3339))
	}
	return out
}

// crossTemplate builds the old root's certificate for the new root: the new
// root's subject (byte for byte, so certificates issued by the new root
// chain to it by name), public key, key identifier, SPIFFE ID and name
// constraints; CA of path length 1 (issuing CAs, then SVIDs, below it,
// whatever the new root allows); not before the later of start - skew and
// either root's not before; validity after that (Validate refused a
// validity outliving either root).
func crossTemplate(oldRoot, newRoot *x509.Certificate, validity time.Duration, now time.Time) (*x509.Certificate, error) {
	sn, err := serialNumber()
	if err != nil {
		return nil, err
	}
	notBefore := now.Add(-clockSkew)
	for _, r := range []*x509.Certificate{oldRoot, newRoot} {
		if notBefore.Before(r.NotBefore) {
			notBefore = r.NotBefore
		}
	}
	return &x509.Certificate{
		SerialNumber:                sn,
		RawSubject:                  newRoot.RawSubject,
		Subject:                     newRoot.Subject,
		NotBefore:                   notBefore,
		NotAfter:                    now.Add(validity),
		IsCA:                        true,
		BasicConstraintsValid:       true,
		MaxPathLen:                  1,
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                        newRoot.URIs,
		SubjectKeyId:                newRoot.SubjectKeyId,
		PermittedURIDomains:         newRoot.PermittedURIDomains,
		PermittedDNSDomainsCritical: newRoot.PermittedDNSDomainsCritical,
		PublicKey:                   newRoot.PublicKey,
	}, nil
}

// checkCross is run on the cross certificate's template before the HSM
// signs and on the parsed result after (signed: issuer, signature and
// authority key ID are checked too): exactly the new root's name, key,
// key ID and constraints, a CA of path length 1, inside both roots'
// validity.
func checkCross(c, oldRoot, newRoot *x509.Certificate, td spiffeid.TrustDomain, signed bool) error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if err := checkCA(c, nil, td, 1); err != nil {
		errs = append(errs, err)
	}
	if !bytes.Equal(c.RawSubject, newRoot.RawSubject) {
		bad("subject is not the new root's, byte for byte")
	}
	if !samePublicKey(c.PublicKey, newRoot.PublicKey) {
		bad("public key is not the new root's")
	}
	if !bytes.Equal(c.SubjectKeyId, newRoot.SubjectKeyId) {
		bad("subject key ID %x is not the new root's %x", c.SubjectKeyId, newRoot.SubjectKeyId)
	}
	if !slices.Equal(c.PermittedURIDomains, newRoot.PermittedURIDomains) || c.PermittedDNSDomainsCritical != newRoot.PermittedDNSDomainsCritical {
		bad("name constraint %v (critical %v) is not the new root's %v (critical %v)", c.PermittedURIDomains, c.PermittedDNSDomainsCritical,
			newRoot.PermittedURIDomains, newRoot.PermittedDNSDomainsCritical)
	}
	for _, r := range []struct {
		name string
		cert *x509.Certificate
	}{{"old", oldRoot}, {"new", newRoot}} {
		if c.NotBefore.Before(r.cert.NotBefore) || c.NotAfter.After(r.cert.NotAfter) {
			bad("validity %s..%s is not inside the %s root's %s..%s", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339),
				r.name, r.cert.NotBefore.UTC().Format(time.RFC3339), r.cert.NotAfter.UTC().Format(time.RFC3339))
		}
	}
	if signed {
		if !bytes.Equal(c.RawIssuer, oldRoot.RawSubject) {
			bad("issuer %s is not the old root %s", c.Issuer, oldRoot.Subject)
		}
		if len(oldRoot.SubjectKeyId) > 0 && !bytes.Equal(c.AuthorityKeyId, oldRoot.SubjectKeyId) {
			bad("authority key ID %x is not the old root's key ID %x", c.AuthorityKeyId, oldRoot.SubjectKeyId)
		}
		if err := c.CheckSignatureFrom(oldRoot); err != nil {
			bad("signature does not verify under the old root: %v", err)
		}
	}
	return errors.Join(errs...)
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
