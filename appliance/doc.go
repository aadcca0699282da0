// Package appliance will own the identity authority's replicated state and
// services: registration entries, attested agents, join policy, the trust
// bundle, the audit log, and SVID issuance (issues #4 and #5). It may use
// keystore, raft and go-spiffe, never agent.
package appliance
