package clustertest

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/ceremony"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// RootCRL runs the crl ceremony with the root key, as an operator retiring
// node issuing CAs would, and returns the CRL (DER) revoking the issuing
// CAs of nodes (none: an empty CRL). number must increase from one CRL to
// the next.
func (tr *Trust) RootCRL(t testing.TB, number int64, nodes ...string) []byte {
	t.Helper()
	var revoke []string
	for _, id := range nodes {
		n := tr.Nodes[id]
		if n == nil || n.Rogue {
			t.Fatalf("RootCRL: %q is not a node of the root", id)
		}
		revoke = append(revoke, n.IssuingPath)
	}
	out := filepath.Join(tr.Dir, fmt.Sprintf("root-%d-%d.crl", number, time.Now().UnixNano()))
	script := fmt.Sprintf("kind: crl\ntrust-domain: example.org\ntranscript: %s\nhsm:\n  module: %s\n  token: %s\n  pin-file: %s\nkey:\n  label: root\ncrl:\n  root-certificate: %s\n  revoke: [%s]\n  number: %d\n  validity: 30d\n  output: %s\n",
		filepath.Join(tr.Dir, "transcript.jsonl"), tr.Module, tr.RootToken.Label, tr.RootToken.PINFile, tr.RootPath,
		strings.Join(revoke, ", "), number, out)
	cfg, err := ceremony.Parse([]byte(script), ceremony.KindCRL)
	if err != nil {
		t.Fatalf("crl script: %v", err)
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		t.Fatalf("crl: %v", err)
	}
	if err := ceremony.Run(context.Background(), plan, ceremony.Options{}); err != nil {
		t.Fatalf("crl ceremony: %v", err)
	}
	der, err := pemfile.ReadOne(out, pemfile.CRL)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
