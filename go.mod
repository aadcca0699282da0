module github.com/sigil-appliance/sigil

go 1.25.0

require github.com/miekg/pkcs11 v1.1.2

require github.com/google/go-tpm v0.9.8 // indirect
