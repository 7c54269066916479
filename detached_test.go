package duplex_test

// Sessions left detached cannot pile up or lock others out (README:
// "Security defaults", "Limits"): max_detached ends the session detached
// longest, max_sessions (503) and max_sessions_per_ip (429) are counted
// atomically at admission, and a resume of a counted session is never
// refused by them.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// sxSource dials from loopback source address 127.0.<a>.<b>, so many
// connections do not run out of one address's ephemeral ports, and from
// a source port below the kernel's ephemeral range: the ports freePorts
// hands to other tests' Caddys come from that range, and the many
// connections of these tests taking them would keep those Caddys from
// binding.
func sxSource(i int) func(ctx context.Context, network, addr string) (net.Conn, error) {
	ip := net.IPv4(127, 0, byte(1+i/250%250), byte(1+i%250))
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var err error
		for range 20 {
			port := sxLowPortFirst + int(sxLowPort.Add(1)%sxLowPorts)
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip, Port: port}, Timeout: sxWait}
			var c net.Conn
			if c, err = d.DialContext(ctx, network, addr); err == nil {
				return c, nil
			}
			if !errors.Is(err, syscall.EADDRINUSE) {
				return nil, err
			}
		}
		return nil, err
	}
}

// Source ports of sxSource: 10000-31999, below the ephemeral range
// (32768-60999 by default), taken in turn.
const (
	sxLowPortFirst = 10000
	sxLowPorts     = 22000
)

var sxLowPort atomic.Int64

// sxOpenAndDrop opens a WebSocket session dialled by dial, reads its open
// frame and cuts the connection (RST, no close handshake): the session is
// left detached. It returns the open frame, or the refusal status.
func sxOpenAndDrop(ctx context.Context, url string, hdr http.Header, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (map[string]any, int, error) {
	status := 0
	d := ws.Dialer{
		Header:        ws.HandshakeHeaderHTTP(hdr),
		NetDial:       dial,
		OnStatusError: func(st int, _ []byte, _ io.Reader) { status = st },
	}
	conn, br, _, err := d.Dial(ctx, url)
	if err != nil {
		if status != 0 {
			return nil, status, nil
		}
		return nil, 0, fmt.Errorf("duplex test: dial: %w", err)
	}
	defer func() {
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetLinger(0)
		}
		conn.Close()
	}()
	var r io.Reader = conn
	if br != nil {
		r = io.MultiReader(br, conn)
		defer ws.PutReader(br)
	}
	_ = conn.SetReadDeadline(time.Now().Add(sxWait))
	for {
		h, err := ws.ReadHeader(r)
		if err != nil {
			return nil, 0, fmt.Errorf("duplex test: read the open frame: %w", err)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(r, p); err != nil {
			return nil, 0, fmt.Errorf("duplex test: read the open frame: %w", err)
		}
		if h.OpCode != ws.OpText {
			continue
		}
		var f map[string]any
		if err := json.Unmarshal(p, &f); err != nil {
			return nil, 0, fmt.Errorf("duplex test: open frame %q: %w", p, err)
		}
		return f, http.StatusSwitchingProtocols, nil
	}
}

// sxSessionCount is how many sessions the sessions API lists.
func sxSessionCount(t *testing.T, c *caddyProc) int {
	t.Helper()
	st, b := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions"), nil)
	if st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions: %d %s", st, b)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("GET /duplex/sessions: %v: %.200s", err, b)
	}
	switch l := v.(type) {
	case []any:
		return len(l)
	case map[string]any:
		if s, ok := l["sessions"].([]any); ok {
			return len(s)
		}
	}
	t.Fatalf("GET /duplex/sessions: unexpected shape %.200s", b)
	return 0
}

