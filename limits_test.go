package duplex_test

// Abuse limits: the message rate (429 error frames, then close
// 1008 for sustained abuse), max_sessions_per_user (the oldest is closed
// with 4001), max_sessions (503), the inbound bound per session (a flooding
// client is not read while the app is busy, and nothing is lost), and the
// publish API's id (idempotency), except and close for every target kind.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// limSendBatch sends several client frames at once: one write of all the
// WebSocket frames, one write of all the stream lines, one NDJSON POST for
// SSE.
func limSendBatch(t *testing.T, s *dxSession, frames [][]byte) {
	t.Helper()
	switch c := s.conn.(type) {
	case *wsDuplex:
		var buf bytes.Buffer
		for _, f := range frames {
			if err := ws.WriteFrame(&buf, ws.MaskFrame(ws.NewTextFrame(f))); err != nil {
				t.Fatal(err)
			}
		}
		c.wmu.Lock()
		_, err := c.w.Write(buf.Bytes())
		c.wmu.Unlock()
		if err != nil {
			t.Fatalf("%s: write: %v", s.name, err)
		}
	case *streamDuplex:
		var buf bytes.Buffer
		for _, f := range frames {
			buf.Write(f)
			buf.WriteByte('\n')
		}
		if err := c.send(bytes.TrimSuffix(buf.Bytes(), []byte("\n"))); err != nil {
			t.Fatalf("%s: write: %v", s.name, err)
		}
	case *sseDuplex:
		st, raw, _, err := c.post("application/x-ndjson", bytes.Join(frames, []byte("\n")))
		if err != nil || st != http.StatusAccepted {
			t.Fatalf("%s: POST of %d frames: %d %q %v, want 202", s.name, len(frames), st, raw, err)
		}
	default:
		t.Fatalf("unknown connection type %T", s.conn)
	}
}

func limMessages(prefix, path string, n int) ([][]byte, []string) {
	var frames [][]byte
	var ids []string
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("%s%d", prefix, i)
		ids = append(ids, id)
		frames = append(frames, []byte(fmt.Sprintf(`{"id":%q,"path":%q}`, id, path)))
	}
	return frames, ids
}

const limRateRoutes = `
	route /rate* {
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
			rate 5/s burst 5
			max_inflight 16
			disconnect /gone
		}
		reverse_proxy {{.Upstream}}
	}
`

