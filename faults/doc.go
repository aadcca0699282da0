// Package faults holds the fault suite (`make faults`, build tag faults):
// three sigild processes, each in its own network namespace, and a
// sigil-agent, put through partitions, repeated kill -9 of the leader, a
// full appliance stop, a full disk, a root rotation with the leader killed
// in every phase and a state of a million audit records. It has no
// non-test code.
package faults
