package ceremony

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/pinshare"
	"github.com/sigil-appliance/sigil/internal/nodeid"
	"github.com/sigil-appliance/sigil/internal/pemfile"
	"github.com/sigil-appliance/sigil/internal/strictyaml"
)

// Kinds of ceremony.
const (
	KindRoot        = "root"
	KindReissueRoot = "reissue-root"
	KindIssuingCSR  = "issuing-csr"
	KindSignIssuing = "sign-issuing"
	KindCrossSign   = "cross-sign"
	KindCRL         = "crl"
	KindPINSplit    = "pin-split"
)

// Kinds lists every ceremony kind, in the order a new trust domain uses
// them: cross-sign comes with a root rotation, after the new root exists.
var Kinds = []string{KindPINSplit, KindRoot, KindIssuingCSR, KindSignIssuing, KindReissueRoot, KindCrossSign, KindCRL}

// Config is a ceremony script: the whole input of one ceremony. Each kind
// uses some sections and refuses the others, so a script cannot carry a
// setting that silently does nothing.
type Config struct {
	Kind        string `yaml:"kind"`
	TrustDomain string `yaml:"trust-domain"`
	// Transcript is the JSON-lines file this ceremony appends to.
	Transcript string `yaml:"transcript"`

	HSM         *HSMConfig         `yaml:"hsm"`
	Key         *KeyConfig         `yaml:"key"`
	Root        *RootConfig        `yaml:"root"`
	IssuingCSR  *IssuingCSRConfig  `yaml:"issuing-csr"`
	SignIssuing *SignIssuingConfig `yaml:"sign-issuing"`
	CrossSign   *CrossSignConfig   `yaml:"cross-sign"`
	CRL         *CRLConfig         `yaml:"crl"`
	PINSplit    *PINSplitConfig    `yaml:"pin-split"`

	sha256 string // of the script as read, for the transcript
	// fieldProblems are what Parse found wrong with fields while reading;
	// Validate lists them first.
	fieldProblems []fieldProblem
}

// HSMConfig names the token and how its PIN is given: a 0600 file, or M
// share files from pin-split (the PIN is then rebuilt only in memory).
type HSMConfig struct {
	Module    string   `yaml:"module"`
	Token     string   `yaml:"token"`
	PINFile   string   `yaml:"pin-file"`
	PINShares []string `yaml:"pin-shares"`
}

// KeyConfig names the key in the token.
type KeyConfig struct {
	Label string `yaml:"label"`
	Curve string `yaml:"curve"`
}

// Subject is the distinguished name of a CA certificate.
type Subject struct {
	CommonName   string `yaml:"common-name"`
	Organization string `yaml:"organization"`
	Country      string `yaml:"country"`
}

// RootConfig is the self-signed trust anchor (kinds root and reissue-root).
type RootConfig struct {
	Subject  Subject  `yaml:"subject"`
	Validity Duration `yaml:"validity"`
	// NameConstraint limits every certificate below the root to the trust
	// domain's SPIFFE IDs (default true).
	NameConstraint *bool `yaml:"name-constraint"`
	// PathLength is how many CA certificates may stand between the root
	// and an SVID: 1 (the default: issuing CAs only) or 2 (room for one
	// cross certificate, so a successor root can be cross-signed by this
	// one; see kind cross-sign).
	PathLength *int   `yaml:"path-length"`
	Output     string `yaml:"output"`
	// Previous (reissue-root only) is the certificate being replaced; its
	// key must be the key in the HSM.
	Previous string `yaml:"previous"`
}

// IssuingCSRConfig makes a node's issuing CA key and its CSR.
type IssuingCSRConfig struct {
	NodeID string `yaml:"node-id"`
	Output string `yaml:"output"`
}

// SignIssuingConfig signs a node's CSR into its intermediate certificate.
type SignIssuingConfig struct {
	RootCertificate string   `yaml:"root-certificate"`
	CSR             string   `yaml:"csr"`
	NodeID          string   `yaml:"node-id"`
	Validity        Duration `yaml:"validity"`
	Output          string   `yaml:"output"`
}

