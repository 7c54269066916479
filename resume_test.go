package duplex_test

// Resume (README: guarantees and resuming): sessions outlive their
// connections; a client that lost its connection comes back with its
// cursor <token>:<last seq>, over any transport, and gets every push after
// it exactly once, in order. Everything here runs against the real -race
// Caddy binary over real sockets; "cutting" a connection closes its TCP
// connection under it (no close frame, no end of stream).

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// must fails the test (on its own goroutine) with err.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// chaosSeed is the seed of the randomized tests, logged so a failure can
// be replayed with DUPLEX_SEED=<seed>.
func chaosSeed(t *testing.T) uint64 {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("DUPLEX_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("DUPLEX_SEED: %v", err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with DUPLEX_SEED=%d)", seed, seed)
	return seed
}

// stopper is closed once, when the first worker fails, so the others stop
// early instead of waiting for their bounds.
type stopper struct {
	ch   chan struct{}
	once sync.Once
}

func newStopper() *stopper { return &stopper{ch: make(chan struct{})} }
func (s *stopper) stop()   { s.once.Do(func() { close(s.ch) }) }
func (s *stopper) stopped() bool {
	select {
	case <-s.ch:
		return true
	default:
	}
	return false
}

// ---------------------------------------------------------------------------
// 1. Chaos: continuous publishing to 50 sessions over every transport while
// their connections are cut and resumed, switching transports.

