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
	// JoinJobRequest joins one CI/CD or infrastructure-as-code run on the
	// strength of its platform's signed ID token (GitHub Actions, GitLab
	// CI, a Kubernetes service account, any OIDC issuer), checked against
	// the join rule named Rule. The run's agent key is made on the job's
	// machine and never sent: CSR carries its public half.
	JoinJobRequest struct {
		Rule  string `json:"rule"`
		Token string `json:"token"` // the platform's JWT, at most MaxJobTokenBytes
		CSR   []byte `json:"csr"`
		// UID is the Unix user the run's commands run as on the job's
		// machine: the run's entry selects unix:uid:UID.
		UID uint32 `json:"uid"`
	}
	// JobSVID answers a job join: the job agent's own SVID
	// (spiffe://<td>/sigil/agent/job/<rule>/<run>) and the run's identity,
	// which the entry EntryID (parent: the job agent) grants to the run's
	// commands for the rule's TTL.
	JobSVID struct {
		AgentSVID
		SPIFFEID string `json:"spiffe_id"`
		EntryID  string `json:"entry_id"`
		RunID    string `json:"run_id"`
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
	// Job joins a pipeline run by its platform's signed ID token (each
	// token joins once); a run joins again with a fresh token of the same
	// run to renew.
	Job(context.Context, *JoinJobRequest) (*JobSVID, error)
}

// MaxJobTokenBytes bounds a job join's platform token (GitHub's, GitLab's
// and Kubernetes' ID tokens are 1-3 KiB).
const MaxJobTokenBytes = 16 << 10

// JoinService is the gRPC service name.
const JoinService = "sigil.join.v1.Join"
