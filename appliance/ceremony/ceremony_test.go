package ceremony

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

func TestMain(m *testing.M) { os.Exit(testenv.Main(m)) }

// ceremonyEnv is a ceremony room: a root token and node tokens in one
// SoftHSM (the process's), and a directory for scripts and outputs.
type ceremonyEnv struct {
	dir    string
	module string
	root   *testenv.Token
	nodes  map[string]*testenv.Token
}

// newEnv makes every token up front: SoftHSM shows a process only the
// tokens that existed when the module was first initialized.
func newEnv(t *testing.T, prefix string, nodes ...string) *ceremonyEnv {
	hsm := testenv.ProcessHSM(t)
	e := &ceremonyEnv{dir: t.TempDir(), module: hsm.Module, nodes: map[string]*testenv.Token{}}
	e.root = hsm.NewToken(t, prefix+"-root")
	for _, n := range nodes {
		e.nodes[n] = hsm.NewToken(t, prefix+"-"+n)
	}
	return e
}

func (e *ceremonyEnv) path(name string) string { return filepath.Join(e.dir, name) }

// run writes script, then loads, validates and runs it as sigil-ceremony
// does, returning what the witnesses saw.
func (e *ceremonyEnv) run(t *testing.T, kind, script string) (string, error) {
	t.Helper()
	cfgPath := filepath.Join(e.dir, fmt.Sprintf("%s-%d.yaml", kind, time.Now().UnixNano()))
	if err := os.WriteFile(cfgPath, []byte(script), 0o600); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.Remove(cfgPath) }() // cleanup only
	cfg, err := Load(cfgPath, kind)
	if err != nil {
		return "", err
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		return "", err
	}
	var out bytes.Buffer
	err = Run(context.Background(), plan, Options{Out: &out})
	return out.String(), err
}

func (e *ceremonyEnv) hsmSection(tok *testenv.Token, pin string) string {
	return fmt.Sprintf("hsm:\n  module: %s\n  token: %s\n%s", e.module, tok.Label, pin)
}

func pinFile(tok *testenv.Token) string { return "  pin-file: " + tok.PINFile + "\n" }

func pinShares(paths ...string) string {
	return "  pin-shares: [" + strings.Join(paths, ", ") + "]\n"
}

func (e *ceremonyEnv) pinSplitScript(threshold int, shares ...string) string {
	return fmt.Sprintf(`kind: pin-split
transcript: %s
pin-split:
  token: %s
  pin-file: %s
  threshold: %d
  shares: [%s]
`, e.path("transcript.jsonl"), e.root.Label, e.root.PINFile, threshold, strings.Join(shares, ", "))
}

func (e *ceremonyEnv) rootScript(pin, label, output string) string {
	return fmt.Sprintf(`kind: root
trust-domain: example.org
transcript: %s
%skey:
  label: %s
  curve: P-384
root:
  subject:
    common-name: Sigil Test Root
    organization: Sigil Test
  validity: 10y
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(e.root, pin), label, output)
}

func (e *ceremonyEnv) csrScript(node, label, output string) string {
	tok := e.nodes[node]
	return fmt.Sprintf(`kind: issuing-csr
trust-domain: example.org
transcript: %s
%skey:
  label: %s
issuing-csr:
  node-id: %s
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(tok, pinFile(tok)), label, node, output)
}

