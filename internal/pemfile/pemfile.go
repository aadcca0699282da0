// Package pemfile owns reading PEM files that Sigil is given: root and
// issuing certificates, certificate requests, TPM manufacturer CAs,
// stored SVIDs. Each error names the file and says what was wrong: no
// PEM at all, a block of another type, a block that is not valid PEM, or
// bytes after the last block (a truncated or concatenated file). Text
// before a block is allowed, as PEM allows it (certtool and openssl write
// a readable dump there).
package pemfile

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// Block types.
const (
	Certificate        = "CERTIFICATE"
	CertificateRequest = "CERTIFICATE REQUEST"
	CRL                = "X509 CRL"
)

var begin = []byte("-----BEGIN ")

// Decode returns the contents of every PEM block in b, which must all be
// of type typ; name is what errors call b (usually its file's path). At
// least one block is needed.
func Decode(name string, b []byte, typ string) ([][]byte, error) {
	var out [][]byte
	for {
		blk, rest := pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != typ {
			if len(out) == 0 {
				return nil, fmt.Errorf("%s holds no PEM %s (its first block is a %q)", name, typ, blk.Type)
			}
			return nil, fmt.Errorf("%s: PEM block %d is a %q, want %s", name, len(out)+1, blk.Type, typ)
		}
		out = append(out, blk.Bytes)
		b = rest
	}
	if len(out) == 0 {
		if bytes.Contains(b, begin) {
			return nil, fmt.Errorf("%s holds no PEM %s (a block is not valid PEM)", name, typ)
		}
		return nil, fmt.Errorf("%s holds no PEM %s", name, typ)
	}
	if rest := bytes.TrimSpace(b); len(rest) != 0 {
		if bytes.Contains(rest, begin) {
			return nil, fmt.Errorf("%s: PEM block %d is not valid PEM", name, len(out)+1)
		}
		return nil, fmt.Errorf("%s: %d bytes after the last PEM block", name, len(rest))
	}
	return out, nil
}

// DecodeOne is Decode for exactly one block.
func DecodeOne(name string, b []byte, typ string) ([]byte, error) {
	ders, err := Decode(name, b, typ)
	if err != nil {
		return nil, err
	}
	if len(ders) != 1 {
		return nil, fmt.Errorf("%s holds %d PEM blocks, want one %s", name, len(ders), typ)
	}
	return ders[0], nil
}

// ReadOne reads a file holding exactly one PEM block of type typ.
func ReadOne(path, typ string) ([]byte, error) {
	b, err := read(path)
	if err != nil {
		return nil, err
	}
	return DecodeOne(path, b, typ)
}

// ReadCert reads a file holding exactly one certificate.
func ReadCert(path string) (*x509.Certificate, error) {
	der, err := ReadOne(path, Certificate)
	if err != nil {
		return nil, err
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// ReadCerts reads a file holding one or more certificates, in order.
func ReadCerts(path string) ([]*x509.Certificate, error) {
	b, err := read(path)
	if err != nil {
		return nil, err
	}
	return ParseCerts(path, b)
}

// ParseCerts parses b, one or more PEM certificates and nothing else;
// name is what errors call b.
func ParseCerts(name string, b []byte) ([]*x509.Certificate, error) {
	ders, err := Decode(name, b, Certificate)
	if err != nil {
		return nil, err
	}
	out := make([]*x509.Certificate, 0, len(ders))
	for i, der := range ders {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", name, i+1, err)
		}
		out = append(out, c)
	}
	return out, nil
}

// ReadCSR reads a file holding exactly one certificate request.
func ReadCSR(path string) (*x509.CertificateRequest, error) {
	der, err := ReadOne(path, CertificateRequest)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return csr, nil
}

// read reads path; the error from os keeps its cause (errors.Is
// os.ErrNotExist) and names the file.
func read(path string) ([]byte, error) {
	if path == "" {
		return nil, errors.New("no file named")
	}
	return os.ReadFile(path)
}

// CheckPrivate refuses a private key file that is not a regular file or
// that group or others could read; st is the file's (from Stat, or from
// the opened file, so that what is checked is what is read).
func CheckPrivate(path string, st fs.FileInfo) error {
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("%s has mode %v; a private key must be readable by its owner only (chmod 600)", path, st.Mode().Perm())
	}
	return nil
}
