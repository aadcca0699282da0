package pkcs11

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"sync"
	"testing"

	"github.com/sigil-appliance/sigil/keystore"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// BenchmarkSignP256 reports ECDSA P-256 signatures per second through
// PKCS#11 with 1 and 8 concurrent signers, and the same through pure Go in
// the same run; "x-pure-go" is the ratio of each to the pure-Go rate.
func BenchmarkSignP256(b *testing.B) {
	tok := testenv.ProcessHSM(b).NewToken(b, "bench")
	ks := New(Options{SessionsPerToken: 8})
	b.Cleanup(func() { _ = ks.Close() }) // a benchmark measures Sign, not Close
	ctx := context.Background()
	uri := tok.KeyURI("bench")
	if _, err := ks.CreateKey(ctx, keystore.CreateKeyRequest{URI: uri, Algorithm: keystore.ECDSAP256}); err != nil {
		b.Fatal(err)
	}
	hsm, err := ks.Signer(ctx, uri)
	if err != nil {
		b.Fatal(err)
	}
	soft, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	digest := sha256.Sum256([]byte("bench"))

	var pureRate float64
	run := func(name string, s crypto.Signer, concurrency int) {
		b.Run(name, func(b *testing.B) {
			var wg sync.WaitGroup
			per := (b.N + concurrency - 1) / concurrency
			b.ResetTimer()
			for g := 0; g < concurrency; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < per; i++ {
						if _, err := s.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			rate := float64(per*concurrency) / b.Elapsed().Seconds()
			b.ReportMetric(rate, "sigs/s")
			if name == "pure-go" {
				pureRate = rate
			} else if pureRate > 0 {
				b.ReportMetric(rate/pureRate, "x-pure-go")
			}
		})
	}
	run("pure-go", soft, 1)
	run("pkcs11-1", hsm, 1)
	run("pkcs11-8", hsm, 8)
}
