package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"path/filepath"
	"testing"

	"github.com/sigil-appliance/sigil/keystore"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// BenchmarkSignP256 reports TPM ECDSA P-256 signatures per second next to
// pure Go in the same run ("x-pure-go" is the ratio). The agent signs with
// its TPM key only at join and renewal, never per workload SVID.
func BenchmarkSignP256(b *testing.B) {
	tp := testenv.NewTPM(b)
	k, err := Open(context.Background(), Config{Path: tp.Socket})
	if err != nil {
		b.Fatal(err)
	}
	defer k.Close()
	uri := "tpmkey:file=" + filepath.Join(b.TempDir(), "bench.key")
	if _, err := k.CreateKey(context.Background(), keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); err != nil {
		b.Fatal(err)
	}
	tpmSigner, err := k.Signer(context.Background(), uri)
	if err != nil {
		b.Fatal(err)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := sha256.Sum256([]byte("bench"))
	var pure float64
	for _, c := range []struct {
		name string
		s    crypto.Signer
	}{{"pure-go", soft}, {"tpm", tpmSigner}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				if _, err := c.s.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
			}
			rate := float64(b.N) / b.Elapsed().Seconds()
			b.ReportMetric(rate, "sigs/s")
			if c.name == "pure-go" {
				pure = rate
			} else if pure > 0 {
				b.ReportMetric(rate/pure, "x-pure-go")
			}
		})
	}
}
