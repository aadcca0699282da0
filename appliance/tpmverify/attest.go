// Package tpmverify is the appliance's TPM verifier: it decides whether
// evidence from an agent proves a genuine TPM (EK certificate chained to a
// trusted manufacturer CA, or an allowlisted EK), a well-formed attestation
// key, an agent key resident in that same TPM (TPM2_Certify by that AK),
// and, through credential activation, that the AK and the EK live in one
// TPM. It parses TPM structures itself and trusts nothing the agent says
// about them.
package tpmverify

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"sort"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// ErrEvidence wraps every reason evidence is refused.
var ErrEvidence = errors.New("attestation refused")

func refuse(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrEvidence, fmt.Sprintf(format, a...))
}

// EK is a verified endorsement key.
type EK struct {
	Public *tpm2.TPMTPublic
	Key    crypto.PublicKey
	// Hash is the hex SHA-256 of the EK's PKIX public key: the host's
	// stable identity in agent IDs and allowlists.
	Hash string
	// Method says how it was trusted: "ek-cert" or "ek-allowlist".
	Method string
	Issuer string // the EK certificate's issuer, for the audit log
}

var (
	oidSAN      = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUsage = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidEKU      = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidEKCertU  = asn1.ObjectIdentifier{2, 23, 133, 8, 1} // tcg-kp-EKCertificate
)

// VerifyEK accepts an EK whose public key hash is allowlisted, or whose
// certificate chains to one of cas and certifies exactly this public key.
func VerifyEK(public, certDER []byte, cas []*x509.Certificate, allow []string) (*EK, error) {
	pub, key, err := parsePublic(public)
	if err != nil {
		return nil, refuse("EK public area: %v", err)
	}
	if !pub.ObjectAttributes.Restricted || !pub.ObjectAttributes.Decrypt || pub.ObjectAttributes.SignEncrypt {
		return nil, refuse("EK is not a restricted decryption key")
	}
	der, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		return nil, refuse("EK key: %v", err)
	}
	sum := sha256.Sum256(der)
	ek := &EK{Public: pub, Key: key, Hash: hex.EncodeToString(sum[:])}
	if slices.Contains(allow, ek.Hash) {
		ek.Method = "ek-allowlist"
		return ek, nil
	}
	if len(certDER) == 0 {
		return nil, refuse("EK %s is not on the allowlist and the TPM has no EK certificate", ek.Hash)
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, refuse("EK certificate: %v", err)
	}
	if !samePublic(cert.PublicKey, key) {
		return nil, refuse("EK certificate certifies another key than the TPM's EK")
	}
	// TCG EK certificates carry a critical SubjectAltName with only a
	// directoryName (TPM manufacturer, model, version), which crypto/x509
	// does not process; the name is informational, so it is accepted here
	// after checking the extension is that SAN and nothing else.
	unhandled := slices.DeleteFunc(slices.Clone(cert.UnhandledCriticalExtensions), func(o asn1.ObjectIdentifier) bool { return o.Equal(oidSAN) })
	if len(unhandled) > 0 {
		return nil, refuse("EK certificate has unhandled critical extensions %v", unhandled)
	}
	cert.UnhandledCriticalExtensions = nil
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range cas {
		if bytes.Equal(c.RawIssuer, c.RawSubject) {
			roots.AddCert(c)
		} else {
			inter.AddCert(c)
		}
	}
	if len(cas) == 0 {
		return nil, refuse("EK %s is not allowlisted and no EK CA is trusted", ek.Hash)
	}
	// An intermediate may be configured as a trust anchor on its own.
	for _, c := range cas {
		if !bytes.Equal(c.RawIssuer, c.RawSubject) {
			roots.AddCert(c)
		}
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, refuse("EK certificate (issuer %s) does not chain to a trusted EK CA: %v", cert.Issuer, err)
	}
	if err := checkEKProfile(cert, key); err != nil {
		return nil, err
	}
	ek.Method, ek.Issuer = "ek-cert", cert.Issuer.String()
	return ek, nil
}

// AK is a checked attestation key.
type AK struct {
	Name []byte // TPM2B_NAME contents: nameAlg || digest of the public area
	Key  *ecdsa.PublicKey
}