func (e *ceremonyEnv) signScript(pin, rootLabel, rootCert, csr, node, output string) string {
	return fmt.Sprintf(`kind: sign-issuing
trust-domain: example.org
transcript: %s
%skey:
  label: %s
sign-issuing:
  root-certificate: %s
  csr: %s
  node-id: %s
  validity: 1y
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(e.root, pin), rootLabel, rootCert, csr, node, output)
}

func mustRun(t *testing.T, e *ceremonyEnv, kind, script string) string {
	t.Helper()
	out, err := e.run(t, kind, script)
	if err != nil {
		t.Fatalf("%s ceremony: %v\n%s", kind, err, out)
	}
	return out
}

func openssl(t *testing.T, args ...string) string {
	t.Helper()
	testenv.RequireTools(t, "openssl")
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestCompleteCeremony(t *testing.T) {
	e := newEnv(t, "full", "node-1", "node-2")
	var shares []string
	for i := 1; i <= 5; i++ {
		shares = append(shares, e.path(fmt.Sprintf("officer-%d.share", i)))
	}

	out := mustRun(t, e, KindPINSplit, e.pinSplitScript(3, shares...))
	if !strings.Contains(out, "shares read back and verified") {
		t.Fatalf("pin-split output:\n%s", out)
	}
	for _, s := range shares {
		if st, _ := os.Stat(s); st.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", s, st.Mode().Perm())
		}
	}

	// Root with three officers' shares; the PIN exists only in memory.
	out = mustRun(t, e, KindRoot, e.rootScript(pinShares(shares[0], shares[2], shares[4]), "root-key", e.path("root.pem")))
	t.Logf("root ceremony:\n%s", out)
	for _, want := range []string{"] ceremony started", "key generated in HSM", "public key sha256:", "certificate signed", "sha256 fingerprint:", "wrote root certificate", "ceremony complete"} {
		if !strings.Contains(out, want) {
			t.Errorf("root ceremony output lacks %q", want)
		}
	}
	root, err := readCert(e.path("root.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !root.IsCA || root.MaxPathLen != 1 || root.URIs[0].String() != "spiffe://example.org" ||
		len(root.PermittedURIDomains) != 1 || root.PermittedURIDomains[0] != "example.org" {
		t.Fatalf("root certificate: CA=%v pathlen=%d URIs=%v constraints=%v", root.IsCA, root.MaxPathLen, root.URIs, root.PermittedURIDomains)
	}

	for _, node := range []string{"node-1", "node-2"} {
		csr := e.path(node + ".csr")
		mustRun(t, e, KindIssuingCSR, e.csrScript(node, "issuing", csr))
		inter := e.path(node + "-issuing.pem")
		mustRun(t, e, KindSignIssuing, e.signScript(pinShares(shares[1], shares[3], shares[4]), "root-key", e.path("root.pem"), csr, node, inter))

		if got := openssl(t, "verify", "-CAfile", e.path("root.pem"), inter); !strings.Contains(got, ": OK") {
			t.Fatalf("openssl verify %s: %s", node, got)
		}
		cert, _ := readCert(inter)
		if !cert.IsCA || cert.MaxPathLen != 0 || !cert.MaxPathLenZero || cert.Subject.CommonName != node ||
			cert.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign || cert.NotAfter.After(root.NotAfter) {
			t.Fatalf("%s intermediate: CA=%v pathlen=%d cn=%s ku=%b", node, cert.IsCA, cert.MaxPathLen, cert.Subject.CommonName, cert.KeyUsage)
		}
		// The node's HSM holds the key the intermediate certifies.
		if keys := e.nodes[node].PrivateKeys(t); keys["issuing"]["Access"] != testenv.NonExtractable {
			t.Fatalf("%s issuing key: %v", node, keys)
		}
	}
	if keys := e.root.PrivateKeys(t); len(keys) != 1 || keys["root-key"]["Access"] != testenv.NonExtractable || keys["root-key"]["Usage"] != "sign" {
		t.Fatalf("root token keys: %v", keys)
	}

	// Retire node-2's intermediate with a CRL signed by the root.
	mustRun(t, e, KindCRL, fmt.Sprintf(`kind: crl
trust-domain: example.org
transcript: %s
%skey:
  label: root-key
crl:
  root-certificate: %s
  revoke: [%s]
  number: 1
  validity: 30d
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(e.root, pinShares(shares[0], shares[1], shares[2])), e.path("root.pem"), e.path("node-2-issuing.pem"), e.path("root.crl")))
	if got := openssl(t, "crl", "-in", e.path("root.crl"), "-CAfile", e.path("root.pem"), "-noout"); !strings.Contains(got, "verify OK") {
		t.Fatalf("openssl crl: %s", got)
	}
	inter2, _ := readCert(e.path("node-2-issuing.pem"))
	got := openssl(t, "verify", "-crl_check", "-CRLfile", e.path("root.crl"), "-CAfile", e.path("root.pem"), e.path("node-1-issuing.pem"))
	if !strings.Contains(got, ": OK") {
		t.Fatalf("node-1 with CRL: %s", got)
	}
	cmd := exec.Command("openssl", "verify", "-crl_check", "-CRLfile", e.path("root.crl"), "-CAfile", e.path("root.pem"), e.path("node-2-issuing.pem"))
	if o, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(o), "revoked") {
		t.Fatalf("node-2 (serial %x) not reported revoked: %v %s", inter2.SerialNumber, err, o)
	}

	// Re-issue the root for the same key: the intermediates still verify.
	mustRun(t, e, KindReissueRoot, fmt.Sprintf(`kind: reissue-root
trust-domain: example.org
transcript: %s
%skey:
  label: root-key
root:
  subject:
    common-name: Sigil Test Root
    organization: Sigil Test
  validity: 12y
  previous: %s
  output: %s
`, e.path("transcript.jsonl"), e.hsmSection(e.root, pinShares(shares[2], shares[3], shares[4])), e.path("root.pem"), e.path("root-2.pem")))
	if got := openssl(t, "verify", "-CAfile", e.path("root-2.pem"), e.path("node-1-issuing.pem")); !strings.Contains(got, ": OK") {
		t.Fatalf("intermediate under re-issued root: %s", got)
	}

	// One transcript, chained across all eight ceremonies.
	n, err := VerifyTranscript(e.path("transcript.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(readFile(t, e.path("transcript.jsonl"))), "\n")
	if n != len(lines) || n < 30 {
		t.Fatalf("transcript: %d records, %d lines", n, len(lines))
	}
	ceremonies := map[string]bool{}
	for _, l := range lines {
		var r Record
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("transcript line %q: %v", l, err)
		}
		ceremonies[r.Ceremony] = true
	}
	if len(ceremonies) != 8 {
		t.Fatalf("transcript holds %d ceremonies, want 8", len(ceremonies))
	}
	if strings.Contains(readFile(t, e.path("transcript.jsonl")), e.root.PIN(t)) {
		t.Fatal("transcript contains the PIN")
	}

	// An edited transcript is detected, and no ceremony appends to it.
	tampered := strings.Replace(readFile(t, e.path("transcript.jsonl")), "node-1", "node-9", 1)
	writeFile(t, e.path("transcript.jsonl"), []byte(tampered), 0o640)
	if _, err := VerifyTranscript(e.path("transcript.jsonl")); err == nil || !strings.Contains(err.Error(), "hash chain broken") {
		t.Fatalf("tampered transcript: %v", err)
	}
	if _, err := e.run(t, KindIssuingCSR, e.csrScript("node-1", "issuing-2", e.path("x.csr"))); err == nil || !strings.Contains(err.Error(), "transcript") {
		t.Fatalf("ceremony on a tampered transcript: %v", err)
	}
}

