package api

import (
	"context"
	"time"
)

// Join service messages. A TPM join is two calls on one connection (the
// node keeps the challenge in memory between them):
//
//	JoinTPMHello  -> JoinTPMChallenge   (EK, AK -> nonce, credential)
//	JoinTPMProof  -> AgentSVID          (certify, activated secret, quote)
type (
	JoinTPMHello struct {
		EKPublic []byte // TPM2B_PUBLIC
		EKCert   []byte // DER, if the TPM has one
		AKPublic []byte // TPM2B_PUBLIC of a fresh attestation key
	}
	JoinTPMChallenge struct {
		Nonce     []byte
		IDObject  []byte // credential for TPM2_ActivateCredential
		EncSecret []byte
		PCRs      []uint `json:",omitempty"` // quote these (sha256) when the policy asks
	}
	JoinTPMProof struct {
		Nonce            []byte
		CertifyAttest    []byte // TPM2_Certify of the agent key by the AK
		CertifySignature []byte
		AgentKeyPublic   []byte // TPM2B_PUBLIC of the agent key
		Secret           []byte // what ActivateCredential returned
		QuoteAttest      []byte `json:",omitempty"`
		QuoteSignature   []byte `json:",omitempty"`
		// CSR for the agent key, signed by it (proof of possession through
		// the TPM's signing path too).
		CSR []byte
	}
	JoinTokenRequest struct {
		Token string
		CSR   []byte // the agent's software key (no TPM on this host)
	}
	RenewRequest struct {
		CSR []byte // must be for the key of the certificate presented
	}
	// AgentSVID is the agent's own identity.
	AgentSVID struct {
		AgentID   string
		Chain     [][]byte // leaf, then the node's intermediate
		ExpiresAt time.Time
	}
)

// JoinServer is the service agents use before (join) and with (renew)
// their own SVID. Join methods accept callers without a certificate.
//
//apigen:service
type JoinServer interface {
	TPMHello(context.Context, *JoinTPMHello) (*JoinTPMChallenge, error)
	TPMProve(context.Context, *JoinTPMProof) (*AgentSVID, error)
	Token(context.Context, *JoinTokenRequest) (*AgentSVID, error)
	Renew(context.Context, *RenewRequest) (*AgentSVID, error)
}

// JoinService is the gRPC service name.
const JoinService = "sigil.join.v1.Join"
