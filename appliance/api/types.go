package api

import "time"

// The API's own data types. They are not the persisted state types: the
// node converts between the two (appliance/node/convert.go), so the state
// can change its storage without changing what clients see. The JSON names
// below are the wire format (and sigilctl's --output json): keep them.

// Selector is one "type:value" property a workload or agent must show.
type Selector struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

func (s Selector) String() string { return s.Type + ":" + s.Value }

// Seconds is a duration in whole seconds, a JSON number.
type Seconds int64

// Duration converts s to a time.Duration.
func (s Seconds) Duration() time.Duration { return time.Duration(s) * time.Second }

// Entry is a registration entry: which SPIFFE ID a parent may obtain for
// workloads showing its selectors.
type Entry struct {
	ID        string     `json:"id"`
	SPIFFEID  string     `json:"spiffe_id"`
	ParentID  string     `json:"parent_id"`
	Selectors []Selector `json:"selectors"`
	X509TTL   Seconds    `json:"x509_ttl,omitempty"` // 0: the default (1h)
	JWTTTL    Seconds    `json:"jwt_ttl,omitempty"`  // 0: the default (5m)
	DNSNames  []string   `json:"dns_names,omitempty"`
	Hint      string     `json:"hint,omitempty"`
	Admin     bool       `json:"admin,omitempty"` // its workloads are appliance admins
	CreatedAt time.Time  `json:"created_at"`
	UpdatedAt time.Time  `json:"updated_at"`
	Revision  uint64     `json:"revision"` // of the last change; set by the appliance
}

// Agent is an attested sigil-agent as admins see it.
type Agent struct {
	ID              string            `json:"id"` // spiffe://<td>/sigil/agent/...
	AttestationType string            `json:"attestation_type"`
	Facts           map[string]string `json:"facts,omitempty"` // EK hash, AK name, PCR digest...
	SerialNumber    string            `json:"serial_number,omitempty"`
	ExpiresAt       time.Time         `json:"expires_at,omitzero"`
	Banned          bool              `json:"banned,omitempty"`
	JoinedAt        time.Time         `json:"joined_at"`
	UpdatedAt       time.Time         `json:"updated_at"`
	Revision        uint64            `json:"revision"`
}

// JoinPolicy is which TPMs may join: trusted EK CAs, allowed EK hashes,
// the PCR policy, and whether join tokens are accepted.
type JoinPolicy struct {
	EKCAs              []EKCA     `json:"ek_cas,omitempty"`
	EKAllow            []string   `json:"ek_allow,omitempty"` // hex SHA-256 of EK public keys (PKIX DER)
	PCRPolicy          *PCRPolicy `json:"pcr_policy,omitempty"`
	JoinTokensDisabled bool       `json:"join_tokens_disabled,omitempty"`
}

// EKCA is a trusted TPM manufacturer CA.
type EKCA struct {
	ID      string `json:"id"` // hex SHA-256 of DER
	Subject string `json:"subject"`
	DER     []byte `json:"der"`
}

// PCRPolicy is the PCR values (one bank) a joining TPM must quote.
type PCRPolicy struct {
	Bank string            `json:"bank"` // sha256
	PCRs map[string]string `json:"pcrs"` // PCR index -> hex digest
}

// Bundle is the trust domain's trust bundle: X.509 roots, JWT keys and
// revoked SVIDs.
type Bundle struct {
	TrustDomain string       `json:"trust_domain"`
	Roots       [][]byte     `json:"roots,omitempty"` // DER
	JWTKeys     []JWTKey     `json:"jwt_keys,omitempty"`
	Revoked     []Revocation `json:"revoked,omitempty"`
	Sequence    uint64       `json:"sequence"` // increases on every change
}

// JWTKey is the public half of a node's JWT signing key.
type JWTKey struct {
	KID       string    `json:"kid"`
	Node      string    `json:"node"`
	PublicKey []byte    `json:"public_key"` // PKIX DER
	NotAfter  time.Time `json:"not_after"`
}

// Revocation is a revoked X.509-SVID serial, listed until the SVID expires.
type Revocation struct {
	Serial   string    `json:"serial"` // hex
	Node     string    `json:"node"`   // whose issuing CA signed it
	NotAfter time.Time `json:"not_after"`
	At       time.Time `json:"at"`
}
