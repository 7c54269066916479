package duplex_test

import (
	"bufio"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// SSE and stream sessions over HTTP/1.1 write their own response head on
// the connection they take over: it carries what handlers in front set
// (here a CORS header), the transport's content type, and Connection:
// close with a body that ends with the connection (neither chunked nor
// sized); frames then flow both ways as inside a request.
func TestTakenOverResponseHead(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(corsLiveRoute(), "Upstream", app.Addr), "")
	for _, v := range []struct{ transport, contentType string }{
		{"sse", "text/event-stream"},
		{"stream", "application/x-ndjson"},
	} {
		t.Run(v.transport, func(t *testing.T) {
			t.Parallel()
			user := "head-" + v.transport
			rc, status, err := dialConn(e.target("h1"), v.transport, "/live", hdrs("X-User", user), connOpts{})
			if err != nil {
				t.Fatalf("status %d, %v", status, err)
			}
			t.Cleanup(rc.end)
			var s *dxSession
			switch cc := rc.duplexConn.(type) {
			case *sseDuplex:
				s = &dxSession{name: v.transport, transport: v.transport, conn: cc, raw: rc}
				checkTakenOverHead(t, cc.resp.Header, cc.resp.Close, cc.resp.TransferEncoding, cc.resp.ContentLength, v.contentType)
			case *streamDuplex:
				s = &dxSession{name: v.transport, transport: v.transport, conn: cc, raw: rc}
				checkTakenOverHead(t, cc.resp.Header, cc.resp.Close, cc.resp.TransferEncoding, cc.resp.ContentLength, v.contentType)
			default:
				t.Fatalf("unexpected connection %T", rc.duplexConn)
			}
			s.expectOpen(t)
			e.c.mustPublish(t, map[string]any{"user": user, "data": map[string]any{"i": 1}}, 1)
			s.expectPush(t, "", map[string]any{"i": 1})
			id := user + "-1"
			expectFrame(t, s.call(t, id, "/reply", "z"), map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": "z"}})
		})
	}
}

// corsLiveRoute is liveRoute behind a handler that sets a CORS header,
// which the response head of a session that took its connection over
// must carry.
func corsLiveRoute(opts ...string) string {
	return liveRouteBehind(`header Access-Control-Allow-Origin "https://app.example"`, opts...)
}

func checkTakenOverHead(t *testing.T, h map[string][]string, closes bool, te []string, length int64, contentType string) {
	t.Helper()
	if got := first(h["Content-Type"]); got != contentType {
		t.Errorf("Content-Type %q, want %q", got, contentType)
	}
	if got := first(h["Access-Control-Allow-Origin"]); got != "https://app.example" {
		t.Errorf("Access-Control-Allow-Origin %q: the header set in front is missing", got)
	}
	if !closes || len(te) != 0 || length != -1 {
		t.Errorf("the body should end with the connection: Close %v, Transfer-Encoding %v, Content-Length %d", closes, te, length)
	}
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

// A stream over HTTP/1.1 may send its body with a Content-Length instead
// of chunked: the session reads the body from the connection it took over
// (its start came with the request head, the rest later) up to that
// length and serves its messages. The end of the body is the end of what
// the client sends: the session stays and keeps sending (as when a client
// ends a chunked body), and what comes on the connection after the body is
// not read as a message. The connection's end then detaches the session.
func TestTakenOverStreamSizedBody(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteOf(corsLiveRoute("max_message_size 1KiB")), "Upstream", app.Addr))
	message := func(id string) string { return `{"id":"` + id + `","path":"/reply","data":"` + id + `"}` + "\n" }
	msg1, msg2 := message("sized-1"), message("sized-2")
	// After the body: a line over max_message_size, which the session
	// would count and answer with error 413 as soon as it read it.
	after := `{"id":"after","data":"` + strings.Repeat("x", 2<<10) + `"}` + "\n"

	host := "127.0.0.1:" + strconv.Itoa(c.HTTP)
	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	sc := &streamDuplex{eventPump: newEventPump()}
	rc := &rawConn{duplexConn: sc, cutf: func() { conn.Close() }, major: 1}
	t.Cleanup(rc.cut)
	send := func(s string) {
		t.Helper()
		_ = conn.SetWriteDeadline(time.Now().Add(frameWait))
		if _, err := conn.Write([]byte(s)); err != nil {
			t.Fatalf("write: %v", err)
		}
	}
	send("POST /live HTTP/1.1\r\nHost: " + host + "\r\nContent-Type: application/x-ndjson\r\nX-User: sized\r\n" +
		"Content-Length: " + strconv.Itoa(len(msg1)+len(msg2)) + "\r\n\r\n" + msg1)
	_ = conn.SetReadDeadline(time.Now().Add(frameWait))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("response head: %v", err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	checkTakenOverHead(t, resp.Header, resp.Close, resp.TransferEncoding, resp.ContentLength, "application/x-ndjson")
	go sc.readLoop(resp.Body)
	s := &dxSession{name: "stream with a Content-Length", transport: "stream", conn: sc, raw: rc}
	s.expectOpen(t)
	expectFrame(t, s.readFrame(t), map[string]any{"type": "reply", "ref": "sized-1", "status": 200, "data": map[string]any{"echo": "sized-1"}})
	send(msg2 + after)
	expectFrame(t, s.readFrame(t), map[string]any{"type": "reply", "ref": "sized-2", "status": 200, "data": map[string]any{"echo": "sized-2"}})

	// The body is over: the client still receives.
	for i := 1; i <= 2; i++ {
		c.mustPublish(t, map[string]any{"session": s.Session, "data": i}, 1)
		s.expectPush(t, "", i)
	}

	// The client goes: the session is detached (and resumable), and the
	// line after the body was never read as a message (the session's
	// reader had returned before it detached).
	rc.cut()
	hkWaitDetached(t, c, s.Session)
	if n := scrape(t, c)[`caddy_duplex_messages_total{result="too_large"}`]; n != 0 {
		t.Errorf("%v oversize messages: what the client sent after its body was read as messages", n)
	}
}

// An SSE client over HTTP/1.1 that stops reading: the session's writes to
// the connection it took over block once the socket's buffers are full
// (about 100 KiB), and the pushes published meanwhile overflow send_queue,
// which closes the connection as a slow consumer (4008) after what is
// queued. With 256 KiB queued behind a write that blocks, that close
// event cannot get out: what ends the write, with no help from the client,
// which still reads nothing, is the connection's write deadline (two
// heartbeats). The session is detached, not ended: the client then gets
// the pushes that made it onto the wire, in order, and the end of the
// connection, and resumes from there with every later push exactly once.
func TestTakenOverSSEStalledReader(t *testing.T) {
	t.Parallel()
	testSSEStalledReader(t, rdial{transport: "sse", proto: "h1"}, "")
}

// Over HTTP/2 the session stays inside its request, and the session's own
// write deadline ends the blocked write the same way (the stream is
// reset), also with Caddy's write idle timeout turned off. The client's
// HTTP/2 receive window (4 MiB) fills first.
func TestSSEStalledReaderOverHTTP2(t *testing.T) {
	t.Parallel()
	testSSEStalledReader(t, rdial{transport: "sse", proto: "h2c", via: "header"}, "timeouts {\n\t\t\twrite_idle -1s\n\t\t}")
}

// testSSEStalledReader is the stalled reader test over sse, with extra
// server options.
func testSSEStalledReader(t *testing.T, sse rdial, serverOpts string) {
	const maxPub = 400 // 6.4 MiB: the stalled connection overflows well before, and all of it fits the resume buffer
	pad := strings.Repeat("x", 16<<10)
	app := newTestApp(t)
	site := strings.Replace(resumeSite("send_queue 256KiB", "heartbeat 10s"), "protocols h1 h2 h2c", "protocols h1 h2 h2c\n\t\t"+serverOpts, 1)
	c := startCaddy(t, sub(site, "Upstream", app.Addr))
	s, err := openStalledR(t, "stalled", c.url(""), sse, "/live", hdrs("X-User", "stalled"))
	must(t, err)

	published := 0
	for slow := false; !slow; {
		if published == maxPub {
			t.Fatalf("the stalled connection was not closed as a slow consumer after %d pushes of %d bytes", published, len(pad))
		}
		published++
		must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": published, "pad": pad}}, 1))
		v, err := duplexMetric(c, "caddy_duplex_slow_consumer_closures_total")
		must(t, err)
		slow = v > 0
	}
	t.Logf("the stalled connection overflowed after %d pushes", published)
	if reason := detachReason(t, c, s.id); reason != "send queue full" {
		t.Errorf("the session was detached for %q, want the slow consumer's %q", reason, "send queue full")
	}
	if info := hkSessionInfo(t, c, s.id); info["attached"] != false {
		t.Fatalf("the session is not detached: %v", info)
	}

	// Now the client reads: the pushes on the wire, then the end.
	s.conn.duplexConn.(*sseDuplex).unstall()
	s.readStalledPushes(t, func(e dxEvent) bool { return e.end != nil })
	if s.last >= published {
		t.Fatalf("stalled: got all %d pushes before the connection ended: it never stalled", published)
	}
	t.Logf("stalled: %d pushes arrived before the connection ended; resuming from there", s.last)

	must(t, s.resumeOver(t, sse))
	for n := s.last + 1; n <= published; n++ {
		must(t, s.expectPushN(n))
	}
	must(t, publishWant(c, map[string]any{"session": s.id, "data": map[string]any{"n": published + 1}}, 1))
	must(t, s.expectPushN(published+1))
}

// detachReason waits for Caddy to log that session id was detached, and
// returns the reason it logged.
func detachReason(t *testing.T, c *caddyProc, id string) string {
	t.Helper()
	reason := ""
	waitUntil(t, "session "+id+" to be detached", time.Minute, func() bool {
		for _, e := range logEntries[struct{ Msg, Session, Reason string }](c) {
			if e.Msg == "session detached" && e.Session == id {
				reason = e.Reason
				return true
			}
		}
		return false
	})
	return reason
}
