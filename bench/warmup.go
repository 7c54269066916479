package main

import (
	"fmt"
	"slices"
	"time"
)

// warmUpSessions is how many sessions per transport the warm-up opens.
const warmUpSessions = 1000

// warmUp opens and closes sessions of every transport on a throwaway
// reference server before anything is measured, so that the harness's
// own cold start (its heap growing, its first client goroutines and
// connections) is not charged to whichever server is measured first: the
// first measurement of a run (caddy-duplex's opens at N=1,000, which
// eachServer measures first) came out 0.51–1.20× the
// reference's over six runs, and 1.10–2.23× with the two servers measured
// the other way round. The measured servers stay cold: each scenario
// starts its own.
func (e *env) warmUp() error {
	if !slices.Contains(e.cfg.servers, nameReference) {
		logf("warm-up: skipped, the reference server is not measured")
		return nil
	}
	srv, err := startReference(e.bins, e.upstreamPort)
	if err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	defer srv.stop()
	start := time.Now()
	for _, t := range e.cfg.transports {
		sessions, err := openMany(warmUpSessions, e.cfg.openConc, func(int) (*clientSession, error) {
			return openSession(t, srv, "warm-up", func([]byte) {})
		})
		if err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
		closeAll(sessions)
	}
	logf("warm-up: %d sessions per transport opened and closed on a throwaway reference server in %s",
		warmUpSessions, time.Since(start).Round(time.Millisecond))
	return nil
}