// CheckAK requires the properties that make an AK's signatures mean
// something: restricted signing (it signs only TPM-generated structures),
// fixedTPM, fixedParent, sensitiveDataOrigin, never a decryption key.
func CheckAK(public []byte) (*AK, error) {
	pub, key, err := parsePublic(public)
	if err != nil {
		return nil, refuse("AK public area: %v", err)
	}
	a := pub.ObjectAttributes
	switch {
	case !a.Restricted || !a.SignEncrypt || a.Decrypt:
		return nil, refuse("AK is not a restricted signing key")
	case !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin:
		return nil, refuse("AK is not fixedTPM, fixedParent and sensitiveDataOrigin: it could have come from outside this TPM")
	}
	ec, ok := key.(*ecdsa.PublicKey)
	if !ok {
		return nil, refuse("AK is %T, want ECDSA", key)
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, refuse("AK name: %v", err)
	}
	return &AK{Name: name.Buffer, Key: ec}, nil
}

// Certification is what the agent sends for TPM2_Certify.
type Certification struct {
	Attest    []byte
	Signature []byte
	Public    []byte // the certified (agent) key's TPM2B_PUBLIC
}

// VerifyCertify checks that the AK signed a certification of exactly the
// presented key, with this nonce, and that the key is TPM-resident and
// non-duplicable. It returns the certified key.
func VerifyCertify(ak *AK, c Certification, nonce []byte) (*ecdsa.PublicKey, error) {
	info, err := verifyAttest(ak, c.Attest, c.Signature, nonce, tpm2.TPMSTAttestCertify)
	if err != nil {
		return nil, err
	}
	ci, err := info.Attested.Certify()
	if err != nil {
		return nil, refuse("certify info: %v", err)
	}
	pub, key, err := parsePublic(c.Public)
	if err != nil {
		return nil, refuse("certified key public area: %v", err)
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		return nil, refuse("certified key name: %v", err)
	}
	if !bytes.Equal(ci.Name.Buffer, name.Buffer) {
		return nil, refuse("the AK certified another key than the one presented")
	}
	a := pub.ObjectAttributes
	switch {
	case !a.FixedTPM || !a.FixedParent || !a.SensitiveDataOrigin:
		return nil, refuse("agent key is not fixedTPM, fixedParent and sensitiveDataOrigin: it could be copied out of the TPM")
	case !a.SignEncrypt || a.Restricted || a.Decrypt:
		return nil, refuse("agent key is not an unrestricted signing key")
	}
	ec, ok := key.(*ecdsa.PublicKey)
	if !ok {
		return nil, refuse("agent key is %T, want ECDSA", key)
	}
	return ec, nil
}

// Credential is a challenge for TPM2_ActivateCredential.
type Credential struct {
	IDObject, EncSecret []byte
	secret              []byte
}

// MakeCredential encrypts a fresh secret to the EK, bound to the AK's name:
// the TPM releases it only if it holds that EK and a loaded key with that
// name.
func MakeCredential(ek *EK, ak *AK) (*Credential, error) {
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	encKey, err := tpm2.ImportEncapsulationKey(ek.Public)
	if err != nil {
		return nil, refuse("EK cannot encapsulate: %v", err)
	}
	id, enc, err := tpm2.CreateCredential(rand.Reader, encKey, ak.Name, secret)
	if err != nil {
		return nil, err
	}
	return &Credential{IDObject: id, EncSecret: enc, secret: secret}, nil
}

// Check compares the activated secret in constant time.
func (c *Credential) Check(activated []byte) error {
	if subtle.ConstantTimeCompare(c.secret, activated) != 1 {
		return refuse("credential activation returned the wrong secret: the AK and the EK are not in one TPM")
	}
	return nil
}

