package ceremony

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"io"
	"strings"
	"time"
)

// Describe writes the plan the witnesses check before a ceremony and
// compare with what it then prints: every step in order, with the keys
// (label, type, token), subjects, validity in UTC, serial policy, outputs,
// and what signs what. It reads nothing but the transcript (for its
// length) and opens no HSM. Times are those the ceremony would use if it
// started at now; a run computes them again from its own start.
func (p *Plan) Describe(w io.Writer, now time.Time) error {
	c := p.Config
	d := &planText{}
	now = now.UTC()
	d.linef("PLAN of the %s ceremony (nothing below has happened yet)", c.Kind)
	if c.Kind != KindPINSplit {
		d.field("trust domain", c.TrustDomain)
	}
	d.field("script sha256", c.sha256)
	records := "a new transcript"
	if n, _, err := readTranscript(c.Transcript); err == nil && n > 0 {
		records = fmt.Sprintf("%d records so far", n)
	}
	d.field("transcript", fmt.Sprintf("%s (%s); the steps are appended when the ceremony succeeds", c.Transcript, records))
	d.field("times as of", now.Format(time.RFC3339)+" (a run uses its own start time)")

	d.step("Reserve the outputs: created now with O_EXCL (never overwritten), removed again if the ceremony fails")
	for _, o := range p.outputs {
		d.field("output", fmt.Sprintf("%s (mode %04o)", o, outputMode(c.Kind)))
	}

	switch c.Kind {
	case KindPINSplit:
		p.describePINSplit(d)
	case KindRoot, KindReissueRoot:
		p.describeRoot(d, now)
	case KindIssuingCSR:
		p.describeIssuingCSR(d)
	case KindSignIssuing:
		p.describeSignIssuing(d, now)
	case KindCrossSign:
		p.describeCrossSign(d, now)
	case KindCRL:
		p.describeCRL(d, now)
	}
	_, err := io.WriteString(w, d.b.String())
	return err
}

func (p *Plan) describePINSplit(d *planText) {
	s := p.Config.PINSplit
	d.step("Read the PIN of token %q from %s (read and checked already; it is never printed or logged)", s.Token, s.PINFile)
	d.step("Split it into %d shares, any %d of which rebuild it (a random split ID ties the shares together)", len(s.Shares), s.Threshold)
	for i, f := range s.Shares {
		d.step("Write share %d of %d to %s (mode 0600)", i+1, len(s.Shares), f)
	}
	d.step("Read shares 1-%d back from their files and check they rebuild the PIN", s.Threshold)
}

func (p *Plan) describeHSM(d *planText) {
	h := p.Config.HSM
	d.step("Log in to the HSM")
	d.field("module", h.Module)
	d.field("token", h.Token)
	if h.PINFile != "" {
		d.field("PIN from", "file "+h.PINFile)
	} else {
		d.field("PIN from", fmt.Sprintf("%d share files, rebuilt in memory only: %s", len(h.PINShares), strings.Join(h.PINShares, ", ")))
	}
}

func (p *Plan) describeNewKey(d *planText) {
	k := p.Config.Key
	d.step("Generate a new key in the HSM: sensitive, never extractable; refused if the label is taken")
	d.field("label", k.Label)
	d.field("type", "ECDSA "+k.Curve)
	d.field("token", p.Config.HSM.Token)
}

// describeExistingKey: the key of cert (what), already in the HSM.
func (p *Plan) describeExistingKey(d *planText, cert *x509.Certificate, what string) {
	k := p.Config.Key
	d.step("Find the existing key in the HSM and check it is the key of %s", what)
	d.field("label", k.Label)
	d.field("token", p.Config.HSM.Token)
	if cert != nil {
		d.field("type", keyType(cert.PublicKey))
		d.field("public key sha256", spkiFingerprint(cert.PublicKey))
	} else {
		d.field("public key", "not checked: root.previous is not set")
	}
}

