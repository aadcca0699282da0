package api

import (
	"context"

	"google.golang.org/grpc"
)

// The services' registration and clients are generated from their Go
// interfaces (AdminServer, AgentServer, JoinServer) by internal/apigen
// into *_gen.go; the functions here are what the generated code calls.
// Handlers are built from method expressions (AdminServer.EntryCreate), so
// a method that the interface lacks does not compile.

//go:generate go run ./internal/apigen

// unary is the handler of a unary method. The interceptor sees the full
// method name, as the node's authorization expects.
func unary[S, Req, Resp any](name, full string, call func(S, context.Context, *Req) (*Resp, error)) grpc.MethodDesc {
	return grpc.MethodDesc{MethodName: name, Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
		req := new(Req)
		if err := dec(req); err != nil {
			return nil, err
		}
		h := func(ctx context.Context, r any) (any, error) { return call(srv.(S), ctx, r.(*Req)) }
		if ic == nil {
			return h(ctx, req)
		}
		return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: full}, h)
	}}
}

// serverStream is the handler of a method that takes one request and
// answers with a stream.
func serverStream[S, Req, Resp any](name string, call func(S, *Req, grpc.ServerStreamingServer[Resp]) error) grpc.StreamDesc {
	return grpc.StreamDesc{StreamName: name, ServerStreams: true, Handler: func(srv any, stream grpc.ServerStream) error {
		req := new(Req)
		if err := stream.RecvMsg(req); err != nil {
			return err
		}
		return call(srv.(S), req, &grpc.GenericServerStream[Req, Resp]{ServerStream: stream})
	}}
}

// clientStream is the handler of a method that takes a stream and answers
// once.
func clientStream[S, Req, Resp any](name string, call func(S, grpc.ClientStreamingServer[Req, Resp]) error) grpc.StreamDesc {
	return grpc.StreamDesc{StreamName: name, ClientStreams: true, Handler: func(srv any, stream grpc.ServerStream) error {
		return call(srv.(S), &grpc.GenericServerStream[Req, Resp]{ServerStream: stream})
	}}
}

// invoke makes a unary call with the JSON codec.
func invoke[Req, Resp any](ctx context.Context, cc grpc.ClientConnInterface, full string, req *Req) (*Resp, error) {
	resp := new(Resp)
	if err := cc.Invoke(ctx, full, req, resp, grpc.ForceCodec(Codec{})); err != nil {
		return nil, err
	}
	return resp, nil
}

// openServerStream sends the one request of a server-streaming method and
// returns the stream of answers.
func openServerStream[Req, Resp any](ctx context.Context, cc grpc.ClientConnInterface, name, full string, req *Req) (grpc.ServerStreamingClient[Resp], error) {
	desc := &grpc.StreamDesc{StreamName: name, ServerStreams: true}
	stream, err := cc.NewStream(ctx, desc, full, grpc.ForceCodec(Codec{}))
	if err != nil {
		return nil, err
	}
	x := &grpc.GenericClientStream[Req, Resp]{ClientStream: stream}
	if err := x.ClientStream.SendMsg(req); err != nil {
		return nil, err
	}
	if err := x.ClientStream.CloseSend(); err != nil {
		return nil, err
	}
	return x, nil
}

// openClientStream opens a client-streaming method: the caller sends, then
// closes and receives the one answer.
func openClientStream[Req, Resp any](ctx context.Context, cc grpc.ClientConnInterface, name, full string) (grpc.ClientStreamingClient[Req, Resp], error) {
	desc := &grpc.StreamDesc{StreamName: name, ClientStreams: true}
	stream, err := cc.NewStream(ctx, desc, full, grpc.ForceCodec(Codec{}))
	if err != nil {
		return nil, err
	}
	return &grpc.GenericClientStream[Req, Resp]{ClientStream: stream}, nil
}