// snapshot is what a refused ceremony must leave unchanged: every file in
// the ceremony directory and every object on every token.
func snapshot(t *testing.T, e *ceremonyEnv) string {
	t.Helper()
	var b strings.Builder
	entries, _ := os.ReadDir(e.dir)
	var names []string
	for _, en := range entries {
		names = append(names, en.Name())
	}
	sort.Strings(names)
	for _, n := range names {
		sum := sha256.Sum256([]byte(readFile(t, e.path(n))))
		fmt.Fprintf(&b, "%s %s\n", n, hex.EncodeToString(sum[:8]))
	}
	toks := []*testenv.Token{e.root}
	var nodes []string
	for n := range e.nodes {
		nodes = append(nodes, n)
	}
	sort.Strings(nodes)
	for _, n := range nodes {
		toks = append(toks, e.nodes[n])
	}
	for _, tok := range toks {
		b.WriteString(tok.ListObjects(t))
	}
	return b.String()
}

func TestRefusedCeremoniesChangeNothing(t *testing.T) {
	e := newEnv(t, "refuse", "node-1")
	var shares []string
	for i := 1; i <= 3; i++ {
		shares = append(shares, e.path(fmt.Sprintf("s%d.share", i)))
	}
	mustRun(t, e, KindPINSplit, e.pinSplitScript(2, shares...))
	mustRun(t, e, KindRoot, e.rootScript(pinShares(shares[0], shares[1]), "root-key", e.path("root.pem")))
	mustRun(t, e, KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("node-1.csr")))

	// A share from another split of the same PIN, and a damaged share.
	otherDir := t.TempDir()
	other := []string{filepath.Join(otherDir, "o1"), filepath.Join(otherDir, "o2")}
	mustRun(t, e, KindPINSplit, strings.Replace(e.pinSplitScript(2, other...), e.path("transcript.jsonl"), filepath.Join(otherDir, "t.jsonl"), 1))
	damaged := e.path("damaged.share")
	var sh map[string]any
	if err := json.Unmarshal([]byte(readFile(t, shares[1])), &sh); err != nil {
		t.Fatal(err)
	}
	v, _ := base64.StdEncoding.DecodeString(sh["value"].(string))
	v[5] ^= 0x01
	sh["value"] = base64.StdEncoding.EncodeToString(v)
	b, _ := json.Marshal(sh)
	writeFile(t, damaged, b, 0o600)
	openShare := e.path("open.share")
	writeFile(t, openShare, []byte(readFile(t, shares[2])), 0o644)
	writeFile(t, e.path("exists.pem"), []byte("taken"), 0o644)

	good := e.rootScript(pinShares(shares[0], shares[1]), "root-2", e.path("root-2.pem"))
	cases := []struct {
		name, kind, script, want string
	}{
		{"unknown field", KindRoot, good + "colour: blue\n", "colour is an unknown field"},
		{"misspelled nested field", KindRoot, strings.Replace(good, "  curve: P-384", "  curv: P-384", 1), "key.curv is an unknown field (line 10); key has: label, curve"},
		{"unknown field with other problems", KindRoot, strings.Replace(good, "  curve: P-384", "  curv: P-384", 1) + "colour: blue\n" + "pin-split:\n  token: x\n",
			"invalid ceremony config:\n  - key.curv is an unknown field (line 10); key has: label, curve\n" +
				"  - colour is an unknown field (line 17); a ceremony script has: kind, trust-domain, transcript, hsm, key, root, issuing-csr, sign-issuing, cross-sign, crl, pin-split\n" +
				"  - pin-split is not used by kind root; remove it"},
		{"mistyped value", KindRoot, strings.Replace(good, "validity: 10y", "validity: [10y]", 1), "root.validity must be a duration such as 90d, 1y or 36h, not a list (line 15)"},
		{"curve of an existing key", KindSignIssuing, strings.Replace(e.signScript(pinShares(shares[0], shares[1]), "root-key", e.path("root.pem"), e.path("node-1.csr"), "node-1", e.path("n1.pem")), "  label: root-key\n", "  label: root-key\n  curve: P-256\n", 1),
			"key.curve is not used by kind sign-issuing"},
		{"curve of an existing key for a CRL", KindCRL, "kind: crl\ntrust-domain: example.org\ntranscript: " + e.path("transcript.jsonl") + "\n" + e.hsmSection(e.root, pinFile(e.root)) + "key:\n  label: root-key\n  curve: P-384\ncrl:\n  root-certificate: " + e.path("root.pem") + "\n  number: 1\n  validity: 30d\n  output: " + e.path("c.crl") + "\n",
			"key.curve is not used by kind crl"},
		{"previous root in a root ceremony", KindRoot, strings.Replace(good, "  validity: 10y\n", "  validity: 10y\n  previous: "+e.path("root.pem")+"\n", 1), "root.previous is not used by kind root (only by reissue-root)"},
		{"second document", KindRoot, good + "---\nkind: root\n", "more than one YAML document"},
		{"wrong kind", KindIssuingCSR, good, `kind is "root"`},
		{"bad curve", KindRoot, strings.Replace(good, "P-384", "P-521", 1), "key.curve must be P-256 or P-384"},
		{"bad trust domain", KindRoot, strings.Replace(good, "example.org", "Example Org", 1), "trust-domain must be"},
		{"missing PIN source", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), "", 1), "needs a PIN source"},
		{"PIN file readable by others", KindIssuingCSR, strings.Replace(e.csrScript("node-1", "issuing-2", e.path("n2.csr")), e.nodes["node-1"].PINFile, openShare, 1), "must be readable by its owner only"},
		{"existing output", KindRoot, strings.Replace(good, e.path("root-2.pem"), e.path("exists.pem"), 1), "already exists"},
		{"existing key label", KindRoot, e.rootScript(pinShares(shares[0], shares[1]), "root-key", e.path("root-3.pem")), "already exists"},
		{"existing node key label", KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("n3.csr")), "already exists"},
		{"too few shares", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), pinShares(shares[0]), 1), "1 distinct shares given, 2 needed"},
		{"same share twice", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), pinShares(shares[0], shares[0]), 1), "given twice"},
		{"share from another split", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), pinShares(shares[0], other[1]), 1), "does not belong"},
		{"damaged share", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), pinShares(shares[0], damaged), 1), "wrong share"},
		{"share readable by others", KindRoot, strings.Replace(good, pinShares(shares[0], shares[1]), pinShares(shares[0], openShare), 1), "must be readable by its owner only"},
		{"CSR for another node", KindSignIssuing, e.signScript(pinShares(shares[0], shares[1]), "root-key", e.path("root.pem"), e.path("node-1.csr"), "node-7", e.path("n7.pem")), `not node "node-7"`},
		{"CSR given as the root certificate", KindSignIssuing, e.signScript(pinFile(e.root), "root-key", e.path("node-1.csr"), e.path("node-1.csr"), "node-1", e.path("n1.pem")), "holds no PEM CERTIFICATE"},
		{"intermediate outliving the root", KindSignIssuing, strings.Replace(e.signScript(pinShares(shares[0], shares[1]), "root-key", e.path("root.pem"), e.path("node-1.csr"), "node-1", e.path("n1.pem")), "validity: 1y", "validity: 11y", 1), "would outlive the root"},
		{"sign with a missing root key", KindSignIssuing, e.signScript(pinShares(shares[0], shares[1]), "no-such-key", e.path("root.pem"), e.path("node-1.csr"), "node-1", e.path("n1.pem")), "key not found"},
		{"section of another kind", KindRoot, good + "pin-split:\n  token: x\n", "pin-split is not used by kind root"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := snapshot(t, e)
			out, err := e.run(t, tc.kind, tc.script)
			if err == nil {
				t.Fatalf("ceremony was not refused:\n%s", out)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not say %q", err, tc.want)
			}
			if after := snapshot(t, e); after != before {
				t.Fatalf("a refused ceremony changed files or tokens:\nbefore:\n%s\nafter:\n%s", before, after)
			}
			for _, pin := range []string{e.root.PIN(t), e.nodes["node-1"].PIN(t)} {
				if strings.Contains(err.Error(), pin) || strings.Contains(out, pin) {
					t.Fatal("a PIN appears in the output")
				}
			}
		})
	}
	if _, err := VerifyTranscript(e.path("transcript.jsonl")); err != nil {
		t.Fatal(err)
	}
}

