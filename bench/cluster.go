package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Scenario (e), the cluster (README "Running a cluster"): one
// redis-server (no persistence) for the whole scenario; three Caddy nodes
// with `broker redis` beside one Caddy on the memory broker, measured in
// the same run, and — when its binary is there — three Centrifugo nodes on
// its Redis engine on the same Redis (its own key prefix). Sessions are
// spread round-robin over the nodes, publishes go to the first node's
// publish API. Every phase gets fresh server processes; Redis is emptied
// (FLUSHALL) between phases while no node runs.
//
//   - fan-out: N sessions on one channel, publishes one at a time as in
//     (b): delivery latency from the publish to each session, Redis
//     commands and Redis CPU per publish (INFO commandstats and INFO cpu
//     deltas over the publishes);
//   - unicast: sessions on their own channels, concurrent publishers, as
//     in (c) with single publishes;
//   - detached sessions: N sessions opened, their connections cut so that
//     they detach (resume_window 10m), Redis used_memory delta ÷ N, with an
//     empty resume log and again with 10 pushes in each log.

// clusterResumeWindow is long enough that no session of a run expires.
const clusterResumeWindow = 10 * time.Minute

// clusterCaddyfile is the bench Caddyfile with an optional global duplex
// block (the broker) and a resume window.
const clusterCaddyfile = `{
	admin 127.0.0.1:%[1]d
	auto_https off
	skip_install_trust
	persist_config off
	storage file_system %[4]s
	log {
		level WARN
	}
%[6]s}
http://127.0.0.1:%[2]d {
	route /live* {
		duplex {
			channels {http.request.uri.query.channel}
			transports websocket stream sse
			resume_window %[7]s
		}
		reverse_proxy 127.0.0.1:%[3]d%[5]s
	}
	route /direct* {
		reverse_proxy 127.0.0.1:%[3]d%[5]s
	}
	handle /publish {
		duplex_publish
	}
}
`

// Names of the systems the cluster scenario compares.
const (
	sysRedis      = "3 nodes on Redis"
	sysMemory     = "1 node, memory broker"
	sysCentrifugo = "Centrifugo v6, 3 nodes on Redis"
)

// system is a running set of nodes: sessions open round-robin on them,
// publishes go to the first.
type system struct {
	name  string
	procs []*proc
	// open opens session i (its node: i mod nodes) on channel; every push
	// frame goes to onPush.
	open func(i int, channel string, onPush frameFunc) (handle, error)
	// publish publishes data (JSON) to channel through the first node.
	publish func(channel string, data []byte) error
	// publishURL is caddy-duplex's first node's publish API.
	publishURL string
	// nodes are caddy-duplex's nodes (their admin endpoints serve pprof).
	nodes []*server
	stop  func()
}

// crashed reports a node that has exited.
func (s *system) crashed() error {
	for _, p := range s.procs {
		if err := p.exited(); err != nil {
			return err
		}
	}
	return nil
}

// cpu is the nodes' CPU time so far.
func (s *system) cpu() (time.Duration, error) {
	var total time.Duration
	for _, p := range s.procs {
		if err := p.exited(); err != nil {
			return 0, err
		}
		u, err := readUsage(p.pid())
		if err != nil {
			return 0, err
		}
		total += u.cpu
	}
	return total, nil
}

// redisServer is the scenario's redis-server.
type redisServer struct {
	proc *proc
	addr string
	rdb  *redis.Client
}

