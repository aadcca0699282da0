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

// BenchmarkTPMSignP256 reports TPM ECDSA P-256 signatures per second and,
// in the same run, pure-Go ecdsa.SignASN1 ("x-pure-go" is the TPM's rate
// as a fraction of it). The agent signs with its TPM key only at join and
// renewal, never per workload SVID, so the ratio only has to be tolerable.
func BenchmarkTPMSignP256(b *testing.B) {
	ctx := context.Background()
	tp := testenv.NewTPM(b)
	k, err := Open(ctx, Config{Path: tp.Socket})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = k.Close() }) // a benchmark measures Sign, not Close
	uri := "tpmkey:file=" + filepath.Join(b.TempDir(), "bench.key")
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); err != nil {
		b.Fatal(err)
	}
	tpmSigner, err := k.Signer(ctx, uri)
	if err != nil {
		b.Fatal(err)
	}
	soft, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	d := sha256.Sum256([]byte("bench"))

	var pure float64
	b.Run("pure-go", func(b *testing.B) {
		for b.Loop() {
			if _, err := ecdsa.SignASN1(rand.Reader, soft, d[:]); err != nil {
				b.Fatal(err)
			}
		}
		pure = float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(pure, "sigs/s")
	})
	b.Run("tpm", func(b *testing.B) {
		for b.Loop() {
			if _, err := tpmSigner.Sign(rand.Reader, d[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
		rate := float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(rate, "sigs/s")
		if pure > 0 {
			b.ReportMetric(rate/pure, "x-pure-go")
		}
	})
}
