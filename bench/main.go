// Command bench is caddy-duplex's benchmark harness. It builds
// Caddy with the plugin, the reference server (bench/reference: plain Go
// on gobwas/ws, no guarantees) and a small upstream app (bench/upstream),
// starts them on loopback, drives them with real clients and prints one
// markdown table: every figure for caddy-duplex beside the reference
// server's, and their ratio.
//
//	go run ./bench           # the full run (about 12 minutes on 2 cores, the cluster included)
//	go run ./bench -quick    # smaller sizes, 3 s phases (about 3½ minutes)
//
// Scenarios: (a) idle sessions: RSS per session and opens per second;
// (b) fan-out: publishes to one channel with N subscribers; (c) unicast:
// sessions on their own channels, concurrent publishers, single and
// batched publishes; (d) round trips through the session to the upstream,
// beside plain HTTP/1.1 requests through Caddy's reverse_proxy. Each runs
// over WebSocket, SSE (+ POST) and stream (NDJSON over HTTP/1.1 full
// duplex). (e) cluster: three Caddy nodes on Redis (`broker redis`)
// beside one on the memory broker and beside three Centrifugo v6 nodes on
// the same Redis, over WebSocket (cluster.go). Server CPU time per operation comes from /proc/<pid>/stat,
// RSS from /proc/<pid>/status. Each measurement gets fresh server
// processes; progress goes to stderr, the table to stdout.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// config is the harness's settings, from flags.
type config struct {
	scenarios  map[string]bool
	transports []string
	servers    []string

	sizes      []int         // (a)/(b) session counts
	openConc   int           // sessions opened in parallel
	settle     time.Duration // wait before reading idle RSS
	publishes  int           // (b) publishes per size, at least
	deliveries int           // (b) deliveries per size, at least (more publishes at small sizes)
	publishGap time.Duration // (b) pause between publishes
	fanoutWait time.Duration // (b) longest wait for one publish

	unicastSessions int           // (c)
	publishers      int           // (c) concurrent publishers
	batch           int           // (c) publishes per batch (1: no batched run)
	publishRoute    bool          // (c) also publish on a duplex_publish route
	publishListen   bool          // (c) also publish on publish_listen
	unicastRounds   int           // (c) rounds of each single-publish measurement
	duration        time.Duration // (c) publishing time
	drain           time.Duration // (c) longest wait for deliveries after it

	rtSessions int           // (d) sessions sending back to back
	rtDuration time.Duration // (d)

	clusterSizes []int  // (e) fan-out session counts
	centrifugo   string // (e) Centrifugo binary ("" = $(go env GOPATH)/bin/centrifugo)

	proxyIdleConns int // Caddy's keepalive_idle_conns_per_host (0: default)

	pprofDir string // save Caddy profiles here ("" = none)
	caddyBin string // use this Caddy instead of building one
	outFile  string // also write the table here
	keep     bool   // keep the work directory
}

var allScenarios = []string{"idle", "fanout", "unicast", "roundtrip", "cluster"}

