package jobrule_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/sigil-appliance/sigil/appliance/jobrule"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestApplyPreset(t *testing.T) {
	for _, tc := range []struct {
		preset, issuer, template, run, firstAudit string
	}{
		{"github-actions", "https://token.actions.githubusercontent.com", "/ci/github/{{repository_owner}}/{{repository_name}}", "{{run_id}}-{{run_attempt}}", "repository"},
		{"gitlab-ci", "https://gitlab.com", "/ci/gitlab/{{namespace_path}}/{{project_name}}", "{{job_id}}", "project_path"},
		{"kubernetes", "", "/k8s/ns/{{namespace}}/sa/{{serviceaccount}}", "{{pod_uid}}", "namespace"},
		{"oidc", "", "", "{{token_id}}", "sub"},
		{"", "", "", "{{token_id}}", "sub"},
	} {
		s := jobrule.Spec{Preset: tc.preset}
		if err := s.ApplyPreset(td); err != nil {
			t.Fatal(err)
		}
		if s.Issuer != tc.issuer || s.SPIFFEIDTemplate != tc.template || s.RunTemplate != tc.run ||
			s.Audience != "spiffe://example.org" || len(s.AuditClaims) == 0 || s.AuditClaims[0] != tc.firstAudit {
			t.Errorf("%q: %+v", tc.preset, s)
		}
	}
	// What the rule says stays.
	s := jobrule.Spec{Preset: "github-actions", Issuer: "https://ghe.example.com/_services/token",
		Audience: "sigil", RunTemplate: "{{run_id}}", AuditClaims: []string{"sha"}}
	if err := s.ApplyPreset(td); err != nil {
		t.Fatal(err)
	}
	if s.Issuer != "https://ghe.example.com/_services/token" || s.Audience != "sigil" || s.RunTemplate != "{{run_id}}" ||
		fmt.Sprint(s.AuditClaims) != "[sha]" {
		t.Errorf("overrode the rule: %+v", s)
	}
	if err := (&jobrule.Spec{Preset: "jenkins"}).ApplyPreset(td); err == nil || !strings.Contains(err.Error(), `"jenkins"`) {
		t.Errorf("unknown preset: %v", err)
	}
	if err := (&jobrule.Spec{}).ApplyPreset(spiffeid.TrustDomain{}); err == nil {
		t.Error("empty trust domain accepted")
	}
	// kubernetes and oidc leave the issuer (and oidc the template) to the rule.
	for _, p := range []string{"kubernetes", "oidc"} {
		s := jobrule.Spec{Name: "k", Preset: p, TTL: time.Hour, MaxTokenAge: time.Hour}
		if err := s.ApplyPreset(td); err != nil {
			t.Fatal(err)
		}
		err := s.Validate()
		if err == nil || !strings.Contains(err.Error(), "issuer: required") {
			t.Errorf("%s without an issuer: %v", p, err)
		}
		if p == "oidc" && !strings.Contains(err.Error(), "spiffe_id_template: required") {
			t.Errorf("oidc without a template: %v", err)
		}
	}
}

func validSpec(t *testing.T) jobrule.Spec {
	t.Helper()
	s := jobrule.Spec{Name: "gh-octo", Preset: "github-actions", TTL: time.Hour, MaxTokenAge: 10 * time.Minute,
		Conditions: []jobrule.Condition{{Claim: "repository", Pattern: "octo-org/*"}, {Claim: "ref", Pattern: "refs/heads/main"}}}
	if err := s.ApplyPreset(td); err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err != nil {
		t.Fatalf("valid spec refused: %v", err)
	}
	return s
}