// The wrong root key for a root certificate is caught after the HSM opens
// and before anything is signed.
func TestSignIssuingRefusesForeignRootKey(t *testing.T) {
	e := newEnv(t, "foreign", "node-1")
	mustRun(t, e, KindRoot, e.rootScript(pinFile(e.root), "root-a", e.path("a.pem")))
	mustRun(t, e, KindRoot, e.rootScript(pinFile(e.root), "root-b", e.path("b.pem")))
	mustRun(t, e, KindIssuingCSR, e.csrScript("node-1", "issuing", e.path("n.csr")))
	before := snapshot(t, e)
	_, err := e.run(t, KindSignIssuing, e.signScript(pinFile(e.root), "root-b", e.path("a.pem"), e.path("n.csr"), "node-1", e.path("n.pem")))
	if err == nil || !strings.Contains(err.Error(), "is not the key of root certificate") {
		t.Fatalf("signing with root-b for certificate a: %v", err)
	}
	if snapshot(t, e) != before {
		t.Fatal("refused ceremony changed something")
	}
}

func TestExampleScriptsParse(t *testing.T) {
	files, _ := filepath.Glob("../../packaging/ceremony/*.yaml")
	if len(files) != len(Kinds) {
		t.Fatalf("%d example scripts, want one per kind (%d)", len(files), len(Kinds))
	}
	for _, f := range files {
		kind := strings.TrimSuffix(filepath.Base(f), ".yaml")
		c, err := Load(f, kind)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		// Every field known, of its type, and used by the kind (the files
		// they name exist only at a ceremony).
		v := &problems{}
		c.checkFields(v)
		if err := v.Err(f); err != nil {
			t.Error(err)
		}
	}
}