func startRedis(dir string) (*redisServer, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("redis-server not found (apt-get install redis-server): %w", err)
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	p, err := startProc("redis-server", dir, bin, []string{"--port", strconv.Itoa(ports[0]), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", dir, "--maxclients", "10000"})
	if err != nil {
		return nil, err
	}
	r := &redisServer{proc: p, addr: addr, rdb: redis.NewClient(&redis.Options{Addr: addr})}
	deadline := time.Now().Add(15 * time.Second)
	for {
		err := r.rdb.Ping(context.Background()).Err()
		if err == nil {
			return r, nil
		}
		if e := p.exited(); e != nil {
			return nil, e
		}
		if time.Now().After(deadline) {
			r.stop()
			return nil, fmt.Errorf("redis-server not answering at %s: %w", addr, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *redisServer) stop() {
	r.rdb.Close()
	r.proc.stop(3 * time.Second)
}

// flush empties Redis between phases (no node runs then).
func (r *redisServer) flush() error {
	if err := r.rdb.FlushAll(context.Background()).Err(); err != nil {
		return fmt.Errorf("redis FLUSHALL: %w", err)
	}
	return nil
}

// redisStats is Redis's command count (INFO itself left out), CPU time
// (INFO cpu: used_cpu_sys + used_cpu_user) and used_memory at one moment.
type redisStats struct {
	commands int64
	byCmd    map[string]int64
	cpu      time.Duration
	memory   int64 // used_memory
	dataset  int64 // used_memory_dataset: used_memory without Redis's overhead (client buffers and such)
}

func (r *redisServer) stats() (redisStats, error) {
	st := redisStats{byCmd: map[string]int64{}}
	info, err := r.rdb.Info(context.Background(), "commandstats", "cpu", "memory").Result()
	if err != nil {
		return st, fmt.Errorf("redis INFO: %w", err)
	}
	var cpu float64
	for line := range strings.Lines(info) {
		line = strings.TrimSpace(line)
		if rest, ok := strings.CutPrefix(line, "cmdstat_"); ok {
			name, fields, _ := strings.Cut(rest, ":")
			if name == "info" {
				continue
			}
			for f := range strings.SplitSeq(fields, ",") {
				if v, ok := strings.CutPrefix(f, "calls="); ok {
					n, _ := strconv.ParseInt(v, 10, 64)
					st.commands += n
					st.byCmd[name] = n
				}
			}
			continue
		}
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		switch k {
		case "used_cpu_sys", "used_cpu_user":
			f, _ := strconv.ParseFloat(v, 64)
			cpu += f
		case "used_memory":
			st.memory, _ = strconv.ParseInt(v, 10, 64)
		case "used_memory_dataset":
			st.dataset, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	st.cpu = time.Duration(cpu * float64(time.Second))
	return st, nil
}

// commandMix is the commands between two samples, most frequent first,
// per op ("evalsha 1.0, hget 2.0, …").
func commandMix(a, b redisStats, ops int64) string {
	type kv struct {
		name string
		n    int64
	}
	var all []kv
	for name, n := range b.byCmd {
		if d := n - a.byCmd[name]; d > 0 {
			all = append(all, kv{name, d})
		}
	}
	slices.SortFunc(all, func(x, y kv) int { return int(y.n - x.n) })
	var parts []string
	for _, x := range all {
		parts = append(parts, fmt.Sprintf("%s %.2f", x.name, float64(x.n)/float64(ops)))
	}
	return strings.Join(parts, ", ")
}

// profileName makes a system's name part of a file name.
var profileName = strings.NewReplacer(" ", "-", ",", "")

// startDuplexSystem starts n Caddy nodes: on redis with `broker redis`,
// or (redis nil) on the memory broker.
func (e *env) startDuplexSystem(name string, n int, rs *redisServer, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*system, error) {
	global := ""
	if rs != nil {
		global = "\tduplex {\n\t\tbroker redis " + rs.addr + "\n\t}\n"
	}
	var nodes []*server
	stop := func() {
		for _, s := range nodes {
			s.stop()
		}
	}
	for range n {
		s, err := startCaddyWith(e.bins, func(c caddyPorts) string {
			return fmt.Sprintf(clusterCaddyfile, c.admin, c.http, e.upstreamPort, c.storage,
				proxyOptions(e.bins.proxyIdleConns), global, clusterResumeWindow)
		})
		if err != nil {
			stop()
			return nil, err
		}
		nodes = append(nodes, s)
	}
	sys := &system{name: name, stop: stop, publishURL: nodes[0].publishURL, nodes: nodes}
	for _, s := range nodes {
		sys.procs = append(sys.procs, s.proc)
	}
	sys.open = func(i int, channel string, onPush frameFunc) (handle, error) {
		return openSessionDial(transportWebSocket, nodes[i%len(nodes)], channel, dial, func(f []byte) {
			if bytes.HasPrefix(f, pushPrefix) {
				onPush(f)
			}
		})
	}
	sys.publish = func(channel string, data []byte) error {
		body := make([]byte, 0, len(channel)+len(data)+24)
		body = append(body, `{"channel":"`...)
		body = append(body, channel...)
		body = append(body, `","data":`...)
		body = append(body, data...)
		body = append(body, '}')
		return e.publishTo(nodes[0].publishURL, body)
	}
	return sys, nil
}

// runCluster runs (e): every phase on every system.
func (e *env) runCluster() {
	if _, err := exec.LookPath("redis-server"); err != nil {
		logf("cluster: skipped, redis-server is not installed (apt-get install redis-server): %v", err)
		e.rep.add("(e) cluster", "websocket", metricSpec{key: "skipped",
			label: "skipped: redis-server not found", format: "%.0f"}, math.NaN(), math.NaN())
		return
	}
	rs, err := startRedis(e.bins.workDir)
	if err != nil {
		e.failures++
		logf("FAILED cluster: %v", err)
		return
	}
	defer rs.stop()
	if v, err := rs.rdb.Info(context.Background(), "server").Result(); err == nil {
		for line := range strings.Lines(v) {
			if strings.HasPrefix(line, "redis_version:") {
				logf("cluster: %s on %s", strings.TrimSpace(line), rs.addr)
			}
		}
	}
	cf, cfErr := findCentrifugo(e.cfg.centrifugo)
	if cfErr != nil {
		logf("cluster: the Centrifugo rows are skipped: %v", cfErr)
	} else {
		logf("cluster: Centrifugo binary %s", cf)
	}

	starters := []struct {
		name  string
		start func() (*system, error)
	}{
		{sysRedis, func() (*system, error) { return e.startDuplexSystem(sysRedis, 3, rs, nil) }},
		{sysMemory, func() (*system, error) { return e.startDuplexSystem(sysMemory, 1, nil, nil) }},
	}
	if cfErr == nil {
		starters = append(starters, struct {
			name  string
			start func() (*system, error)
		}{sysCentrifugo, func() (*system, error) { return e.startCentrifugo(cf, 3, rs) }})
	}
	// phase runs fn on a fresh instance of every system.
	phase := func(what string, fn func(sys *system) (metrics, error)) map[string]metrics {
		out := map[string]metrics{}
		for _, st := range starters {
			logf("== cluster %s on %s", what, st.name)
			m, err := func() (metrics, error) {
				if err := rs.flush(); err != nil {
					return nil, err
				}
				sys, err := st.start()
				if err != nil {
					return nil, err
				}
				defer sys.stop()
				m, err := fn(sys)
				if err == nil {
					err = sys.crashed()
				}
				if err == nil {
					err = rs.proc.exited()
				}
				return m, err
			}()
			if err != nil {
				e.failures++
				logf("FAILED cluster %s on %s: %v", what, st.name, err)
				continue
			}
			out[st.name] = m
		}
		time.Sleep(300 * time.Millisecond)
		return out
	}

	for _, n := range e.cfg.clusterSizes {
		ms := phase(fmt.Sprintf("fan-out N=%d", n), func(sys *system) (metrics, error) {
			return e.clusterFanout(sys, rs, n)
		})
		e.addClusterRows(fmt.Sprintf("(e) cluster fan-out to N=%d, %d publishes", n, e.cfg.publishes), clusterFanoutSpecs, ms)
	}
	ms := phase("unicast", func(sys *system) (metrics, error) {
		return e.clusterUnicast(sys, rs)
	})
	e.addClusterRows(fmt.Sprintf("(e) cluster unicast, %d sessions, %d publishers, %s", e.cfg.unicastSessions, e.cfg.publishers, e.cfg.duration),
		clusterUnicastSpecs, ms)

	// Detached sessions: Redis only.
	n := e.cfg.unicastSessions
	logf("== cluster detached sessions N=%d on %s", n, sysRedis)
	m, err := func() (metrics, error) {
		if err := rs.flush(); err != nil {
			return nil, err
		}
		return e.clusterDetached(rs, n)
	}()
	if err != nil {
		e.failures++
		logf("FAILED cluster detached sessions: %v", err)
	}
	scenario := fmt.Sprintf("(e) cluster sessions in Redis, N=%d", n)
	for _, s := range clusterDetachedSpecs {
		e.rep.add(scenario, "websocket", s, lookup(m, s.key), math.NaN())
	}
}

// Row specs of the cluster scenario. The metric's label names what the
// reference column holds.
var (
	clusterFanoutSpecs = []metricSpec{
		{key: "p50", label: "delivery latency p50, first publish left out (ms)", format: "%.1f"},
		{key: "p99", label: "delivery latency p99, first publish left out (ms)", format: "%.1f"},
		{key: "lastMedian", label: "last subscriber has it, median (ms)", format: "%.1f"},
		{key: "cpuDelivery", label: "nodes' CPU per delivery, all nodes (µs)", format: "%.2f"},
		{key: "redisCmds", label: "Redis commands per publish", format: "%.1f"},
		{key: "redisCPU", label: "Redis CPU per publish (µs)", format: "%.0f"},
		{key: "missing", label: "deliveries missing", format: "%.0f"},
	}
	clusterUnicastSpecs = []metricSpec{
		{key: "rate", label: "pushes delivered per second", format: "%.0f"},
		{key: "p50", label: "push latency p50 (ms)", format: "%.1f"},
		{key: "p99", label: "push latency p99 (ms)", format: "%.1f"},
		{key: "cpuPush", label: "nodes' CPU per push, all nodes (µs)", format: "%.1f"},
		{key: "redisCmds", label: "Redis commands per push", format: "%.1f"},
		{key: "redisCPU", label: "Redis CPU per push (µs)", format: "%.1f"},
		{key: "lost", label: "pushes published but not delivered", format: "%.0f"},
	}
	clusterDetachedSpecs = []metricSpec{
		{key: "memAttached", label: "Redis memory per attached session, empty log (bytes)", format: "%.0f"},
		{key: "memDetached", label: "Redis memory per detached session, empty log (bytes)", format: "%.0f"},
		{key: "memDetached10", label: "Redis memory per detached session, 10 pushes of 60 B in its log (bytes)", format: "%.0f"},
		{key: "dataDetached", label: "Redis used_memory_dataset per detached session, empty log (bytes)", format: "%.0f"},
		{key: "dataDetached10", label: "Redis used_memory_dataset per detached session, 10 pushes in its log (bytes)", format: "%.0f"},
	}
)

// addClusterRows adds each spec twice: 3 nodes on Redis against 1 node
// on the memory broker, then against Centrifugo (when it ran).
func (e *env) addClusterRows(scenario string, specs []metricSpec, ms map[string]metrics) {
	r := ms[sysRedis]
	for _, s := range specs {
		s.label += " — ref. column: " + sysMemory
		e.rep.add(scenario, "websocket", s, lookup(r, s.key), lookup(ms[sysMemory], s.key))
	}
	if c, ok := ms[sysCentrifugo]; ok {
		for _, s := range specs {
			if s.key == "lastMedian" || s.key == "cpuDelivery" {
				continue
			}
			s.label += " — ref. column: " + sysCentrifugo
			e.rep.add(scenario, "websocket", s, lookup(r, s.key), lookup(c, s.key))
		}
	} else {
		e.rep.add(scenario, "websocket", metricSpec{key: "skipped",
			label: "Centrifugo rows skipped (binary not found or its run failed; see the log)", format: "%.0f"}, math.NaN(), math.NaN())
	}
}

// redisDelta measures Redis and the nodes over a phase.
type redisDelta struct {
	rs      *redisServer
	sys     *system
	r0      redisStats
	nodeCPU time.Duration
}

func startRedisDelta(rs *redisServer, sys *system) (*redisDelta, error) {
	r0, err := rs.stats()
	if err != nil {
		return nil, err
	}
	c, err := sys.cpu()
	if err != nil {
		return nil, err
	}
	return &redisDelta{rs: rs, sys: sys, r0: r0, nodeCPU: c}, nil
}

// end fills redisCmds and redisCPU per op into m and returns the nodes'
// CPU time over the phase.
func (d *redisDelta) end(m metrics, ops int64) (time.Duration, error) {
	r1, err := d.rs.stats()
	if err != nil {
		return 0, err
	}
	c, err := d.sys.cpu()
	if err != nil {
		return 0, err
	}
	if ops > 0 {
		m["redisCmds"] = float64(r1.commands-d.r0.commands) / float64(ops)
		m["redisCPU"] = microsPer(r1.cpu-d.r0.cpu, ops)
		logf("  %s: Redis commands per op: %s", d.sys.name, commandMix(d.r0, r1, ops))
	}
	return c - d.nodeCPU, nil
}

// clusterFanout is (b) on a system: N sessions on one channel, spread
// over its nodes, publishes one at a time.
func (e *env) clusterFanout(sys *system, rs *redisServer, n int) (metrics, error) {
	fan := newFanout(n, e.cfg.publishes)
	start := time.Now()
	hs, err := openMany(n, e.cfg.openConc, func(i int) (handle, error) {
		return sys.open(i, "fan", fan.record)
	})
	if err != nil {
		return nil, err
	}
	defer closeAll(hs)
	logf("  %s: %d sessions opened in %s", sys.name, n, time.Since(start).Round(time.Millisecond))
	time.Sleep(e.cfg.settle)
	m := metrics{}
	d, err := startRedisDelta(rs, sys)
	if err != nil {
		return nil, err
	}
	last, missing, err := fan.publishAll(sys.name, func(data []byte) error {
		return sys.publish("fan", data)
	}, e.cfg.fanoutWait, e.cfg.publishGap)
	if err != nil {
		return nil, err
	}
	nodeCPU, err := d.end(m, int64(e.cfg.publishes))
	if err != nil {
		return nil, err
	}
	steady, all := fan.split()
	m["p50"] = ms(steady.percentile(0.50))
	m["p99"] = ms(steady.percentile(0.99))
	m["lastMedian"] = math.NaN()
	if len(last) > 0 {
		m["lastMedian"] = ms(last.percentile(0.5))
	}
	m["cpuDelivery"] = microsPer(nodeCPU, int64(len(all)))
	m["missing"] = float64(missing)
	if x := fan.extra.Load(); x > 0 {
		logf("  %s: %d unexpected or duplicate deliveries", sys.name, x)
	}
	return m, nil
}

// clusterUnicast is (c) with single publishes on a system.
func (e *env) clusterUnicast(sys *system, rs *redisServer) (metrics, error) {
	n := e.cfg.unicastSessions
	u := &unicastRun{}
	recv := make([]*receiver, n)
	for i := range recv {
		recv[i] = &receiver{lat: make([]time.Duration, 0, 256)}
	}
	hs, err := openMany(n, e.cfg.openConc, func(i int) (handle, error) {
		rc := recv[i]
		return sys.open(i, "u"+strconv.Itoa(i), func(frame []byte) {
			now := time.Now().UnixNano()
			if t, ok := intField(frame, "t"); ok {
				rc.lat = append(rc.lat, time.Duration(now-t))
			}
			u.delivered.Add(1)
			u.lastAt.Store(now)
		})
	})
	if err != nil {
		return nil, err
	}
	defer closeAll(hs)
	time.Sleep(e.cfg.settle)
	m := metrics{}
	d, err := startRedisDelta(rs, sys)
	if err != nil {
		return nil, err
	}
	var (
		next      atomic.Int64
		published atomic.Int64
		pubErr    atomic.Value
		wg        sync.WaitGroup
	)
	if e.cfg.pprofDir != "" {
		// The first node publishes (and holds a third of the sessions);
		// the second only holds sessions.
		for i, node := range sys.nodes[:min(2, len(sys.nodes))] {
			name := fmt.Sprintf("cpu-cluster-unicast-%s-node%d", profileName.Replace(sys.name), i)
			defer e.startCPUProfile(node, name, e.cfg.duration-time.Second)()
		}
	}
	start := time.Now()
	deadline := start.Add(e.cfg.duration)
	for range e.cfg.publishers {
		wg.Go(func() {
			var data []byte
			for time.Now().Before(deadline) {
				ch := next.Add(1) % int64(n)
				data = append(data[:0], `{"t":`...)
				data = strconv.AppendInt(data, time.Now().UnixNano(), 10)
				data = append(data, '}')
				if err := sys.publish("u"+strconv.FormatInt(ch, 10), data); err != nil {
					pubErr.CompareAndSwap(nil, err)
					return
				}
				published.Add(1)
			}
		})
	}
	wg.Wait()
	if err, _ := pubErr.Load().(error); err != nil {
		return nil, err
	}
	drainUntil := time.Now().Add(e.cfg.drain)
	for u.delivered.Load() < published.Load() && time.Now().Before(drainUntil) {
		time.Sleep(20 * time.Millisecond)
	}
	delivered := u.delivered.Load()
	nodeCPU, err := d.end(m, published.Load())
	if err != nil {
		return nil, err
	}
	closeAll(hs) // readers end: their samples can be read
	var all durations
	for _, rc := range recv {
		all = append(all, rc.lat...)
	}
	end := time.Unix(0, u.lastAt.Load())
	if end.Before(deadline) {
		end = deadline
	}
	m["rate"] = rate(delivered, end.Sub(start))
	m["p50"] = ms(all.percentile(0.50))
	m["p99"] = ms(all.percentile(0.99))
	m["cpuPush"] = microsPer(nodeCPU, delivered)
	m["lost"] = float64(published.Load() - delivered)
	return m, nil
}

// clusterDetached opens n sessions on three Redis nodes, each on its own
// channel, cuts their connections so that they detach, and reads Redis's
// used_memory against the empty Redis's.
func (e *env) clusterDetached(rs *redisServer, n int) (metrics, error) {
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
		return c, err
	}
	sys, err := e.startDuplexSystem(sysRedis, 3, rs, dial)
	if err != nil {
		return nil, err
	}
	defer sys.stop()
	time.Sleep(e.cfg.settle)
	base, err := rs.stats()
	if err != nil {
		return nil, err
	}
	hs, err := openMany(n, e.cfg.openConc, func(i int) (handle, error) {
		return sys.open(i, "d"+strconv.Itoa(i), func([]byte) {})
	})
	if err != nil {
		return nil, err
	}
	defer closeAll(hs)
	time.Sleep(e.cfg.settle)
	attached, err := rs.stats()
	if err != nil {
		return nil, err
	}
	expires0, err := rs.expiringKeys()
	if err != nil {
		return nil, err
	}
	// Cut every connection: the nodes see them drop and detach the
	// sessions, which gives their keys a TTL (redisbroker/doc.go).
	mu.Lock()
	for _, c := range conns {
		c.Close()
	}
	mu.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	for {
		x, err := rs.expiringKeys()
		if err != nil {
			return nil, err
		}
		if x-expires0 >= int64(3*n) { // meta, channels, token (no log yet)
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d keys got a TTL within 30 s after cutting %d sessions", x-expires0, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(e.cfg.settle)
	detached, err := rs.stats()
	if err != nil {
		return nil, err
	}
	// 10 pushes to each detached session, into its log: batches of 100.
	payload := strings.Repeat("x", 50)
	for round := range 10 {
		for first := 0; first < n; first += 100 {
			var body bytes.Buffer
			body.WriteByte('[')
			for i := first; i < min(n, first+100); i++ {
				if i > first {
					body.WriteByte(',')
				}
				fmt.Fprintf(&body, `{"channel":"d%d","data":{"r":%d,"p":"%s"}}`, i, round, payload)
			}
			body.WriteByte(']')
			if err := e.publishTo(sys.publishURL, body.Bytes()); err != nil {
				return nil, err
			}
		}
	}
	time.Sleep(e.cfg.settle)
	withLog, err := rs.stats()
	if err != nil {
		return nil, err
	}
	logf("  Redis used_memory: empty %d, %d attached %d, detached %d, with logs %d; used_memory_dataset %d, %d, %d, %d",
		base.memory, n, attached.memory, detached.memory, withLog.memory, base.dataset, attached.dataset, detached.dataset, withLog.dataset)
	return metrics{
		"dataDetached":   float64(detached.dataset-base.dataset) / float64(n),
		"dataDetached10": float64(withLog.dataset-base.dataset) / float64(n),
		"memAttached":    float64(attached.memory-base.memory) / float64(n),
		"memDetached":    float64(detached.memory-base.memory) / float64(n),
		"memDetached10":  float64(withLog.memory-base.memory) / float64(n),
	}, nil
}

// expiringKeys is the number of keys with a TTL (INFO keyspace, db0).
func (r *redisServer) expiringKeys() (int64, error) {
	v, err := r.rdb.Info(context.Background(), "keyspace").Result()
	if err != nil {
		return 0, fmt.Errorf("redis INFO keyspace: %w", err)
	}
	for line := range strings.Lines(v) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "db0:")
		if !ok {
			continue
		}
		for f := range strings.SplitSeq(rest, ",") {
			if x, ok := strings.CutPrefix(f, "expires="); ok {
				return strconv.ParseInt(x, 10, 64)
			}
		}
	}
	return 0, nil
}
