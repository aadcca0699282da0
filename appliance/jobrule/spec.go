// Package jobrule owns the verification of a pipeline run's platform ID
// token (GitHub Actions, GitLab CI, a Kubernetes service account, any
// OIDC issuer) against a join rule: the rule's shape and bounds (Spec),
// the presets that fill it, the issuer's keys (static or by OIDC
// discovery), and the checks that turn a signed token into the run's
// SPIFFE ID path, run name and audit record (Verify).
//
// It holds no replicated state and makes no decision beyond one token:
// replay (each token joins once) is the caller's, keyed by
// Verified.ReplayKey until Verified.ReplayUntil.
package jobrule

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Spec is a join rule as the appliance stores it (durations already parsed).
type Spec struct {
	Name, Preset, Issuer, Audience string
	// JWKS is a static key set (JSON); empty: OIDC discovery from Issuer.
	JWKS []byte
	// IssuerCA is PEM roots for discovery TLS; empty: system roots.
	IssuerCA   []byte
	Conditions []Condition
	// SPIFFEIDTemplate is the run identity's path, e.g.
	// "/ci/github/{{repository_owner}}/{{repository_name}}".
	SPIFFEIDTemplate string
	// RunTemplate names the run in one path segment, e.g.
	// "{{run_id}}-{{run_attempt}}".
	RunTemplate      string
	TTL, MaxTokenAge time.Duration
	AuditClaims      []string
}

// Condition requires the flattened claim Claim to match Pattern: exact,
// or a path.Match glob (* stays within one /-separated part, ? is one
// character).
type Condition struct {
	Claim, Pattern string
}

// Preset names.
const (
	PresetGitHubActions = "github-actions"
	PresetGitLabCI      = "gitlab-ci"
	PresetKubernetes    = "kubernetes"
	PresetOIDC          = "oidc"
)

// Bounds a rule must respect.
const (
	MinTTL, MaxTTL                 = time.Minute, 24 * time.Hour
	MinMaxTokenAge, MaxMaxTokenAge = time.Minute, 24 * time.Hour
	MaxConditions                  = 32
	MaxAuditClaims                 = 32
	MaxClaimNameBytes              = 128
	MaxPatternBytes                = 256
	MaxAudienceBytes               = 256
	MaxJWKSKeys                    = 64
	// MaxPathBytes leaves room for "spiffe://" and the longest trust
	// domain (255) within SPIFFE's 2048-byte ID.
	MaxPathBytes = 2048 - len("spiffe://") - 255
	// MaxRunBytes keeps the run name one short segment: it becomes part
	// of the job agent's own ID.
	MaxRunBytes = 255
)

// preset is what a preset brings: defaults for the rule's empty fields,
// and claims Verify derives from the token before conditions and
// templates see it.
type preset struct {
	issuer   string // default; empty: the rule must say
	template string // default; empty: the rule must say
	run      string
	audit    []string
	aliases  map[string]string // short name -> flattened claim
	// child, when set, is the part of claim full after the value of
	// claim owner and a "/" (repository_name from repository and
	// repository_owner).
	child, full, owner string
	// scope, for issuers that sign for anyone's projects (GitHub, GitLab),
	// names the claims a condition must pin, at least one of them, so
	// that the rule admits one owner's runs and not every project on the
	// platform: exact claims (IDs, owner names) must match exactly,
	// owner-prefixed ones (owner/project paths) in their first part.
	scope map[string]scopeKind
}

type scopeKind int

const (
	scopeExact scopeKind = iota + 1
	scopeOwnerPrefix
)

