package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// metrics are one scenario run's figures, by metric key.
type metrics map[string]float64

// metricSpec says how a metric is shown: its label (with unit), its
// number format, and optionally a target.
type metricSpec struct {
	key    string
	label  string
	format string // fmt verb for the figures, e.g. "%.1f"
	target *target
}

// target is a performance target for a figure: absolute (on
// caddy-duplex's figure) or relative (on the ratio to the reference
// column).
type target struct {
	text string
	ok   func(duplex, ratio float64) bool
}

// The performance targets. report.add gives each row its target by
// scenario, transport and metric (targetFor), whatever the scenario code
// set.
var (
	targetIdleRSS        = &target{"≤ 16 KiB", func(d, _ float64) bool { return d <= 16 }}
	targetIdleRSSRef     = &target{"ratio ≤ 1.0", func(_, r float64) bool { return r <= 1.0 }}
	targetOpenCPU        = &target{"ratio ≤ 1.3", func(_, r float64) bool { return r <= 1.3 }}
	targetOpenRate       = &target{"ratio ≥ 0.8", func(_, r float64) bool { return r >= 0.8 }}
	targetFanoutP99      = &target{"ratio ≤ 1.1", func(_, r float64) bool { return r <= 1.1 }}
	targetUnicast        = &target{"ratio ≥ 1.0", func(_, r float64) bool { return r >= 1.0 }}
	targetRoundTripCPU   = &target{"ratio ≤ 1.15", func(_, r float64) bool { return r <= 1.15 }}
	targetRoundTrips     *target // round trips/s vs reverse_proxy: no target (its CPU row has one)
	targetClusterFanout  = &target{"ratio ≤ 1.5", func(_, r float64) bool { return r <= 1.5 }}
	targetClusterUnicast = &target{"ratio ≥ 1.0", func(_, r float64) bool { return r >= 1.0 }}
	roundTripCPUVsProxy  = metricSpec{key: "cpuVsProxy",
		label: "server CPU per round trip vs Caddy CPU per reverse_proxy request (ref. column: reverse_proxy, µs)", format: "%.1f"}
)

// targetFor is the target of a row, nil if it has none:
//   - idle sessions: WebSocket ≤ 16 KiB RSS per session, SSE and stream
//     no more than the reference's; CPU per open ≤ 1.3× the reference's,
//     opens per second ≥ 0.8×;
//   - fan-out: delivery p99 ≤ 1.1× the reference's;
//   - unicast: single publishes (admin endpoint, publish_listen or
//     duplex_publish route)
//     delivered per second ≥ 1.0× the reference's;
//   - round trips: WebSocket server CPU per round trip ≤ 1.15× Caddy's
//     CPU per plain reverse_proxy request;
//   - cluster: fan-out p99 on three Redis nodes ≤ 1.5× one memory-broker
//     node's; unicast pushes/s on three Redis nodes ≥ Centrifugo's on the
//     same Redis.
func targetFor(scenario, transport string, spec metricSpec) *target {
	switch {
	case strings.HasPrefix(scenario, "(a) idle"):
		switch spec.key {
		case "rss":
			if transport == "websocket" {
				return targetIdleRSS
			}
			return targetIdleRSSRef
		case "cpuOpen":
			return targetOpenCPU
		case "opens":
			return targetOpenRate
		}
	case strings.HasPrefix(scenario, "(b) fan-out") && spec.key == "p99":
		return targetFanoutP99
	case strings.HasPrefix(scenario, "(c) unicast") && spec.key == "rate" && !strings.Contains(spec.label, "batches"):
		return targetUnicast
	case strings.HasPrefix(scenario, "(d) round trips") && spec.key == roundTripCPUVsProxy.key && transport == "websocket":
		return targetRoundTripCPU
	case strings.HasPrefix(scenario, "(e) cluster fan-out") && spec.key == "p99" && strings.HasSuffix(spec.label, sysMemory):
		return targetClusterFanout
	case strings.HasPrefix(scenario, "(e) cluster unicast") && spec.key == "rate" && strings.HasSuffix(spec.label, sysCentrifugo):
		return targetClusterUnicast
	}
	return nil
}

// row is one line of the table.
type row struct {
	scenario, transport string
	spec                metricSpec
	duplex, reference   float64 // NaN: not measured
}

// report collects rows in the order they are produced.
type report struct{ rows []row }

func (r *report) add(scenario, transport string, spec metricSpec, duplex, reference float64) {
	spec.target = targetFor(scenario, transport, spec)
	r.rows = append(r.rows, row{scenario, transport, spec, duplex, reference})
	logf("  %-28s %-9s %-34s %s | %s", scenario, transport, spec.label,
		formatValue(spec.format, duplex), formatValue(spec.format, reference))
	if strings.HasPrefix(scenario, "(d) round trips") && spec.key == "cpuOp" {
		// Beside it: the same CPU against a plain request's through
		// Caddy's reverse_proxy (the plain requests row came first).
		proxy := math.NaN()
		for _, x := range r.rows {
			if strings.HasPrefix(x.scenario, "(d) plain requests") && x.spec.key == "cpuOp" {
				proxy = x.duplex
			}
		}
		r.add(scenario, transport, roundTripCPUVsProxy, duplex, proxy)
	}
}

// addPair adds one row per spec from the two servers' metrics (either may
// be nil when that server was not run).
func (r *report) addPair(scenario, transport string, specs []metricSpec, duplex, reference metrics) {
	for _, s := range specs {
		r.add(scenario, transport, s, lookup(duplex, s.key), lookup(reference, s.key))
	}
}

func lookup(m metrics, key string) float64 {
	if v, ok := m[key]; ok {
		return v
	}
	return math.NaN()
}

func formatValue(format string, v float64) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "—"
	}
	return fmt.Sprintf(format, v)
}

// write prints the table as markdown.
func (r *report) write(w io.Writer) {
	fmt.Fprintln(w, "| scenario | transport | metric | caddy-duplex | reference | ratio | target |")
	fmt.Fprintln(w, "|---|---|---|---:|---:|---:|---|")
	for _, x := range r.rows {
		ratio := x.duplex / x.reference
		tgt := ""
		if t := x.spec.target; t != nil && !math.IsNaN(x.duplex) {
			mark := "✗ missed"
			if t.ok(x.duplex, ratio) {
				mark = "✓"
			}
			tgt = t.text + " " + mark
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n",
			x.scenario, x.transport, x.spec.label,
			formatValue(x.spec.format, x.duplex), formatValue(x.spec.format, x.reference),
			formatValue("%.2f×", ratio), tgt)
	}
}

// durations is a sample of latencies.
type durations []time.Duration

// percentile returns the q-quantile (0..1) by the nearest-rank method.
func (d durations) percentile(q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// microsPer is CPU time per operation in microseconds.
func microsPer(cpu time.Duration, ops int64) float64 {
	if ops <= 0 {
		return math.NaN()
	}
	return float64(cpu) / float64(time.Microsecond) / float64(ops)
}

func rate(ops int64, d time.Duration) float64 {
	if d <= 0 {
		return math.NaN()
	}
	return float64(ops) / d.Seconds()
}
