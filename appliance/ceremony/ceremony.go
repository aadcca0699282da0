// Package ceremony runs Sigil's key ceremonies: the offline, scripted
// creation of the root CA key and certificate in a ceremony HSM, of each
// node's issuing CA key (in that node's HSM) and CSR, the root's signature
// over those CSRs, root re-issuance, the old root's cross certificate for a
// successor root, CRLs for retired intermediates, and the M-of-N splitting
// of HSM PINs.
//
// A ceremony is one YAML script, validated in full before any HSM is
// opened. Every step is printed, numbered, for the witnesses and recorded in
// a hash-chained JSON-lines transcript. Outputs are created with O_EXCL and
// removed again if the ceremony fails, so a failed ceremony leaves neither
// files nor keys behind (key creation is the last step that can be refused
// before a key exists).
package ceremony

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/pinshare"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// Plan is a validated script plus what validation already read.
type Plan struct {
	Config      *Config
	TrustDomain spiffeid.TrustDomain
	// RootCert is the certificate of the HSM key that signs (the old root
	// for cross-sign).
	RootCert *x509.Certificate
	// NewRoot is the successor root a cross-sign ceremony certifies.
	NewRoot  *x509.Certificate
	CSR      *x509.CertificateRequest
	Previous *x509.Certificate
	Revoked  []*x509.Certificate

	pin     []byte // rebuilt from shares, or read for pin-split; memory only
	outputs []string
}

func (p *Plan) wipe() { clear(p.pin) }

// Options tune a run.
type Options struct {
	Out io.Writer // the witnesses' screen
	Now func() time.Time
	// ProgressEvery is how often a long step reports that it is still
	// running (default 1s).
	ProgressEvery time.Duration
}

// Run carries out a validated plan.
func Run(ctx context.Context, p *Plan, opts Options) (err error) {
	defer p.wipe()
	if opts.Out == nil {
		opts.Out = io.Discard
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.ProgressEvery <= 0 {
		opts.ProgressEvery = time.Second
	}
	c := p.Config
	// The plan first, as the dry run showed it: the witnesses compare it
	// with the script they read, then follow the steps against it.
	_ = p.Describe(opts.Out, opts.Now()) // the console; the transcript is the record
	tr, err := newTranscript(opts.Out, c.Transcript, c.Kind, opts.Now)
	if err != nil {
		return err
	}
	r := &run{plan: p, opts: opts, tr: tr, outputs: map[string]*os.File{}}
	defer func() {
		if r.ks != nil {
			// The keys are on the token (or the ceremony failed before
			// them): letting go of the module cannot change either.
			_ = r.ks.Close()
		}
		if err != nil {
			// Out is the operator's console: if it fails too there is no
			// one left to tell, and err is returned either way.
			if left := r.abandonOutputs(); len(left) > 0 {
				_, _ = fmt.Fprintf(opts.Out, "CEREMONY FAILED: %v\nThese outputs could not be removed; delete them by hand:\n  %s\nThe transcript was not changed.\n", err, strings.Join(left, "\n  "))
			} else {
				_, _ = fmt.Fprintf(opts.Out, "CEREMONY FAILED: %v\nNo outputs were kept and the transcript was not changed.\n", err)
			}
		}
	}()

	tr.Step("ceremony started",
		Field{"kind", c.Kind},
		Field{"trust domain", c.TrustDomain},
		Field{"config sha256", c.sha256})
	// Reserve every output now, before any key exists: a name taken in the
	// meantime fails here, not after the HSM has made a key.
	for _, path := range p.outputs {
		if err := r.reserve(path); err != nil {
			return err
		}
	}
	tr.Step("outputs reserved", Field{"files", strings.Join(p.outputs, ", ")})

	switch c.Kind {
	case KindPINSplit:
		err = r.pinSplit()
	case KindRoot:
		err = r.root(ctx, true)
	case KindReissueRoot:
		err = r.root(ctx, false)
	case KindIssuingCSR:
		err = r.issuingCSR(ctx)
	case KindSignIssuing:
		err = r.signIssuing(ctx)
	case KindCrossSign:
		err = r.crossSign(ctx)
	case KindCRL:
		err = r.crl(ctx)
	default:
		err = fmt.Errorf("kind %q has no runner", c.Kind)
	}
	if err != nil {
		return err
	}
	if err := r.closeOutputs(); err != nil {
		return err
	}
	tr.Step("ceremony complete")
	return tr.Commit()
}

type run struct {
	plan    *Plan
	opts    Options
	tr      *Transcript
	ks      *pkcs11.KeyStore
	outputs map[string]*os.File
	order   []string
}

func (r *run) reserve(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, outputMode(r.plan.Config.Kind))
	if err != nil {
		return fmt.Errorf("reserve output: %w", err)
	}
	r.outputs[path] = f
	r.order = append(r.order, path)
	return nil
}