// TestDetachedFlood: one client opens and drops sessions as fast as it can
// (DUPLEX_FLOOD_SESSIONS, default 24000; the attack used 64000). The
// detached sessions stay within max_detached and Caddy's memory stays
// bounded (a Caddy built without the race detector, whose own bookkeeping
// grows with every goroutine ever run), and a new client still gets a
// session.
func TestDetachedFlood(t *testing.T) {
	t.Parallel()
	n := sxEnvInt(t, "DUPLEX_FLOOD_SESSIONS", 24000)
	const maxDetached = 2000
	app := newTestApp(t)
	c := startCaddyBinary(t, sxPlainCaddy, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	log {
		output discard
	}
	route /live* {
		duplex {
			max_detached `+strconv.Itoa(maxDetached)+`
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr), sxMemLimit)
	pid := c.cmd.Process.Pid
	// Warm up (the first sessions allocate the hub's maps and pools).
	for i := range 200 {
		if _, st, err := sxOpenAndDrop(context.Background(), c.wsURL("/live"), nil, sxSource(i)); err != nil || st != 101 {
			t.Fatalf("warm-up opening: %d %v", st, err)
		}
	}
	before := sxRSS(t, pid)
	heap0, g0 := sxGoStats(t, c)

	var next, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > n || ctx.Err() != nil {
					return
				}
				if _, st, err := sxOpenAndDrop(ctx, c.wsURL("/live"), nil, sxSource(i)); err != nil || st != 101 {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("opening %d: status %d, %v", i, st, err))
				}
			}
		}()
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		t.Fatalf("%d of %d openings failed; first: %v", f, n, firstErr.Load())
	}
	waitUntil(t, "every dropped session to be detached", sxWait, func() bool {
		return sxSessionCount(t, c) <= maxDetached
	})
	after := sxRSS(t, pid)
	heap1, g1 := sxGoStats(t, c)
	t.Logf("%d sessions opened and dropped: %d listed, Caddy RSS %d MiB → %d MiB, heap in use %d → %d MiB, goroutines %d → %d",
		n, sxSessionCount(t, c), before>>20, after>>20, int64(heap0)>>20, int64(heap1)>>20, int(g0), int(g1))
	// Each detached session keeps about 16 KiB (its buffers, a copy of
	// the opening's headers): unbounded, the flood would hold all n of
	// them (the attack's 64000 took the heap to 1 GiB; 24000 hold some
	// 375 MiB). Bounded by max_detached, the heap holds 2000 of them and
	// the rest is garbage; RSS also keeps the heap's peak during the
	// flood, up to the memory limit of sxMemLimit.
	const bound = 200 << 20
	if after-before > bound {
		t.Errorf("Caddy's RSS grew by %d MiB, want at most %d MiB", (after-before)>>20, bound>>20)
	}
	if heap1-heap0 > 64<<20 {
		t.Errorf("Caddy's heap in use after a GC grew by %d MiB, want at most 64 MiB", int64(heap1-heap0)>>20)
	}
	fresh := sxOpenWS(t, c.wsURL("/live"), nil)
	fresh.send(t, map[string]any{"id": "x", "path": "/live/x"})
	if f := sxNextRef(t, fresh.next, "x"); f.typ() != "reply" {
		t.Fatalf("a new session after the flood: %v", f)
	}
}

// TestDetachedDoNotLockOut: with max_sessions 200, 200 sessions opened and
// dropped do not keep new openings out for their resume window:
// max_detached ends the oldest, whose resume then starts over.
func TestDetachedDoNotLockOut(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			max_sessions 200
			max_detached 100
			resume_window 2m
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	var first map[string]any
	for i := range 200 {
		f, st, err := sxOpenAndDrop(context.Background(), c.wsURL("/live"), nil, sxSource(i))
		if err != nil || st != 101 {
			t.Fatalf("opening %d: %d %v", i, st, err)
		}
		if i == 0 {
			first = f
		}
	}
	waitUntil(t, "the dropped sessions to be detached (at most max_detached kept)", sxWait, func() bool {
		return sxSessionCount(t, c) <= 100
	})
	s, st, err := sxDialWS(t, c.wsURL("/live"), nil, nil)
	if err != nil || s == nil {
		t.Fatalf("a new opening after 200 open-and-drops: %d %v, want a session", st, err)
	}
	if f := s.mustNext(t); f.typ() != "open" || f["resumed"] != false {
		t.Fatalf("new opening: %v", f)
	}
	// The first session was evicted: its cursor opens a new session.
	cur := first["token"].(string) + ":0"
	r := sxOpenWS(t, c.wsURL("/live"), hdrs("Duplex-Resume", cur))
	if r.open["resumed"] != false || r.open["session"] == first["session"] {
		t.Fatalf("resume of the evicted session: %v, want resumed:false and a new session", r.open)
	}
}

