package gen

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const fixtureHead = `package p

import (
	"context"

	"google.golang.org/grpc"
)

type Req struct{}
type Resp struct{}

const FooService = "test.Foo"
`

func generate(t *testing.T, src string) (map[string][]byte, error) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.go"), []byte(fixtureHead+src), 0o644); err != nil {
		t.Fatal(err)
	}
	return Generate(dir)
}

// Interfaces the generator cannot serve are refused with the method and
// the shape it expected, not turned into code that misbehaves.
func TestRefusesWhatItCannotGenerate(t *testing.T) {
	for name, tc := range map[string]struct{ src, want string }{
		"bidi stream": {"//apigen:service\ntype FooServer interface {\n\tChat(grpc.BidiStreamingServer[Req, Resp]) error\n}\n",
			"FooServer.Chat: bidirectional streams are not generated"},
		"unary without context": {"//apigen:service\ntype FooServer interface {\n\tGet(*Req) (*Resp, error)\n}\n",
			"FooServer.Get: not a unary"},
		"unary by value": {"//apigen:service\ntype FooServer interface {\n\tGet(context.Context, Req) (*Resp, error)\n}\n",
			"a unary method is M(context.Context, *Req) (*Resp, error)"},
		"foreign message type": {"//apigen:service\ntype FooServer interface {\n\tGet(context.Context, *grpc.PreparedMsg) (*Resp, error)\n}\n",
			"FooServer.Get: a unary method"},
		"wrap on unary": {"//apigen:service\ntype FooServer interface {\n\t//apigen:wrap\n\tGet(context.Context, *Req) (*Resp, error)\n}\n",
			"applies to streaming methods only"},
		"embedded interface": {"//apigen:service\ntype FooServer interface {\n\tinterface{ Get(context.Context, *Req) (*Resp, error) }\n}\n",
			"not embedded types"},
		"no service constant": {"//apigen:service\ntype BarServer interface {\n\tGet(context.Context, *Req) (*Resp, error)\n}\n",
			"needs a string constant BarService"},
		"not named XServer": {"//apigen:service\ntype Foo interface {\n\tGet(context.Context, *Req) (*Resp, error)\n}\n",
			"must be named XServer"},
		"nothing marked": {"type FooServer interface {\n\tGet(context.Context, *Req) (*Resp, error)\n}\n",
			"no interface is marked //apigen:service"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := generate(t, tc.src)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// Each shape becomes its handler and client, a wrapped stream an
// unexported opener and a reference to the hand-written method.
func TestShapes(t *testing.T) {
	files, err := generate(t, `//apigen:service
type FooServer interface {
	// Get gets.
	Get(context.Context, *Req) (*Resp, error)
	Watch(*Req, grpc.ServerStreamingServer[Resp]) error
	Upload(grpc.ClientStreamingServer[Req, Resp]) error
	//apigen:wrap
	SVIDDump(*Req, grpc.ServerStreamingServer[Resp]) error
}
`)
	if err != nil {
		t.Fatal(err)
	}
	src := string(files["foo_gen.go"])
	if !strings.HasPrefix(src, Header+"\n") {
		t.Errorf("no generated-code header:\n%s", src)
	}
	for _, want := range []string{
		`FooMethodGet      = "/" + FooService + "/Get"`,
		`unary("Get", FooMethodGet, FooServer.Get)`,
		`serverStream("Watch", FooServer.Watch)`,
		`clientStream("Upload", FooServer.Upload)`,
		"// Get gets.\nfunc (c *FooClient) Get(ctx context.Context, r *Req) (*Resp, error) {",
		"func (c *FooClient) Watch(ctx context.Context, r *Req) (grpc.ServerStreamingClient[Resp], error) {",
		"func (c *FooClient) Upload(ctx context.Context) (grpc.ClientStreamingClient[Req, Resp], error) {",
		"func (c *FooClient) svidDumpStream(ctx context.Context, r *Req) (grpc.ServerStreamingClient[Resp], error) {",
		"_ = (*FooClient).SVIDDump",
	} {
		if !strings.Contains(src, want) {
			t.Errorf("generated file lacks %q:\n%s", want, src)
		}
	}
	if strings.Contains(src, "func (c *FooClient) SVIDDump(") {
		t.Errorf("a wrapped method's client is generated:\n%s", src)
	}
}
