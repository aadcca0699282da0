package api

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// DialConfig says how a client reaches a node: over mutual TLS with a
// certificate, or through the node's local socket as root.
type DialConfig struct {
	Addr     string // host:port of a node's API
	CertFile string // client certificate chain (PEM, leaf first)
	KeyFile  string // its private key (PEM, must be 0600)
	RootFile string // the trust domain's root certificate(s)
	Socket   string // local admin socket; used instead of Addr when set
	// Roots, when set, replaces RootFile: it is asked at every handshake,
	// so a long-lived client (the agent, whose roots follow the trust
	// bundle through a root rotation) verifies each new connection, and
	// each reconnection of a ClientConn, against the roots of that moment.
	Roots func() []*x509.Certificate
	// Certificate, when set, replaces CertFile/KeyFile: for keys that live
	// in a TPM (the agent's), whose signer is not a file.
	Certificate func() (*tls.Certificate, error)
	// Anonymous dials without a client certificate (an agent joining).
	Anonymous bool
	// VerifyChain, when set, is asked about the server's chains once they
	// verify to the roots; an error refuses the server. The agent refuses
	// nodes whose issuing CA a root CRL revoked with it.
	VerifyChain func(chains [][]*x509.Certificate) error
}

// Dial connects and returns a connection for NewAdminClient. Over TLS the
// server must prove a node identity (spiffe://<td>/sigil/node/...) that
// chains to the roots: host names are not what Sigil trusts.
func Dial(c DialConfig) (*grpc.ClientConn, error) {
	if c.Socket != "" {
		return grpc.NewClient("unix://"+c.Socket, append(DialOptions(), grpc.WithTransportCredentials(LocalCredentials()))...)
	}
	if c.Addr == "" {
		return nil, errors.New("no server address (--server) or local socket (--socket)")
	}
	tlsCfg, err := clientTLS(c)
	if err != nil {
		return nil, err
	}
	return grpc.NewClient(c.Addr, append(DialOptions(), grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))...)
}

// ClientTLS builds the mutual-TLS client config from credential files.
func ClientTLS(certFile, keyFile, rootFile string) (*tls.Config, error) {
	return clientTLS(DialConfig{CertFile: certFile, KeyFile: keyFile, RootFile: rootFile})
}

func clientTLS(c DialConfig) (*tls.Config, error) {
	if c.RootFile == "" && c.Roots == nil {
		return nil, errors.New("TLS to a node needs the trust domain's root certificate (--root)")
	}
	var getCert func(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	switch {
	case c.Anonymous:
		getCert = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	case c.Certificate != nil:
		getCert = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return c.Certificate() }
	default:
		if c.CertFile == "" || c.KeyFile == "" {
			return nil, errors.New("mutual TLS needs a certificate, its key and the root certificate (--cert, --key, --root)")
		}
		if st, err := os.Stat(c.KeyFile); err != nil {
			return nil, err
		} else if st.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("%s has mode %v; a private key must be readable by its owner only (chmod 600)", c.KeyFile, st.Mode().Perm())
		}
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client credential: %w", err)
		}
		getCert = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	verify := func(cs tls.ConnectionState, bundle *x509bundle.Bundle) error {
		td := bundle.TrustDomain()
		raw := make([][]byte, len(cs.PeerCertificates))
		for i, c := range cs.PeerCertificates {
			raw[i] = c.Raw
		}
		id, chains, err := x509svid.ParseAndVerify(raw, bundle)
		if err != nil {
			return fmt.Errorf("server is not a node of %s: %w", td, err)
		}
		if !strings.HasPrefix(id.Path(), "/sigil/node/") {
			return fmt.Errorf("server identity %s is not a Sigil node", id)
		}
		if c.VerifyChain != nil {
			if err := c.VerifyChain(chains); err != nil {
				return fmt.Errorf("server %s refused: %w", id, err)
			}
		}
		return nil
	}
	cfg := &tls.Config{
		MinVersion:           tls.VersionTLS13,
		GetClientCertificate: getCert,
		InsecureSkipVerify:   true, // verified in VerifyConnection by SPIFFE ID, not host name
	}
	if c.Roots != nil {
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			bundle, err := rootBundle(c.Roots(), "the trusted roots")
			if err != nil {
				return err
			}
			return verify(cs, bundle)
		}
		return cfg, nil
	}
	roots, err := ReadCerts(c.RootFile)
	if err != nil {
		return nil, err
	}
	bundle, err := rootBundle(roots, c.RootFile)
	if err != nil {
		return nil, err
	}
	cfg.VerifyConnection = func(cs tls.ConnectionState) error { return verify(cs, bundle) }
	return cfg, nil
}

// rootBundle is the X.509 bundle of roots, whose trust domain is the one a
// root names in its URI SAN; name is what errors call the roots.
func rootBundle(roots []*x509.Certificate, name string) (*x509bundle.Bundle, error) {
	var td spiffeid.TrustDomain
	for _, r := range roots {
		if len(r.URIs) == 1 {
			if id, err := spiffeid.FromURI(r.URIs[0]); err == nil {
				td = id.TrustDomain()
			}
		}
	}
	if td.IsZero() {
		if len(roots) == 0 {
			return nil, fmt.Errorf("%s: no root certificate", name)
		}
		return nil, fmt.Errorf("%s: root certificate names no SPIFFE trust domain", name)
	}
	return x509bundle.FromX509Authorities(td, roots), nil
}

// ReadCerts reads a file of one or more PEM certificates and nothing
// else (pemfile.ReadCerts).
func ReadCerts(path string) ([]*x509.Certificate, error) { return pemfile.ReadCerts(path) }