// TestLimitRate: over every transport, messages over `rate 5/s burst 5`
// are answered with error 429 (with their ref) and the session goes on;
// a client that keeps sending over the rate is closed with 1008 and its
// session ends.
func TestLimitRate(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(limRateRoutes, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	for _, tr := range transports {
		t.Run(tr+"/429", func(t *testing.T) {
			t.Parallel()
			s := openDX(t, tr, tg, "/rate", hdrs("X-User", "rate-"+tr))
			frames, ids := limMessages("r", "/empty", 8)
			start := time.Now()
			limSendBatch(t, s, frames)
			answers := map[string]map[string]any{}
			acks, limited := 0, 0
			for len(answers) < len(ids) {
				f := s.readFrame(t)
				ref, _ := f["ref"].(string)
				if _, dup := answers[ref]; dup || ref == "" {
					t.Fatalf("answer %v: no ref or a second answer for %q", f, ref)
				}
				answers[ref] = f
				switch {
				case f["type"] == "ack":
					acks++
				case f["type"] == "error" && f["status"] == float64(429):
					limited++
				default:
					t.Fatalf("answer %v, want an ack or an error 429", f)
				}
			}
			elapsed := time.Since(start)
			if limited == 0 {
				t.Errorf("8 messages at once with rate 5/s burst 5: none refused with 429")
			}
			// The bucket holds 5 and refills 5/s: no more can have passed.
			if max := 5 + int(math.Ceil(elapsed.Seconds()*5)); acks > max || acks < 5 {
				t.Errorf("%d of 8 messages served within %s, want between 5 and %d", acks, elapsed, max)
			}
			if served := len(app.of("message", "Duplex-User", "rate-"+tr)); served != acks {
				t.Errorf("the app served %d messages, %d were acked", served, acks)
			}
			// Fewer refusals in a row than the burst: the session goes on
			// and is served again once the bucket refills.
			deadline := time.Now().Add(20 * time.Second)
			for i := 0; ; i++ {
				id := fmt.Sprintf("later%d", i)
				f := s.call(t, id, "/empty", nil)
				if f["type"] == "ack" {
					break
				}
				if f["status"] != float64(429) || time.Now().After(deadline) {
					t.Fatalf("after the burst: %v", f)
				}
				time.Sleep(250 * time.Millisecond)
			}
			c.mustPublish(t, map[string]any{"session": s.Session, "data": "alive"}, 1)
			s.expectPush(t, "", "alive")
		})
	}
	for _, tr := range []string{"websocket", "stream"} {
		t.Run(tr+"/abuse", func(t *testing.T) {
			t.Parallel()
			user := "abuse-" + tr
			s := openDX(t, tr, tg, "/rate", hdrs("X-User", user))
			frames, _ := limMessages("a", "/empty", 60)
			limSendBatch(t, s, frames)
			seen := map[string]bool{}
			limited := 0
			for {
				e := s.next(t)
				if e.frame == nil {
					t.Fatalf("%s: want frames up to a close frame, got %v", s.name, e)
				}
				f := e.frame
				if f["type"] == "close" {
					if f["code"] != float64(1008) || f["reconnect"] == true {
						t.Fatalf("close frame %v, want code 1008 without reconnect", f)
					}
					break
				}
				ref, _ := f["ref"].(string)
				if seen[ref] {
					t.Fatalf("a second answer for %q: %v", ref, f)
				}
				seen[ref] = true
				if f["type"] == "error" && f["status"] == float64(429) {
					limited++
				} else if f["type"] != "ack" {
					t.Fatalf("want acks, 429 errors and a close frame, got %v", f)
				}
			}
			if limited < 10*5 {
				t.Errorf("closed for abuse after %d refused messages (each with its 429), want more than 10 × burst (50) in a row", limited)
			}
			s.expectEnd(t, 1008)
			if sessionExists(t, c, s.Session) {
				t.Errorf("the session closed for abuse is still listed")
			}
			app.waitGone(t, s.Session, user, tr, "message rate limit exceeded")
		})
	}
}

// TestLimitSessionsPerUser: with max_sessions_per_user 2, opening a third
// session of a user closes that user's oldest (4001, no reconnect), over
// any transport; other users are untouched.
func TestLimitSessionsPerUser(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(liveRoute("max_sessions_per_user 2", "disconnect /gone"), "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	a1 := openDX(t, "websocket", tg, "/live", hdrs("X-User", "alice"))
	a2 := openDX(t, "sse", tg, "/live", hdrs("X-User", "alice"))
	b1 := openDX(t, "websocket", tg, "/live", hdrs("X-User", "bob"))
	b2 := openDX(t, "stream", tg, "/live", hdrs("X-User", "bob"))
	a3 := openDX(t, "stream", tg, "/live", hdrs("X-User", "alice"))
	a1.expectClose(t, 4001, "", false)
	if sessionExists(t, c, a1.Session) {
		t.Errorf("the oldest session of alice is still listed")
	}
	app.waitGone(t, a1.Session, "alice", "websocket", "too many sessions for this user")
	if got := sessionsOfUser(t, c, "alice"); len(got) != 2 || !(got[0] == a2.Session && got[1] == a3.Session) {
		t.Errorf("alice's sessions %v, want the two newest [%s %s]", got, a2.Session, a3.Session)
	}
	c.mustPublish(t, map[string]any{"user": "alice", "data": "a"}, 2)
	a2.expectPush(t, "", "a")
	a3.expectPush(t, "", "a")
	c.mustPublish(t, map[string]any{"user": "bob", "data": "b"}, 2)
	b1.expectPush(t, "", "b")
	b2.expectPush(t, "", "b")

	// Again: now a2 is the oldest.
	a4 := openDX(t, "websocket", tg, "/live", hdrs("X-User", "alice"))
	a2.expectClose(t, 4001, "", false)
	a3.call(t, "a3", "/empty", nil)
	a4.call(t, "a4", "/empty", nil)
	b1.call(t, "b1", "/empty", nil)
	// Anonymous sessions are not limited.
	var anon []*dxSession
	for i := 0; i < 3; i++ {
		anon = append(anon, openDX(t, "websocket", tg, "/live", nil))
	}
	for i, s := range anon {
		s.call(t, fmt.Sprintf("anon%d", i), "/empty", nil)
	}
}

// TestLimitMaxSessions: with max_sessions 2, a third opening is refused
// with 503 over every transport; resuming an existing session is not an
// opening; once one ends, a new opening works.
func TestLimitMaxSessions(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(liveRoute("max_sessions 2"), "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	s1 := openDX(t, "websocket", tg, "/live", hdrs("X-User", "one"))
	s2 := openDX(t, "sse", tg, "/live", hdrs("X-User", "two"))
	for _, tr := range transports {
		if st, _, _ := hkRefused(t, tr, tg, "/live", hdrs("X-User", "three")); st != http.StatusServiceUnavailable {
			t.Errorf("%s: third opening got %d, want 503", tr, st)
		}
	}
	if n := sessionCount(t, c); n != 2 {
		t.Errorf("%d sessions after refused openings, want 2", n)
	}
	s1.call(t, "s1", "/empty", nil)

	// A resume is no new session.
	sid, tok := s2.Session, s2.Token
	hkDrop(s2)
	hkWaitDetached(t, c, sid)
	r := dialDX(t, "stream", tg, "/live", hdrs("X-User", "two", "Duplex-Resume", tok+":0"))
	hkExpectResumed(t, r, sid, tok)
	r.call(t, "r", "/empty", nil)

	// One ends: room for a new one.
	s1.close()
	waitUntil(t, "the closed session to be gone", 15*time.Second, func() bool { return sessionCount(t, c) == 1 })
	s3 := openDX(t, "websocket", tg, "/live", hdrs("X-User", "three"))
	s3.call(t, "s3", "/empty", nil)
	if st, _, _ := hkRefused(t, "websocket", tg, "/live", nil); st != http.StatusServiceUnavailable {
		t.Errorf("opening over max_sessions again: %d, want 503", st)
	}
}

// TestLimitInboundBound: a WebSocket client that floods a session whose app
// is busy is not read without bound (the socket is not read while the
// session's inbound queue is full: the client's writes stall), and once the
// app goes on every message is answered exactly once, in order.
func TestLimitInboundBound(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
			rate off
			heartbeat 1m
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))

	tg, path := wsTarget(t, c.wsURL("/live"))
	rc, status, err := dialConn(tg, "websocket", path, nil, connOpts{dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var nd net.Dialer
		conn, err := nd.DialContext(ctx, network, addr)
		if err == nil {
			conn.(*net.TCPConn).SetWriteBuffer(64 << 10)
		}
		return conn, err
	}})
	if err != nil {
		t.Fatalf("status %d, %v", status, err)
	}
	t.Cleanup(rc.cut)
	cl := &dxSession{name: "flood", transport: "websocket", conn: rc.duplexConn, raw: rc}
	cl.expectOpen(t)

	// The app holds the first message.
	cl.send(t, map[string]any{"id": "hold", "path": "/hold"})
	waitUntil(t, "the app to hold the first message", frameWait, func() bool { return app.holding.Load() == 1 })

	// Flood: up to 64 MiB of 63 KB messages.
	const size, limit = 63 << 10, 64 << 20
	pad := strings.Repeat("p", size)
	var written atomic.Int64 // messages completely written
	var stop atomic.Bool
	writerDone := make(chan error, 1)
	go func() {
		for i := 0; int64(i)*size < limit; i++ {
			if stop.Load() {
				writerDone <- nil
				return
			}
			b, _ := json.Marshal(map[string]any{"id": fmt.Sprintf("f%d", i), "path": "/empty", "data": pad})
			if err := cl.writeFrame(ws.NewTextFrame(b)); err != nil {
				writerDone <- err
				return
			}
			written.Add(1)
		}
		writerDone <- nil
	}()
	// Wait until the writes stall (no progress for a second), or all of
	// it was taken.
	var last int64 = -1
	still := 0
	for still < 5 {
		select {
		case err := <-writerDone:
			stop.Store(true)
			app.release()
			t.Fatalf("Caddy read all %d MiB (%d messages, err %v) while the app held the first message: the inbound side is not bounded",
				limit>>20, written.Load(), err)
		case <-time.After(200 * time.Millisecond):
		}
		if n := written.Load(); n == last {
			still++
		} else {
			last, still = n, 0
		}
	}
	t.Logf("writes stalled after %d messages (%d MiB) while the app held the first one", last, last*size>>20)
	if n := len(app.of("message", "", "")); n != 1 {
		t.Errorf("the app got %d messages while holding the first, want 1 (max_inflight 1)", n)
	}

	// Let it go: every message written is answered once, in order.
	stop.Store(true)
	app.release()
	select {
	case err := <-writerDone:
		if err != nil {
			t.Fatalf("flood writer: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("the flood writer is still blocked 60s after the app went on")
	}
	n := written.Load()
	want := []string{"hold"}
	for i := int64(0); i < n; i++ {
		want = append(want, fmt.Sprintf("f%d", i))
	}
	for _, id := range want {
		f := cl.readFrame(t)
		if f["type"] != "ack" || f["ref"] != id {
			t.Fatalf("want the ack of %s next, got %v", id, f)
		}
	}
	cl.send(t, map[string]any{"id": "end", "path": "/empty"})
	if f := cl.readFrame(t); f["ref"] != "end" {
		t.Fatalf("want the ack of end, got %v", f)
	}
	if got := len(app.of("message", "", "")); got != len(want)+1 {
		t.Errorf("the app served %d messages, want %d", got, len(want)+1)
	}
}

// TestPublishIdempotencyExceptClose: a publish id repeated within the window
// is not applied again (each session gets the push once) and the answer
// repeats the first delivered count; except leaves one session out for
// every target kind; close ends every session of a session, user or
// channel target.
func TestPublishIdempotencyExceptClose(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	open := func(user, room string) *dxSession {
		w := openClient(t, c.wsURL("/live"), hdrs("X-User", user, "X-Room", room))
		w.name = user + "@" + room
		return w
	}
	a := open("alice", "1")
	b := open("alice", "2")
	x := open("bob", "1")
	y := open("carol", "3")
	everyone := []*dxSession{a, b, x, y}
	marker := func(n int, who ...*dxSession) {
		t.Helper()
		m := fmt.Sprintf("marker-%d", n)
		c.mustPublish(t, map[string]any{"channel": "lobby", "data": m}, len(who))
		for _, w := range who {
			w.expectPush(t, "lobby", m)
		}
	}

	t.Run("id", func(t *testing.T) {
		c.mustPublish(t, map[string]any{"session": a.Session, "data": "once", "id": "evt-1"}, 1)
		c.mustPublish(t, map[string]any{"session": a.Session, "data": "once", "id": "evt-1"}, 1)
		c.mustPublish(t, map[string]any{"session": a.Session, "data": "changed", "id": "evt-1"}, 1)
		a.expectPush(t, "", "once")

		c.mustPublish(t, map[string]any{"channel": "room:1", "data": "r1", "id": "evt-2"}, 2)
		c.mustPublish(t, map[string]any{"channel": "room:1", "data": "r1", "id": "evt-2"}, 2)
		a.expectPush(t, "room:1", "r1")
		x.expectPush(t, "room:1", "r1")

		c.mustPublish(t, map[string]any{"user": "alice", "data": "u", "id": "evt-3"}, 2)
		a.expectPush(t, "", "u")
		b.expectPush(t, "", "u")
		// In a batch: the repeat answers the first count and is not applied.
		st, m := c.publish(t, []any{
			map[string]any{"user": "alice", "data": "u", "id": "evt-3"},
			map[string]any{"user": "carol", "data": "c", "id": "evt-4"},
			map[string]any{"user": "carol", "data": "c", "id": "evt-4"},
		})
		res, _ := m["results"].([]any)
		if st != http.StatusOK || len(res) != 3 || !jsonEqual(res, []any{map[string]any{"delivered": 2}, map[string]any{"delivered": 1}, map[string]any{"delivered": 1}}) {
			t.Errorf("batch with repeated ids: %d %v, want results delivered 2, 1, 1", st, m)
		}
		y.expectPush(t, "", "c")
		// Without id, the same body is applied each time.
		c.mustPublish(t, map[string]any{"session": y.Session, "data": "twice"}, 1)
		c.mustPublish(t, map[string]any{"session": y.Session, "data": "twice"}, 1)
		y.expectPush(t, "", "twice")
		y.expectPush(t, "", "twice")
		marker(1, everyone...)
	})

	t.Run("except", func(t *testing.T) {
		c.mustPublish(t, map[string]any{"channel": "lobby", "data": "not a", "except": a.Session}, 3)
		for _, w := range []*dxSession{b, x, y} {
			w.expectPush(t, "lobby", "not a")
		}
		c.mustPublish(t, map[string]any{"user": "alice", "data": "not b", "except": b.Session}, 1)
		a.expectPush(t, "", "not b")
		c.mustPublish(t, map[string]any{"session": x.Session, "data": "not x", "except": x.Session}, 0)
		c.mustPublish(t, map[string]any{"channel": "room:1", "data": "except other", "except": y.Session}, 2)
		a.expectPush(t, "room:1", "except other")
		x.expectPush(t, "room:1", "except other")
		marker(2, everyone...)
	})

	t.Run("close", func(t *testing.T) {
		// session
		c.mustPublish(t, map[string]any{"session": x.Session, "close": "s-close", "id": "close-1"}, 1)
		x.expectClosed(t, 4000, "s-close")
		c.mustPublish(t, map[string]any{"session": x.Session, "close": "s-close", "id": "close-1"}, 1) // repeat: not applied, same answer
		// user, except one of them
		a2 := open("alice", "4")
		c.mustPublish(t, map[string]any{"user": "alice", "close": "u-close", "except": a2.Session}, 2)
		a.expectClosed(t, 4000, "u-close")
		b.expectClosed(t, 4000, "u-close")
		// channel
		z := open("dave", "3")
		w := open("erin", "5")
		c.mustPublish(t, map[string]any{"channel": "room:3", "close": "c-close"}, 2)
		y.expectClosed(t, 4000, "c-close")
		z.expectClosed(t, 4000, "c-close")
		for _, gone := range []*dxSession{x, a, b, y, z} {
			if sessionExists(t, c, gone.Session) {
				t.Errorf("%s: still listed after close", gone.name)
			}
		}
		c.mustPublish(t, map[string]any{"channel": "room:3", "close": "again"}, 0)
		// The others are untouched.
		marker(3, a2, w)
		a2.call(t, "a2", "/empty", nil)
		w.call(t, "w", "/empty", nil)
	})
}
