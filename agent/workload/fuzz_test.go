package workload

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/sigil-appliance/sigil/agent/cache"
	"github.com/sigil-appliance/sigil/agent/callerid"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// fixed is a Source holding one snapshot: a bundle with a JWT key and an
// entry for uid 1000. It signs nothing: JWT-SVID requests that get past
// validation see an unavailable appliance.
type fixed struct{ snap *cache.Snapshot }

func (f fixed) Current() (*cache.Snapshot, <-chan struct{}) { return f.snap, make(chan struct{}) }
func (f fixed) JWTSVID(context.Context, api.Entry, []string) (string, time.Time, error) {
	return "", time.Time{}, errors.New("appliance unreachable")
}

func fuzzServer(t testing.TB) (*Server, context.Context, *ecdsa.PrivateKey) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), IsCA: true, BasicConstraintsValid: true,
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, ca, ca, &k.PublicKey, k)
	root, _ := x509.ParseCertificate(der)
	b := spiffebundle.FromX509Authorities(td, []*x509.Certificate{root})
	if err := b.AddJWTAuthority("kid-1", &k.PublicKey); err != nil {
		t.Fatal(err)
	}
	snap := &cache.Snapshot{Bundle: b, SVIDs: map[string]*cache.SVID{}, Entries: []api.Entry{{
		ID: "e1", SPIFFEID: "spiffe://example.org/w", Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}}}}}
	s := New(fixed{snap}, callerid.New(""), Options{Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ctx := context.WithValue(context.Background(), callerKey{}, &call{caller: &callerid.Caller{UID: 1000},
		sel: callerid.Selectors{"unix:uid:1000": {}}})
	return s, ctx, k
}

func token(t testing.TB, k *ecdsa.PrivateKey, sub string, aud []string) string {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k}, (&jose.SignerOptions{}).WithHeader("kid", "kid-1").WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := jwt.Signed(sig).Claims(jwt.Claims{Subject: sub, Audience: aud, Expiry: jwt.NewNumericDate(time.Now().Add(time.Minute))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// FuzzValidateJWTSVID: ValidateJWTSVID requests as they come off the wire
// (protobuf bytes). Whatever is accepted must carry a token our key
// signed for the requested audience.
func FuzzValidateJWTSVID(f *testing.F) {
	s, ctx, k := fuzzServer(f)
	good := token(f, k, "spiffe://example.org/w", []string{"api"})
	for _, r := range []*workload.ValidateJWTSVIDRequest{
		{Audience: "api", Svid: good}, {Audience: "other", Svid: good}, {Audience: "api", Svid: good[:len(good)-5]}, {},
	} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req := new(workload.ValidateJWTSVIDRequest)
		if proto.Unmarshal(b, req) != nil {
			return
		}
		resp, err := s.ValidateJWTSVID(ctx, req)
		if err != nil {
			if c := status.Code(err); c != codes.InvalidArgument {
				t.Fatalf("refusal with code %v: %v", c, err)
			}
			return
		}
		if req.Svid != good || req.Audience != "api" || resp.SpiffeId != "spiffe://example.org/w" {
			t.Fatalf("accepted %q for %q", req.Svid, req.Audience)
		}
	})
}

// FuzzFetchJWTSVID: JWT-SVID requests with any audience and ID.
func FuzzFetchJWTSVID(f *testing.F) {
	s, ctx, _ := fuzzServer(f)
	for _, r := range []*workload.JWTSVIDRequest{
		{Audience: []string{"api"}}, {Audience: []string{""}}, {SpiffeId: "spiffe://example.org/w", Audience: []string{"a", "b"}},
		{SpiffeId: "not an id", Audience: []string{"a"}}, {SpiffeId: "spiffe://example.org/other", Audience: []string{"a"}},
	} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		req := new(workload.JWTSVIDRequest)
		if proto.Unmarshal(b, req) != nil {
			return
		}
		if _, err := s.FetchJWTSVID(ctx, req); err == nil {
			t.Fatal("a JWT-SVID came back from a source that signs none")
		} else if c := status.Code(err); c != codes.InvalidArgument && c != codes.PermissionDenied && c != codes.Unavailable {
			t.Fatalf("unexpected code %v: %v", c, err)
		}
	})
}
