package state

import (
	"bytes"
	"encoding/json"
	"time"
)

// Selector is one property a workload (or agent) must show, "type:value"
// as in SPIFFE registration entries: unix:uid:1000, tpm:ek-hash:ab12...
type Selector struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

func (s Selector) String() string { return s.Type + ":" + s.Value }

// Entry is a registration entry: who may get which SPIFFE ID.
type Entry struct {
	ID        string     `json:"id"`
	SPIFFEID  string     `json:"spiffe_id"`
	ParentID  string     `json:"parent_id"`
	Selectors []Selector `json:"selectors"`
	X509TTL   Seconds    `json:"x509_ttl,omitempty"`
	JWTTTL    Seconds    `json:"jwt_ttl,omitempty"`
	DNSNames  []string   `json:"dns_names,omitempty"`
	// IPAddresses are IP SANs of the entry's X.509-SVIDs, each in its
	// canonical text form (netip.Addr.String); version 6 commands on
	// (IPSANVersion).
	IPAddresses []string `json:"ip_addresses,omitempty"`
	// FederatesWith names the foreign trust domains (federation
	// relationships) whose bundles the entry's workloads receive; version
	// 7 commands on (FederationVersion), kept sorted.
	FederatesWith []string  `json:"federates_with,omitempty"`
	Hint          string    `json:"hint,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	UpdatedAt     time.Time `json:"updated_at"`
	// Revision is the raft index of the last change, for watchers that
	// resume from a revision.
	Revision uint64 `json:"revision"`
}

// UnmarshalJSON decodes an entry strictly, except that it accepts and
// drops the "admin" flag that entries had until it was removed: it was
// stored but never enforced, so dropping it changes nothing, and raft logs
// and snapshots written before keep replaying the same on every replica.
// Any other unknown field is still refused.
func (e *Entry) UnmarshalJSON(b []byte) error {
	type plain Entry
	var v struct {
		plain
		LegacyAdmin *bool `json:"admin,omitempty"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return err
	}
	*e = Entry(v.plain)
	return nil
}

// Seconds is a TTL in whole seconds (JSON number), so state snapshots stay
// readable and stable.
type Seconds int64

func (s Seconds) Duration() time.Duration { return time.Duration(s) * time.Second }

// Agent is an attested sigil-agent.
type Agent struct {
	ID              string            `json:"id"` // spiffe://<td>/sigil/agent/...
	AttestationType string            `json:"attestation_type"`
	Facts           map[string]string `json:"facts,omitempty"` // EK hash, AK name, PCR digest...
	SerialNumber    string            `json:"serial_number,omitempty"`
	// PreviousSerial is the certificate the last renewal replaced. It may
	// renew once more until PreviousUntil: a renewal's answer can be lost
	// after its commit (the node answering was killed), and its agent
	// then still holds only the replaced certificate. The state machine
	// sets both (version 5 commands); a command's values are ignored.
	PreviousSerial string    `json:"previous_serial,omitempty"`
	PreviousUntil  time.Time `json:"previous_until,omitzero"`
	ExpiresAt      time.Time `json:"expires_at,omitzero"`
	Banned         bool      `json:"banned,omitempty"`
	// Job is a job agent's run (job.join sets it; version 6): the run's
	// identity, for which the agent's implied entry (JobEntry) issues.
	Job       *JobRun   `json:"job,omitempty"`
	JoinedAt  time.Time `json:"joined_at"`
	UpdatedAt time.Time `json:"updated_at"`
	Revision  uint64    `json:"revision"`
	// BundleAck is the highest bundle sequence the agent acknowledged
	// while a root rotation waited for it (CmdBundleAck; version 9). The
	// state machine keeps it across the agent's renewals; a command's
	// value is ignored.
	BundleAck uint64 `json:"bundle_ack,omitempty"`
}