func (r *run) write(path string, data []byte, what string) error {
	f := r.outputs[path]
	if f == nil {
		return fmt.Errorf("output %s was not reserved", path)
	}
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	sum := sha256.Sum256(data)
	r.tr.Step("wrote "+what, Field{"file", path}, Field{"file sha256", hex.EncodeToString(sum[:])})
	return nil
}

func (r *run) closeOutputs() error {
	for _, path := range r.order {
		if err := r.outputs[path].Close(); err != nil {
			return fmt.Errorf("close %s: %w", path, err)
		}
	}
	r.order = nil
	return nil
}

// abandonOutputs removes every output of a failed ceremony and returns
// the ones it could not remove (with why).
func (r *run) abandonOutputs() (left []string) {
	for _, path := range r.order {
		_ = r.outputs[path].Close() // removed next: what was written no longer matters
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			left = append(left, err.Error())
		}
	}
	return left
}

// keyURI addresses the script's key. With a PIN file the key store reads it
// at login; with shares the PIN comes from memory through the provider.
func (r *run) keyURI() string {
	h := r.plan.Config.HSM
	u := pkcs11.URI{Token: h.Token, Object: r.plan.Config.Key.Label, ModulePath: h.Module}
	if h.PINFile != "" {
		u.PINSource = "file:" + h.PINFile
	}
	return u.String()
}

func (r *run) openHSM() {
	pin := r.plan.pin
	r.ks = pkcs11.New(pkcs11.Options{SessionsPerToken: 1, PIN: func(context.Context, string) ([]byte, error) {
		if len(pin) == 0 {
			return nil, errors.New("no PIN available")
		}
		return bytes.Clone(pin), nil
	}})
	src := "pin-file " + r.plan.Config.HSM.PINFile
	if r.plan.Config.HSM.PINFile == "" {
		src = fmt.Sprintf("%d PIN shares, rebuilt in memory", len(r.plan.Config.HSM.PINShares))
	}
	r.tr.Step("HSM session", Field{"module", r.plan.Config.HSM.Module}, Field{"token", r.plan.Config.HSM.Token}, Field{"PIN from", src})
}

func (r *run) createKey(ctx context.Context) (crypto.Signer, error) {
	alg := keystore.ECDSAP384
	if r.plan.Config.Key.Curve == "P-256" {
		alg = keystore.ECDSAP256
	}
	var pub crypto.PublicKey
	err := r.progress("generating "+r.plan.Config.Key.Curve+" key in the HSM", func() (err error) {
		pub, err = r.ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: r.keyURI(), Algorithm: alg})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("create key %q on token %q: %w", r.plan.Config.Key.Label, r.plan.Config.HSM.Token, err)
	}
	s, err := r.ks.Signer(ctx, r.keyURI())
	if err != nil {
		return nil, err
	}
	if !samePublicKey(pub, s.Public()) {
		return nil, errors.New("the HSM returned a different public key for the new key")
	}
	r.tr.Step("key generated in HSM (sensitive, never extractable)",
		Field{"token", r.plan.Config.HSM.Token},
		Field{"label", r.plan.Config.Key.Label},
		Field{"curve", r.plan.Config.Key.Curve},
		Field{"public key sha256", spkiFingerprint(pub)})
	return s, nil
}

