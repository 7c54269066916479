package main

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Scenario (d): sessions send messages back to back, each answered by the
// upstream through the session; beside it, the same upstream reached by
// plain HTTP/1.1 keep-alive requests through Caddy's reverse_proxy (and,
// in the reference column, directly).

var roundTripSpecs = []metricSpec{
	{key: "rate", label: "round trips per second", format: "%.0f"},
	{key: "p50", label: "round trip p50 (ms)", format: "%.2f"},
	{key: "p99", label: "round trip p99 (ms)", format: "%.2f"},
	{key: "cpuOp", label: "server CPU per round trip (µs)", format: "%.1f"},
	{key: "errors", label: "errors", format: "%.0f"},
}

var plainSpecs = []metricSpec{
	{key: "rate", label: "requests per second (ref.: direct to upstream)", format: "%.0f"},
	{key: "p50", label: "request p50 (ms)", format: "%.2f"},
	{key: "p99", label: "request p99 (ms)", format: "%.2f"},
	{key: "cpuOp", label: "Caddy CPU per request (µs)", format: "%.1f"},
}

// runRoundTrips runs (d): plain requests first (the baseline), then every
// transport.
func (e *env) runRoundTrips() {
	scenario := fmt.Sprintf("(d) round trips, %d sessions, %s", e.cfg.rtSessions, e.cfg.rtDuration)
	logf("== plain requests")
	var viaProxy, direct metrics
	if err := func() error {
		var err error
		direct, err = e.plainRequests(nil, fmt.Sprintf("http://127.0.0.1:%d/live", e.upstreamPort))
		if err != nil {
			return fmt.Errorf("direct to upstream: %w", err)
		}
		viaProxy, _ = e.eachServerOnly(nameDuplex, "plain requests via reverse_proxy", func(srv *server) (metrics, error) {
			if e.cfg.pprofDir != "" {
				defer e.startCPUProfile(srv, "cpu-plain-reverse_proxy", e.cfg.rtDuration-time.Second)()
			}
			return e.plainRequests(srv, srv.directURL+"/live")
		})
		return nil
	}(); err != nil {
		e.failures++
		logf("FAILED plain requests: %v", err)
	}
	if direct != nil {
		direct["cpuOp"] = math.NaN() // no proxy in between
	}
	e.rep.addPair(fmt.Sprintf("(d) plain requests, %d clients, %s", e.cfg.rtSessions, e.cfg.rtDuration),
		"http/1.1 reverse_proxy", plainSpecs, viaProxy, direct)

	for _, t := range e.cfg.transports {
		what := "round trips " + t
		logf("== %s", what)
		d, r := e.eachServer(what, func(srv *server) (metrics, error) {
			return e.roundTrips(srv, t)
		})
		e.rep.addPair(scenario, t, roundTripSpecs, d, r)
		vs := metricSpec{key: "rate", label: "round trips/s vs reverse_proxy requests/s (ref. column: reverse_proxy)", format: "%.0f"}
		if t == transportWebSocket {
			vs.target = targetRoundTrips
		}
		e.rep.add(scenario, t, vs, lookup(d, "rate"), lookup(viaProxy, "rate"))
	}
}

// eachServerOnly is eachServer restricted to one server.
func (e *env) eachServerOnly(name, what string, fn func(srv *server) (metrics, error)) (metrics, error) {
	m, err := e.runOn(name, fn)
	if err != nil {
		e.failures++
		logf("FAILED %s: %v", what, err)
	}
	return m, err
}