func jwksOf(t *testing.T, keys ...jose.JSONWebKey) []byte {
	t.Helper()
	b, err := json.Marshal(jose.JSONWebKeySet{Keys: keys})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestValidate(t *testing.T) {
	validSpec(t)
	rsa1024, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	many := make([]jose.JSONWebKey, 65)
	for i := range many {
		many[i] = jose.JSONWebKey{Key: p256.Public(), KeyID: fmt.Sprint(i)}
	}
	iss := jobruletest.NewIssuer(t)

	for _, tc := range []struct {
		name string
		edit func(s *jobrule.Spec)
		want []string // each must appear
	}{
		{"bad name", func(s *jobrule.Spec) { s.Name = "Bad_Name" }, []string{"name: "}},
		{"empty name", func(s *jobrule.Spec) { s.Name = "" }, []string{"name: "}},
		{"long name", func(s *jobrule.Spec) { s.Name = strings.Repeat("a", 49) }, []string{"name: "}},
		{"unknown preset", func(s *jobrule.Spec) { s.Preset = "jenkins" }, []string{"preset: unknown"}},
		{"http issuer", func(s *jobrule.Spec) { s.Issuer = "http://gitlab.example.com" }, []string{"issuer: ", "not an https URL"}},
		{"issuer with a query", func(s *jobrule.Spec) { s.Issuer = "https://x.example/?a=b" }, []string{"issuer: ", "query"}},
		{"issuer with a fragment", func(s *jobrule.Spec) { s.Issuer = "https://x.example/#f" }, []string{"issuer: ", "fragment"}},
		{"issuer with userinfo", func(s *jobrule.Spec) { s.Issuer = "https://u:secret@x.example" }, []string{"issuer: ", "user information"}},
		{"empty audience", func(s *jobrule.Spec) { s.Audience = "" }, []string{"audience: "}},
		{"audience with a newline", func(s *jobrule.Spec) { s.Audience = "a\nb" }, []string{"audience: "}},
		{"too many conditions", func(s *jobrule.Spec) {
			s.Conditions = make([]jobrule.Condition, 33)
			for i := range s.Conditions {
				s.Conditions[i] = jobrule.Condition{Claim: "ref", Pattern: "x"}
			}
		}, []string{"conditions: 33 conditions"}},
		{"bad condition", func(s *jobrule.Spec) {
			s.Conditions = []jobrule.Condition{{Claim: "", Pattern: "x"}, {Claim: "ref", Pattern: "refs/[heads"}, {Claim: "a b", Pattern: ""}}
		}, []string{"conditions[0].claim", "conditions[1].pattern", "conditions[2].claim", "conditions[2].pattern"}},
		{"template without a slash", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "ci/{{repository}}" }, []string{"spiffe_id_template: ", "start with '/'"}},
		{"template with an empty segment", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci//{{repository}}" }, []string{"spiffe_id_template: ", "not a valid SPIFFE ID path"}},
		{"template with a dot segment", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci/../{{repository}}" }, []string{"spiffe_id_template: "}},
		{"template with a bad character", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci/a b/{{x}}" }, []string{"spiffe_id_template: "}},
		{"template with an empty placeholder", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci/{{}}" }, []string{"spiffe_id_template: ", "placeholder"}},
		{"template unclosed", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci/{{x" }, []string{"spiffe_id_template: "}},
		{"template trailing slash", func(s *jobrule.Spec) { s.SPIFFEIDTemplate = "/ci/{{x}}/" }, []string{"spiffe_id_template: "}},
		{"run template of two segments", func(s *jobrule.Spec) { s.RunTemplate = "{{run_id}}/{{run_attempt}}" }, []string{"run_template: ", "one path segment"}},
		{"TTL too short", func(s *jobrule.Spec) { s.TTL = 30 * time.Second }, []string{"ttl: 30s is outside"}},
		{"TTL too long", func(s *jobrule.Spec) { s.TTL = 25 * time.Hour }, []string{"ttl: "}},
		{"max token age zero", func(s *jobrule.Spec) { s.MaxTokenAge = 0 }, []string{"max_token_age: "}},
		{"private key in the JWKS", func(s *jobrule.Spec) {
			var set map[string][]map[string]any
			_ = json.Unmarshal(iss.JWKS(), &set)
			set["keys"][0]["d"] = "AQAB"
			s.JWKS, _ = json.Marshal(set)
		}, []string{"jwks: ", "private"}},
		{"weak RSA key", func(s *jobrule.Spec) {
			s.JWKS = jwksOf(t, jose.JSONWebKey{Key: rsa1024.Public(), KeyID: "a"})
		}, []string{"jwks: ", "1024 bits"}},
		{"P-384 key", func(s *jobrule.Spec) {
			s.JWKS = jwksOf(t, jose.JSONWebKey{Key: p384.Public(), KeyID: "a"})
		}, []string{"jwks: ", "only P-256"}},
		{"key for another algorithm", func(s *jobrule.Spec) {
			s.JWKS = jwksOf(t, jose.JSONWebKey{Key: p256.Public(), KeyID: "a", Algorithm: "RS256"})
		}, []string{"jwks: ", `is for alg "RS256", not ES256`}},
		{"encryption key", func(s *jobrule.Spec) {
			s.JWKS = jwksOf(t, jose.JSONWebKey{Key: p256.Public(), KeyID: "a", Use: "enc"})
		}, []string{"jwks: ", `is for "enc"`}},
		{"duplicate kid", func(s *jobrule.Spec) {
			s.JWKS = jwksOf(t, jose.JSONWebKey{Key: p256.Public(), KeyID: "a"}, jose.JSONWebKey{Key: p256.Public(), KeyID: "a"})
		}, []string{"jwks: ", "kid appears twice"}},
		{"run template too long", func(s *jobrule.Spec) { s.RunTemplate = strings.Repeat("r", 256) }, []string{"run_template: longer than 255"}},
		{"key without kid", func(s *jobrule.Spec) { s.JWKS = jwksOf(t, jose.JSONWebKey{Key: p256.Public()}) }, []string{"jwks: ", "no kid"}},
		{"too many keys", func(s *jobrule.Spec) { s.JWKS = jwksOf(t, many...) }, []string{"jwks: 65 keys"}},
		{"JWKS not JSON", func(s *jobrule.Spec) { s.JWKS = []byte("nope") }, []string{"jwks: "}},
		{"IssuerCA not PEM", func(s *jobrule.Spec) { s.IssuerCA = []byte("nope") }, []string{"issuer_ca: "}},
		{"IssuerCA a key", func(s *jobrule.Spec) {
			s.IssuerCA = append(iss.CAPEM(), "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"...)
		}, []string{"issuer_ca: ", "PUBLIC KEY"}},
		{"too many audit claims", func(s *jobrule.Spec) { s.AuditClaims = make([]string, 33) }, []string{"audit_claims: 33"}},
		{"bad audit claim", func(s *jobrule.Spec) { s.AuditClaims = []string{"ok", "not ok"} }, []string{"audit_claims[1]"}},
		{"several at once", func(s *jobrule.Spec) {
			s.Name, s.Issuer, s.TTL = "X", "http://x", 0
		}, []string{"name: ", "issuer: ", "ttl: "}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := validSpec(t)
			tc.edit(&s)
			err := s.Validate()
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "secret@") {
				t.Errorf("%q shows the issuer's password", err)
			}
		})
	}

	// Good static keys and roots pass.
	s := validSpec(t)
	s.JWKS, s.IssuerCA = iss.JWKS(), iss.CAPEM()
	if err := s.Validate(); err != nil {
		t.Error(err)
	}
}

// GitHub's and GitLab's issuers sign for every project on the platform,
// and any workflow can ask for a token with the appliance's audience: a
// rule of those presets must pin the owner, or it admits everyone's runs.
func TestAttackUnscopedMultiTenantRule(t *testing.T) {
	for _, tc := range []struct {
		preset string
		conds  []jobrule.Condition
		ok     bool
	}{
		{jobrule.PresetGitHubActions, nil, false},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "ref", Pattern: "refs/heads/main"}}, false},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository", Pattern: "*/infra"}}, false},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository", Pattern: "octo-*/infra"}}, false},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository_owner", Pattern: "octo*"}}, false},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository", Pattern: "octo-org/*"}}, true},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository", Pattern: "octo-org/infra"}}, true},
		{jobrule.PresetGitHubActions, []jobrule.Condition{{Claim: "repository_owner_id", Pattern: "65"}}, true},
		{jobrule.PresetGitLabCI, nil, false},
		{jobrule.PresetGitLabCI, []jobrule.Condition{{Claim: "project_path", Pattern: "*"}}, false},
		{jobrule.PresetGitLabCI, []jobrule.Condition{{Claim: "project_path", Pattern: "my-group/*"}}, true},
		{jobrule.PresetGitLabCI, []jobrule.Condition{{Claim: "namespace_id", Pattern: "72"}}, true},
		{jobrule.PresetKubernetes, nil, true},
	} {
		s := jobrule.Spec{Name: "r", Preset: tc.preset, Issuer: "https://issuer.example", TTL: time.Hour, MaxTokenAge: 10 * time.Minute, Conditions: tc.conds}
		if err := s.ApplyPreset(td); err != nil {
			t.Fatal(err)
		}
		err := s.Validate()
		if (err == nil) != tc.ok {
			t.Errorf("%s %v: %v, want ok=%v", tc.preset, tc.conds, err, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "must pin the owner") {
			t.Errorf("%s %v: %v does not say why", tc.preset, tc.conds, err)
		}
	}
}
