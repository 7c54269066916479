package main

import (
	"bytes"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"sync/atomic"
	"time"
)

// Scenarios (a) and (b) share their sessions: N sessions are opened on one
// channel (opens per second, CPU per open), left idle (RSS per session),
// then the channel gets publishes one at a time (fan-out latency).

var idleSpecs = []metricSpec{
	{key: "rss", label: "RSS per idle session (KiB)", format: "%.1f"},
	{key: "opens", label: "opens per second (median of rounds, ≥ 5,000 opens in all)", format: "%.0f"},
	{key: "cpuOpen", label: "server CPU per open (µs, mean of rounds)", format: "%.0f"},
	{key: "openP50", label: "open latency p50 (ms)", format: "%.1f"},
	{key: "openP99", label: "open latency p99 (ms)", format: "%.1f"},
}

var fanoutSpecs = []metricSpec{
	{key: "p50", label: "delivery latency p50 (ms)", format: "%.1f"},
	{key: "p99", label: "delivery latency p99 (ms)", format: "%.1f", target: targetFanoutP99},
	{key: "max", label: "delivery latency max (ms)", format: "%.1f"},
	{key: "firstLast", label: "first publish: last subscriber has it (ms)", format: "%.1f"},
	{key: "p99All", label: "delivery latency p99, first publish included (ms)", format: "%.1f"},
	{key: "lastMedian", label: "last subscriber has it, median (ms)", format: "%.1f"},
	{key: "lastMax", label: "last subscriber has it, worst (ms)", format: "%.1f"},
	{key: "cpuDelivery", label: "server CPU per delivery (µs)", format: "%.2f"},
	{key: "missing", label: "deliveries missing", format: "%.0f"},
}

// runSessions runs (a) and (b) for every transport and size.
func (e *env) runSessions() {
	if err := e.warmUp(); err != nil {
		logf("warm-up failed, measuring without it: %v", err)
	}
	for _, n := range e.cfg.sizes {
		for _, t := range e.cfg.transports {
			what := fmt.Sprintf("sessions %s N=%d", t, n)
			logf("== %s", what)
			d, r := e.eachServer(what, func(srv *server) (metrics, error) {
				return e.sessions(srv, t, n)
			})
			var dr, rr []metrics
			for k := 2; e.cfg.scenarios["idle"] && k <= openRounds(n); k++ {
				dk, rk := e.eachServer(fmt.Sprintf("%s opens, round %d", what, k), func(srv *server) (metrics, error) {
					return e.openRound(srv, t, n)
				})
				dr, rr = append(dr, dk), append(rr, rk)
			}
			medianOpens(d, dr)
			medianOpens(r, rr)
			specs := slices.Clone(idleSpecs)
			if t == transportWebSocket {
				specs[0].target = targetIdleRSS
			}
			if e.cfg.scenarios["idle"] {
				e.rep.addPair(fmt.Sprintf("(a) idle sessions, N=%d", n), t, specs, d, r)
			}
			if e.cfg.scenarios["fanout"] {
				e.rep.addPair(fmt.Sprintf("(b) fan-out to N=%d, %d publishes", n, e.cfg.fanoutPublishes(n)), t, fanoutSpecs, d, r)
			}
		}
	}
}

// openPhase opens n sessions on srv (openConc at a time) and measures
// the opens: per second, server CPU per open, latency of one open.
func (e *env) openPhase(srv *server, transport string, n int, onFrame frameFunc) ([]*clientSession, metrics, error) {
	before, err := srv.usage()
	if err != nil {
		return nil, nil, err
	}
	start := time.Now()
	lat := make(durations, n) // each opener writes its own slots
	sessions, err := openMany(n, e.cfg.openConc, func(i int) (*clientSession, error) {
		t := time.Now()
		cs, err := openSession(transport, srv, "fan", onFrame)
		lat[i] = time.Since(t)
		return cs, err
	})
	if err != nil {
		return nil, nil, err
	}
	opened := time.Since(start)
	after, err := srv.usage()
	if err != nil {
		closeAll(sessions)
		return nil, nil, err
	}
	return sessions, metrics{
		"opens":   rate(int64(n), opened),
		"cpuOpen": microsPer(after.cpu-before.cpu, int64(n)),
		"openP50": ms(lat.percentile(0.5)),
		"openP99": ms(lat.percentile(0.99)),
	}, nil
}