func (p *Plan) describeCert(d *planText, name string, cert *x509.Certificate) {
	if cert == nil {
		return
	}
	d.field(name, cert.Subject.String())
	d.sub("serial", serialText(cert.SerialNumber))
	d.sub("not before", cert.NotBefore.UTC().Format(time.RFC3339))
	d.sub("not after", cert.NotAfter.UTC().Format(time.RFC3339))
	d.sub("sha256 fingerprint", fingerprint(cert.Raw))
}

func (p *Plan) describeRoot(d *planText, now time.Time) {
	c := p.Config
	p.describeHSM(d)
	if c.Kind == KindRoot {
		p.describeNewKey(d)
	} else {
		p.describeExistingKey(d, p.Previous, "the previous root certificate "+c.Root.Previous)
		p.describeCert(d, "previous root", p.Previous)
	}
	tmpl, err := rootTemplate(p.TrustDomain, c.Root, now)
	if err != nil {
		d.step("Build the root certificate (cannot describe it: %v)", err)
		return
	}
	d.step("Build the root certificate and check it (CA, path length, key usage, SPIFFE ID, constraint)")
	d.field("subject", tmpl.Subject.String())
	d.field("issuer", "the same: self-signed")
	d.field("SPIFFE ID", p.TrustDomain.IDString())
	if tmpl.MaxPathLen == 2 {
		d.field("CA", "yes, path length 2 (root, then a cross certificate for a successor root if it ever cross-signs one, then issuing CAs, then SVIDs)")
	} else {
		d.field("CA", "yes, path length 1 (root, then issuing CAs, then SVIDs; it cannot cross-sign a successor: root.path-length 2 can)")
	}
	if p.Previous != nil && p.Previous.MaxPathLen != tmpl.MaxPathLen {
		d.sub("note", fmt.Sprintf("the previous root's path length is %d", p.Previous.MaxPathLen))
	}
	d.field("key usage", "certificate signing, CRL signing")
	if len(tmpl.PermittedURIDomains) > 0 {
		d.field("name constraint", "URI SANs in "+strings.Join(tmpl.PermittedURIDomains, ", ")+" only")
	} else {
		d.field("name constraint", "none (root.name-constraint: false)")
	}
	validity(d, tmpl.NotBefore, tmpl.NotAfter, now, c.Root.Validity.Duration, "")
	d.field("serial", serialPolicy)
	d.field("public key", fmt.Sprintf("key %q", c.Key.Label))
	d.step("Sign it with key %q on token %q (self-signed); check it verifies under its own key and check it again", c.Key.Label, c.HSM.Token)
	d.step("Write the root certificate to %s", c.Root.Output)
}

func (p *Plan) describeIssuingCSR(d *planText) {
	c := p.Config
	p.describeHSM(d)
	p.describeNewKey(d)
	d.step("Build the node's certificate signing request")
	d.field("subject", subject(Subject{CommonName: c.IssuingCSR.NodeID}).String()+",OU="+issuingOU)
	d.field("SPIFFE ID", p.TrustDomain.IDString())
	d.field("public key", fmt.Sprintf("the new key %q", c.Key.Label))
	d.step("Sign the CSR with the new key %q on token %q; check it", c.Key.Label, c.HSM.Token)
	d.step("Write the CSR to %s (carry it to the root ceremony's sign-issuing)", c.IssuingCSR.Output)
}

