package ctl

import "time"

// SetPageSize makes list --all and verify page with n records per request
// (so tests page without 10,000 records); the returned func restores it.
func SetPageSize(n int) func() {
	old := pageSize
	pageSize = n
	return func() { pageSize = old }
}

// SetProgressEvery makes transfers report progress every d; the returned
// func restores the default.
func SetProgressEvery(d time.Duration) func() {
	old := progressEvery
	progressEvery = d
	return func() { progressEvery = old }
}