func parseFlags() (config, error) {
	var (
		cfg                                 config
		quick                               bool
		scenarios, transports, servers, szs string
		clusterSizes                        string
	)
	flag.BoolVar(&quick, "quick", false, "quick run: N=1000 only (cluster fan-out 1, 100, 1000), 20 publishes, 3 s phases (overrides the size and duration flags)")
	flag.StringVar(&scenarios, "scenarios", strings.Join(allScenarios, ","), "scenarios to run: "+strings.Join(allScenarios, ","))
	flag.StringVar(&transports, "transports", "websocket,sse,stream", "transports to drive")
	flag.StringVar(&servers, "servers", nameDuplex+","+nameReference, "servers to measure")
	flag.StringVar(&szs, "sizes", "1000,10000", "(a)/(b) session counts")
	flag.IntVar(&cfg.openConc, "open-concurrency", 32, "sessions opened in parallel")
	flag.DurationVar(&cfg.settle, "settle", 2*time.Second, "(a) wait after opening before reading RSS")
	flag.IntVar(&cfg.publishes, "publishes", 50, "(b) publishes per fan-out run, at least")
	flag.IntVar(&cfg.deliveries, "deliveries", 200_000, "(b) deliveries per fan-out run, at least: more publishes at small N, up to 1,000 (0: -publishes only)")
	flag.DurationVar(&cfg.publishGap, "publish-gap", 20*time.Millisecond, "(b) pause after each publish has reached every subscriber")
	flag.DurationVar(&cfg.fanoutWait, "fanout-wait", 10*time.Second, "(b) longest wait for one publish to reach every subscriber")
	flag.IntVar(&cfg.unicastSessions, "unicast-sessions", 1000, "(c) sessions, each on its own channel")
	flag.IntVar(&cfg.publishers, "publishers", 32, "(c) concurrent publishers")
	flag.IntVar(&cfg.batch, "batch", 20, "(c) publishes per batched request (1: no batched run)")
	flag.IntVar(&cfg.unicastRounds, "unicast-rounds", 3, "(c) rounds of each single-publish measurement, each on fresh servers, the first server alternating; medians are reported (quick mode: 1)")
	flag.BoolVar(&cfg.publishListen, "publish-listen", true, "(c) also run single publishes, every transport, with caddy-duplex publishing on its publish_listen address")
	flag.BoolVar(&cfg.publishRoute, "publish-route", true, "(c) also run WebSocket unicast with caddy-duplex publishing on a duplex_publish site route")
	flag.DurationVar(&cfg.duration, "duration", 10*time.Second, "(c) publishing time")
	flag.DurationVar(&cfg.drain, "drain", 5*time.Second, "(c) longest wait for deliveries after publishing stops")
	flag.IntVar(&cfg.rtSessions, "rt-sessions", 100, "(d) sessions (and plain-request clients)")
	flag.DurationVar(&cfg.rtDuration, "rt-duration", 10*time.Second, "(d) time each sends back to back")
	flag.StringVar(&clusterSizes, "cluster-sizes", "1,100,1000,10000", "(e) cluster fan-out session counts")
	flag.StringVar(&cfg.centrifugo, "centrifugo", "", "(e) Centrifugo v6 binary (default: centrifugo in $(go env GOPATH)/bin; its rows are skipped if it is not there)")
	flag.IntVar(&cfg.proxyIdleConns, "proxy-idle-conns", 128, "Caddy's reverse_proxy keepalive_idle_conns_per_host, for both routes (0: Caddy's default, 32, which churns upstream connections under 100 concurrent clients)")
	flag.StringVar(&cfg.pprofDir, "pprof", "", "save Caddy heap, goroutine and CPU profiles into this directory")
	flag.StringVar(&cfg.caddyBin, "caddy", "", "Caddy binary to use instead of building ./cmd/caddy")
	flag.StringVar(&cfg.outFile, "out", "", "also write the table to this file")
	flag.BoolVar(&cfg.keep, "keep", false, "keep the work directory (binaries, Caddyfiles, logs)")
	flag.Parse()

	if quick {
		szs = "1000"
		clusterSizes = "1,100,1000"
		cfg.publishes = 20
		cfg.deliveries = 0
		cfg.duration = 3 * time.Second
		cfg.rtDuration = 3 * time.Second
		cfg.settle = time.Second
		cfg.drain = 3 * time.Second
		cfg.unicastRounds = 1
	}
	cfg.scenarios = map[string]bool{}
	for _, s := range splitList(scenarios) {
		if !slices.Contains(allScenarios, s) {
			return cfg, fmt.Errorf("-scenarios: unknown scenario %q (want some of %s)", s, strings.Join(allScenarios, ","))
		}
		cfg.scenarios[s] = true
	}
	cfg.transports = splitList(transports)
	for _, t := range cfg.transports {
		if t != transportWebSocket && t != transportSSE && t != transportStream {
			return cfg, fmt.Errorf("-transports: unknown transport %q", t)
		}
	}
	cfg.servers = splitList(servers)
	for _, s := range cfg.servers {
		if s != nameDuplex && s != nameReference {
			return cfg, fmt.Errorf("-servers: unknown server %q", s)
		}
	}
	for _, s := range splitList(szs) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return cfg, fmt.Errorf("-sizes: bad size %q", s)
		}
		cfg.sizes = append(cfg.sizes, n)
	}
	for _, s := range splitList(clusterSizes) {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return cfg, fmt.Errorf("-cluster-sizes: bad size %q", s)
		}
		cfg.clusterSizes = append(cfg.clusterSizes, n)
	}
	if len(cfg.sizes) == 0 || len(cfg.clusterSizes) == 0 || cfg.publishes < 1 || cfg.unicastSessions < 1 || cfg.publishers < 1 || cfg.rtSessions < 1 {
		return cfg, fmt.Errorf("sizes, publishes, sessions and publishers must be positive")
	}
	return cfg, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