// VerifyQuote checks a quote by the AK over the policy's PCRs (sha256
// bank) with this nonce, against the policy's values.
func VerifyQuote(ak *AK, attest, sig, nonce []byte, policy map[uint][]byte) error {
	info, err := verifyAttest(ak, attest, sig, nonce, tpm2.TPMSTAttestQuote)
	if err != nil {
		return err
	}
	q, err := info.Attested.Quote()
	if err != nil {
		return refuse("quote info: %v", err)
	}
	var idx []uint
	for i := range policy {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	want := tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(idx...)}}}
	if !bytes.Equal(tpm2.Marshal(q.PCRSelect), tpm2.Marshal(want)) {
		return refuse("quote covers other PCRs than the policy's %v", idx)
	}
	h := sha256.New()
	for _, i := range idx {
		h.Write(policy[i])
	}
	if !bytes.Equal(q.PCRDigest.Buffer, h.Sum(nil)) {
		return refuse("PCR values do not match the policy")
	}
	return nil
}

func verifyAttest(ak *AK, attest, sig, nonce []byte, typ tpm2.TPMST) (*tpm2.TPMSAttest, error) {
	s, err := tpm2.Unmarshal[tpm2.TPMTSignature](sig)
	if err != nil {
		return nil, refuse("signature: %v", err)
	}
	ecSig, err := s.Signature.ECDSA()
	if err != nil || ecSig.Hash != tpm2.TPMAlgSHA256 {
		return nil, refuse("signature is not ECDSA with SHA-256")
	}
	digest := sha256.Sum256(attest)
	r, ss := new(big.Int).SetBytes(ecSig.SignatureR.Buffer), new(big.Int).SetBytes(ecSig.SignatureS.Buffer)
	if !ecdsa.Verify(ak.Key, digest[:], r, ss) {
		return nil, refuse("the AK's signature over the attestation does not verify")
	}
	info, err := tpm2.Unmarshal[tpm2.TPMSAttest](attest)
	if err != nil {
		return nil, refuse("attestation structure: %v", err)
	}
	if info.Magic != tpm2.TPMGeneratedValue {
		return nil, refuse("attestation was not generated by a TPM")
	}
	if info.Type != typ {
		return nil, refuse("attestation is of type %v, want %v", info.Type, typ)
	}
	if subtle.ConstantTimeCompare(info.ExtraData.Buffer, nonce) != 1 {
		return nil, refuse("attestation carries another nonce")
	}
	return info, nil
}

func parsePublic(b []byte) (*tpm2.TPMTPublic, crypto.PublicKey, error) {
	p2b, err := tpm2.Unmarshal[tpm2.TPM2BPublic](b)
	if err != nil {
		return nil, nil, err
	}
	pub, err := p2b.Contents()
	if err != nil {
		return nil, nil, err
	}
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		parms, err := pub.Parameters.RSADetail()
		if err != nil {
			return nil, nil, err
		}
		u, err := pub.Unique.RSA()
		if err != nil {
			return nil, nil, err
		}
		k, err := tpm2.RSAPub(parms, u)
		return pub, k, err
	case tpm2.TPMAlgECC:
		parms, err := pub.Parameters.ECCDetail()
		if err != nil {
			return nil, nil, err
		}
		u, err := pub.Unique.ECC()
		if err != nil {
			return nil, nil, err
		}
		k, err := tpm2.ECDSAPub(parms, u)
		return pub, k, err
	}
	return nil, nil, fmt.Errorf("key type %v", pub.Type)
}

func samePublic(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}

