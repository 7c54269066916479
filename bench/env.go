package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"
)

// env is what every scenario needs: the configuration, the binaries, the
// upstream, an HTTP client and the report.
type env struct {
	cfg          config
	bins         binaries
	upstreamPort int
	upstream     *proc
	hc           *http.Client // publishes, SSE posts, plain requests
	rep          *report
	failures     int
}

func newHTTPClient(conns int) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			MaxIdleConns:        conns,
			MaxIdleConnsPerHost: conns,
			IdleConnTimeout:     time.Minute,
		},
	}
}

// eachServer runs fn against a fresh instance of each selected server, one
// after the other, and returns their metrics (nil for a server not run or
// whose run failed; failures are logged and counted).
func (e *env) eachServer(what string, fn func(srv *server) (metrics, error)) (duplex, reference metrics) {
	for _, name := range []string{nameDuplex, nameReference} {
		if !slices.Contains(e.cfg.servers, name) {
			continue
		}
		m, err := e.runOn(name, fn)
		if err != nil {
			e.failures++
			logf("FAILED %s on %s: %v", what, name, err)
			continue
		}
		if name == nameDuplex {
			duplex = m
		} else {
			reference = m
		}
	}
	// Let sockets of the finished run (TIME_WAIT, closing) settle.
	time.Sleep(300 * time.Millisecond)
	return duplex, reference
}

func (e *env) runOn(name string, fn func(srv *server) (metrics, error)) (metrics, error) {
	if err := e.upstream.exited(); err != nil {
		return nil, err
	}
	srv, err := startServer(name, e.bins, e.upstreamPort)
	if err != nil {
		return nil, err
	}
	defer srv.stop()
	m, err := fn(srv)
	if err == nil {
		err = srv.proc.exited() // a crash during the run voids it
	}
	return m, err
}

// publish POSTs a publish body to srv's publish API and checks the answer.
func (e *env) publish(srv *server, body []byte) error {
	return e.publishTo(srv.publishURL, body)
}

// publishTo POSTs a publish body to url and checks the answer.
func (e *env) publishTo(url string, body []byte) error {
	resp, err := e.hc.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("publish: status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}

// cpuMeter measures a server's CPU time over a phase.
type cpuMeter struct {
	srv   *server
	start usage
}

func startCPU(srv *server) (*cpuMeter, error) {
	u, err := srv.usage()
	if err != nil {
		return nil, err
	}
	return &cpuMeter{srv: srv, start: u}, nil
}

// since returns the CPU time the server used since the meter started.
func (c *cpuMeter) since() (time.Duration, error) {
	u, err := c.srv.usage()
	if err != nil {
		return 0, err
	}
	return u.cpu - c.start.cpu, nil
}