// The scripts README.md shows (indented blocks starting "kind: ") are
// valid scripts of their kind: every field known, of its type, and used.
func TestReadmeScriptsParse(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var scripts []string
	lines := strings.Split(string(b), "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		if !strings.HasPrefix(strings.TrimLeft(l, " "), "kind: ") || !strings.HasPrefix(l, "    ") {
			continue
		}
		indent := l[:len(l)-len(strings.TrimLeft(l, " "))]
		var block []string
		for ; i < len(lines) && (strings.HasPrefix(lines[i], indent) || strings.TrimSpace(lines[i]) == ""); i++ {
			if strings.TrimSpace(lines[i]) == "" && i+1 < len(lines) && !strings.HasPrefix(lines[i+1], indent) {
				break
			}
			block = append(block, strings.TrimPrefix(lines[i], indent))
		}
		scripts = append(scripts, strings.Join(block, "\n"))
	}
	if len(scripts) == 0 {
		t.Fatal("README.md shows no ceremony script: the check checks nothing")
	}
	for _, s := range scripts {
		kind := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(s, "\n", 2)[0], "kind: "))
		c, err := Parse([]byte(s), kind)
		if err != nil {
			t.Errorf("README script %q: %v", kind, err)
			continue
		}
		v := &problems{}
		c.checkFields(v)
		if err := v.Err("README " + kind + " script"); err != nil {
			t.Error(err)
		}
	}
}

// Serials print as openssl x509 -text prints them: the magnitude's bytes,
// without DER's sign padding, in lower-case hex, colon separated.
func TestSerialText(t *testing.T) {
	for in, want := range map[string]string{
		"0a1b": "0a:1b", "80": "80", "00": "00", "7fffffffffffffffffffffffffffffff": "7f:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff:ff",
		"0123456789abcdef01": "01:23:45:67:89:ab:cd:ef:01",
	} {
		n, ok := new(big.Int).SetString(in, 16)
		if !ok {
			t.Fatal(in)
		}
		if got := serialText(n); got != want {
			t.Errorf("serialText(%s) = %q, want %q", in, got, want)
		}
	}
}

func TestDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{"90d": 90 * 24 * time.Hour, "1y": 365 * 24 * time.Hour, "36h": 36 * time.Hour} {
		if got, err := ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "-1d", "0y", "1.5y", "forever"} {
		if _, err := ParseDuration(in); err == nil {
			t.Errorf("ParseDuration(%q) accepted", in)
		}
	}
	if _, err := Parse([]byte(""), KindRoot); err == nil || !errors.Is(err, err) {
		t.Error("empty config accepted")
	}
}

func writeFile(t *testing.T, path string, b []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, b, mode); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
