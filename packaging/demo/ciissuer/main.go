// Command ciissuer stands in for a CI platform's OIDC token service in
// `make demo`, and only there: it is not part of Sigil. `serve` publishes
// an OIDC discovery document and its JWKS over TLS on loopback (a fresh
// RSA key and a self-signed certificate in --dir); `token` signs an ID
// token shaped like a GitHub Actions run's with that key, as the platform
// would hand one to a job.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

const kid = "demo-ci-1"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ciissuer serve|token [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", "", "state directory (key, certificate, issuer URL)")
	addr := fs.String("addr", "127.0.0.1:17480", "serve: listen address")
	aud := fs.String("aud", "", "token: audience")
	run := fs.String("run", "4242", "token: run id")
	_ = fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(*dir, *addr)
	case "token":
		err = token(*dir, *aud, *run)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "ciissuer:", err)
		os.Exit(1)
	}
}

func serve(dir, addr string) error {
	if dir == "" {
		return errors.New("--dir is required")
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "signing-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: mustPKCS8(key)}), 0o600); err != nil {
		return err
	}
	tlsKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "demo CI issuer"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &tlsKey.PublicKey, tlsKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "tls-ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	issuer := "https://" + addr
	if err := os.WriteFile(filepath.Join(dir, "issuer"), []byte(issuer+"\n"), 0o644); err != nil {
		return err
	}
	jwks, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: kid, Algorithm: "RS256", Use: "sig"}}})
	disc, _ := json.Marshal(map[string]any{"issuer": issuer, "jwks_uri": issuer + "/keys",
		"id_token_signing_alg_values_supported": []string{"RS256"}, "response_types_supported": []string{"id_token"}})
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(disc) })
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(jwks) })
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: tlsKey}}}}
	fmt.Printf("demo CI issuer %s (discovery and JWKS over TLS)\n", issuer)
	return srv.ListenAndServeTLS("", "")
}

func token(dir, aud, run string) error {
	b, err := os.ReadFile(filepath.Join(dir, "signing-key.pem"))
	if err != nil {
		return err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return errors.New("signing-key.pem: no PEM block")
	}
	key, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return err
	}
	iss, err := os.ReadFile(filepath.Join(dir, "issuer"))
	if err != nil {
		return err
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", kid))
	if err != nil {
		return err
	}
	now := time.Now()
	jti := make([]byte, 16)
	rand.Read(jti)
	claims := map[string]any{
		"iss": string(iss[:len(iss)-1]), "aud": aud, "iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(10 * time.Minute).Unix(),
		"jti": fmt.Sprintf("%x", jti), "sub": "repo:demo-org/deploy-infra:ref:refs/heads/main",
		"repository": "demo-org/deploy-infra", "repository_owner": "demo-org", "ref": "refs/heads/main", "ref_type": "branch",
		"sha": "3f2c9e1d7b5a4c3e2f1a0b9c8d7e6f5a4b3c2d1e", "run_id": run, "run_attempt": "1", "actor": "alice",
		"workflow": "terraform-apply", "workflow_ref": "demo-org/deploy-infra/.github/workflows/apply.yml@refs/heads/main",
		"event_name": "push", "environment": "prod",
	}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		return err
	}
	fmt.Println(tok)
	return nil
}

func mustPKCS8(k *rsa.PrivateKey) []byte {
	b, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err)
	}
	return b
}
