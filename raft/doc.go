// Package raft will own replication (issue #4): a hashicorp/raft node with
// bolt stores, a mutual-TLS stream layer, leader forwarding and linearizable
// reads. It knows nothing about identities.
package raft