func (p *Plan) describeSignIssuing(d *planText, now time.Time) {
	c, s := p.Config, p.Config.SignIssuing
	d.step("Check the node's CSR (its signature, node ID, trust domain and key were checked already)")
	d.field("file", s.CSR)
	if p.CSR != nil {
		d.field("subject", p.CSR.Subject.String())
		d.field("public key", keyType(p.CSR.PublicKey)+", sha256 "+spkiFingerprint(p.CSR.PublicKey))
	}
	p.describeHSM(d)
	p.describeExistingKey(d, p.RootCert, "the root certificate "+s.RootCertificate)
	p.describeCert(d, "root", p.RootCert)
	if p.RootCert == nil || p.CSR == nil {
		return
	}
	tmpl, err := issuingTemplate(p.TrustDomain, p.RootCert, p.CSR, s.NodeID, s.Validity.Duration, now)
	if err != nil {
		d.step("Build the issuing CA certificate (cannot describe it: %v)", err)
		return
	}
	d.step("Build node %s's issuing CA certificate and check it (CA, path length 0, key usage, inside the root's validity, constraint)", s.NodeID)
	d.field("subject", tmpl.Subject.String())
	d.field("issuer", p.RootCert.Subject.String())
	d.field("SPIFFE ID", p.TrustDomain.IDString())
	d.field("CA", "yes, path length 0 (it signs SVIDs only)")
	d.field("key usage", "certificate signing, CRL signing")
	d.field("name constraint", "URI SANs in "+strings.Join(tmpl.PermittedURIDomains, ", ")+" only")
	validity(d, tmpl.NotBefore, tmpl.NotAfter, now, s.Validity.Duration, "the issuer's not before")
	d.field("serial", serialPolicy)
	d.field("public key", "the CSR's, sha256 "+spkiFingerprint(p.CSR.PublicKey))
	d.step("Sign it with the root key %q on token %q; check it again, that it carries the CSR's key, and that it chains to the root", c.Key.Label, c.HSM.Token)
	d.step("Write the issuing CA certificate to %s", s.Output)
}

func (p *Plan) describeCrossSign(d *planText, now time.Time) {
	c, s := p.Config, p.Config.CrossSign
	d.step("Check both roots (checked already: self-signed, CAs of trust domain %s, valid now, different keys and subjects)", c.TrustDomain)
	p.describeCert(d, "old root", p.RootCert)
	if p.RootCert != nil {
		d.sub("file", s.OldRootCertificate)
	}
	p.describeCert(d, "new root", p.NewRoot)
	if p.NewRoot != nil {
		d.sub("file", s.NewRootCertificate)
		d.sub("public key", keyType(p.NewRoot.PublicKey)+", sha256 "+spkiFingerprint(p.NewRoot.PublicKey))
	}
	p.describeHSM(d)
	p.describeExistingKey(d, p.RootCert, "the old root certificate "+s.OldRootCertificate)
	if p.RootCert == nil || p.NewRoot == nil {
		return
	}
	tmpl, err := crossTemplate(p.RootCert, p.NewRoot, s.Validity.Duration, now)
	if err != nil {
		d.step("Build the cross certificate (cannot describe it: %v)", err)
		return
	}
	d.step("Build the cross certificate: the new root's subject and key, issued by the old root; check it (CA, path length 1, key usage, inside both roots' validity, the new root's name, key ID and constraint)")
	d.field("subject", tmpl.Subject.String()+" (the new root's, byte for byte)")
	d.field("issuer", p.RootCert.Subject.String())
	d.field("SPIFFE ID", p.TrustDomain.IDString())
	d.field("CA", "yes, path length 1 (issuing CAs, then SVIDs, below it)")
	d.field("key usage", "certificate signing, CRL signing")
	if len(tmpl.PermittedURIDomains) > 0 {
		d.field("name constraint", "URI SANs in "+strings.Join(tmpl.PermittedURIDomains, ", ")+" only (the new root's)")
	} else {
		d.field("name constraint", "none (the new root has none)")
	}
	d.field("subject key ID", fmt.Sprintf("%x (the new root's)", tmpl.SubjectKeyId))
	floor := "the old root's not before"
	if tmpl.NotBefore.Equal(p.NewRoot.NotBefore) {
		floor = "the new root's not before"
	}
	validity(d, tmpl.NotBefore, tmpl.NotAfter, now, s.Validity.Duration, floor)
	d.field("serial", serialPolicy)
	d.field("public key", "the new root's, sha256 "+spkiFingerprint(p.NewRoot.PublicKey))
	d.step("Sign it with the old root key %q on token %q; check it again and that it verifies under the old root", c.Key.Label, c.HSM.Token)
	d.step("Write the cross certificate to %s", s.Output)
}