func (r *run) existingKey(ctx context.Context, want crypto.PublicKey, wantWhat string) (crypto.Signer, error) {
	s, err := r.ks.Signer(ctx, r.keyURI())
	if err != nil {
		return nil, fmt.Errorf("key %q on token %q: %w", r.plan.Config.Key.Label, r.plan.Config.HSM.Token, err)
	}
	if want != nil && !samePublicKey(want, s.Public()) {
		return nil, fmt.Errorf("key %q on token %q is not the key of %s (public key sha256 %s, want %s)",
			r.plan.Config.Key.Label, r.plan.Config.HSM.Token, wantWhat, spkiFingerprint(s.Public()), spkiFingerprint(want))
	}
	r.tr.Step("key found in HSM", Field{"token", r.plan.Config.HSM.Token}, Field{"label", r.plan.Config.Key.Label},
		Field{"public key sha256", spkiFingerprint(s.Public())})
	return s, nil
}

func (r *run) root(ctx context.Context, create bool) error {
	p, c := r.plan, r.plan.Config
	r.openHSM()
	var signer crypto.Signer
	var err error
	if create {
		signer, err = r.createKey(ctx)
	} else {
		var prev crypto.PublicKey
		if p.Previous != nil {
			prev = p.Previous.PublicKey
		}
		signer, err = r.existingKey(ctx, prev, "the previous root certificate")
	}
	if err != nil {
		return err
	}
	tmpl, err := rootTemplate(p.TrustDomain, c.Root, r.opts.Now())
	if err != nil {
		return err
	}
	tmpl.PublicKey = signer.Public()
	pathLen := rootPathLen(c.Root)
	if err := checkCA(tmpl, nil, p.TrustDomain, pathLen); err != nil {
		return fmt.Errorf("root certificate template failed its checks, nothing signed: %w", err)
	}
	r.tr.Step("root certificate built and checked", Field{"subject", tmpl.Subject.String()},
		Field{"validity", tmpl.NotBefore.UTC().Format(time.RFC3339) + " .. " + tmpl.NotAfter.UTC().Format(time.RFC3339)},
		Field{"path length", fmt.Sprint(pathLen)},
		Field{"name constraint", strings.Join(tmpl.PermittedURIDomains, ",")})
	cert, err := r.sign(tmpl, tmpl, signer)
	if err != nil {
		return err
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return fmt.Errorf("root certificate does not verify under its own key: %w", err)
	}
	if err := checkCA(cert, nil, p.TrustDomain, pathLen); err != nil {
		return fmt.Errorf("signed root certificate failed its checks: %w", err)
	}
	return r.write(c.Root.Output, pemBytes("CERTIFICATE", cert.Raw), "root certificate")
}