func TestChaosResume(t *testing.T) {
	t.Parallel()
	const (
		nChan     = 5
		perChan   = 10   // sessions per channel: 50 sessions
		publishes = 1000 // each reaches perChan sessions: 10,000 pushes
		cuts      = 6    // connection cuts per session
		ahead     = 40   // the publisher runs at most this many pushes ahead of a channel's slowest session
		ackEvery  = 23   // sessions ack every this many pushes
		msgEvery  = 17   // and send a message with an id every this many
	)
	seed := chaosSeed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("channels {http.request.header.X-Chan}"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	// The plan: which channel each publish goes to, and where each
	// session's connections are cut (by pushes received; repeated points
	// cut again right after a resume, before any push).
	plan := make([]int, publishes)
	totals := make([]int, nChan)
	for k := range plan {
		plan[k] = rng.IntN(nChan)
		totals[plan[k]]++
	}
	n := nChan * perChan
	cutAt := make([][]int, n)
	for i := range cutAt {
		for range cuts {
			cutAt[i] = append(cutAt[i], rng.IntN(totals[i%nChan]))
		}
		slices.Sort(cutAt[i])
	}

	sessions := make([]*rsess, n)
	for i := range sessions {
		ch := i % nChan
		s, err := openR(t, fmt.Sprintf("s%02d/ch-%d", i, ch), base, rdials[i%len(rdials)], "/live/chaos",
			hdrs("X-User", fmt.Sprintf("u%02d", i), "X-Chan", fmt.Sprintf("ch-%d", ch)))
		must(t, err)
		sessions[i] = s
	}

	var (
		fails   errs
		stop    = newStopper()
		seen    = make([]atomic.Int64, n) // last seq each session got
		resumed atomic.Int64
		wg      sync.WaitGroup
	)
	fail := func(err error) { fails.add(err); stop.stop() }
	deadline := time.Now().Add(3 * time.Minute) // a bound against hangs only

	wg.Go(func() { // publisher
		published := make([]int, nChan)
		for k, ch := range plan {
			want := published[ch] + 1
			for {
				slowest := int64(1 << 62)
				for i := ch; i < n; i += nChan {
					slowest = min(slowest, seen[i].Load())
				}
				if slowest >= int64(want-1-ahead) {
					break
				}
				if stop.stopped() {
					return
				}
				if time.Now().After(deadline) {
					fail(fmt.Errorf("publisher: sessions of ch-%d stuck below push %d", ch, want-1-ahead))
					return
				}
				time.Sleep(time.Millisecond)
			}
			body := map[string]any{"channel": fmt.Sprintf("ch-%d", ch), "data": map[string]any{"ch": ch, "n": want, "k": k}}
			if err := publishWant(c, body, perChan); err != nil {
				fail(fmt.Errorf("publish %d: %w", k, err))
				return
			}
			published[ch] = want
		}
	})

	// Every message with an id ends with at least one answer, also when
	// its connection is cut right after it was sent (a repeat is allowed).
	sent := make([][]string, n)
	sentOn := make([][]int, n) // per message: the connection (count of cuts before it)
	conns := make([]int, n)
	answered := make([]map[string]bool, n)
	message := func(i int, s *rsess) error {
		id := fmt.Sprintf("%s-m%d", s.name, len(sent[i]))
		sent[i] = append(sent[i], id)
		sentOn[i] = append(sentOn[i], conns[i])
		return s.sendJSON(map[string]any{"id": id, "path": "/live/chaos/msg", "data": len(sent[i])})
	}
	// isAnswer records an answer frame of session i and reports whether e
	// was one.
	isAnswer := func(i int, s *rsess, e dxEvent) (bool, error) {
		switch e.frame["type"] {
		case "ack", "reply", "error":
		default:
			return false, nil
		}
		ref, _ := e.frame["ref"].(string)
		if e.frame["type"] != "reply" || !slices.Contains(sent[i], ref) {
			return true, fmt.Errorf("%s: unexpected answer %s", s.name, e.raw)
		}
		answered[i][ref] = true
		return true, nil
	}
	for i, s := range sessions {
		answered[i] = map[string]bool{}
		wg.Go(func() {
			ch, total := i%nChan, totals[i%nChan]
			di, next := i%len(rdials), 0
			for s.last < total {
				for next < len(cutAt[i]) && cutAt[i][next] <= s.last {
					if next%2 == 0 {
						// a message in flight when the connection is cut
						if err := message(i, s); err != nil {
							fail(err)
							return
						}
					}
					s.conn.cut()
					conns[i]++
					di = (di + 1 + i%3) % len(rdials)
					if err := s.resumeOver(t, rdials[di]); err != nil {
						fail(err)
						return
					}
					resumed.Add(1)
					next++
				}
				var e dxEvent
				select {
				case e = <-s.conn.frames():
				case <-stop.ch:
					return
				case <-time.After(30 * time.Second):
					fail(fmt.Errorf("%s (%s): no push for 30s after seq %d of %d", s.name, s.conn.d, s.last, total))
					return
				}
				if ok, err := isAnswer(i, s, e); ok || err != nil {
					if err != nil {
						fail(err)
						return
					}
					continue
				}
				f, err := s.checkPush(e)
				if err != nil {
					fail(err)
					return
				}
				d, _ := f["data"].(map[string]any)
				if f["channel"] != fmt.Sprintf("ch-%d", ch) || d["ch"] != float64(ch) || dataN(f) != s.last {
					fail(fmt.Errorf("%s: push %d is %s, want the %dth publish to ch-%d", s.name, s.last, e.raw, s.last, ch))
					return
				}
				seen[i].Store(int64(s.last))
				if s.last%msgEvery == 0 {
					if err := message(i, s); err != nil {
						fail(err)
						return
					}
				}
				if s.last%ackEvery == 0 {
					if err := s.sendJSON(map[string]any{"type": "ack", "seq": s.last}); err != nil {
						fail(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	fails.report(t)

	// Every session got every push of its channel once, in order; no
	// resume failed (no extra session was opened) and the server counted
	// each resume.
	if got := sessionCount(t, c); got != n {
		t.Errorf("%d sessions listed, want %d", got, n)
	}
	want := float64(resumed.Load())
	if got, err := duplexMetric(c, `caddy_duplex_resumes_total{result="resumed"}`); err != nil || got != want {
		t.Errorf("resumes_total{resumed} = %v (%v), want %v", got, err, want)
	}
	if got, err := duplexMetric(c, `caddy_duplex_resumes_total{result="failed"}`); err != nil || got != 0 {
		t.Errorf("resumes_total{failed} = %v (%v), want 0", got, err)
	}
	// Every message the server accepted got its answer. A message written
	// on a connection that was cut later may never have reached the
	// server (lost in flight, as on any network); one the app served was
	// accepted and must be answered, and so must every message sent on a
	// connection that is still open.
	served := map[string]bool{}
	for _, r := range app.requests() {
		if id := r.Header.Get("Duplex-Message-Id"); id != "" {
			served[id] = true
		}
	}
	for i, s := range sessions {
		var owed []string
		for k, id := range sent[i] {
			if !answered[i][id] && (served[id] || sentOn[i][k] == conns[i]) {
				owed = append(owed, id)
			}
		}
		for len(owed) > 0 {
			e, err := s.nextEvent(frameWait)
			if err != nil {
				t.Fatalf("%s: no answer to %v (served by the app: %v): %v", s.name, owed, servedOf(served, owed), err)
			}
			if ok, err := isAnswer(i, s, e); !ok || err != nil {
				t.Fatalf("%s: waiting for answers to %v; got %s (%v)", s.name, owed, e.raw, err)
			}
			owed = slices.DeleteFunc(owed, func(id string) bool { return answered[i][id] })
		}
	}
	// Nothing is left over: the next push on each channel is the next
	// frame every session gets.
	for ch := range nChan {
		must(t, publishWant(c, map[string]any{"channel": fmt.Sprintf("ch-%d", ch), "data": map[string]any{"ch": ch, "n": totals[ch] + 1}}, perChan))
	}
	for i, s := range sessions {
		must(t, s.expectPushN(totals[i%nChan]+1))
	}
	t.Logf("%d pushes received by %d sessions across %d resumes", publishes*perChan, n, resumed.Load())
}

func servedOf(served map[string]bool, ids []string) []bool {
	out := make([]bool, len(ids))
	for i, id := range ids {
		out[i] = served[id]
	}
	return out
}

// ---------------------------------------------------------------------------
// 2. Config reloads: sessions are told to reconnect (4012) and resume on
// the new config, losing nothing, while publishing goes on.

func TestResumeAcrossReloads(t *testing.T) {
	t.Parallel()
	const (
		nSess     = 9
		reloads   = 3
		publishes = 600
		ahead     = 30
	)
	heartbeat := func(gen int) float64 { return float64(20 + gen%2) } // 20s, 21s, 20s, ...
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("channels all", "heartbeat 20s"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")
	cfPath := filepath.Join(c.Dir, "Caddyfile")
	// A client without keep-alive: the admin endpoint is replaced on every
	// load, and a POST on a connection the old one closes is not retried.
	fresh := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	t.Cleanup(fresh.CloseIdleConnections)

	sessions := make([]*rsess, nSess)
	for i := range sessions {
		s, err := openR(t, fmt.Sprintf("s%d", i), base, rdials[i], "/live/reload", hdrs("X-User", fmt.Sprintf("r%d", i)))
		must(t, err)
		if s.open["heartbeat"] != heartbeat(0) {
			t.Fatalf("%s: open %v, want heartbeat %v", s.name, s.open, heartbeat(0))
		}
		sessions[i] = s
	}

	var (
		fails     errs
		stop      = newStopper()
		seen      = make([]atomic.Int64, nSess)
		gens      = make([]atomic.Int64, nSess) // reloads each session has resumed from
		published atomic.Int64
		phaseDone = make(chan int)
		reloading = make(chan struct{})
		wg        sync.WaitGroup
	)
	fail := func(err error) { fails.add(err); stop.stop() }
	deadline := time.Now().Add(3 * time.Minute)

	// publish retries a publish that got no answer (the admin endpoint is
	// being replaced): its id makes the retry harmless (README: publishing).
	publish := func(k int) error {
		body := map[string]any{"channel": "all", "id": fmt.Sprintf("reload-%d", k), "data": map[string]any{"n": k}}
		var last error
		for range 5 {
			b, _ := json.Marshal(body)
			resp, err := fresh.Post(c.adminURL("/duplex/publish"), "application/json", bytes.NewReader(b))
			if err != nil {
				last = err
				time.Sleep(50 * time.Millisecond)
				continue
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var m map[string]any
			if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &m) != nil || m["delivered"] != float64(nSess) {
				return fmt.Errorf("publish %d: %d %s, want 200 with delivered %d", k, resp.StatusCode, raw, nSess)
			}
			return nil
		}
		return fmt.Errorf("publish %d: no answer: %v", k, last)
	}

	wg.Go(func() { // publisher, in reloads+1 phases
		for k := 1; k <= publishes; k++ {
			if k > 1 && (k-1)%(publishes/(reloads+1)) == 0 {
				select {
				case phaseDone <- k - 1:
				case <-stop.ch:
					return
				}
				select {
				case <-reloading:
				case <-stop.ch:
					return
				}
			}
			for {
				slowest := int64(1 << 62)
				for i := range seen {
					slowest = min(slowest, seen[i].Load())
				}
				if slowest >= int64(k-1-ahead) {
					break
				}
				if stop.stopped() {
					return
				}
				if time.Now().After(deadline) {
					fail(fmt.Errorf("publisher: sessions stuck below push %d", k-1-ahead))
					return
				}
				time.Sleep(time.Millisecond)
			}
			if err := publish(k); err != nil {
				fail(err)
				return
			}
			published.Store(int64(k))
		}
	})

	for i, s := range sessions {
		wg.Go(func() {
			di := i
			for s.last < publishes || gens[i].Load() < reloads {
				var e dxEvent
				select {
				case e = <-s.conn.frames():
				case <-stop.ch:
					return
				case <-time.After(30 * time.Second):
					fail(fmt.Errorf("%s (%s): nothing for 30s after seq %d (reloads seen %d)", s.name, s.conn.d, s.last, gens[i].Load()))
					return
				}
				if e.frame != nil && e.frame["type"] == "close" {
					if e.frame["code"] != float64(4012) || e.frame["reconnect"] != true {
						fail(fmt.Errorf("%s (%s): close %s, want code 4012 reconnect true", s.name, s.conn.d, e.raw))
						return
					}
					if err := s.expectEndR(4012); err != nil {
						fail(err)
						return
					}
					gen := gens[i].Load() + 1
					di = (di + 1) % len(rdials)
					// A reload swaps Caddy's servers while the listeners
					// stay: a dial landing on the old server as it shuts
					// down is closed before any answer (an h2c client
					// then reports that its connection could not be
					// established). Like a real client, dial again.
					err := s.resumeOver(t, rdials[di])
					for try := 1; try < 5 && errors.As(err, new(noAnswerError)); try++ {
						time.Sleep(time.Duration(try) * 100 * time.Millisecond)
						err = s.resumeOver(t, rdials[di])
					}
					if err != nil {
						fail(fmt.Errorf("after reload %d: %w", gen, err))
						return
					}
					if s.open["heartbeat"] != heartbeat(int(gen)) {
						fail(fmt.Errorf("%s: resumed after reload %d with open %v, want heartbeat %v (the new config)", s.name, gen, s.open, heartbeat(int(gen))))
						return
					}
					gens[i].Store(gen)
					continue
				}
				if _, err := s.checkPush(e); err != nil {
					fail(err)
					return
				}
				if dataN(e.frame) != s.last {
					fail(fmt.Errorf("%s: push %d is %s, want publish %d", s.name, s.last, e.raw, s.last))
					return
				}
				seen[i].Store(int64(s.last))
			}
		})
	}

	cf, err := os.ReadFile(cfPath)
	must(t, err)
	for r := 1; r <= reloads; r++ {
		select {
		case <-phaseDone:
		case <-stop.ch:
		case <-time.After(2 * time.Minute):
			fail(fmt.Errorf("publisher did not reach phase %d", r))
		}
		if stop.stopped() {
			break
		}
		from, to := fmt.Sprintf("heartbeat %ds", int(heartbeat(r-1))), fmt.Sprintf("heartbeat %ds", int(heartbeat(r)))
		changed := bytes.Replace(cf, []byte(from), []byte(to), 1)
		if bytes.Equal(changed, cf) {
			t.Fatalf("no %q in the Caddyfile:\n%s", from, cf)
		}
		cf = changed
		select {
		case reloading <- struct{}{}: // publishing goes on during the reload
		case <-stop.ch:
		}
		if stop.stopped() {
			break
		}
		req, _ := http.NewRequest(http.MethodPost, c.adminURL("/load"), bytes.NewReader(cf))
		req.Header.Set("Content-Type", "text/caddyfile")
		resp, err := fresh.Do(req)
		if err != nil {
			fail(fmt.Errorf("reload %d: %v", r, err))
			break
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			fail(fmt.Errorf("reload %d: %d %s", r, resp.StatusCode, body))
			break
		}
		// Every session resumes on the new config before the next reload.
		for i := range gens {
			for gens[i].Load() < int64(r) && !stop.stopped() {
				if time.Now().After(deadline) {
					fail(fmt.Errorf("%s did not resume after reload %d", sessions[i].name, r))
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		t.Logf("reload %d done after publish %d", r, published.Load())
	}
	wg.Wait()
	fails.report(t)

	// The resumed sessions are served by the new config's route.
	for i, s := range sessions {
		id := fmt.Sprintf("after-reload-%d", i)
		must(t, s.sendJSON(map[string]any{"id": id, "path": "/reply", "data": map[string]any{"i": i}}))
		f, e, err := s.nextFrame()
		must(t, err)
		if f["type"] != "reply" || f["ref"] != id || f["status"] != float64(200) || !jsonEqual(f["data"], map[string]any{"echo": map[string]any{"i": i}}) {
			t.Fatalf("%s (%s): answer %s, want the app's reply to %s", s.name, s.conn.d, e.raw, id)
		}
		if got := app.byMessageID(t, id); got.Header.Get("Duplex-Session") != s.id {
			t.Fatalf("%s: the app saw Duplex-Session %q, want %q", s.name, got.Header.Get("Duplex-Session"), s.id)
		}
	}
	if got := sessionCount(t, c); got != nSess {
		t.Errorf("%d sessions listed, want %d (a resume opened a new session)", got, nSess)
	}
}

// ---------------------------------------------------------------------------
// 3. A stalled reader among many: it alone is closed (4008, reconnect) and
// resumes from its buffer; the others get every push without waiting.
// More clients stall beside it than the write pool has workers (Caddy runs
// on one CPU: four), so writers blocked on their sockets hold every worker
// until the pool's watchdog adds more.

func TestResumeStalledReader(t *testing.T) {
	t.Parallel()
	const (
		nReaders = 20
		nStalled = 8    // besides the one followed below
		maxPub   = 3000 // bound: the stalled one must overflow well before
		check    = 4    // publishes between checks for the slow-consumer closure
	)
	pad := strings.Repeat("x", 700)
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("channels shared", "send_queue 16KiB", "heartbeat 30s"), "Upstream", app.Addr), xconnectEnv, "GOMAXPROCS=1")
	base := c.url("")

	readers := make([]*rsess, nReaders)
	for i := range readers {
		s, err := openR(t, fmt.Sprintf("reader%02d", i), base, rdials[i%len(rdials)], "/live/stall", hdrs("X-User", fmt.Sprintf("reader%02d", i)))
		must(t, err)
		readers[i] = s
	}

	// The stalled client: a WebSocket over a TCP connection with a tiny
	// receive window; it reads its open frame, then nothing.
	stalled, err := openStalledR(t, "stalled", base, rdials[0], "/live/stall", hdrs("X-User", "stalled"))
	must(t, err)
	// Others like it, which stay stalled.
	for i := range nStalled {
		_, err := openStalledR(t, fmt.Sprintf("stalled%d", i), base, rdials[0], "/live/stall", hdrs("X-User", fmt.Sprintf("stalled%d", i)))
		must(t, err)
	}

	var (
		fails   errs
		stop    = newStopper()
		final   atomic.Int64 // pushes published, once publishing is over
		pubDone = make(chan struct{})
		wg      sync.WaitGroup
	)
	final.Store(-1)
	fail := func(err error) { fails.add(err); stop.stop() }
	for _, s := range readers {
		wg.Go(func() {
			done := pubDone
			for f := final.Load(); f < 0 || s.last < int(f); f = final.Load() {
				var e dxEvent
				select {
				case e = <-s.conn.frames():
				case <-done:
					done = nil // publishing is over: check the count again
					continue
				case <-stop.ch:
					return
				case <-time.After(30 * time.Second):
					fail(fmt.Errorf("%s (%s): nothing for 30s after push %d", s.name, s.conn.d, s.last))
					return
				}
				if _, err := s.checkPush(e); err != nil {
					fail(fmt.Errorf("%w (a reader must not be held up or closed by the stalled one)", err))
					return
				}
				if dataN(e.frame) != s.last {
					fail(fmt.Errorf("%s: push %d carries %s", s.name, s.last, e.raw))
					return
				}
			}
		})
	}

	// Publish until the stalled connection overflows its send queue.
	published, overflowed := 0, false
	for published < maxPub && !stop.stopped() {
		if err := publishWant(c, map[string]any{"channel": "shared", "data": map[string]any{"n": published + 1, "pad": pad}}, nReaders+1+nStalled); err != nil {
			fail(err)
			break
		}
		published++
		if published%check == 0 {
			v, err := duplexMetric(c, "caddy_duplex_slow_consumer_closures_total")
			if err != nil {
				fail(err)
				break
			}
			if v >= 1+nStalled { // every stalled connection, the one followed below too
				overflowed = true
				break
			}
		}
	}
	final.Store(int64(published))
	close(pubDone)
	// The readers get every push while the stalled one still reads nothing.
	readersDone := make(chan struct{})
	go func() { wg.Wait(); close(readersDone) }()
	select {
	case <-readersDone:
	case <-time.After(time.Minute):
		stop.stop()
		<-readersDone
		fails.add(fmt.Errorf("readers did not get all %d pushes", published))
	}
	fails.report(t)
	if !overflowed {
		t.Fatalf("the stalled connection was not closed as a slow consumer after %d pushes of %d bytes", published, len(pad))
	}
	t.Logf("the stalled connection overflowed after %d publishes; %d readers got them all first", published, nReaders)

	// Now the stalled client reads: the pushes that fit, then close 4008.
	stalled.conn.duplexConn.(*wsDuplex).unstall()
	e := stalled.readStalledPushes(t, func(e dxEvent) bool { return e.frame["type"] == "close" })
	if e.frame["code"] != float64(4008) || e.frame["reconnect"] != true {
		t.Fatalf("stalled: close %s, want code 4008 reconnect true", e.raw)
	}
	must(t, stalled.expectEndR(4008))
	if stalled.last >= published {
		t.Fatalf("stalled: got all %d pushes before the close: it never overflowed", published)
	}
	t.Logf("stalled: %d pushes arrived before close 4008; resuming from there", stalled.last)

	// It resumes from its cursor and gets the rest exactly once.
	must(t, stalled.resumeOver(t, rdials[1]))
	for n := stalled.last + 1; n <= published; n++ {
		must(t, stalled.expectPushN(n))
	}
	must(t, publishWant(c, map[string]any{"channel": "shared", "data": map[string]any{"n": published + 1}}, nReaders+1+nStalled))
	must(t, stalled.expectPushN(published+1))
	for _, s := range readers {
		must(t, s.expectPushN(published+1))
	}
}

// ---------------------------------------------------------------------------
// 4. Resume racing a tight publish loop: no gap, no duplicate.

func TestResumeRace(t *testing.T) {
	t.Parallel()
	const (
		pushes = 800
		drops  = 8
	)
	seed := chaosSeed(t)
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("resume_buffer 5000"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	var (
		fails errs
		stop  = newStopper()
		wg    sync.WaitGroup
	)
	fail := func(err error) { fails.add(err); stop.stop() }
	for w, start := range []int{0, 1, 2} { // websocket, stream and sse first
		s, err := openR(t, fmt.Sprintf("race%d", w), base, rdials[start], "/live/race", hdrs("X-User", fmt.Sprintf("race%d", w)))
		must(t, err)
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		var dropAt []int
		for range drops {
			dropAt = append(dropAt, rng.IntN(pushes))
		}
		slices.Sort(dropAt)
		wg.Go(func() { // tight publish loop
			for k := 1; k <= pushes && !stop.stopped(); k++ {
				if err := publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": k}}, 1); err != nil {
					fail(err)
					return
				}
			}
		})
		wg.Go(func() {
			di, next := start, 0
			for s.last < pushes {
				for next < len(dropAt) && dropAt[next] <= s.last {
					s.conn.cut()
					di = (di + 1 + w) % len(rdials)
					if err := s.resumeOver(t, rdials[di]); err != nil {
						fail(err)
						return
					}
					next++
				}
				var e dxEvent
				select {
				case e = <-s.conn.frames():
				case <-stop.ch:
					return
				case <-time.After(30 * time.Second):
					fail(fmt.Errorf("%s (%s): nothing for 30s after push %d", s.name, s.conn.d, s.last))
					return
				}
				if _, err := s.checkPush(e); err != nil {
					fail(err)
					return
				}
				if dataN(e.frame) != s.last {
					fail(fmt.Errorf("%s: push %d carries %s", s.name, s.last, e.raw))
					return
				}
			}
			if s.resumes != drops {
				fail(fmt.Errorf("%s: %d resumes, want %d", s.name, s.resumes, drops))
			}
		})
	}
	wg.Wait()
	fails.report(t)
}

// ---------------------------------------------------------------------------
// 5. Wrong or guessed tokens open new sessions and leave the real ones be.

func TestResumeWrongToken(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("channels lobby"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	alice, err := openR(t, "alice", base, rdials[0], "/live/tok", hdrs("X-User", "alice"))
	must(t, err)
	bob, err := openR(t, "bob", base, rdials[1], "/live/tok", hdrs("X-User", "bob"))
	must(t, err)
	for n := 1; n <= 3; n++ {
		must(t, publishWant(c, map[string]any{"channel": "lobby", "data": map[string]any{"n": n}}, 2))
		must(t, alice.expectPushN(n))
		must(t, bob.expectPushN(n))
	}

	tampered := []byte(alice.token)
	i := len(tampered) / 2
	if tampered[i] == 'A' {
		tampered[i] = 'B'
	} else {
		tampered[i] = 'A'
	}
	attempts := []struct {
		name   string
		d      rdial
		cursor string
	}{
		{"random token", rdials[0], randomToken() + ":3"},
		{"random token, seq 0", rdials[2], randomToken() + ":0"},
		{"tampered token", rdials[1], string(tampered) + ":3"},
		{"tampered token over sse", rdials[5], string(tampered) + ":3"},
		{"bob's token presented by alice", rdials[3], bob.cursor()},
		{"bob's token presented by alice over sse", rdials[2], bob.cursor()},
		{"bob's token presented by alice over stream", rdials[4], bob.cursor()},
		{"not a cursor", rdials[6], alice.token},
	}
	seenIDs := map[string]bool{alice.id: true, bob.id: true}
	for _, a := range attempts {
		conn, err := dialR(t, base, a.d, "/live/tok", hdrs("X-User", "alice"), a.cursor)
		must(t, err)
		s := &rsess{name: a.name, conn: conn}
		f, e, err := s.nextFrame()
		must(t, err)
		if f["type"] != "open" || f["resumed"] != false {
			t.Fatalf("%s over %s: %s, want open resumed:false", a.name, a.d, e.raw)
		}
		id, _ := f["session"].(string)
		tok, _ := f["token"].(string)
		if id == "" || seenIDs[id] || tok == alice.token || tok == bob.token {
			t.Fatalf("%s over %s: open %s reuses a session id or token", a.name, a.d, e.raw)
		}
		seenIDs[id] = true
		if st, info := sessionInfoOf(t, c, id); st != http.StatusOK || info["user"] != "alice" {
			t.Fatalf("%s: the new session is %d %v, want it listed for user alice", a.name, st, info)
		}
		conn.cut()
	}

	// The real sessions are untouched: still attached, still getting their
	// pushes, in sequence, on their connections.
	for _, s := range []*rsess{alice, bob} {
		if st, info := sessionInfoOf(t, c, s.id); st != http.StatusOK || info["attached"] != true {
			t.Fatalf("%s after the attempts: %d %v, want attached", s.name, st, info)
		}
		must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": 4}}, 1))
		must(t, s.expectPushN(4))
	}
	// And their own cursors still resume them.
	alice.conn.cut()
	must(t, alice.resumeOver(t, rdials[5]))
	must(t, publishWant(c, map[string]any{"user": "alice", "data": map[string]any{"n": 5}}, 1+len(attempts)))
	must(t, alice.expectPushN(5))
}

// randomToken is a token-shaped random string (base64url, 32 characters).
func randomToken() string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	b := make([]byte, 32)
	for i := range b {
		b[i] = alphabet[rand.IntN(len(alphabet))]
	}
	return string(b)
}

// ---------------------------------------------------------------------------
// 6. After resume_window the session is gone: resuming opens a new one,
// publishing to it answers 404. Before, it was listed detached and counted.

func TestResumeWindowExpires(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("resume_window 1s"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	for _, d := range []rdial{rdials[0], rdials[1], rdials[2]} {
		t.Run(d.transport, func(t *testing.T) {
			t.Parallel()
			var s *rsess
			// Up to three tries: the checks before expiry must fit in the
			// 1s window, which a loaded machine may not grant every time.
			for try := 1; ; try++ {
				var err error
				s, err = openR(t, "expiring-"+d.transport, base, d, "/live/exp", hdrs("X-User", "exp-"+d.transport))
				must(t, err)
				must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": 1}}, 1))
				must(t, s.expectPushN(1))
				s.conn.cut()
				var info map[string]any
				var st int
				waitUntil(t, "the session to be listed detached", 15*time.Second, func() bool {
					st, info = sessionInfoOf(t, c, s.id)
					return st != http.StatusOK || info["attached"] == false
				})
				if st == http.StatusOK {
					stp, m, err := tryPublish(c, map[string]any{"session": s.id, "data": map[string]any{"n": 2}})
					must(t, err)
					if stp == http.StatusOK {
						if m["delivered"] != float64(1) {
							t.Fatalf("publish to the detached session: %v, want delivered 1", m)
						}
						break
					}
					if stp != http.StatusNotFound {
						t.Fatalf("publish to the detached session: %d %v", stp, m)
					}
				}
				if try == 3 {
					t.Fatalf("three times the session was never seen detached and taking pushes before it ended (last: GET %d %v)", st, info)
				}
				t.Logf("try %d: the window ended before the checks; again", try)
			}
			waitUntil(t, "GET /duplex/sessions/<id> to answer 404", 15*time.Second, func() bool {
				st, _ := sessionInfoOf(t, c, s.id)
				return st == http.StatusNotFound
			})
			conn, err := dialR(t, base, d, "/live/exp", s.hdr, s.cursor())
			must(t, err)
			r := &rsess{name: "after expiry", conn: conn}
			f, e, err := r.nextFrame()
			must(t, err)
			if f["type"] != "open" || f["resumed"] != false || f["session"] == s.id {
				t.Fatalf("resume after the window: %s, want open resumed:false with a new session id", e.raw)
			}
			if st, m, err := tryPublish(c, map[string]any{"session": s.id, "data": 3}); err != nil || st != http.StatusNotFound {
				t.Fatalf("publish to the expired session: %d %v %v, want 404", st, m, err)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 7. Resuming while the first connection is still alive: the new one wins,
// the old one is closed with 4009.

func TestResumeTakeover(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite(), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	for _, pair := range [][2]rdial{{rdials[0], rdials[1]}, {rdials[1], rdials[2]}, {rdials[2], rdials[3]}, {rdials[5], rdials[6]}} {
		t.Run(pair[0].String()+"_to_"+pair[1].String(), func(t *testing.T) {
			t.Parallel()
			user := "take-" + pair[0].String()
			first, err := openR(t, "first", base, pair[0], "/live/take", hdrs("X-User", user))
			must(t, err)
			must(t, publishWant(c, map[string]any{"session": first.id, "data": map[string]any{"n": 1}}, 1))
			must(t, first.expectPushN(1))

			second := &rsess{name: "second", base: base, path: "/live/take", hdr: first.hdr, id: first.id, token: first.token, last: first.last}
			must(t, second.resumeOver(t, pair[1]))
			must(t, first.expectCloseR(4009, false))

			for n := 2; n <= 4; n++ {
				must(t, publishWant(c, map[string]any{"session": first.id, "data": map[string]any{"n": n}}, 1))
				must(t, second.expectPushN(n))
			}
			if st, info := sessionInfoOf(t, c, first.id); st != http.StatusOK || info["attached"] != true || info["transport"] != pair[1].transport {
				t.Fatalf("session after the takeover: %d %v, want attached over %s", st, info, pair[1].transport)
			}
			id := "after-takeover"
			must(t, second.sendJSON(map[string]any{"id": id, "path": "/reply", "data": 1}))
			f, e, err := second.nextFrame()
			must(t, err)
			if f["type"] != "reply" || f["ref"] != id {
				t.Fatalf("second: %s, want the reply to %s", e.raw, id)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// 8. resume_buffer and acks: only cursors whose next push is still held
// resume; an ack forgets the pushes it covers.

func TestResumeBufferAndAck(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite("resume_buffer 5"), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	for _, d := range []rdial{rdials[0], rdials[1], rdials[2]} {
		t.Run(d.transport, func(t *testing.T) {
			t.Parallel()
			hdr := hdrs("X-User", "buf-"+d.transport)
			s, err := openR(t, "buffered", base, d, "/live/buf", hdr)
			must(t, err)
			pub := func(n int) {
				t.Helper()
				must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": n}}, 1))
			}
			for n := 1; n <= 10; n++ {
				pub(n)
				must(t, s.expectPushN(n))
			}
			// tryFrom resumes from cursor seq and reports the open frame.
			tryFrom := func(seq int, over rdial) (map[string]any, *rconn) {
				t.Helper()
				conn, err := dialR(t, base, over, "/live/buf", hdr, s.token+":"+strconv.Itoa(seq))
				must(t, err)
				r := &rsess{name: fmt.Sprintf("resume from %d", seq), conn: conn}
				f, e, err := r.nextFrame()
				must(t, err)
				if f["type"] != "open" {
					t.Fatalf("resume from %d: %s, want open", seq, e.raw)
				}
				return f, conn
			}
			next := func(i int) rdial { return rdials[(slices.Index(rdials, d)+i)%len(rdials)] }

			// The buffer holds pushes 6..10: from 4 (next push 5) is too old.
			s.conn.cut()
			f, conn := tryFrom(4, next(1))
			if f["resumed"] != false || f["session"] == s.id {
				t.Fatalf("resume from 4 with pushes 6..10 held: %v, want resumed:false and a new session", f)
			}
			conn.cut()
			// From 5 it works: pushes 6..10 again, exactly once.
			s.last = 5
			must(t, s.resumeOver(t, next(2)))
			for n := 6; n <= 10; n++ {
				must(t, s.expectPushN(n))
			}

			// The client acks 8; a message answered after it proves the
			// server has taken the ack (frames are handled in order).
			must(t, s.sendJSON(map[string]any{"type": "ack", "seq": 8}))
			must(t, s.sendJSON(map[string]any{"id": "after-ack", "path": "/empty"}))
			af, ae, err := s.nextFrame()
			must(t, err)
			if af["type"] != "ack" || af["ref"] != "after-ack" {
				t.Fatalf("after the ack: %s, want ack of after-ack", ae.raw)
			}
			pub(11)
			must(t, s.expectPushN(11))

			// Held now: 9..11 (the last 5 would be 7..11, but 7 and 8 were
			// acked). From 7 fails, although 8 is within the last 5 pushes.
			s.conn.cut()
			f, conn = tryFrom(7, next(3))
			if f["resumed"] != false || f["session"] == s.id {
				t.Fatalf("resume from 7 after ack 8: %v, want resumed:false and a new session", f)
			}
			conn.cut()
			// From 8 it works: 9, 10, 11 exactly once, then live pushes.
			s.last = 8
			must(t, s.resumeOver(t, next(4)))
			for n := 9; n <= 11; n++ {
				must(t, s.expectPushN(n))
			}
			pub(12)
			must(t, s.expectPushN(12))
			// And a cursor ahead of the session (never sent) is refused.
			s.conn.cut()
			f, conn = tryFrom(13, next(5))
			if f["resumed"] != false || f["session"] == s.id {
				t.Fatalf("resume from 13 (only 12 pushes sent): %v, want resumed:false", f)
			}
			conn.cut()
		})
	}
}

// ---------------------------------------------------------------------------
// 4b. Resuming from the oldest cursor the buffer still holds while pushes
// keep coming: whether the server finds it still held or already dropped,
// the answer starts with an open frame (always first, as the README says):
// resumed:true followed by every push after the cursor, or resumed:false
// and a new session (README: guarantees and resuming). The session, which has not ended, is never
// reported as ended.

func TestResumeCursorAtBufferEdge(t *testing.T) {
	t.Parallel()
	const (
		tries  = 200
		buffer = 10
	)
	app := newTestApp(t)
	c := startCaddy(t, sub(resumeSite(fmt.Sprintf("resume_buffer %d", buffer)), "Upstream", app.Addr), xconnectEnv)
	base := c.url("")

	outcomes := map[string]int{}
	for try := range tries {
		d := rdials[try%len(rdials)]
		s, err := openR(t, fmt.Sprintf("edge%d", try), base, d, "/live/edge", hdrs("X-User", fmt.Sprintf("edge%d", try)))
		must(t, err)
		s.conn.cut()
		for n := 1; n <= buffer; n++ { // the buffer is full: pushes 1..10
			must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": n}}, 1))
		}
		// Pushes go on while the client resumes from 0, whose next push
		// (1) the next publish drops from the buffer.
		var (
			wg        sync.WaitGroup
			pubErr    error
			published = buffer
			stop      = make(chan struct{})
		)
		wg.Go(func() {
			for k := buffer + 1; k <= buffer+50; k++ {
				select {
				case <-stop:
					return
				default:
				}
				if pubErr = publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": k}}, 1); pubErr != nil {
					return
				}
				published = k
			}
		})
		conn, err := dialR(t, base, d, "/live/edge", s.hdr, s.token+":0")
		if err != nil {
			close(stop)
			wg.Wait()
			t.Fatal(err)
		}
		r := &rsess{name: fmt.Sprintf("try %d over %s", try, d), conn: conn, id: s.id, token: s.token}
		f, e, err := r.nextFrame()
		close(stop)
		wg.Wait()
		must(t, err)
		must(t, pubErr)
		switch {
		case f["type"] == "open" && f["resumed"] == true && f["session"] == s.id:
			outcomes["resumed"]++
			for n := 1; n <= published; n++ {
				must(t, r.expectPushN(n))
			}
		case f["type"] == "open" && f["resumed"] == false && f["session"] != s.id:
			outcomes["new session"]++
		default:
			st, info := sessionInfoOf(t, c, s.id)
			t.Fatalf("%s: resuming from the oldest held cursor while pushes go on, the first frame is %s; want open (resumed:true, or resumed:false with a new session). Meanwhile the session is GET %d %v (after %d of %d tries: %v)",
				r.name, e.raw, st, info, try, tries, outcomes)
		}
		conn.cut()
	}
	t.Logf("outcomes: %v", outcomes)
}
