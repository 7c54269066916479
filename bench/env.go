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
	// pairs counts eachServer's measurements, to alternate which server
	// goes first.
	pairs int
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
// The server measured first alternates from one measurement to the next,
// so that neither always meets the machine as the other left it.
func (e *env) eachServer(what string, fn func(srv *server) (metrics, error)) (duplex, reference metrics) {
	first := nameDuplex
	if e.pairs%2 == 1 {
		first = nameReference
	}
	e.pairs++
	return e.eachServerFrom(what, first, fn)
}

// eachServerFrom is eachServer measuring server first first.
func (e *env) eachServerFrom(what, first string, fn func(srv *server) (metrics, error)) (duplex, reference metrics) {
	order := []string{nameDuplex, nameReference}
	if first == nameReference {
		slices.Reverse(order)
	}
	for _, name := range order {
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

// eachServerRounds is eachServer over rounds rounds, each on fresh
// servers, the server measured first alternating from round to round (so
// that neither always meets the machine as the other left it). Each
// server's figures are the medians over its rounds, except sumKeys,
// summed; each round's ratio of the key ratioKey is logged.
func (e *env) eachServerRounds(what string, rounds int, ratioKey string, sumKeys []string, fn func(srv *server) (metrics, error)) (duplex, reference metrics) {
	if rounds <= 1 {
		return e.eachServer(what, fn)
	}
	var ds, rs []metrics
	for i := range rounds {
		first := nameDuplex
		if i%2 == 1 {
			first = nameReference
		}
		d, r := e.eachServerFrom(fmt.Sprintf("%s (round %d of %d)", what, i+1, rounds), first, fn)
		if d != nil {
			ds = append(ds, d)
		}
		if r != nil {
			rs = append(rs, r)
		}
		if d != nil && r != nil && r[ratioKey] != 0 {
			logf("  round %d of %d (%s first): %s %.0f | %.0f = %.2f×", i+1, rounds, first, ratioKey, d[ratioKey], r[ratioKey], d[ratioKey]/r[ratioKey])
		}
	}
	return medianMetrics(ds, sumKeys, nil), medianMetrics(rs, sumKeys, nil)
}

// medianMetrics is, for each key, the median of its values over ms (the
// mean of the middle two for an even count, as when a round failed), or
// for sumKeys their sum, for meanKeys their mean; nil if ms is empty.
func medianMetrics(ms []metrics, sumKeys, meanKeys []string) metrics {
	if len(ms) == 0 {
		return nil
	}
	out := metrics{}
	for key := range ms[0] {
		var vs []float64
		for _, m := range ms {
			if v, ok := m[key]; ok {
				vs = append(vs, v)
			}
		}
		sum := 0.0
		for _, v := range vs {
			sum += v
		}
		slices.Sort(vs)
		switch n := len(vs); {
		case slices.Contains(sumKeys, key):
			out[key] = sum
		case slices.Contains(meanKeys, key):
			out[key] = sum / float64(n)
		case n%2 == 0:
			out[key] = (vs[n/2-1] + vs[n/2]) / 2
		default:
			out[key] = vs[n/2]
		}
	}
	return out
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
