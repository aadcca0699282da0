// Package agent will own sigil-agent: TPM join, SVID cache and rotation,
// and the SPIFFE Workload API served to local workloads (issues #6 and #7).
// It reaches the appliance only through the appliance's API package.
package agent