// JoinPolicy decides which TPMs may join.
type JoinPolicy struct {
	// EKCAs are DER certificates of TPM manufacturer CAs (roots or
	// intermediates) that EK certificates must chain to.
	EKCAs []EKCA `json:"ek_cas,omitempty"`
	// EKAllow lists hex SHA-256 hashes of EK public keys (PKIX DER)
	// accepted without a certificate.
	EKAllow []string `json:"ek_allow,omitempty"`
	// PCRPolicy, when set, must be met by a quote at join.
	PCRPolicy *PCRPolicy `json:"pcr_policy,omitempty"`
	// JoinTokensDisabled turns off the join-token method.
	JoinTokensDisabled bool `json:"join_tokens_disabled,omitempty"`
}

// EKCA is one trusted TPM manufacturer CA.
type EKCA struct {
	ID      string `json:"id"` // hex SHA-256 of DER
	Subject string `json:"subject"`
	DER     []byte `json:"der"`
}

// PCRPolicy pins PCR values in one bank.
type PCRPolicy struct {
	Bank string            `json:"bank"` // sha256
	PCRs map[string]string `json:"pcrs"` // PCR index -> hex digest
}

// JoinToken is a one-time join secret. Only its SHA-256 is stored: the
// token itself is shown once to the admin who created it.
type JoinToken struct {
	ID        string    `json:"id"` // hex SHA-256 of the token
	ExpiresAt time.Time `json:"expires_at"`
	CreatedBy string    `json:"created_by"`
	CreatedAt time.Time `json:"created_at"`
	UsedBy    string    `json:"used_by,omitempty"`
	UsedAt    time.Time `json:"used_at,omitzero"`
	// RevokedAt and RevokedBy are set by token.revoke: the token no
	// longer joins. Tokens stored before token.revoke existed carry
	// neither.
	RevokedAt time.Time `json:"revoked_at,omitzero"`
	RevokedBy string    `json:"revoked_by,omitempty"`
}

// Bundle is the trust domain's trust bundle.
type Bundle struct {
	TrustDomain string `json:"trust_domain"`
	// Roots are the X.509 authorities (DER), the ceremony's root certificates.
	Roots [][]byte `json:"roots,omitempty"`
	// JWTKeys are the JWT authorities of every node.
	JWTKeys []JWTKey `json:"jwt_keys,omitempty"`
	// Revoked lists revoked leaf serials per issuing node; each node signs
	// a CRL of its own.
	Revoked []Revocation `json:"revoked,omitempty"`
	// RootCRLs are the stored root CRLs (DER), newest of each root: the
	// node issuing CAs the root ceremony revoked (crl.go).
	RootCRLs [][]byte `json:"root_crls,omitempty"`
	// Sequence increases on every change.
	Sequence uint64 `json:"sequence"`
}

// JWTKey is a JWT signing key's public half, published before it signs.
type JWTKey struct {
	KID       string    `json:"kid"`
	Node      string    `json:"node"`
	PublicKey []byte    `json:"public_key"` // PKIX DER
	NotAfter  time.Time `json:"not_after"`
	// CA is the publishing node's issuing CA certificate (DER): a root CRL
	// revoking that CA withdraws the key. Keys published before root CRLs
	// existed carry none.
	CA []byte `json:"ca,omitempty"`
}

// Revocation is a revoked X.509-SVID, until it would have expired anyway.
type Revocation struct {
	Serial   string    `json:"serial"` // hex
	Node     string    `json:"node"`   // the node whose issuing CA signed it
	NotAfter time.Time `json:"not_after"`
	At       time.Time `json:"at"`
}

// AuditRecord is one entry of the tamper-evident audit log. Hash is the
// SHA-256 of the record's canonical JSON with Hash empty; Prev is the hash of
// the record before, so the log is a chain from the first record.
type AuditRecord struct {
	Seq   uint64    `json:"seq"`
	Index uint64    `json:"index"` // raft index of the command
	Time  time.Time `json:"time"`
	Actor string    `json:"actor"`
	// Origin is the cluster member that proposed the command, as raft
	// authenticated it: the node that vouches for Actor.
	Origin string            `json:"origin,omitempty"`
	Action string            `json:"action"`
	Target string            `json:"target,omitempty"`
	Detail map[string]string `json:"detail,omitempty"`
	Prev   string            `json:"prev"`
	Hash   string            `json:"hash"`
}