// checkEKProfile requires what the TCG EK Credential Profile says makes a
// certificate an EK certificate, so that a trusted vendor CA's leaf for
// some other purpose (a TLS or code-signing key, whose private key may
// live outside any TPM) cannot stand in for a TPM's EK:
//   - the extended key usage is present and names tcg-kp-EKCertificate
//     (2.23.133.8.1) and nothing else: another purpose, or
//     anyExtendedKeyUsage, means the CA vouched for the key in a role an
//     EK never has;
//   - the key usage, when present, gives the EK's one use, key transport
//     (keyEncipherment) for RSA or key agreement (keyAgreement) for ECC,
//     and no signing bit (digitalSignature, contentCommitment,
//     keyCertSign, cRLSign): an EK is a restricted decryption key.
//
// A missing keyUsage extension is tolerated: the required EKU already
// states the purpose, and an absent extension grants no other use; the
// EK's public area is checked to be a restricted decryption key, and
// credential activation proves it is one inside a TPM.
func checkEKProfile(cert *x509.Certificate, key crypto.PublicKey) error {
	has := func(oid asn1.ObjectIdentifier) bool {
		return slices.ContainsFunc(cert.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(oid) })
	}
	if !has(oidEKU) {
		return refuse("EK certificate (issuer %s, serial %s) has no extended key usage: an EK certificate must name tcg-kp-EKCertificate (%s)", cert.Issuer, cert.SerialNumber, oidEKCertU)
	}
	isEK := func(o asn1.ObjectIdentifier) bool { return o.Equal(oidEKCertU) }
	if !slices.ContainsFunc(cert.UnknownExtKeyUsage, isEK) {
		return refuse("EK certificate (issuer %s, serial %s) is not an EK certificate: its extended key usage is %s, want tcg-kp-EKCertificate (%s)", cert.Issuer, cert.SerialNumber, ekuNames(cert), oidEKCertU)
	}
	if len(cert.ExtKeyUsage) > 0 || slices.ContainsFunc(cert.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return !isEK(o) }) {
		return refuse("EK certificate (issuer %s, serial %s) also names other purposes (%s): an EK certificate names only tcg-kp-EKCertificate", cert.Issuer, cert.SerialNumber, ekuNames(cert))
	}
	if !has(oidKeyUsage) {
		return nil
	}
	ku := cert.KeyUsage
	if sign := ku & (x509.KeyUsageDigitalSignature | x509.KeyUsageContentCommitment | x509.KeyUsageCertSign | x509.KeyUsageCRLSign); sign != 0 {
		return refuse("EK certificate (issuer %s, serial %s) key usage %s allows signing (%s): an EK is a decryption key", cert.Issuer, cert.SerialNumber, kuNames(ku), kuNames(sign))
	}
	switch key.(type) {
	case *rsa.PublicKey:
		if ku&x509.KeyUsageKeyEncipherment == 0 {
			return refuse("EK certificate (issuer %s, serial %s) key usage %s lacks keyEncipherment, which an RSA EK certificate has", cert.Issuer, cert.SerialNumber, kuNames(ku))
		}
	case *ecdsa.PublicKey:
		if ku&x509.KeyUsageKeyAgreement == 0 {
			return refuse("EK certificate (issuer %s, serial %s) key usage %s lacks keyAgreement, which an ECC EK certificate has", cert.Issuer, cert.SerialNumber, kuNames(ku))
		}
	default:
		return refuse("EK key type %T", key)
	}
	return nil
}

// ekuNames lists a certificate's extended key usages for a refusal.
func ekuNames(cert *x509.Certificate) string {
	known := map[x509.ExtKeyUsage]string{
		x509.ExtKeyUsageAny: "anyExtendedKeyUsage", x509.ExtKeyUsageServerAuth: "serverAuth",
		x509.ExtKeyUsageClientAuth: "clientAuth", x509.ExtKeyUsageCodeSigning: "codeSigning",
		x509.ExtKeyUsageEmailProtection: "emailProtection", x509.ExtKeyUsageTimeStamping: "timeStamping",
		x509.ExtKeyUsageOCSPSigning: "OCSPSigning",
	}
	var out []string
	for _, u := range cert.ExtKeyUsage {
		if n, ok := known[u]; ok {
			out = append(out, n)
		} else {
			out = append(out, fmt.Sprintf("eku(%d)", u))
		}
	}
	for _, o := range cert.UnknownExtKeyUsage {
		if o.Equal(oidEKCertU) {
			out = append(out, "tcg-kp-EKCertificate")
		} else {
			out = append(out, o.String())
		}
	}
	if len(out) == 0 {
		return "empty"
	}
	return strings.Join(out, ", ")
}

// kuNames lists key usage bits for a refusal.
func kuNames(ku x509.KeyUsage) string {
	names := []string{"digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment",
		"keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly"}
	var out []string
	for i, n := range names {
		if ku&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		return "(none)"
	}
	return strings.Join(out, ", ")
}