func presetFor(name string) (*preset, bool) {
	// Built on each call: presets are never shared mutable state.
	switch name {
	case PresetGitHubActions:
		return &preset{
			issuer:   "https://token.actions.githubusercontent.com",
			template: "/ci/github/{{repository_owner}}/{{repository_name}}",
			run:      "{{run_id}}-{{run_attempt}}",
			audit: []string{"repository", "ref", "sha", "run_id", "run_attempt", "actor",
				"workflow", "workflow_ref", "job_workflow_ref", "event_name", "environment"},
			child: "repository_name", full: "repository", owner: "repository_owner",
			scope: map[string]scopeKind{"repository_owner_id": scopeExact, "repository_id": scopeExact,
				"repository_owner": scopeExact, "repository": scopeOwnerPrefix},
		}, true
	case PresetGitLabCI:
		return &preset{
			issuer:   "https://gitlab.com",
			template: "/ci/gitlab/{{namespace_path}}/{{project_name}}",
			run:      "{{job_id}}",
			audit: []string{"project_path", "ref", "ref_type", "sha", "pipeline_id", "job_id",
				"user_login", "environment", "pipeline_source"},
			child: "project_name", full: "project_path", owner: "namespace_path",
			scope: map[string]scopeKind{"namespace_id": scopeExact, "project_id": scopeExact,
				"namespace_path": scopeExact, "project_path": scopeOwnerPrefix},
		}, true
	case PresetKubernetes:
		return &preset{
			template: "/k8s/ns/{{namespace}}/sa/{{serviceaccount}}",
			run:      "{{pod_uid}}",
			audit:    []string{"namespace", "serviceaccount", "pod", "pod_uid", "sub"},
			aliases: map[string]string{
				"namespace":      "kubernetes.io.namespace",
				"serviceaccount": "kubernetes.io.serviceaccount.name",
				"pod":            "kubernetes.io.pod.name",
				"pod_uid":        "kubernetes.io.pod.uid",
			},
		}, true
	case PresetOIDC, "":
		return &preset{run: "{{token_id}}", audit: []string{"sub"}}, true
	}
	return nil, false
}

// ApplyPreset fills the fields s leaves empty from its preset (oidc when
// Preset is empty): issuer, audience (the trust domain's ID), templates
// and audit claims. It never overrides what the rule says.
func (s *Spec) ApplyPreset(td spiffeid.TrustDomain) error {
	p, ok := presetFor(s.Preset)
	if !ok {
		return fmt.Errorf("preset: unknown preset %q (want %s, %s, %s or %s)", s.Preset,
			PresetGitHubActions, PresetGitLabCI, PresetKubernetes, PresetOIDC)
	}
	if td.IsZero() {
		return errors.New("preset: the trust domain is empty")
	}
	if s.Preset == "" {
		s.Preset = PresetOIDC
	}
	if s.Issuer == "" {
		s.Issuer = p.issuer
	}
	if s.Audience == "" {
		s.Audience = td.IDString()
	}
	if s.SPIFFEIDTemplate == "" {
		s.SPIFFEIDTemplate = p.template
	}
	if s.RunTemplate == "" {
		s.RunTemplate = p.run
	}
	if len(s.AuditClaims) == 0 {
		s.AuditClaims = append([]string(nil), p.audit...)
	}
	return nil
}

