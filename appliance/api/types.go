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
	// IPAddresses are the X.509-SVIDs' IP SANs, IPv4 or IPv6 in text
	// form (the appliance stores the canonical form).
	IPAddresses []string `json:"ip_addresses,omitempty"`
	// FederatesWith names foreign trust domains (federation
	// relationships) whose bundles the entry's workloads receive and
	// trust besides their own.
	FederatesWith []string  `json:"federates_with,omitempty"`
	Hint          string    `json:"hint,omitempty"`
	CreatedAt     time.Time `json:"created_at"`
	UpdatedAt     time.Time `json:"updated_at"`
	Revision      uint64    `json:"revision"` // of the last change; set by the appliance

	// EffectiveX509TTL and EffectiveJWTTTL are the lifetimes the entry's
	// SVIDs get: the stored value, or the default when that is 0. Set by
	// the appliance in what it serves; ignored in requests.
	EffectiveX509TTL Seconds `json:"effective_x509_ttl,omitempty"`
	EffectiveJWTTTL  Seconds `json:"effective_jwt_ttl,omitempty"`
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
	// BundleAck is the highest trust bundle sequence the agent
	// acknowledged while a root rotation waited for it.
	BundleAck uint64 `json:"bundle_ack,omitempty"`
	// SeenBy is the node that answered; LastSeen is when the agent last
	// called that node (zero: not since it started), and Connected
	// whether the agent holds a sync stream open to it now. Each node
	// keeps its own view in memory, not replicated: an agent that talks
	// to another node is seen there.
	// Job is a job agent's run (pipeline runs joined by Join.Job).
	Job       *JobRun   `json:"job,omitempty"`
	SeenBy    string    `json:"seen_by,omitempty"`
	LastSeen  time.Time `json:"last_seen,omitzero"`
	Connected bool      `json:"connected,omitempty"`
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
	// RootCRLs are the newest CRL (DER) of each root: the node issuing CAs
	// the root ceremony revoked. Receivers check the signatures against
	// the roots they trust themselves.
	RootCRLs [][]byte `json:"root_crls,omitempty"`
}

// JWTKey is the public half of a node's JWT signing key.
type JWTKey struct {
	KID       string    `json:"kid"`
	Node      string    `json:"node"`
	PublicKey []byte    `json:"public_key"` // PKIX DER
	NotAfter  time.Time `json:"not_after"`
	// CA is the issuing CA certificate (DER) of the node that published
	// the key; a root CRL revoking it withdraws the key.
	CA []byte `json:"ca,omitempty"`
}

// JWTKeyRotated is what a JWT key rotation on demand made: the new key's
// kid and the node whose key it is (the node that answered).
type JWTKeyRotated struct {
	KID  string `json:"kid"`
	Node string `json:"node"`
}

// MaxNodeJWTKeys bounds rotations on demand (JWTKeyRotate): one is refused
// while its node already has this many keys in the trust bundle. Each
// rotation makes an HSM key and adds a key to the replicated bundle, which
// every agent receives, for the key's signing period plus the longest
// token life (48 h by default), so a script asking in a loop would grow
// both without bound. The schedule alone keeps about three keys per node
// (default jwt.rotate-every 24 h: the current key, the one before it while
// its tokens may live, and an expired one until it is retired), which
// leaves room for several rotations on demand within two days: enough to
// answer a suspected exposure and to test that a rotation reaches every
// agent. A node whose rotate-every is much shorter (under about 4 h) keeps
// this many keys by schedule alone, and is refused every rotation on
// demand.
const MaxNodeJWTKeys = 8

// Revocation is a revoked X.509-SVID serial, listed until the SVID expires.
type Revocation struct {
	Serial   string    `json:"serial"` // hex
	Node     string    `json:"node"`   // whose issuing CA signed it
	NotAfter time.Time `json:"not_after"`
	At       time.Time `json:"at"`
}

// Admin roles (see AdminRecord).
const (
	// AdminRoleAdmin administers the appliance, renews its own
	// certificate and may revoke its own name.
	AdminRoleAdmin = "admin"
	// AdminRoleIssuer may also issue certificates for any admin name and
	// role, and revoke any admin name.
	AdminRoleIssuer = "admin-issuer"
)

// AdminRecord is an admin name as the appliance records it: its role,
// its last issuance and revocation, and the unexpired certificates issued
// since. Once a name has been revoked, only those certificates act for it.
type AdminRecord struct {
	Name      string      `json:"name"`
	ID        string      `json:"id"` // spiffe://<td>/sigil/admin/<name>
	Role      string      `json:"role"`
	IssuedBy  string      `json:"issued_by,omitempty"`
	IssuedAt  time.Time   `json:"issued_at,omitzero"`
	RevokedAt time.Time   `json:"revoked_at,omitzero"`
	RevokedBy string      `json:"revoked_by,omitempty"`
	Certs     []AdminCert `json:"certs,omitempty"`
	Revision  uint64      `json:"revision"`
}

// AdminCert is an admin certificate the appliance issued.
type AdminCert struct {
	Serial   string    `json:"serial"` // hex
	Node     string    `json:"node"`   // whose issuing CA signed it
	Role     string    `json:"role"`
	NotAfter time.Time `json:"not_after"`
}

// RootCRLRequest carries a CRL signed by a root of the trust bundle, PEM
// ("X509 CRL") or DER, as the root ceremony wrote it.
type RootCRLRequest struct {
	CRL []byte `json:"crl"`
}

// RootCRL is a root CRL as the appliance stores it: the newest (highest
// number) of its root.
type RootCRL struct {
	Root       string    `json:"root"`   // hex SHA-256 of the root certificate
	Number     string    `json:"number"` // CRL number, decimal
	ThisUpdate time.Time `json:"this_update"`
	NextUpdate time.Time `json:"next_update"`
	AddedAt    time.Time `json:"added_at"`
	Revoked    []string  `json:"revoked"` // hex serials of the revoked CA certificates
}