// TestDetachedAdmissionRace: 600 parallel openings against max_sessions
// 300 never make more than 300 sessions; the others get 503.
func TestDetachedAdmissionRace(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			max_sessions 300
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	const n = 600
	var mu sync.Mutex
	statuses := map[int]int{}
	var conns []*sxWS
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			s, st, err := sxDialWS(t, c.wsURL("/live"), nil, sxSource(i))
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				statuses[-1]++
				return
			}
			statuses[st]++
			if s != nil {
				conns = append(conns, s)
			}
		}()
	}
	close(start)
	wg.Wait()
	t.Logf("600 parallel openings: %v", statuses)
	if statuses[101] > 300 {
		t.Errorf("%d openings got a session, want at most max_sessions (300)", statuses[101])
	}
	if statuses[101]+statuses[503] != n {
		t.Errorf("statuses %v: want only 101 and 503", statuses)
	}
	if statuses[101] < 300 {
		t.Errorf("%d openings got a session: max_sessions refused some below 300", statuses[101])
	}
	if got := sxSessionCount(t, c); got > 300 {
		t.Errorf("the sessions API lists %d sessions, want at most 300", got)
	}
	// Every admitted session works.
	for i, s := range conns {
		if f := s.mustNext(t); f.typ() != "open" {
			t.Fatalf("session %d: first frame %v", i, f)
		}
	}
}

// TestDetachedPerIP: max_sessions_per_ip counts attached and detached
// sessions of one client IP (429 over it), not other IPs, and never
// refuses the resume of a counted session.
func TestDetachedPerIP(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			max_sessions_per_ip 3
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	const ipA, ipB = 7, 8 // 127.0.1.8 and 127.0.1.9
	dropped, st, err := sxOpenAndDrop(context.Background(), c.wsURL("/live"), nil, sxSource(ipA))
	if err != nil || st != 101 {
		t.Fatalf("opening: %d %v", st, err)
	}
	for i := range 2 {
		if s, st, err := sxDialWS(t, c.wsURL("/live"), nil, sxSource(ipA)); err != nil || s == nil {
			t.Fatalf("opening %d from A: %d %v", i+2, st, err)
		}
	}
	if s, st, err := sxDialWS(t, c.wsURL("/live"), nil, sxSource(ipA)); err != nil || s != nil || st != http.StatusTooManyRequests {
		t.Fatalf("fourth opening from A: %d %v, want 429", st, err)
	}
	if s, st, err := sxDialWS(t, c.wsURL("/live"), nil, sxSource(ipB)); err != nil || s == nil {
		t.Fatalf("opening from B: %d %v, want a session", st, err)
	}
	// The dropped session's resume is not a new session: not refused.
	r, st, err := sxDialWS(t, c.wsURL("/live"), hdrs("Duplex-Resume", dropped["token"].(string)+":0"), sxSource(ipA))
	if err != nil || r == nil {
		t.Fatalf("resume from A at the limit: %d %v, want it resumed", st, err)
	}
	if f := r.mustNext(t); f.typ() != "open" || f["resumed"] != true || f["session"] != dropped["session"] {
		t.Fatalf("resume from A at the limit: %v, want resumed:true", f)
	}
}
