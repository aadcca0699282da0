// Package appliance holds no code: its subpackages are the identity
// authority, the appliance that sigild runs and sigilctl administers.
//
//   - node runs one sigild node: its issuing CA in its HSM, raft
//     membership over mutual TLS, the replicated state, the API and the
//     HTTP health, metrics and bundle endpoints; node/cli is sigild's
//     command line.
//   - state is the replicated state machine: registration entries,
//     attested agents, the TPM join policy, join tokens, the trust bundle,
//     revocations, the index of issued X.509-SVIDs and the hash-chained
//     audit log.
//   - ca is a node's certificate authority: it signs X.509-SVIDs, CRLs,
//     audit checkpoints and JWT-SVIDs, and verifies peers, admins and
//     agents against the root.
//   - tpmverify decides whether an agent's TPM evidence is genuine.
//   - selector holds the rules for the workload selectors an entry may
//     hold: the ones sigil-agent produces.
//   - jobrule verifies a pipeline run's platform ID token (GitHub
//     Actions, GitLab CI, Kubernetes, any OIDC issuer) against a join
//     rule and names the run's identity; jobrule/jobruletest runs a real
//     OIDC issuer for tests.
//   - api is the public interface: the admin, agent and join gRPC
//     services, their types and typed clients.
//   - ctl is sigilctl's command tree.
//   - ceremony runs the offline key ceremonies; pinshare splits HSM PINs
//     into M-of-N shares for them.
//   - clustertest builds real trust material and clusters for tests; only
//     tests import it.
//
// These packages may use keystore, raft and go-spiffe, never agent; the
// agent reaches the appliance only through api (make lint checks both).
package appliance