// RootCRLResult is what adding a root CRL did.
type RootCRLResult struct {
	CRL RootCRL `json:"crl"`
	// WithdrawnJWTKeys were published by nodes whose CA is now revoked.
	WithdrawnJWTKeys []string `json:"withdrawn_jwt_keys,omitempty"`
}

// JoinRule admits pipeline runs (Join.Job) by their platform's signed ID
// token: who signs (Issuer, keys by OIDC discovery or the static JWKS),
// for whom (Audience), which runs (every condition must hold), and which
// identity they get (SPIFFEIDTemplate, filled from the token's claims).
type JoinRule struct {
	Name string `json:"name"`
	// Preset is github-actions, gitlab-ci, kubernetes or oidc: it fills
	// the issuer, templates and audited claims the rule leaves empty.
	Preset string `json:"preset,omitempty"`
	Issuer string `json:"issuer"`
	// JWKS is the issuer's key set (JSON) for appliances that cannot reach
	// the issuer; empty: keys come from the issuer's OIDC discovery.
	JWKS string `json:"jwks,omitempty"`
	// IssuerCA is PEM roots for discovery over TLS (empty: the system's).
	IssuerCA   string           `json:"issuer_ca,omitempty"`
	Audience   string           `json:"audience"`
	Conditions []ClaimCondition `json:"conditions,omitempty"`
	// SPIFFEIDTemplate is the run's identity's path, e.g.
	// /ci/github/{{repository_owner}}/{{repository_name}}.
	SPIFFEIDTemplate string `json:"spiffe_id_template"`
	// RunTemplate names the run (the job agent's ID); the preset's default
	// when empty.
	RunTemplate string  `json:"run_template,omitempty"`
	TTL         Seconds `json:"ttl"`
	MaxTokenAge Seconds `json:"max_token_age"`
	// AuditClaims are recorded with each join (the preset's when empty).
	AuditClaims []string  `json:"audit_claims,omitempty"`
	CreatedBy   string    `json:"created_by,omitempty"`
	CreatedAt   time.Time `json:"created_at,omitzero"`
	Revision    uint64    `json:"revision,omitempty"`
}

// ClaimCondition requires a token claim (a flattened name such as
// repository or kubernetes.io.namespace) to match Pattern: exact, or a
// glob where * matches within one /-separated part and ? one character.
type ClaimCondition struct {
	Claim   string `json:"claim"`
	Pattern string `json:"pattern"`
}

// JobRun is a job agent's run: the identity (SPIFFEID) its commands,
// running as UID on the job's machine, get for the rule's TTL.
type JobRun struct {
	Rule     string  `json:"rule"`
	Run      string  `json:"run"`
	SPIFFEID string  `json:"spiffe_id"`
	UID      uint32  `json:"uid"`
	TTL      Seconds `json:"ttl"`
}

// JoinRuleList lists the join rules by name.
type JoinRuleList struct {
	Rules []JoinRule `json:"rules"`
}

// FederationRelationship is a foreign SPIFFE trust domain this appliance
// trusts: its bundle, fetched from its bundle endpoint (or set out of
// band), goes to the workloads whose entries federate with it.
type FederationRelationship struct {
	TrustDomain string `json:"trust_domain"`
	// BundleEndpointURL is the foreign bundle endpoint (https); empty: the
	// bundle is only ever set out of band (FederationBundleSet).
	BundleEndpointURL string `json:"bundle_endpoint_url,omitempty"`
	// Profile is https_spiffe (the endpoint authenticates with an X.509-SVID
	// of EndpointSPIFFEID, checked against the foreign bundle itself) or
	// https_web (Web PKI, or the roots in EndpointCA).
	Profile          string `json:"profile,omitempty"`
	EndpointSPIFFEID string `json:"endpoint_spiffe_id,omitempty"`
	EndpointCA       string `json:"endpoint_ca,omitempty"` // PEM, https_web only
	// Bundle is the foreign trust domain's current SPIFFE bundle document
	// (JSON), with its sequence and refresh hint.
	Bundle         []byte `json:"bundle,omitempty"`
	BundleSequence uint64 `json:"bundle_sequence,omitempty"`
	// BundleChanges counts the bundles stored for the relationship (the
	// order of bundles that carry no sequence number).
	BundleChanges   uint64    `json:"bundle_changes,omitempty"`
	RefreshHint     Seconds   `json:"refresh_hint,omitempty"`
	BundleUpdatedAt time.Time `json:"bundle_updated_at,omitzero"`
	// LastFetch and LastFetchError are the answering node's own view of
	// its last fetch (only the leader fetches): not replicated.
	LastFetch      time.Time `json:"last_fetch,omitzero"`
	LastFetchError string    `json:"last_fetch_error,omitempty"`
	CreatedBy      string    `json:"created_by,omitempty"`
	CreatedAt      time.Time `json:"created_at,omitzero"`
	Revision       uint64    `json:"revision,omitempty"`
}

// FederationList lists the federation relationships by trust domain.
type FederationList struct {
	Relationships []FederationRelationship `json:"relationships"`
}

// FederationBundle sets a foreign trust domain's bundle out of band (a
// SPIFFE bundle document, JSON): its sequence must not go backwards.
type FederationBundle struct {
	TrustDomain string `json:"trust_domain"`
	Bundle      []byte `json:"bundle"`
	// Force replaces the stored bundle whatever its sequence: the way back
	// from a bundle whose sequence was set far ahead (a foreign endpoint,
	// once subverted, could otherwise lock every later bundle out).
	// Audited as such.
	Force bool `json:"force,omitempty"`
}
