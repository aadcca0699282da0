// Package inspect is `sigil-agent inspect`: it asks a Workload API socket
// for what the calling process is given, with go-spiffe's own client, and
// prints it, so an operator sees exactly what a workload would see.
package inspect

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Options say where to ask and what for.
type Options struct {
	// Socket is a path or unix:// address; empty uses SPIFFE_ENDPOINT_SOCKET,
	// then DefaultSocket.
	Socket string
	// Audience, when set, also fetches JWT-SVIDs for it.
	Audience []string
	Timeout  time.Duration
}

// address turns a socket option into a Workload API address.
func address(socket, fallback string) string {
	if socket == "" {
		socket = os.Getenv(workloadapi.SocketEnv)
	}
	if socket == "" {
		socket = fallback
	}
	if strings.HasPrefix(socket, "unix:") {
		return socket
	}
	return "unix://" + socket
}

// ErrNone means the socket answered but gave this caller no SVID.
var ErrNone = errors.New("no SVID received")

// Run prints the caller's SVIDs and bundles to w.
func Run(ctx context.Context, opts Options, fallback string, out io.Writer) (err error) {
	// Writes stick their first error in w; the deferred Flush returns it,
	// and what was written before a failure still reaches out.
	w := bufio.NewWriter(out)
	defer func() {
		if ferr := w.Flush(); err == nil && ferr != nil {
			err = fmt.Errorf("write report: %w", ferr)
		}
	}()
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	addr := address(opts.Socket, fallback)
	c, err := workloadapi.New(ctx, workloadapi.WithAddr(addr))
	if err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	defer func() { _ = c.Close() }() // its answers are read: closing only hangs up
	x, err := c.FetchX509Context(ctx)
	if err != nil {
		return fmt.Errorf("%s: X.509-SVIDs: %w", addr, err)
	}
	if len(x.SVIDs) == 0 {
		return ErrNone
	}
	fmt.Fprintf(w, "X.509-SVIDs from %s: %d\n", addr, len(x.SVIDs))
	for i, s := range x.SVIDs {
		leaf := s.Certificates[0]
		def := ""
		if i == 0 {
			def = " (default)"
		}
		fmt.Fprintf(w, "  %s%s\n", s.ID, def)
		if s.Hint != "" {
			fmt.Fprintf(w, "    hint:     %s\n", s.Hint)
		}
		fmt.Fprintf(w, "    expires:  %s (in %s)\n", leaf.NotAfter.UTC().Format(time.RFC3339), time.Until(leaf.NotAfter).Round(time.Second))
		fmt.Fprintf(w, "    serial:   %s\n", leaf.SerialNumber.Text(16))
		for j, cert := range s.Certificates {
			fmt.Fprintf(w, "    chain[%d]: subject=%q issuer=%q sha256=%s\n", j, cert.Subject.String(), cert.Issuer.String(), fp(cert.Raw))
		}
	}
	for _, b := range x.Bundles.Bundles() {
		fmt.Fprintf(w, "X.509 bundle %s: %d authorities\n", b.TrustDomain(), len(b.X509Authorities()))
		for _, a := range b.X509Authorities() {
			fmt.Fprintf(w, "  subject=%q expires=%s sha256=%s\n", a.Subject.String(), a.NotAfter.UTC().Format(time.RFC3339), fp(a.Raw))
		}
	}
	if len(opts.Audience) > 0 {
		svids, err := c.FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: opts.Audience[0], ExtraAudiences: opts.Audience[1:]})
		if err != nil {
			return fmt.Errorf("%s: JWT-SVIDs: %w", addr, err)
		}
		for _, s := range svids {
			fmt.Fprintf(w, "JWT-SVID %s aud=%v expires=%s\n  %s\n", s.ID, s.Audience, s.Expiry.UTC().Format(time.RFC3339), s.Marshal())
			// The signing key reaches the agent's bundle through the
			// appliance's sync stream, a moment after the token.
			var verr error
			for range 20 {
				if _, verr = c.ValidateJWTSVID(ctx, s.Marshal(), opts.Audience[0]); verr == nil {
					break
				}
				time.Sleep(250 * time.Millisecond)
			}
			if verr != nil {
				fmt.Fprintf(w, "  ValidateJWTSVID: %v\n", verr)
			} else {
				fmt.Fprintf(w, "  ValidateJWTSVID: valid for %s\n", opts.Audience[0])
			}
		}
	}
	jb, err := c.FetchJWTBundles(ctx)
	if err != nil {
		return fmt.Errorf("%s: JWT bundles: %w", addr, err)
	}
	for _, b := range jb.Bundles() {
		var kids []string
		for k := range b.JWTAuthorities() {
			kids = append(kids, k)
		}
		sort.Strings(kids)
		fmt.Fprintf(w, "JWT bundle %s: %d keys %v\n", b.TrustDomain(), len(kids), kids)
	}
	return nil
}

func fp(der []byte) string {
	s := sha256.Sum256(der)
	return hex.EncodeToString(s[:8])
}