func (r *run) issuingCSR(ctx context.Context) error {
	p, c := r.plan, r.plan.Config
	r.openHSM()
	signer, err := r.createKey(ctx)
	if err != nil {
		return err
	}
	tmpl := &x509.CertificateRequest{
		Subject: subject(Subject{CommonName: c.IssuingCSR.NodeID}),
		URIs:    []*url.URL{tdURL(p.TrustDomain)},
	}
	tmpl.Subject.OrganizationalUnit = []string{issuingOU}
	var der []byte
	err = r.progress("signing the CSR in the HSM", func() (err error) {
		der, err = x509.CreateCertificateRequest(rand.Reader, tmpl, signer)
		return err
	})
	if err != nil {
		return fmt.Errorf("create CSR: %w", err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return err
	}
	if err := checkCSR(csr, p.TrustDomain, c.IssuingCSR.NodeID); err != nil {
		return fmt.Errorf("the new CSR failed its checks: %w", err)
	}
	r.tr.Step("CSR signed and verified", Field{"node", c.IssuingCSR.NodeID}, Field{"subject", csr.Subject.String()},
		Field{"public key sha256", spkiFingerprint(csr.PublicKey)})
	return r.write(c.IssuingCSR.Output, pemBytes("CERTIFICATE REQUEST", der), "issuing CA CSR")
}

func (r *run) signIssuing(ctx context.Context) error {
	p, c := r.plan, r.plan.Config
	r.tr.Step("CSR checked", Field{"file", c.SignIssuing.CSR}, Field{"node", c.SignIssuing.NodeID},
		Field{"public key sha256", spkiFingerprint(p.CSR.PublicKey)})
	r.openHSM()
	signer, err := r.existingKey(ctx, p.RootCert.PublicKey, "root certificate "+c.SignIssuing.RootCertificate)
	if err != nil {
		return err
	}
	tmpl, err := issuingTemplate(p.TrustDomain, p.RootCert, p.CSR, c.SignIssuing.NodeID, c.SignIssuing.Validity.Duration, r.opts.Now())
	if err != nil {
		return err
	}
	if err := checkCA(tmpl, p.RootCert, p.TrustDomain, 0); err != nil {
		return fmt.Errorf("issuing CA template failed its checks, nothing signed: %w", err)
	}
	r.tr.Step("issuing CA certificate built and checked", Field{"subject", tmpl.Subject.String()},
		Field{"validity", tmpl.NotBefore.UTC().Format(time.RFC3339) + " .. " + tmpl.NotAfter.UTC().Format(time.RFC3339)},
		Field{"path length", "0"}, Field{"name constraint", strings.Join(tmpl.PermittedURIDomains, ",")})
	cert, err := r.sign(tmpl, p.RootCert, signer)
	if err != nil {
		return err
	}
	if err := checkCA(cert, p.RootCert, p.TrustDomain, 0); err != nil {
		return fmt.Errorf("signed issuing CA failed its checks: %w", err)
	}
	if !samePublicKey(cert.PublicKey, p.CSR.PublicKey) {
		return errors.New("signed issuing CA does not carry the CSR's key")
	}
	roots := x509.NewCertPool()
	roots.AddCert(p.RootCert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: r.opts.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("signed issuing CA does not chain to the root: %w", err)
	}
	r.tr.Step("issuing CA chain verified", Field{"root sha256", fingerprint(p.RootCert.Raw)})
	return r.write(c.SignIssuing.Output, pemBytes("CERTIFICATE", cert.Raw), "issuing CA certificate")
}

// crossSign has the old root's key certify the new root's subject and key.
// Everything about both roots was checked by Validate; here the HSM key is
// checked to be the old root's before anything is built or signed.
func (r *run) crossSign(ctx context.Context) error {
	p, c := r.plan, r.plan.Config
	oldRoot, newRoot := p.RootCert, p.NewRoot
	r.tr.Step("roots checked (self-signed, this trust domain, valid now, distinct keys and subjects)",
		Field{"old root", oldRoot.Subject.String()}, Field{"old root sha256", fingerprint(oldRoot.Raw)},
		Field{"new root", newRoot.Subject.String()}, Field{"new root sha256", fingerprint(newRoot.Raw)},
		Field{"new root key sha256", spkiFingerprint(newRoot.PublicKey)})
	r.openHSM()
	signer, err := r.existingKey(ctx, oldRoot.PublicKey, "old root certificate "+c.CrossSign.OldRootCertificate)
	if err != nil {
		return err
	}
	tmpl, err := crossTemplate(oldRoot, newRoot, c.CrossSign.Validity.Duration, r.opts.Now())
	if err != nil {
		return err
	}
	if err := checkCross(tmpl, oldRoot, newRoot, p.TrustDomain, false); err != nil {
		return fmt.Errorf("cross certificate template failed its checks, nothing signed: %w", err)
	}
	r.tr.Step("cross certificate built and checked", Field{"subject", tmpl.Subject.String()}, Field{"issuer", oldRoot.Subject.String()},
		Field{"validity", tmpl.NotBefore.UTC().Format(time.RFC3339) + " .. " + tmpl.NotAfter.UTC().Format(time.RFC3339)},
		Field{"path length", "1"}, Field{"name constraint", strings.Join(tmpl.PermittedURIDomains, ",")},
		Field{"public key sha256", spkiFingerprint(tmpl.PublicKey)})
	cert, err := r.sign(tmpl, oldRoot, signer)
	if err != nil {
		return err
	}
	if err := checkCross(cert, oldRoot, newRoot, p.TrustDomain, true); err != nil {
		return fmt.Errorf("signed cross certificate failed its checks: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(oldRoot)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: r.opts.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fmt.Errorf("signed cross certificate does not chain to the old root: %w", err)
	}
	r.tr.Step("cross certificate verified under the old root", Field{"old root sha256", fingerprint(oldRoot.Raw)})
	return r.write(c.CrossSign.Output, pemBytes("CERTIFICATE", cert.Raw), "cross certificate")
}

func (r *run) crl(ctx context.Context) error {
	p, c := r.plan, r.plan.Config
	r.openHSM()
	signer, err := r.existingKey(ctx, p.RootCert.PublicKey, "root certificate "+c.CRL.RootCertificate)
	if err != nil {
		return err
	}
	tmpl := crlTemplate(c.CRL, p.Revoked, r.opts.Now())
	var serials []string
	for _, cert := range p.Revoked {
		serials = append(serials, fmt.Sprintf("%s (%s)", serialText(cert.SerialNumber), cert.Subject.CommonName))
	}
	r.tr.Step("CRL built", Field{"number", fmt.Sprint(c.CRL.Number)}, Field{"revokes", strings.Join(serials, ", ")},
		Field{"next update", tmpl.NextUpdate.UTC().Format(time.RFC3339)})
	var der []byte
	err = r.progress("signing the CRL in the HSM", func() (err error) {
		der, err = x509.CreateRevocationList(rand.Reader, tmpl, p.RootCert, signer)
		return err
	})
	if err != nil {
		return fmt.Errorf("sign CRL: %w", err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		return err
	}
	if err := crl.CheckSignatureFrom(p.RootCert); err != nil {
		return fmt.Errorf("CRL does not verify under the root: %w", err)
	}
	r.tr.Step("CRL signed and verified", Field{"sha256", fingerprint(der)})
	return r.write(c.CRL.Output, pemBytes("X509 CRL", der), "CRL")
}

func (r *run) pinSplit() error {
	c := r.plan.Config.PINSplit
	shares, err := pinshare.Split(r.plan.pin, c.Token, c.Threshold, len(c.Shares))
	if err != nil {
		return err
	}
	r.tr.Step("PIN split", Field{"token", c.Token}, Field{"threshold", fmt.Sprintf("%d of %d", c.Threshold, len(c.Shares))},
		Field{"split id", shares[0].Split})
	for i, path := range c.Shares {
		if err := r.write(path, shares[i].Marshal(), fmt.Sprintf("share %d of %d", i+1, len(c.Shares))); err != nil {
			return err
		}
	}
	// Prove the written files rebuild the PIN before anyone relies on them.
	var back []pinshare.Share
	for _, path := range c.Shares[:c.Threshold] {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		s, err := pinshare.Parse(b)
		if err != nil {
			return err
		}
		back = append(back, s)
	}
	pin, err := pinshare.Combine(back)
	if err != nil || !bytes.Equal(pin, r.plan.pin) {
		return fmt.Errorf("written shares do not rebuild the PIN: %v", err)
	}
	clear(pin)
	r.tr.Step("shares read back and verified", Field{"rebuilt from", fmt.Sprintf("shares 1-%d", c.Threshold)})
	return nil
}

// sign has the HSM sign a checked template. x509.CreateCertificate verifies
// the signature it gets back before returning.
func (r *run) sign(tmpl, parent *x509.Certificate, signer crypto.Signer) (*x509.Certificate, error) {
	var der []byte
	err := r.progress("signing in the HSM", func() (err error) {
		der, err = x509.CreateCertificate(rand.Reader, tmpl, parent, tmpl.PublicKey, signer)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sign certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	r.tr.Step("certificate signed", Field{"serial", serialText(cert.SerialNumber)}, Field{"sha256 fingerprint", fingerprint(der)})
	return cert, nil
}

// progress runs a step that may take long on a real HSM (RSA key
// generation takes minutes on some), telling the room it is still going.
func (r *run) progress(what string, fn func() error) error {
	done := make(chan error, 1)
	start := r.opts.Now()
	go func() { done <- fn() }()
	tick := time.NewTicker(r.opts.ProgressEvery)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
			_, _ = fmt.Fprintf(r.opts.Out, "      ... %s (%s)\n", what, r.opts.Now().Sub(start).Round(time.Second))
		}
	}
}

func pemBytes(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