var (
	started     = time.Now()
	workDir     atomic.Pointer[string] // removed on Ctrl-C too
	interrupted atomic.Bool            // set on Ctrl-C: the failures that follow are ours
)

// logf reports progress on stderr.
func logf(format string, args ...any) {
	if interrupted.Load() {
		return
	}
	fmt.Fprintf(os.Stderr, "[%6.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
}

func main() {
	cfg, err := parseFlags()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	// Every child dies with the harness, also on Ctrl-C.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		logf("%v: stopping every process", s)
		interrupted.Store(true)
		killAll()
		if dir := workDir.Load(); dir != nil && !cfg.keep {
			os.RemoveAll(*dir)
		}
		os.Exit(130)
	}()
	code := run(cfg)
	killAll()
	os.Exit(code)
}

func run(cfg config) int {
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1
	}
	limit, err := raiseFileLimit()
	if err != nil {
		return fail(err)
	}
	need := uint64(max(slices.Max(cfg.sizes), slices.Max(cfg.clusterSizes)) + 1000) // per process: the harness and each server
	if limit < need {
		logf("warning: open-file limit %d is below the %d the largest size needs", limit, need)
	}
	root, err := moduleRoot()
	if err != nil {
		return fail(err)
	}
	work, err := os.MkdirTemp("", "duplex-bench-")
	if err != nil {
		return fail(fmt.Errorf("work directory: %w", err))
	}
	workDir.Store(&work)
	if cfg.keep {
		logf("work directory: %s", work)
	} else {
		defer os.RemoveAll(work)
	}
	if cfg.pprofDir != "" {
		if err := os.MkdirAll(cfg.pprofDir, 0o755); err != nil {
			return fail(fmt.Errorf("-pprof: %w", err))
		}
	}

	bins := binaries{workDir: work, proxyIdleConns: cfg.proxyIdleConns}
	bins.caddy, bins.reference, bins.upstream, err = buildBinaries(root, work, cfg.caddyBin)
	if err != nil {
		return fail(err)
	}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		logf("load average before the run: %s", strings.TrimSpace(string(l)))
	}
	loadStart, err := readLoad()
	if err != nil {
		return fail(err)
	}
	up, upPort, err := startUpstream(bins)
	if err != nil {
		return fail(err)
	}
	defer up.stop(time.Second)

	e := &env{cfg: cfg, bins: bins, upstreamPort: upPort, upstream: up,
		hc: newHTTPClient(2 * cfg.publishers), rep: &report{}}
	logf("machine: %d CPUs, %s, open-file limit %d", runtime.NumCPU(), runtime.Version(), limit)
	if cfg.scenarios["idle"] || cfg.scenarios["fanout"] {
		e.runSessions()
	}
	if cfg.scenarios["unicast"] {
		e.runUnicast()
	}
	if cfg.scenarios["roundtrip"] {
		e.runRoundTrips()
	}
	if cfg.scenarios["cluster"] {
		e.runCluster()
	}

	up.stop(time.Second) // so its CPU time counts as ours
	loadEnd, err := readLoad()
	if err != nil {
		return fail(err)
	}
	foreign := foreignShare(loadStart, loadEnd)

	out := io.Writer(os.Stdout)
	if cfg.outFile != "" {
		f, err := os.Create(cfg.outFile)
		if err != nil {
			return fail(fmt.Errorf("-out: %w", err))
		}
		defer f.Close()
		out = io.MultiWriter(os.Stdout, f)
	}
	fmt.Fprintf(out, "\ncaddy-duplex benchmark — %d CPUs, %s, %s; took %s; other processes used %.0f%% of the CPU meanwhile (load average %s → %s)\n\n",
		runtime.NumCPU(), runtime.Version(), time.Now().UTC().Format("2006-01-02 15:04 MST"), time.Since(started).Round(time.Second),
		100*foreign, loadStart.loadavg1m, loadEnd.loadavg1m)
	if foreign > 0.1 {
		logf("warning: other processes used %.0f%% of the CPU during the run: the figures are disturbed", 100*foreign)
	}
	e.rep.write(out)
	if e.failures > 0 {
		fmt.Fprintf(os.Stderr, "bench: %d measurement(s) failed; see the log above\n", e.failures)
		return 1
	}
	return 0
}
