package main

import (
	"bytes"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Scenario (c): sessions on their own channels; concurrent publishers push
// to them one channel per publish (or a batch of channels per publish)
// for a fixed time.

// publishPath is where caddy-duplex's publishes go in (c): its admin
// endpoint (the default), its publish_listen address or a duplex_publish
// site route. The reference has one publish endpoint.
type publishPath string

const (
	pathAdmin  publishPath = ""
	pathListen publishPath = "publish_listen"
	pathRoute  publishPath = "route"
)

func unicastSpecs(batch int, path publishPath) []metricSpec {
	label := "pushes delivered per second"
	switch {
	case path == pathRoute:
		label = "pushes delivered per second (caddy-duplex publishing on a duplex_publish route)"
	case path == pathListen:
		label = "pushes delivered per second (caddy-duplex publishing on publish_listen)"
	case batch > 1:
		label = fmt.Sprintf("pushes delivered per second (batches of %d)", batch)
	}
	return []metricSpec{
		{key: "rate", label: label, format: "%.0f", target: targetUnicast},
		{key: "p50", label: "push latency p50 (ms)", format: "%.1f"},
		{key: "p99", label: "push latency p99 (ms)", format: "%.1f"},
		{key: "cpuPush", label: "server CPU per push (µs)", format: "%.1f"},
		{key: "lost", label: "pushes published but not delivered", format: "%.0f"},
	}
}

// runUnicast runs (c) for every transport, single and batched publishes.
func (e *env) runUnicast() {
	batches := []int{1}
	if e.cfg.batch > 1 {
		batches = append(batches, e.cfg.batch)
	}
	scenario := fmt.Sprintf("(c) unicast, %d sessions, %d publishers, %s", e.cfg.unicastSessions, e.cfg.publishers, e.cfg.duration)
	for _, batch := range batches {
		for _, t := range e.cfg.transports {
			what := fmt.Sprintf("unicast %s batch=%d", t, batch)
			logf("== %s", what)
			d, r := e.unicastRounds(what, batch, func(srv *server) (metrics, error) {
				return e.unicast(srv, t, batch, pathAdmin)
			})
			e.rep.addPair(scenario, t, unicastSpecs(batch, pathAdmin), d, r)
		}
	}
	// The admin endpoint costs per request (its request logger and
	// metrics): the same single publishes on publish_listen, where the
	// plugin serves the API itself, and on a site route.
	if e.cfg.publishListen {
		for _, t := range e.cfg.transports {
			what := fmt.Sprintf("unicast %s via publish_listen", t)
			logf("== %s", what)
			d, r := e.unicastRounds(what, 1, func(srv *server) (metrics, error) {
				return e.unicast(srv, t, 1, pathListen)
			})
			e.rep.addPair(scenario, t, unicastSpecs(1, pathListen), d, r)
		}
	}
	if e.cfg.publishRoute && slices.Contains(e.cfg.transports, transportWebSocket) {
		what := "unicast websocket via duplex_publish"
		logf("== %s", what)
		d, r := e.unicastRounds(what, 1, func(srv *server) (metrics, error) {
			return e.unicast(srv, transportWebSocket, 1, pathRoute)
		})
		e.rep.addPair(scenario, transportWebSocket, unicastSpecs(1, pathRoute), d, r)
	}
}

// unicastRounds measures single publishes (batch 1) over -unicast-rounds
// rounds: one run of each server moves by ±10 % on this shared machine
// from run to run, more than the differences measured. Batches, whose
// rows have no target, are measured once.
func (e *env) unicastRounds(what string, batch int, fn func(srv *server) (metrics, error)) (duplex, reference metrics) {
	rounds := e.cfg.unicastRounds
	if batch > 1 {
		rounds = 1
	}
	return e.eachServerRounds(what, rounds, "rate", []string{"lost"}, fn)
}

// receiver records the pushes one session receives: only its own reader
// goroutine appends.
type receiver struct {
	lat []time.Duration
}

// unicastRun counts deliveries across sessions.
type unicastRun struct {
	delivered atomic.Int64
	lastAt    atomic.Int64 // unix ns of the latest delivery
}

func (u *unicastRun) handler(rc *receiver) frameFunc {
	return func(frame []byte) {
		if !bytes.HasPrefix(frame, pushPrefix) {
			return
		}
		now := time.Now().UnixNano()
		if t, ok := intField(frame, "t"); ok {
			rc.lat = append(rc.lat, time.Duration(now-t))
		}
		u.delivered.Add(1)
		u.lastAt.Store(now)
	}
}

// unicast runs (c) once, caddy-duplex publishing on path.
func (e *env) unicast(srv *server, transport string, batch int, path publishPath) (metrics, error) {
	n := e.cfg.unicastSessions
	publishURL := srv.publishURL
	switch {
	case path == pathRoute && srv.routeURL != "":
		publishURL = srv.routeURL
	case path == pathListen && srv.listenURL != "":
		publishURL = srv.listenURL
	}
	u := &unicastRun{}
	recv := make([]*receiver, n)
	for i := range recv {
		recv[i] = &receiver{lat: make([]time.Duration, 0, 256)}
	}
	sessions, err := openMany(n, e.cfg.openConc, func(i int) (*clientSession, error) {
		return openSession(transport, srv, "u"+strconv.Itoa(i), u.handler(recv[i]))
	})
	if err != nil {
		return nil, err
	}
	defer closeAll(sessions)

	stopProfile := func() {}
	if e.cfg.pprofDir != "" && srv.adminURL != "" {
		name := fmt.Sprintf("cpu-unicast-%s-batch%d", transport, batch)
		if path != pathAdmin {
			name += "-" + string(path)
		}
		stopProfile = e.startCPUProfile(srv, name, e.cfg.duration-time.Second)
	}
	cpu, err := startCPU(srv)
	if err != nil {
		return nil, err
	}
	var (
		next      atomic.Int64 // round robin over the sessions' channels
		published atomic.Int64
		pubErr    atomic.Value
		wg        sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(e.cfg.duration)
	for range e.cfg.publishers {
		wg.Go(func() {
			var body []byte
			for time.Now().Before(deadline) {
				body = body[:0]
				if batch > 1 {
					body = append(body, '[')
				}
				for j := range batch {
					if j > 0 {
						body = append(body, ',')
					}
					ch := next.Add(1) % int64(n)
					body = append(body, `{"channel":"u`...)
					body = strconv.AppendInt(body, ch, 10)
					body = append(body, `","data":{"t":`...)
					body = strconv.AppendInt(body, time.Now().UnixNano(), 10)
					body = append(body, `}}`...)
				}
				if batch > 1 {
					body = append(body, ']')
				}
				if err := e.publishTo(publishURL, body); err != nil {
					pubErr.CompareAndSwap(nil, err)
					return
				}
				published.Add(int64(batch))
			}
		})
	}
	wg.Wait()
	if err, _ := pubErr.Load().(error); err != nil {
		return nil, err
	}
	// Wait for the deliveries still under way (bounded).
	drainUntil := time.Now().Add(e.cfg.drain)
	for u.delivered.Load() < published.Load() && time.Now().Before(drainUntil) {
		time.Sleep(20 * time.Millisecond)
	}
	cpuUsed, err := cpu.since()
	if err != nil {
		return nil, err
	}
	stopProfile()
	delivered := u.delivered.Load()
	closeAll(sessions) // readers end: their samples can be read
	var all durations
	for _, rc := range recv {
		all = append(all, rc.lat...)
	}
	// The rate runs until the last delivery, so a backlog drained after
	// the publishers stopped does not inflate it.
	end := time.Unix(0, u.lastAt.Load())
	if end.Before(deadline) {
		end = deadline
	}
	return metrics{
		"rate":    rate(delivered, end.Sub(start)),
		"p50":     ms(all.percentile(0.50)),
		"p99":     ms(all.percentile(0.99)),
		"cpuPush": microsPer(cpuUsed, delivered),
		"lost":    float64(published.Load() - delivered),
	}, nil
}
