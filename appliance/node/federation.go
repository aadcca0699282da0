package node

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
)

func (a *admin) FederationAdd(context.Context, *api.FederationRelationship) (*api.FederationRelationship, error) {
	return nil, status.Error(codes.Unimplemented, "federation is not built yet")
}

func (a *admin) FederationList(context.Context, *api.Empty) (*api.FederationList, error) {
	return nil, status.Error(codes.Unimplemented, "federation is not built yet")
}

func (a *admin) FederationShow(context.Context, *api.IDRequest) (*api.FederationRelationship, error) {
	return nil, status.Error(codes.Unimplemented, "federation is not built yet")
}

func (a *admin) FederationDelete(context.Context, *api.IDRequest) (*api.Empty, error) {
	return nil, status.Error(codes.Unimplemented, "federation is not built yet")
}

func (a *admin) FederationBundleSet(context.Context, *api.FederationBundle) (*api.FederationRelationship, error) {
	return nil, status.Error(codes.Unimplemented, "federation is not built yet")
}