// openRounds is how many times the opening of n sessions is measured,
// each time on a fresh server: enough rounds for 5,000 opens, an odd
// number of them (a median of its own), at most 9. Opening 1,000 sessions
// takes a quarter of a second, and single phases that short ranged over 2×
// for either server on a quiet machine.
func openRounds(n int) int { return min(9, ((5000+n-1)/n)|1) }

// openRound is one extra round of openPhase, on a server of its own.
func (e *env) openRound(srv *server, transport string, n int) (metrics, error) {
	sessions, m, err := e.openPhase(srv, transport, n, func([]byte) {})
	if err != nil {
		return nil, err
	}
	closeAll(sessions)
	return m, nil
}

// medianOpens sets m's open figures to the medians over the rounds
// (m's own round and rounds), and CPU per open to their mean.
func medianOpens(m metrics, rounds []metrics) {
	if m == nil {
		return
	}
	all := medianMetrics(append([]metrics{m}, rounds...), nil, []string{"cpuOpen"})
	for _, key := range []string{"opens", "openP50", "openP99", "cpuOpen"} {
		if v, ok := all[key]; ok {
			m[key] = v
		}
	}
}

// fanoutPublishes is the number of publishes of a fan-out run to n
// sessions: -publishes, or more for -deliveries. The deliveries of one
// publish are not independent samples: the p99 is set by the few
// publishes whose tails are longest. At 1,000 sessions, 50 publishes gave
// p99s ranging over 1.5× for the same server from one run to the next;
// 200 publishes held both servers within 20 %.
func (c *config) fanoutPublishes(n int) int { return max(c.publishes, min(c.deliveries/n, 1000)) }

// fanout records the deliveries of each publish.
type fanout struct {
	n      int
	lat    [][]atomic.Int64 // per publish, one slot per delivery (ns); written by the clients' goroutines
	count  []atomic.Int64   // slots taken, per publish
	filled []atomic.Int64   // slots written, per publish
	done   []chan struct{}  // closed when publish k reached all n
	extra  atomic.Int64     // deliveries beyond n, or of unknown publishes
}

func newFanout(n, publishes int) *fanout {
	f := &fanout{n: n, lat: make([][]atomic.Int64, publishes),
		count: make([]atomic.Int64, publishes), filled: make([]atomic.Int64, publishes),
		done: make([]chan struct{}, publishes)}
	for k := range publishes {
		f.lat[k] = make([]atomic.Int64, n)
		f.done[k] = make(chan struct{})
	}
	return f
}

var pushPrefix = []byte(`{"type":"push"`)

// onFrame takes a caddy-duplex frame: a push carrying {"i":k,"t":<unix
// ns published>}.
func (f *fanout) onFrame(frame []byte) {
	if bytes.HasPrefix(frame, pushPrefix) {
		f.record(frame)
	}
}

// record takes a push frame of any protocol carrying {"i":k,"t":<unix ns
// published>}.
func (f *fanout) record(frame []byte) {
	now := time.Now().UnixNano()
	k, ok1 := intField(frame, "i")
	t, ok2 := intField(frame, "t")
	if !ok1 || !ok2 || k < 0 || int(k) >= len(f.lat) {
		f.extra.Add(1)
		return
	}
	idx := f.count[k].Add(1) - 1
	if idx >= int64(f.n) {
		f.extra.Add(1)
		return
	}
	f.lat[k][idx].Store(now - t)
	if f.filled[k].Add(1) == int64(f.n) {
		close(f.done[k])
	}
}

// split returns the latencies of the publishes after the first (the
// steady state), and of all. The first publish after an idle phase is cold
// for the server and for the harness's own client goroutines alike, and
// with 50 publishes its deliveries alone (2 %) would be the p99: the
// latency rows are over steady (the single-node scenario gives the first
// publish rows of its own).
func (f *fanout) split() (steady, all durations) {
	for k := range f.lat {
		lat := f.latencies(k)
		all = append(all, lat...)
		if k > 0 || len(f.lat) == 1 {
			steady = append(steady, lat...)
		}
	}
	return steady, all
}

// publishAll publishes one message per publish of f, one at a time, each
// carrying its index and publish time ({"i":k,"t":ns}); the next goes gap
// after the previous reached all n subscribers, or after wait. It returns
// how long the last subscriber took for each publish that reached all,
// and how many deliveries are missing. name labels the log.
func (f *fanout) publishAll(name string, publish func(data []byte) error, wait, gap time.Duration) (last durations, missing int, err error) {
	for k := range len(f.lat) {
		data := `{"i":` + strconv.Itoa(k) + `,"t":` + strconv.FormatInt(time.Now().UnixNano(), 10) + `}`
		if err := publish([]byte(data)); err != nil {
			return nil, 0, err
		}
		select {
		case <-f.done[k]:
			last = append(last, slices.Max(f.latencies(k)))
		case <-time.After(wait):
			got := int(min(f.count[k].Load(), int64(f.n)))
			missing += f.n - got
			logf("  %s: publish %d reached %d of %d subscribers within %s", name, k, got, f.n, wait)
		}
		time.Sleep(gap)
	}
	return last, missing, nil
}