var (
	nameRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,47}$`)
	claimRE = regexp.MustCompile(`^[A-Za-z0-9._:-]+$`)
)

// Validate reports every problem with s, each naming its field. It
// expects ApplyPreset to have run: empty required fields are problems.
func (s Spec) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if !nameRE.MatchString(s.Name) {
		bad("name", "%q is not 1-48 of a-z, 0-9 and -, starting with a letter or digit", clip(s.Name, 64))
	}
	if _, ok := presetFor(s.Preset); !ok {
		bad("preset", "unknown preset %q", clip(s.Preset, 64))
	}
	if err := checkIssuer(s.Issuer); err != nil {
		bad("issuer", "%v", err)
	}
	if s.Audience == "" || len(s.Audience) > MaxAudienceBytes || !printable(s.Audience) {
		bad("audience", "must be 1-%d printable characters", MaxAudienceBytes)
	}
	if p, ok := presetFor(s.Preset); ok && len(p.scope) > 0 && !scoped(p.scope, s.Conditions) {
		names := make([]string, 0, len(p.scope))
		for n := range p.scope {
			names = append(names, n)
		}
		slices.Sort(names)
		bad("conditions", "preset %s: the issuer signs for every project on the platform, so a condition must pin the owner: one of %s, exact (an owner/project path may glob after the owner)",
			s.Preset, strings.Join(names, ", "))
	}
	if len(s.Conditions) > MaxConditions {
		bad("conditions", "%d conditions, at most %d", len(s.Conditions), MaxConditions)
	}
	for i, c := range s.Conditions {
		field := fmt.Sprintf("conditions[%d]", i)
		if err := checkClaimName(c.Claim); err != nil {
			bad(field+".claim", "%v", err)
		}
		if c.Pattern == "" || len(c.Pattern) > MaxPatternBytes || !printable(c.Pattern) {
			bad(field+".pattern", "must be 1-%d printable characters", MaxPatternBytes)
		} else if _, err := path.Match(c.Pattern, ""); err != nil {
			bad(field+".pattern", "%q is not a valid glob", c.Pattern)
		}
	}
	if s.SPIFFEIDTemplate == "" {
		bad("spiffe_id_template", "required (the oidc and kubernetes presets have no default)")
	} else if err := checkTemplate(s.SPIFFEIDTemplate, false); err != nil {
		bad("spiffe_id_template", "%v", err)
	}
	if s.RunTemplate == "" {
		bad("run_template", "required")
	} else if err := checkTemplate(s.RunTemplate, true); err != nil {
		bad("run_template", "%v", err)
	}
	if s.TTL < MinTTL || s.TTL > MaxTTL {
		bad("ttl", "%v is outside %v..%v", s.TTL, MinTTL, MaxTTL)
	}
	if s.MaxTokenAge < MinMaxTokenAge || s.MaxTokenAge > MaxMaxTokenAge {
		bad("max_token_age", "%v is outside %v..%v", s.MaxTokenAge, MinMaxTokenAge, MaxMaxTokenAge)
	}
	if len(s.JWKS) > 0 {
		if _, err := parseKeySet(s.JWKS, true); err != nil {
			bad("jwks", "%v", err)
		}
	}
	if len(s.IssuerCA) > 0 {
		if _, err := ParseRoots(s.IssuerCA); err != nil {
			bad("issuer_ca", "%v", err)
		}
	}
	if len(s.AuditClaims) > MaxAuditClaims {
		bad("audit_claims", "%d claims, at most %d", len(s.AuditClaims), MaxAuditClaims)
	}
	for i, c := range s.AuditClaims {
		if err := checkClaimName(c); err != nil {
			bad(fmt.Sprintf("audit_claims[%d]", i), "%v", err)
		}
	}
	return errors.Join(errs...)
}

func checkIssuer(iss string) error {
	if iss == "" {
		return errors.New("required (only the github-actions and gitlab-ci presets have a default)")
	}
	u, err := url.Parse(iss)
	switch {
	case err != nil:
		return fmt.Errorf("%q is not a URL", clip(iss, 256))
	case u.Scheme != "https":
		return fmt.Errorf("%q is not an https URL", clip(iss, 256))
	case u.Host == "":
		return fmt.Errorf("%q has no host", clip(iss, 256))
	case u.User != nil:
		return fmt.Errorf("%q has user information", u.Redacted())
	case u.RawQuery != "" || u.ForceQuery:
		return fmt.Errorf("%q has a query", clip(iss, 256))
	case u.Fragment != "" || u.RawFragment != "" || len(iss) > 0 && iss[len(iss)-1] == '#':
		return fmt.Errorf("%q has a fragment", clip(iss, 256))
	case len(iss) > 1024:
		return errors.New("longer than 1024 bytes")
	}
	return nil
}

func checkClaimName(c string) error {
	if c == "" || len(c) > MaxClaimNameBytes || !claimRE.MatchString(c) {
		return fmt.Errorf("claim name %q is not 1-%d of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
			clip(c, 64), MaxClaimNameBytes)
	}
	return nil
}

// ParseRoots parses PEM certificates (a rule's IssuerCA): every block
// must be a certificate, and there must be at least one.
func ParseRoots(pemBytes []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	for rest := pemBytes; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			if len(trimSpace(rest)) > 0 {
				return nil, errors.New("text after the last PEM block is not PEM")
			}
			break
		}
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is a %q, not a CERTIFICATE", n+1, clip(b.Type, 64))
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("PEM block %d: %v", n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, errors.New("no PEM certificate")
	}
	return pool, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\n' || b[0] == '\r' || b[0] == '\t') {
		b = b[1:]
	}
	return b
}

func printable(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// clip bounds a value shown in a message, keeping it valid UTF-8.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return clipBytes(s, n) + "..."
}

func clipBytes(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[:n]
	for len(s) > 0 && !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

// scoped reports whether a condition pins one of scope's claims: exactly,
// or (owner-prefixed claims) with an exact first part.
func scoped(scope map[string]scopeKind, conds []Condition) bool {
	const glob = "*?[\\"
	for _, c := range conds {
		switch scope[c.Claim] {
		case scopeExact:
			if c.Pattern != "" && !strings.ContainsAny(c.Pattern, glob) {
				return true
			}
		case scopeOwnerPrefix:
			owner, _, found := strings.Cut(c.Pattern, "/")
			if owner != "" && !strings.ContainsAny(owner, glob) && (found || !strings.ContainsAny(c.Pattern, glob)) {
				return true
			}
		}
	}
	return false
}