func (p *Plan) describeCRL(d *planText, now time.Time) {
	c, s := p.Config, p.Config.CRL
	p.describeHSM(d)
	p.describeExistingKey(d, p.RootCert, "the root certificate "+s.RootCertificate)
	p.describeCert(d, "root", p.RootCert)
	tmpl := crlTemplate(s, p.Revoked, now)
	d.step("Build the CRL")
	if p.RootCert != nil {
		d.field("issuer", p.RootCert.Subject.String())
	}
	d.field("CRL number", fmt.Sprint(s.Number))
	d.field("this update", tmpl.ThisUpdate.UTC().Format(time.RFC3339)+" (start - "+skewText+", for slow clocks)")
	d.field("next update", tmpl.NextUpdate.UTC().Format(time.RFC3339)+" (start + "+durationText(s.Validity.Duration)+")")
	if len(p.Revoked) == 0 {
		d.field("revokes", "nothing (an empty CRL)")
	}
	for i, cert := range p.Revoked {
		d.field("revokes", serialText(cert.SerialNumber))
		d.sub("subject", cert.Subject.String())
		d.sub("file", s.Revoke[i])
		d.sub("reason", "cessationOfOperation, revoked at the start")
	}
	d.step("Sign it with the root key %q on token %q; check it verifies under the root", c.Key.Label, c.HSM.Token)
	d.step("Write the CRL to %s", s.Output)
}

// skewText is clockSkew as the plan writes it ("5m").
var skewText = strings.TrimSuffix(clockSkew.String(), "0s")

// serialPolicy is how the ceremony numbers certificates (serialNumber).
const serialPolicy = "128 random bits, positive, drawn when the certificate is built (printed after signing)"

// validity prints a certificate's validity and how it was reached; floor
// names the not before it is clamped to when start - skew is earlier.
func validity(d *planText, notBefore, notAfter, now time.Time, v time.Duration, floor string) {
	why := "start - " + skewText + ", for slow clocks"
	if !notBefore.Equal(now.Add(-clockSkew)) {
		why = floor + ", which is later than start - " + skewText
	}
	d.field("not before", fmt.Sprintf("%s (%s)", notBefore.UTC().Format(time.RFC3339), why))
	d.field("not after", fmt.Sprintf("%s (start + %s)", notAfter.UTC().Format(time.RFC3339), durationText(v)))
}

// durationText writes whole years and days as the scripts do ("10y",
// "90d").
func durationText(v time.Duration) string {
	const day = 24 * time.Hour
	switch {
	case v > 0 && v%(365*day) == 0:
		return fmt.Sprintf("%dy", v/(365*day))
	case v > 0 && v%day == 0:
		return fmt.Sprintf("%dd", v/day)
	}
	return v.String()
}

func keyType(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return "ECDSA " + k.Curve.Params().Name
	case *rsa.PublicKey:
		return fmt.Sprintf("RSA-%d", k.N.BitLen())
	}
	return fmt.Sprintf("%T", pub)
}

// planText lays the plan out as the transcript's console echo does:
// numbered steps, each with aligned facts.
type planText struct {
	b strings.Builder
	n int
}

func (t *planText) linef(format string, a ...any) {
	fmt.Fprintf(&t.b, format+"\n", a...)
}

func (t *planText) step(format string, a ...any) {
	t.n++
	fmt.Fprintf(&t.b, "  %d. %s\n", t.n, fmt.Sprintf(format, a...))
}

func (t *planText) field(name, value string) {
	fmt.Fprintf(&t.b, "       %-22s %s\n", name+":", value)
}

func (t *planText) sub(name, value string) {
	fmt.Fprintf(&t.b, "         %-20s %s\n", name+":", value)
}
