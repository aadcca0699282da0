// Package join is how sigil-agent gets and keeps its own identity: it
// proves its host's TPM to the appliance (the TPM's evidence comes from
// keystore/tpm, the exchange goes through the appliance's API package) and
// renews its SVID over mutual TLS signed by the TPM-resident agent key.
package join

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/tpm"
)

// SVID is the agent's identity: its certificate chain and the signer of
// its key (in the TPM, or in memory for join-token agents).
type SVID struct {
	ID     string
	Chain  []*x509.Certificate
	Signer crypto.Signer
}

// TLSCertificate presents the SVID in TLS handshakes; the TPM signs them.
func (s *SVID) TLSCertificate() *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.Signer, Leaf: s.Chain[0]}
	for _, x := range s.Chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// EnsureKey creates the agent key in the TPM unless its blob exists.
func EnsureKey(ctx context.Context, t *tpm.TPM, keyURI string) error {
	_, err := t.PublicKey(ctx, keyURI)
	if errors.Is(err, keystore.ErrNotFound) {
		_, err = t.CreateKey(ctx, keystore.CreateKeyRequest{URI: keyURI, Algorithm: keystore.ECDSAP256})
	}
	return err
}

// TPM joins with TPM evidence: EK, a fresh AK, the AK's certification of
// the agent key (with the appliance's nonce), credential activation, and a
// quote when the join policy pins PCRs.
func TPM(ctx context.Context, jc *api.JoinClient, t *tpm.TPM, keyURI string) (*SVID, error) {
	signer, err := t.Signer(ctx, keyURI)
	if err != nil {
		return nil, fmt.Errorf("agent key: %w", err)
	}
	ek, err := t.EndorsementKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("endorsement key: %w", err)
	}
	ak, err := t.NewAK(ctx)
	if err != nil {
		return nil, fmt.Errorf("attestation key: %w", err)
	}
	// Close flushes the AK from the TPM; it fails only when the TPM is gone,
	// which the join's own steps report.
	defer func() { _ = ak.Close() }()
	ch, err := jc.TPMHello(ctx, &api.JoinTPMHello{EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: ak.Public})
	if err != nil {
		return nil, fmt.Errorf("join refused at hello: %w", err)
	}
	cert, err := ak.Certify(ctx, keyURI, ch.Nonce)
	if err != nil {
		return nil, fmt.Errorf("certify agent key: %w", err)
	}
	secret, err := ak.ActivateCredential(ctx, ch.IDObject, ch.EncSecret)
	if err != nil {
		return nil, fmt.Errorf("activate credential: %w", err)
	}
	proof := &api.JoinTPMProof{Nonce: ch.Nonce, CertifyAttest: cert.Attest, CertifySignature: cert.Signature,
		AgentKeyPublic: cert.Public, Secret: secret}
	if len(ch.PCRs) > 0 {
		if proof.QuoteAttest, proof.QuoteSignature, err = ak.Quote(ctx, ch.Nonce, ch.PCRs); err != nil {
			return nil, fmt.Errorf("quote: %w", err)
		}
	}
	if proof.CSR, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer); err != nil {
		return nil, err
	}
	res, err := jc.TPMProve(ctx, proof)
	if err != nil {
		return nil, fmt.Errorf("join refused: %w", err)
	}
	return parse(res, signer)
}

// Renew asks for a new SVID for the same key over a connection that
// presented the current one.
func Renew(ctx context.Context, jc *api.JoinClient, signer crypto.Signer) (*SVID, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
	if err != nil {
		return nil, err
	}
	res, err := jc.Renew(ctx, &api.RenewRequest{CSR: csr})
	if err != nil {
		return nil, fmt.Errorf("renewal refused: %w", err)
	}
	return parse(res, signer)
}

// Token joins a host without a TPM with a one-time token; its key is in
// software and its ID says so (.../agent/join_token/...).
func Token(ctx context.Context, jc *api.JoinClient, token string, signer crypto.Signer) (*SVID, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
	if err != nil {
		return nil, err
	}
	res, err := jc.Token(ctx, &api.JoinTokenRequest{Token: token, CSR: csr})
	if err != nil {
		return nil, fmt.Errorf("join refused: %w", err)
	}
	return parse(res, signer)
}

// Job joins a pipeline run (sigil-agent exec) with its platform's signed
// ID token, checked by the appliance against the join rule named rule;
// uid is the Unix user the run's commands run as. The same call with a
// fresh token of the same run renews (job agents cannot use Renew). It
// returns the job agent's SVID and what the appliance said about the run
// (its identity, entry and run ID).
func Job(ctx context.Context, jc *api.JoinClient, rule, token string, uid uint32, signer crypto.Signer) (*SVID, *api.JobSVID, error) {
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
	if err != nil {
		return nil, nil, err
	}
	res, err := jc.Job(ctx, &api.JoinJobRequest{Rule: rule, Token: token, CSR: csr, UID: uid})
	if err != nil {
		return nil, nil, fmt.Errorf("job join refused: %w", err)
	}
	s, err := parse(&res.AgentSVID, signer)
	if err != nil {
		return nil, nil, err
	}
	return s, res, nil
}

func parse(res *api.AgentSVID, signer crypto.Signer) (*SVID, error) {
	s := &SVID{ID: res.AgentID, Signer: signer}
	for _, der := range res.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		s.Chain = append(s.Chain, c)
	}
	if len(s.Chain) == 0 {
		return nil, errors.New("appliance returned no certificate")
	}
	if k, ok := s.Chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(signer.Public()) {
		return nil, errors.New("appliance certified another key than the agent's")
	}
	return s, nil
}
