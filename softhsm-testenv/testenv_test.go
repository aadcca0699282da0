package testenv

import (
	"bytes"
	"context"
	"crypto/x509"
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
			b, _ := os.ReadFile(der)
			// The NV index may be padded after the DER certificate.
			cert, err := x509.ParseCertificate(trimDER(b))
			if err != nil {
				t.Fatalf("EK certificate at %s: %v", idx, err)
			}
			pemPath := filepath.Join(t.TempDir(), "ek.pem")
			os.WriteFile(pemPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644)
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

// trimDER cuts a DER SEQUENCE to its encoded length.
func trimDER(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x30 {
		return b
	}
	n, hdr := int(b[1]), 2
	if n&0x80 != 0 {
		l := n & 0x7f
		n, hdr = 0, 2+l
		for _, c := range b[2 : 2+l] {
			n = n<<8 | int(c)
		}
	}
	if hdr+n <= len(b) {
		return b[:hdr+n]
	}
	return b
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