// latencies are publish k's deliveries recorded so far. A slot taken but
// not yet written (a publish that timed out) is still 0 and left out.
func (f *fanout) latencies(k int) durations {
	slots := f.lat[k][:min(f.count[k].Load(), int64(f.n))]
	d := make(durations, 0, len(slots))
	for i := range slots {
		if v := slots[i].Load(); v != 0 {
			d = append(d, time.Duration(v))
		}
	}
	return d
}

func (e *env) sessions(srv *server, transport string, n int) (metrics, error) {
	m := metrics{}
	fan := newFanout(n, e.cfg.fanoutPublishes(n))
	profile := e.cfg.pprofDir != "" && srv.adminURL != "" && n == slices.Max(e.cfg.sizes)
	if profile { // the baseline the idle profiles are read against
		e.saveProfile(srv, fmt.Sprintf("heap-before-%s-%d", transport, n), "heap?gc=1")
		e.saveMemStats(srv, fmt.Sprintf("memstats-before-%s-%d", transport, n))
	}
	before, err := srv.usage()
	if err != nil {
		return nil, err
	}
	stopOpenProfile := func() {}
	if profile {
		stopOpenProfile = e.startCPUProfile(srv, fmt.Sprintf("cpu-open-%s-%d", transport, n), 2*time.Second)
	}
	sessions, om, err := e.openPhase(srv, transport, n, fan.onFrame)
	if err != nil {
		return nil, err
	}
	defer closeAll(sessions)
	maps.Copy(m, om)
	stopOpenProfile()
	time.Sleep(e.cfg.settle)
	idle, err := srv.usage()
	if err != nil {
		return nil, err
	}
	m["rss"] = float64(idle.rssKiB-before.rssKiB) / float64(n)
	logf("  %s: %d sessions opened at %.0f/s; RSS %d → %d KiB", srv.name, n, m["opens"], before.rssKiB, idle.rssKiB)
	if profile {
		e.saveProfile(srv, fmt.Sprintf("heap-idle-%s-%d", transport, n), "heap?gc=1")
		e.saveProfile(srv, fmt.Sprintf("goroutine-idle-%s-%d", transport, n), "goroutine")
		e.saveMemStats(srv, fmt.Sprintf("memstats-idle-%s-%d", transport, n))
	}
	if !e.cfg.scenarios["fanout"] {
		return m, nil
	}

	stopProfile := func() {}
	if profile {
		stopProfile = e.startCPUProfile(srv, fmt.Sprintf("cpu-fanout-%s-%d", transport, n), 5*time.Second)
	}
	cpu, err := startCPU(srv)
	if err != nil {
		return nil, err
	}
	last, missing, err := fan.publishAll(srv.name, func(data []byte) error {
		return e.publish(srv, append(append([]byte(`{"channel":"fan","data":`), data...), '}'))
	}, e.cfg.fanoutWait, e.cfg.publishGap)
	if err != nil {
		return nil, err
	}
	cpuUsed, err := cpu.since()
	if err != nil {
		return nil, err
	}
	stopProfile()
	steady, all := fan.split()
	firstLast := math.NaN()
	if fan.filled[0].Load() == int64(n) {
		firstLast = ms(slices.Max(fan.latencies(0)))
	}
	m["p50"] = ms(steady.percentile(0.50))
	m["p99"] = ms(steady.percentile(0.99))
	m["max"] = ms(steady.percentile(1))
	m["firstLast"] = firstLast
	m["p99All"] = ms(all.percentile(0.99))
	m["lastMedian"], m["lastMax"] = math.NaN(), math.NaN()
	if len(last) > 0 {
		m["lastMedian"] = ms(last.percentile(0.5))
		m["lastMax"] = ms(last.percentile(1))
	}
	m["cpuDelivery"] = microsPer(cpuUsed, int64(len(all)))
	m["missing"] = float64(missing)
	if x := fan.extra.Load(); x > 0 {
		logf("  %s: %d unexpected or duplicate deliveries", srv.name, x)
	}
	return m, nil
}
