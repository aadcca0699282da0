module github.com/sigil-appliance/sigil

go 1.25.0

require (
	github.com/cloudflare/circl v1.6.5
	github.com/miekg/pkcs11 v1.1.2
	github.com/spiffe/go-spiffe/v2 v2.9.0
	go.yaml.in/yaml/v3 v3.0.5
)

require (
	github.com/bwesterb/go-ristretto v1.2.4 // indirect
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