// plainRequests sends POSTs back to back from rtSessions clients for
// rtDuration. srv, if not nil, is the server whose CPU is measured.
func (e *env) plainRequests(srv *server, url string) (metrics, error) {
	hc := newHTTPClient(e.cfg.rtSessions)
	defer hc.CloseIdleConnections()
	var cpu *cpuMeter
	if srv != nil {
		var err error
		if cpu, err = startCPU(srv); err != nil {
			return nil, err
		}
	}
	lats, errs, elapsed := e.drive(func(i int, k int64) error {
		body := `{"n":` + strconv.FormatInt(k, 10) + `}`
		resp, err := hc.Post(url, "application/json", bytes.NewReader([]byte(body)))
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
	m := summarize(lats, errs, elapsed)
	if cpu != nil {
		used, err := cpu.since()
		if err != nil {
			return nil, err
		}
		m["cpuOp"] = microsPer(used, int64(len(lats)))
	}
	return m, nil
}

// roundTrips opens rtSessions sessions, each sending messages back to back
// and waiting for each answer, for rtDuration.
func (e *env) roundTrips(srv *server, transport string) (metrics, error) {
	n := e.cfg.rtSessions
	answers := make([]chan bool, n) // true: ack or reply; false: error frame
	for i := range answers {
		answers[i] = make(chan bool, 1)
	}
	sessions, err := openMany(n, e.cfg.openConc, func(i int) (*clientSession, error) {
		return openSession(transport, srv, "rt"+strconv.Itoa(i), func(frame []byte) {
			switch {
			case bytes.HasPrefix(frame, []byte(`{"type":"reply"`)), bytes.HasPrefix(frame, []byte(`{"type":"ack"`)):
				answers[i] <- true
			case bytes.HasPrefix(frame, []byte(`{"type":"error"`)):
				answers[i] <- false
			}
		})
	})
	if err != nil {
		return nil, err
	}
	defer closeAll(sessions)
	stopProfile := func() {}
	if e.cfg.pprofDir != "" && srv.adminURL != "" {
		stopProfile = e.startCPUProfile(srv, "cpu-roundtrip-"+transport, e.cfg.rtDuration-time.Second)
	}
	cpu, err := startCPU(srv)
	if err != nil {
		return nil, err
	}
	lats, errs, elapsed := e.drive(func(i int, k int64) error {
		id := strconv.FormatInt(k, 10)
		if err := sessions[i].send([]byte(`{"id":"` + id + `","path":"/live/msg","data":{"n":` + id + `}}`)); err != nil {
			return err
		}
		select {
		case ok := <-answers[i]:
			if !ok {
				return fmt.Errorf("error frame")
			}
			return nil
		case <-time.After(10 * time.Second):
			return errTimeout
		}
	})
	used, err := cpu.since()
	if err != nil {
		return nil, err
	}
	stopProfile()
	m := summarize(lats, errs, elapsed)
	m["cpuOp"] = microsPer(used, int64(len(lats)))
	return m, nil
}

// drive runs op back to back from rtSessions goroutines (goroutine i,
// operation number k) for rtDuration and returns the latencies of the
// operations that succeeded, the number that failed and the elapsed time.
// A goroutine stops at its first error.
func (e *env) drive(op func(i int, k int64) error) (durations, int64, time.Duration) {
	var (
		mu     sync.Mutex
		all    durations
		errs   atomic.Int64
		seq    atomic.Int64
		wg     sync.WaitGroup
		logged atomic.Bool
	)
	start := time.Now()
	deadline := start.Add(e.cfg.rtDuration)
	for i := range e.cfg.rtSessions {
		wg.Go(func() {
			lat := make(durations, 0, 4096)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := op(i, seq.Add(1)); err != nil {
					errs.Add(1)
					if logged.CompareAndSwap(false, true) {
						logf("  first error: %v", err)
					}
					break
				}
				lat = append(lat, time.Since(t0))
			}
			mu.Lock()
			all = append(all, lat...)
			mu.Unlock()
		})
	}
	wg.Wait()
	return all, errs.Load(), time.Since(start)
}

func summarize(lats durations, errs int64, elapsed time.Duration) metrics {
	return metrics{
		"rate":   rate(int64(len(lats)), elapsed),
		"p50":    ms(lats.percentile(0.50)),
		"p99":    ms(lats.percentile(0.99)),
		"errors": float64(errs),
	}
}