// CrossSignConfig has the old root's key (the script's key, in the HSM)
// certify the new root's subject and public key, for relying parties that
// trust only the old root during a root rotation.
type CrossSignConfig struct {
	// OldRootCertificate is the certificate of the key in the HSM: the
	// issuer of the cross certificate.
	OldRootCertificate string `yaml:"old-root-certificate"`
	// NewRootCertificate is the successor root (made by kind root): its
	// subject, public key, key identifier, SPIFFE ID and name constraints
	// are what the cross certificate carries.
	NewRootCertificate string   `yaml:"new-root-certificate"`
	Validity           Duration `yaml:"validity"`
	Output             string   `yaml:"output"`
}

// CRLConfig revokes retired intermediates.
type CRLConfig struct {
	RootCertificate string   `yaml:"root-certificate"`
	Revoke          []string `yaml:"revoke"`
	Number          int64    `yaml:"number"`
	Validity        Duration `yaml:"validity"`
	Output          string   `yaml:"output"`
}

// PINSplitConfig splits a token PIN into share files.
type PINSplitConfig struct {
	Token     string   `yaml:"token"`
	PINFile   string   `yaml:"pin-file"`
	Threshold int      `yaml:"threshold"`
	Shares    []string `yaml:"shares"`
}

// Duration accepts Go durations and whole days or years ("90d", "1y", "10y";
// a year is 365 days): strictyaml.Duration.
type Duration = strictyaml.Duration

// ParseDuration parses "8760h", "90d" or "10y" (strictyaml.ParseDuration).
func ParseDuration(s string) (time.Duration, error) { return strictyaml.ParseDuration(s) }

// Load reads a ceremony script. A script that cannot be read as one YAML
// mapping, or whose kind is not the one the operator asked for, is an
// error here; every other problem, unknown fields included, is listed by
// Validate.
func Load(path, kind string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return Parse(data, kind)
}

// Parse is Load on bytes. Unknown fields and values of the wrong type do
// not stop it: they are kept, by field path, for Validate to list with the
// rest. A script of another kind stops it, since checking its fields
// against the asked-for kind would list nothing but noise.
func Parse(data []byte, kind string) (*Config, error) {
	var c Config
	fp, err := decodeScript(data, &c)
	if err != nil {
		return nil, err
	}
	c.fieldProblems = fp
	sum := sha256.Sum256(data)
	c.sha256 = hex.EncodeToString(sum[:])
	for _, p := range fp {
		if p.field == "kind" {
			return nil, fmt.Errorf("kind %s", p.msg)
		}
	}
	if c.Kind == "" {
		return nil, fmt.Errorf("kind is missing: a %s script starts with \"kind: %s\"", kind, kind)
	}
	if c.Kind != kind {
		return nil, fmt.Errorf("kind is %q but the ceremony asked for is %q: wrong script?", c.Kind, kind)
	}
	return &c, nil
}

var labelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$`)

// sections says which sections each kind needs; any other section is an
// error.
var sections = map[string][]string{
	KindRoot:        {"hsm", "key", "root"},
	KindReissueRoot: {"hsm", "key", "root"},
	KindIssuingCSR:  {"hsm", "key", "issuing-csr"},
	KindSignIssuing: {"hsm", "key", "sign-issuing"},
	KindCrossSign:   {"hsm", "key", "cross-sign"},
	KindCRL:         {"hsm", "key", "crl"},
	KindPINSplit:    {"pin-split"},
}

// keyCreated says which kinds make a new key (and so use key.curve); the
// others sign with a key the HSM already holds.
var keyCreated = map[string]bool{KindRoot: true, KindIssuingCSR: true}

// problems is strictyaml.Problems that leaves out what a field already
// reported while reading the script would repeat: a mistyped value would
// otherwise also be reported as missing.
type problems struct {
	strictyaml.Problems
	reported []string
}

func (p *problems) Add(field, format string, a ...any) {
	for _, r := range p.reported {
		if field == r || strings.HasPrefix(field, r+".") || strings.HasPrefix(field, r+"[") {
			return
		}
	}
	p.Problems.Add(field, format, a...)
}

// Validate checks the whole script against the file system, without
// touching any HSM: fields are known and used by the kind, inputs exist
// and parse, outputs do not exist yet, PIN sources are private, and shares
// rebuild a PIN. It lists every problem at once, so an officer fixes them
// all in one pass rather than one per attempt. It returns what the run
// needs that validation already read.
func (c *Config) Validate(now time.Time) (*Plan, error) {
	if _, ok := sections[c.Kind]; !ok {
		return nil, fmt.Errorf("kind %q is not one of %s", c.Kind, strings.Join(Kinds, ", "))
	}
	v := &problems{}
	p := &Plan{Config: c}
	c.checkFields(v)

	if c.Kind != KindPINSplit {
		td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
		if err != nil || strings.Contains(c.TrustDomain, "/") {
			v.Add("trust-domain", "must be a SPIFFE trust domain name like example.org (got %q)", c.TrustDomain)
		}
		p.TrustDomain = td
	}
	if c.Transcript == "" {
		v.Add("transcript", "is required: every ceremony leaves a transcript")
	} else if err := checkTranscript(c.Transcript); err != nil {
		v.Add("transcript", "%v", err)
	}

	if c.HSM != nil {
		c.validateHSM(v, p)
	}
	if c.Key != nil {
		if !labelRE.MatchString(c.Key.Label) {
			v.Add("key.label", "must be 1-32 characters of A-Z a-z 0-9 . _ - (got %q)", c.Key.Label)
		}
		switch c.Key.Curve {
		case "":
			if keyCreated[c.Kind] {
				c.Key.Curve = "P-384"
				if c.Kind == KindIssuingCSR {
					// Issuing keys sign every SVID: P-256 is twice as fast
					// in HSMs and as strong as the TLS it protects.
					c.Key.Curve = "P-256"
				}
			}
		case "P-256", "P-384":
		default:
			if keyCreated[c.Kind] {
				v.Add("key.curve", "must be P-256 or P-384 (got %q)", c.Key.Curve)
			}
		}
	}
	switch c.Kind {
	case KindRoot, KindReissueRoot:
		if c.Root != nil {
			c.validateRoot(v, p, now)
		}
	case KindIssuingCSR:
		if c.IssuingCSR != nil {
			if !nodeid.Valid(c.IssuingCSR.NodeID) {
				v.Add("issuing-csr.node-id", "must match %s (got %q)", nodeid.Pattern, c.IssuingCSR.NodeID)
			}
			checkOutput(v, "issuing-csr.output", c.IssuingCSR.Output, p)
		}
	case KindSignIssuing:
		if c.SignIssuing != nil {
			c.validateSignIssuing(v, p, now)
		}
	case KindCrossSign:
		if c.CrossSign != nil {
			c.validateCrossSign(v, p, now)
		}
	case KindCRL:
		if c.CRL != nil {
			c.validateCRL(v, p, now)
		}
	case KindPINSplit:
		if c.PINSplit != nil {
			c.validatePINSplit(v, p)
		}
	}
	if err := v.Err("ceremony config"); err != nil {
		p.wipe()
		return nil, err
	}
	return p, nil
}

// checkFields reports what is wrong with the script's shape, before any
// value is looked at: fields that are unknown or mistyped (found by
// Parse), sections the kind needs or does not use, and fields the kind
// would ignore. A field that does nothing is refused rather than left to
// look like a setting.
func (c *Config) checkFields(v *problems) {
	for _, fp := range c.fieldProblems {
		v.Problems.Add(fp.field, "%s", fp.msg)
		if !fp.keyOnly {
			v.reported = append(v.reported, fp.field)
		}
	}
	need := sections[c.Kind]
	present := []struct {
		name  string
		there bool
	}{{"hsm", c.HSM != nil}, {"key", c.Key != nil}, {"root", c.Root != nil}, {"issuing-csr", c.IssuingCSR != nil},
		{"sign-issuing", c.SignIssuing != nil}, {"cross-sign", c.CrossSign != nil}, {"crl", c.CRL != nil}, {"pin-split", c.PINSplit != nil}}
	for _, s := range present {
		wanted := slices.Contains(need, s.name)
		switch {
		case wanted && !s.there:
			v.Add(s.name, "is required for kind %s", c.Kind)
		case !wanted && s.there:
			v.Add(s.name, "is not used by kind %s; remove it", c.Kind)
		}
	}
	if c.Kind == KindPINSplit && c.TrustDomain != "" {
		v.Add("trust-domain", "is not used by kind pin-split; remove it")
	}
	if c.Key != nil && c.Key.Curve != "" && !keyCreated[c.Kind] {
		v.Add("key.curve", "is not used by kind %s: it signs with a key the HSM already holds, whose curve is its own; remove it", c.Kind)
	}
	if c.Root != nil && c.Root.Previous != "" && c.Kind != KindReissueRoot {
		v.Add("root.previous", "is not used by kind %s (only by reissue-root); remove it", c.Kind)
	}
}

func (c *Config) validateHSM(v *problems, p *Plan) {
	h := c.HSM
	if h.Module == "" {
		v.Add("hsm.module", "is required (the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so)")
	} else if st, err := os.Stat(h.Module); err != nil || !st.Mode().IsRegular() {
		v.Add("hsm.module", "%s is not a readable library", h.Module)
	}
	if h.Token == "" {
		v.Add("hsm.token", "is required (the token label)")
	}
	switch {
	case h.PINFile == "" && len(h.PINShares) == 0:
		v.Add("hsm", "needs a PIN source: pin-file or pin-shares (PINs are never written in the script)")
	case h.PINFile != "" && len(h.PINShares) > 0:
		v.Add("hsm", "has both pin-file and pin-shares; give one")
	case h.PINFile != "":
		if err := checkPrivateFile(h.PINFile); err != nil {
			v.Add("hsm.pin-file", "%v", err)
		}
	default:
		var shares []pinshare.Share
		for i, f := range h.PINShares {
			s, err := readShare(f)
			if err != nil {
				v.Add(fmt.Sprintf("hsm.pin-shares[%d]", i), "%v", err)
				continue
			}
			shares = append(shares, s)
		}
		if len(shares) == len(h.PINShares) {
			if shares[0].Token != h.Token {
				v.Add("hsm.pin-shares", "are for token %q, not %q", shares[0].Token, h.Token)
			} else if pin, err := pinshare.Combine(shares); err != nil {
				v.Add("hsm.pin-shares", "%v", err)
			} else {
				p.pin = pin
			}
		}
	}
}

func (c *Config) validateRoot(v *problems, p *Plan, now time.Time) {
	r := c.Root
	if r.Subject.CommonName == "" {
		v.Add("root.subject.common-name", "is required")
	}
	if len(r.Subject.Country) != 0 && len(r.Subject.Country) != 2 {
		v.Add("root.subject.country", "must be a two-letter code")
	}
	if r.Validity.Duration <= 0 {
		v.Add("root.validity", "is required (e.g. 10y)")
	} else if r.Validity.Duration > 30*365*24*time.Hour {
		v.Add("root.validity", "%v is longer than 30 years", r.Validity.Duration)
	}
	if r.PathLength != nil && *r.PathLength != 1 && *r.PathLength != 2 {
		v.Add("root.path-length", "must be 1 (issuing CAs only) or 2 (room for a cross-signed successor root) (got %d)", *r.PathLength)
	}
	checkOutput(v, "root.output", r.Output, p)
	if c.Kind == KindReissueRoot && r.Previous != "" {
		cert, err := readCert(r.Previous)
		if err != nil {
			v.Add("root.previous", "%v", err)
		} else {
			p.Previous = cert
		}
	}
}

func (c *Config) validateSignIssuing(v *problems, p *Plan, now time.Time) {
	s := c.SignIssuing
	root, err := readCert(s.RootCertificate)
	if err != nil {
		v.Add("sign-issuing.root-certificate", "%v", err)
	} else {
		p.RootCert = root
		if !root.IsCA {
			v.Add("sign-issuing.root-certificate", "%s is not a CA certificate", s.RootCertificate)
		}
		if now.After(root.NotAfter) {
			v.Add("sign-issuing.root-certificate", "expired on %s", root.NotAfter.Format(time.RFC3339))
		}
	}
	if !nodeid.Valid(s.NodeID) {
		v.Add("sign-issuing.node-id", "must match %s (got %q)", nodeid.Pattern, s.NodeID)
	}
	csr, err := readCSR(s.CSR)
	if err != nil {
		v.Add("sign-issuing.csr", "%v", err)
	} else if err := checkCSR(csr, p.TrustDomain, s.NodeID); err != nil {
		v.Add("sign-issuing.csr", "%v", err)
	} else {
		p.CSR = csr
	}
	if s.Validity.Duration <= 0 {
		v.Add("sign-issuing.validity", "is required (e.g. 1y)")
	} else if root != nil && now.Add(s.Validity.Duration).After(root.NotAfter) {
		v.Add("sign-issuing.validity", "%v would outlive the root (expires %s)", s.Validity.Duration, root.NotAfter.Format(time.RFC3339))
	}
	checkOutput(v, "sign-issuing.output", s.Output, p)
}

func (c *Config) validateCrossSign(v *problems, p *Plan, now time.Time) {
	s := c.CrossSign
	const oldField, newField = "cross-sign.old-root-certificate", "cross-sign.new-root-certificate"
	oldRoot, err := readCert(s.OldRootCertificate)
	if err != nil {
		v.Add(oldField, "%v", err)
	} else {
		p.RootCert = oldRoot
		for _, msg := range rootProblems(oldRoot, p.TrustDomain, now) {
			v.Add(oldField, "%s %s", s.OldRootCertificate, msg)
		}
	}
	newRoot, err := readCert(s.NewRootCertificate)
	if err != nil {
		v.Add(newField, "%v", err)
	} else {
		p.NewRoot = newRoot
		for _, msg := range rootProblems(newRoot, p.TrustDomain, now) {
			v.Add(newField, "%s %s", s.NewRootCertificate, msg)
		}
	}
	if oldRoot != nil && newRoot != nil {
		switch {
		case samePublicKey(oldRoot.PublicKey, newRoot.PublicKey):
			v.Add(newField, "%s has the old root's key: that is a re-issued root (reissue-root), not a successor to cross-sign", s.NewRootCertificate)
		case bytes.Equal(oldRoot.RawSubject, newRoot.RawSubject):
			v.Add(newField, "%s has the old root's subject (%s): give the new root a name of its own (e.g. its year in the common name); "+
				"a cross certificate whose subject is its issuer is self-issued, which RFC 5280 path validation treats specially and crypto/x509 does not",
				s.NewRootCertificate, newRoot.Subject)
		}
		// Under the old root, the chain of an SVID signed under the new
		// root is: issuing CA, cross certificate. Verifiers (crypto/x509,
		// OpenSSL) count both against the old root's path length.
		if oldRoot.IsCA && oldRoot.MaxPathLen == 1 { // other lengths are refused above
			v.Add(oldField, "%s has path length %d: an SVID's chain through a cross certificate (issuing CA, cross certificate) puts 2 CA certificates below it, "+
				"which crypto/x509 and OpenSSL refuse; only a root made with root.path-length: 2 can cross-sign its successor", s.OldRootCertificate, oldRoot.MaxPathLen)
		}
	}
	if s.Validity.Duration <= 0 {
		v.Add("cross-sign.validity", "is required (e.g. 1y: until relying parties that pin the old root have the new one)")
	} else {
		end := now.Add(s.Validity.Duration)
		if oldRoot != nil && end.After(oldRoot.NotAfter) {
			v.Add("cross-sign.validity", "%v would outlive the old root (expires %s): a cross certificate ends within its issuer's validity",
				durationText(s.Validity.Duration), oldRoot.NotAfter.UTC().Format(time.RFC3339))
		}
		if newRoot != nil && end.After(newRoot.NotAfter) {
			v.Add("cross-sign.validity", "%v would outlive the new root (expires %s)", durationText(s.Validity.Duration), newRoot.NotAfter.UTC().Format(time.RFC3339))
		}
	}
	checkOutput(v, "cross-sign.output", s.Output, p)
}

func (c *Config) validateCRL(v *problems, p *Plan, now time.Time) {
	s := c.CRL
	root, err := readCert(s.RootCertificate)
	if err != nil {
		v.Add("crl.root-certificate", "%v", err)
	} else {
		p.RootCert = root
	}
	if s.Number <= 0 {
		v.Add("crl.number", "must be a positive, increasing CRL number")
	}
	if s.Validity.Duration <= 0 {
		v.Add("crl.validity", "is required (time to the next update, e.g. 30d)")
	}
	for i, f := range s.Revoke {
		cert, err := readCert(f)
		if err != nil {
			v.Add(fmt.Sprintf("crl.revoke[%d]", i), "%v", err)
			continue
		}
		if root != nil && cert.CheckSignatureFrom(root) != nil {
			v.Add(fmt.Sprintf("crl.revoke[%d]", i), "%s was not issued by the root", f)
			continue
		}
		p.Revoked = append(p.Revoked, cert)
	}
	checkOutput(v, "crl.output", s.Output, p)
}

func (c *Config) validatePINSplit(v *problems, p *Plan) {
	s := c.PINSplit
	if s.Token == "" {
		v.Add("pin-split.token", "is required (the label of the token whose PIN this is)")
	}
	if err := checkPrivateFile(s.PINFile); err != nil {
		v.Add("pin-split.pin-file", "%v", err)
	} else {
		pin, err := readPINFile(s.PINFile)
		if err != nil {
			v.Add("pin-split.pin-file", "%v", err)
		}
		p.pin = pin
	}
	if s.Threshold < 2 {
		v.Add("pin-split.threshold", "must be at least 2 (got %d)", s.Threshold)
	}
	if len(s.Shares) < s.Threshold {
		v.Add("pin-split.shares", "lists %d files, fewer than the threshold %d", len(s.Shares), s.Threshold)
	}
	if len(s.Shares) > 255 {
		v.Add("pin-split.shares", "lists more than 255 files")
	}
	for i, f := range s.Shares {
		checkOutput(v, fmt.Sprintf("pin-split.shares[%d]", i), f, p)
	}
}

// checkOutput refuses an output that exists (outputs are never overwritten)
// or whose directory does not, and a path listed twice.
func checkOutput(v *problems, field, path string, p *Plan) {
	if path == "" {
		v.Add(field, "is required")
		return
	}
	abs, _ := filepath.Abs(path)
	for _, o := range p.outputs {
		if o == abs {
			v.Add(field, "%s is listed twice", path)
			return
		}
	}
	if _, err := os.Lstat(path); err == nil {
		v.Add(field, "%s already exists; outputs are never overwritten", path)
		return
	}
	if st, err := os.Stat(filepath.Dir(abs)); err != nil || !st.IsDir() {
		v.Add(field, "directory %s does not exist", filepath.Dir(abs))
		return
	}
	p.outputs = append(p.outputs, abs)
}

func checkPrivateFile(path string) error {
	if path == "" {
		return errors.New("is required")
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s has mode %v; it must be readable by its owner only (chmod 600)", path, st.Mode().Perm())
	}
	return nil
}

func readPINFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pin := bytes.TrimRight(b, "\r\n")
	if len(pin) == 0 {
		return nil, fmt.Errorf("%s is empty", path)
	}
	if len(pin) > 255 {
		return nil, fmt.Errorf("%s is longer than any PIN", path)
	}
	return pin, nil
}

func readShare(path string) (pinshare.Share, error) {
	if err := checkPrivateFile(path); err != nil {
		return pinshare.Share{}, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return pinshare.Share{}, err
	}
	s, err := pinshare.Parse(b)
	if err != nil {
		return pinshare.Share{}, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}

// readCert and readCSR read files a script must name.
func readCert(path string) (*x509.Certificate, error) {
	if path == "" {
		return nil, errRequired
	}
	return pemfile.ReadCert(path)
}

func readCSR(path string) (*x509.CertificateRequest, error) {
	if path == "" {
		return nil, errRequired
	}
	return pemfile.ReadCSR(path)
}

var errRequired = errors.New("is required")
