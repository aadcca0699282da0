package api

import "time"

// Messages of the operator commands on join tokens, agents, the PCR
// policy and the audit log's filters.
type (
	// JoinToken is a join token as admins see it: its ID (the SHA-256 of
	// the token; the token itself is shown once, at creation, and never
	// stored) and its state.
	JoinToken struct {
		ID        string    `json:"id"`
		CreatedBy string    `json:"created_by"`
		CreatedAt time.Time `json:"created_at"`
		ExpiresAt time.Time `json:"expires_at"`
		UsedBy    string    `json:"used_by,omitempty"`
		UsedAt    time.Time `json:"used_at,omitzero"`
		RevokedBy string    `json:"revoked_by,omitempty"`
		RevokedAt time.Time `json:"revoked_at,omitzero"`
	}
	TokenList struct {
		Tokens []JoinToken `json:"tokens"`
	}
	// AgentRemoveRequest removes an agent's record. An agent that is the
	// parent of entries is refused (the refusal lists them) unless Force:
	// then the entries are kept.
	AgentRemoveRequest struct {
		ID    string `json:"id"`
		Force bool   `json:"force,omitempty"`
	}
	// AgentRemoved is what agent remove did.
	AgentRemoved struct {
		ID          string   `json:"id"`
		KeptEntries []string `json:"kept_entries,omitempty"`
	}
	// PCRPolicyResponse is the PCR policy in force; nil when none is.
	PCRPolicyResponse struct {
		Policy *PCRPolicy `json:"policy"`
	}
)
