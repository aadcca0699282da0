package testenv

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Each swtpm is manufactured anew: its own EK, with an EK certificate that
// the instance's local CA (the stand-in TPM vendor) signed.
func TestTPMsHaveDistinctCertifiedEKs(t *testing.T) {
	RequireTools(t, "tpm2_nvread", "openssl")
	ctx := context.Background()
	var eks [][]byte
	for i := 0; i < 2; i++ {
		tp := NewTPM(t)
		der := filepath.Join(t.TempDir(), "ek.der")
		// RSA EK certificate; the P-384 EK's is at 0x01c00016.
		for _, idx := range []string{"0x01c00002", "0x01c00016"} {
			if _, err := tp.Tool(ctx, "tpm2_nvread", "-o", der, idx); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(der)
			if err != nil {
				t.Fatal(err)
			}
			// The NV index may be padded after the DER certificate.
			var raw asn1.RawValue
			if _, err := asn1.Unmarshal(b, &raw); err != nil {
				t.Fatalf("EK certificate at %s: %v", idx, err)
			}
			cert, err := x509.ParseCertificate(raw.FullBytes)
			if err != nil {
				t.Fatalf("EK certificate at %s: %v", idx, err)
			}
			pemPath := filepath.Join(t.TempDir(), "ek.pem")
			if err := os.WriteFile(pemPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("openssl", "verify", "-CAfile", tp.EKCARoot, "-untrusted", tp.EKCAIssuer, pemPath).CombinedOutput()
			if err != nil || !strings.Contains(string(out), ": OK") {
				t.Fatalf("EK certificate %s does not chain to the local CA: %v %s", idx, err, out)
			}
			if idx == "0x01c00002" {
				eks = append(eks, cert.RawSubjectPublicKeyInfo)
			}
		}
	}
	if bytes.Equal(eks[0], eks[1]) {
		t.Fatal("two swtpm instances have the same EK")
	}
}

func TestTokenFilesArePrivate(t *testing.T) {
	h := NewHSM(t)
	tok := h.NewToken(t, "private")
	for _, f := range []string{tok.PINFile, tok.SOPINFile, h.Conf} {
		st, err := os.Stat(f)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, %v", f, st.Mode().Perm(), err)
		}
	}
	if pin := tok.PIN(t); len(pin) != 32 {
		t.Fatalf("PIN of %d characters", len(pin))
	}
}
