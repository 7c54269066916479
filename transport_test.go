package duplex_test

// The same scenario over every transport (websocket, stream, sse) and every
// protocol (HTTP/1.1, TLS HTTP/2, h2c), plus the stream transport's own
// behaviours, heartbeats under Caddy's idle timeouts, `encode` in front,
// curl as a client, and sessions across `caddy stop` and config reloads.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/caddytest"
)

// scenarioRoutes: /live* opens sessions whose messages go to the test app.
var scenarioRoutes = liveRoute("channels lobby", "heartbeat 5s")

// protos are the ways a client reaches Caddy.
var protos = []string{"h1", "h2", "h2c"}

// transportAllowed says whether the transport runs over the protocol:
// WebSocket over HTTP/2 needs RFC 8441, which Go serves only with
// GODEBUG=http2xconnect=1.
func transportAllowed(transport, proto string, xconnect bool) bool {
	return transport != "websocket" || proto == "h1" || xconnect
}

var xconnectEnv = "GODEBUG=http2xconnect=1"

func TestTransportScenario(t *testing.T) {
	t.Parallel()
	for _, xconnect := range []bool{false, true} {
		name, env := "default", []string(nil)
		if xconnect {
			name, env = "http2xconnect", []string{xconnectEnv}
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			app := newTestApp(t)
			e := startDuplexEnv(t, sub(scenarioRoutes, "Upstream", app.Addr), "", env...)
			for _, proto := range protos {
				for _, tr := range transports {
					if !transportAllowed(tr, proto, xconnect) {
						continue
					}
					t.Run(proto+"/"+tr, func(t *testing.T) {
						t.Parallel()
						runScenario(t, e, app, tr, e.target(proto), name)
					})
				}
			}
		})
	}
}

// runScenario: open → message answered by the app (which sees the
// transport) → publish → push 1 → ack → empty answer → ack → app error →
// error 500 → app-initiated close → close 4000 and the connection ends.
func runScenario(t *testing.T, e *duplexEnv, app *testApp, transport string, tg target, variant string) {
	c := e.c
	user := fmt.Sprintf("u-%s-%s-%s", variant, tg.proto, transport)
	s := openDX(t, transport, tg, "/live/scenario?k=v", hdrs("X-User", user))
	if s.open["heartbeat"] != float64(5) {
		t.Errorf("open frame %v, want heartbeat 5", s.open)
	}

	// message with id → reply; the app sees the transport
	id := user + "-1"
	f := s.call(t, id, "/echo-headers", map[string]any{"via": transport})
	if f["type"] != "reply" || f["status"] != float64(200) {
		t.Fatalf("want reply 200, got %v", f)
	}
	got := app.byMessageID(t, id)
	want := map[string]string{
		"Duplex-Transport": transport,
		"Duplex-Session":   s.Session,
		"Duplex-User":      user,
		"Content-Type":     "application/json",
	}
	for k, w := range want {
		if v := got.Header.Values(k); len(v) != 1 || v[0] != w {
			t.Errorf("app saw %s = %q, want [%q]", k, v, w)
		}
	}
	for _, k := range []string{"Duplex-Token", "Accept", "Upgrade"} {
		if v := got.Header.Values(k); len(v) != 0 {
			t.Errorf("app saw %s = %q, want it removed", k, v)
		}
	}
	if got.Method != http.MethodPost || got.Path != "/echo-headers" || got.Query != "k=v" {
		t.Errorf("app saw %s %s?%s, want POST /echo-headers?k=v", got.Method, got.Path, got.Query)
	}
	if !jsonEqual(decodeAny(t, got.Body), map[string]any{"via": transport}) {
		t.Errorf("app saw body %q", got.Body)
	}

	// publish → push with seq 1; the client acks it
	c.mustPublish(t, map[string]any{"session": s.Session, "data": map[string]any{"n": 1}}, 1)
	s.expectPush(t, "", map[string]any{"n": 1})
	s.send(t, map[string]any{"type": "ack", "seq": 1})
	c.mustPublish(t, map[string]any{"user": user, "data": "second"}, 1)
	s.expectPush(t, "", "second")

	// empty answer → ack
	id = user + "-2"
	expectFrame(t, s.call(t, id, "/empty", nil), map[string]any{"type": "ack", "ref": id})

	// app error → error 500 with its body
	id = user + "-3"
	expectError(t, s.call(t, id, "/boom", nil), id, 500, "boom")

	// Duplex-Close from the app: the reply, then close 4000, then the end
	id = user + "-4"
	expectFrame(t, s.call(t, id, "/close", nil), map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"closing": true}})
	s.expectClose(t, 4000, "bye", false)

	if sessionExists(t, c, s.Session) {
		t.Errorf("the closed session is still listed")
	}
	if st, m := c.publish(t, map[string]any{"session": s.Session, "data": 1}); st != http.StatusNotFound {
		t.Errorf("publish to the closed session: %d %v, want 404", st, m)
	}
	if n := len(app.byPath("/close")); n == 0 {
		t.Errorf("the app never got /close")
	}
}

// --- stream specifics ---------------------------------------------------------

func TestStreamTransport(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(liveRoute("max_message_size 1KiB")+`
	route /wsonly* {
		duplex {
			messages {
				path *
			}
			transports websocket
		}
		reverse_proxy {{.Upstream}}
	}
	route /sseonly* {
		duplex {
			messages {
				path *
			}
			transports sse
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	c := e.c

	for _, proto := range protos {
		tg := e.target(proto)
		t.Run("half-close keeps pushes/"+proto, func(t *testing.T) {
			t.Parallel()
			user := "half-" + proto
			s := openDX(t, "stream", tg, "/live", hdrs("X-User", user))
			id := user + "-1"
			expectFrame(t, s.call(t, id, "/empty", nil), map[string]any{"type": "ack", "ref": id})
			if err := s.conn.(*streamDuplex).halfClose(); err != nil {
				t.Fatalf("half-close: %v", err)
			}
			for i := 1; i <= 3; i++ {
				c.mustPublish(t, map[string]any{"user": user, "data": i}, 1)
				s.expectPush(t, "", i)
			}
			if !sessionExists(t, c, s.Session) {
				t.Fatalf("the session is not listed after the client half-closed")
			}
			c.mustPublish(t, map[string]any{"session": s.Session, "close": "done"}, 1)
			s.expectClose(t, 4000, "done", false)
		})

		t.Run("oversize line/"+proto, func(t *testing.T) {
			t.Parallel()
			user := "big-" + proto
			s := openDX(t, "stream", tg, "/live", hdrs("X-User", user))
			s.send(t, map[string]any{"id": user + "-big", "path": "/reply", "data": strings.Repeat("x", 2048)})
			expectError(t, s.readFrame(t), nil, 413, "")
			id := user + "-ok"
			f := s.call(t, id, "/reply", strings.Repeat("y", 900))
			expectFrame(t, f, map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": strings.Repeat("y", 900)}})
			// A line far longer than the server's read buffer, then a normal one.
			s.sendRaw(t, []byte(`{"id":"`+user+`-big2","path":"/reply","data":"`+strings.Repeat("z", 64<<10)+`"}`))
			expectError(t, s.readFrame(t), nil, 413, "")
			id = user + "-ok2"
			expectFrame(t, s.call(t, id, "/empty", nil), map[string]any{"type": "ack", "ref": id})
			for _, r := range app.requests() {
				if strings.HasPrefix(r.Header.Get("Duplex-Message-Id"), user+"-big") {
					t.Errorf("an oversize message reached the app: %s", r.Header.Get("Duplex-Message-Id"))
				}
			}
		})
	}

	// Refused openings get their HTTP error. Stream openings keep their
	// request body open: the client waits for the answer before it sends
	// anything.
	type refusal struct {
		name, transport, path, origin string
		status                        int
		enabled                       string // for 400: the enabled list
	}
	refusals := []refusal{
		{"stream where only websocket is enabled", "stream", "/wsonly", "", 400, "websocket"},
		{"stream where only sse is enabled", "stream", "/sseonly", "", 400, "sse"},
		{"sse where only websocket is enabled", "sse", "/wsonly", "", 400, "websocket"},
		{"cross-origin stream", "stream", "/live", "http://evil.example", 403, ""},
	}
	for _, proto := range protos {
		for _, rf := range refusals {
			tg := e.target(proto)
			t.Run("refused/"+proto+"/"+rf.name, func(t *testing.T) {
				t.Parallel()
				hc := tg.httpClient(t)
				var h http.Header
				if rf.origin != "" {
					h = hdrs("Origin", rf.origin)
				}
				var resp *http.Response
				var err error
				if rf.transport == "stream" {
					var pw *io.PipeWriter
					var cancel context.CancelFunc
					resp, pw, cancel, err = startStream(hc, tg.url(rf.path), h)
					if err == nil {
						defer cancel()
						defer pw.Close()
					}
				} else {
					var cancel context.CancelFunc
					resp, cancel, err = startSSE(hc, tg.url(rf.path), h)
					if err == nil {
						defer cancel()
					}
				}
				if err != nil {
					t.Fatalf("%s opening on %s: %v", rf.transport, rf.path, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != rf.status {
					t.Fatalf("status %d %q, want %d", resp.StatusCode, body, rf.status)
				}
				if rf.enabled != "" {
					if !strings.Contains(string(body), "enabled: "+rf.enabled) {
						t.Errorf("body %q does not name the enabled transports (%s)", body, rf.enabled)
					}
					if got := resp.Header.Get("Duplex-Transports"); got != rf.enabled {
						t.Errorf("Duplex-Transports %q, want %q", got, rf.enabled)
					}
				}
			})
		}
	}
	t.Run("refused/websocket where only sse is enabled", func(t *testing.T) {
		t.Parallel()
		if st := rejectedStatus(t, c.wsURL("/sseonly"), nil); st != http.StatusBadRequest {
			t.Errorf("websocket opening on /sseonly: status %d, want 400", st)
		}
	})
	t.Cleanup(func() {
		for _, r := range app.requests() {
			if strings.HasPrefix(r.Path, "/wsonly") || strings.HasPrefix(r.Path, "/sseonly") {
				t.Errorf("a refused opening reached the app: %s %s", r.Method, r.Path)
			}
		}
	})
}

// --- heartbeats and idle timeouts ----------------------------------------------

// The heartbeat leaves a healthy peer a whole heartbeat of slack before
// its read deadline (two heartbeats after its last frame): 2s, so that a
// loaded machine running -race cannot starve a ping or its pong that long.
func TestHeartbeatsAndIdleTimeouts(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(liveRoute("heartbeat 2s", "resume_window 1s"), "Upstream", app.Addr), `
		timeouts {
			read_body_idle 5s
			write_idle 5s
		}
`, xconnectEnv)
	c := e.c
	const silence = 12 * time.Second

	// Everything is opened first, so the waits overlap.

	// Sessions that stay silent far longer than read_body_idle/write_idle.
	type silentSession struct {
		*dxSession
		user string
	}
	var silent []silentSession
	for _, proto := range protos {
		for _, tr := range transports {
			user := "silent-" + proto + "-" + tr
			silent = append(silent, silentSession{openDX(t, tr, e.target(proto), "/live", hdrs("X-User", user)), user})
		}
	}
	silenceStart := time.Now()

	// WebSocket peers that never read and never answer pings.
	deaf := []string{"h1", "h2c"}
	for _, proto := range deaf {
		rc, status, err := dialConn(e.target(proto), "websocket", "/live", hdrs("X-User", "deaf-"+proto), connOpts{stall: true})
		if err != nil {
			t.Fatalf("websocket over %s: status %d, %v", proto, status, err)
		}
		t.Cleanup(rc.cut)
		// It opened a session (which lives at least two heartbeats).
		waitUntil(t, "the session of deaf-"+proto+" to be listed", 5*time.Second, func() bool { return len(sessionsOfUser(t, c, "deaf-"+proto)) == 1 })
	}

	// Stream and SSE clients that close their connection.
	var gone []*dxSession
	for _, proto := range protos {
		for _, tr := range []string{"stream", "sse"} {
			s := openDX(t, tr, e.target(proto), "/live", hdrs("X-User", "gone-"+proto+"-"+tr))
			if !sessionExists(t, c, s.Session) {
				t.Fatalf("%s: the session is not listed", s.name)
			}
			gone = append(gone, s)
		}
	}
	for _, s := range gone {
		s.close()
	}

	// The session of a closed stream/SSE connection detaches and, after
	// resume_window (1s), ends.
	t.Run("client gone", func(t *testing.T) {
		for _, s := range gone {
			waitUntil(t, s.name+": the session of the closed connection to end", 30*time.Second, func() bool { return !sessionExists(t, c, s.Session) })
		}
	})

	// A WebSocket peer silent for two heartbeats is dead: its session
	// detaches and, after resume_window (1s), ends.
	t.Run("unresponsive websocket", func(t *testing.T) {
		for _, proto := range deaf {
			user := "deaf-" + proto
			waitUntil(t, user+": the unresponsive session to end", 30*time.Second, func() bool { return len(sessionsOfUser(t, c, user)) == 0 })
		}
	})

	if d := silence - time.Since(silenceStart); d > 0 {
		time.Sleep(d)
	}
	for _, s := range silent {
		t.Run("silent/"+s.name, func(t *testing.T) {
			user := s.user
			id := user + "-1"
			f := s.call(t, id, "/reply", "after silence")
			expectFrame(t, f, map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": "after silence"}})
			c.mustPublish(t, map[string]any{"user": user, "data": "still here"}, 1)
			s.expectPush(t, "", "still here")
			switch cc := s.conn.(type) {
			case *streamDuplex:
				if n := cc.pings.Load(); n < 2 {
					t.Errorf("stream: %d ping lines during %s of silence with heartbeat 2s", n, silence)
				}
			case *sseDuplex:
				if n := cc.pings.Load(); n < 2 {
					t.Errorf("sse: %d ping events during %s of silence with heartbeat 2s", n, silence)
				}
			}
		})
	}
}

// --- encode in front -------------------------------------------------------------

func TestEncodeInFront(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	// heartbeat 30s: longer than frameWait, so no ping can push held-back
	// bytes out and hide buffering.
	e := startDuplexEnv(t, sub(liveRouteBehind("encode gzip zstd", "heartbeat 30s"), "Upstream", app.Addr), "")
	c := e.c

	type variant struct {
		name, transport, proto string
		transparent            bool // Go's own Accept-Encoding and gunzip
	}
	var vs []variant
	for _, proto := range protos {
		vs = append(vs, variant{"stream/" + proto, "stream", proto, false}, variant{"sse/" + proto, "sse", proto, false})
	}
	vs = append(vs, variant{"stream/h1/transparent-gzip", "stream", "h1", true}, variant{"sse/h1/transparent-gzip", "sse", "h1", true})
	for _, v := range vs {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			tg := e.target(v.proto)
			user := "enc-" + strings.ReplaceAll(v.name, "/", "-")
			h := hdrs("X-User", user)
			if !v.transparent {
				h.Set("Accept-Encoding", "gzip")
			}
			rc, status, err := dialConn(tg, v.transport, "/live", h, connOpts{transparentGzip: v.transparent})
			if err != nil {
				t.Fatalf("status %d, %v", status, err)
			}
			t.Cleanup(rc.end)
			var resp *http.Response
			if sc, ok := rc.duplexConn.(*streamDuplex); ok {
				resp = sc.resp
			} else {
				resp = rc.duplexConn.(*sseDuplex).resp
			}
			t.Logf("%s: Content-Encoding %q, uncompressed by Go: %v", v.name, resp.Header.Get("Content-Encoding"), resp.Uncompressed)
			s := &dxSession{name: v.name, transport: v.transport, conn: rc.duplexConn, raw: rc}
			s.expectOpen(t) // before anything else was sent or published
			for i := 1; i <= 3; i++ {
				c.mustPublish(t, map[string]any{"user": user, "data": map[string]any{"i": i}}, 1)
				s.expectPush(t, "", map[string]any{"i": i})
			}
			id := user + "-1"
			expectFrame(t, s.call(t, id, "/reply", "z"), map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": "z"}})
		})
	}
}

// --- curl ------------------------------------------------------------------------

type curlProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *caddytest.SyncBuffer
	exited chan struct{}
	err    error
}

// startCurl runs curl with args; stdout lines arrive on lines. The process
// is killed (if still running) when the test ends.
func startCurl(t *testing.T, withStdin bool, args ...string) *curlProc {
	t.Helper()
	path, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not on PATH (.ci/run installs it); skipping the curl client test")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = 5 * time.Second
	p := &curlProc{cmd: cmd, lines: make(chan string, 1024), stderr: &caddytest.SyncBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	if withStdin {
		p.stdin, err = cmd.StdinPipe()
		if err != nil {
			cancel()
			t.Fatal(err)
		}
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start curl: %v", err)
	}
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	go func() {
		<-readDone
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		if p.stdin != nil {
			p.stdin.Close()
		}
		cancel()
		<-p.exited
		if t.Failed() {
			t.Logf("curl %v stderr:\n%s", args, p.stderr.String())
		}
	})
	return p
}

func (p *curlProc) line(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-p.lines:
		if !ok {
			t.Fatalf("curl's output ended (stderr: %s)", p.stderr.String())
		}
		return l
	case <-time.After(frameWait):
		t.Fatalf("no output from curl within %s", frameWait)
		return ""
	}
}

func TestCurlClients(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("curl"); err != nil {
		t.Skip("curl is not on PATH (.ci/run installs it); skipping the curl client test")
	}
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("\tservers {\n\t\tprotocols h1 h2 h2c\n\t}")+liveSite(), "Upstream", app.Addr))

	t.Run("sse", func(t *testing.T) {
		t.Parallel()
		cp := startCurl(t, false, "-sN", "-H", "Accept: text/event-stream", "-H", "X-User: curl-sse", c.url("/live"))
		p := newSSEParser()
		nextEvent := func() sseEvent {
			for {
				evs := p.Feed([]byte(cp.line(t) + "\n"))
				if len(evs) > 1 {
					t.Fatalf("one line completed %d events", len(evs))
				}
				if len(evs) == 1 {
					return evs[0]
				}
			}
		}
		ev := nextEvent()
		open, _ := decodeAny(t, []byte(ev.Data)).(map[string]any)
		if ev.Type != "open" || open["type"] != "open" {
			t.Fatalf("curl's first event: %+v, want the open event", ev)
		}
		if ev.Retry <= 0 {
			t.Errorf("no retry: hint before the open event")
		}
		sid, _ := open["session"].(string)
		tok, _ := open["token"].(string)
		c.mustPublish(t, map[string]any{"session": sid, "data": "to curl"}, 1)
		ev = nextEvent()
		push, _ := decodeAny(t, []byte(ev.Data)).(map[string]any)
		if ev.Type != "push" || ev.ID != tok+":1" || push["seq"] != float64(1) || push["data"] != "to curl" {
			t.Fatalf("curl's push event: %+v", ev)
		}
		// A message posted for the session is answered on curl's stream.
		st, raw, _, err := ssePost(httpc, c.url("/live"), tok, "application/json", []byte(`{"id":"k1","path":"/reply","data":"hi"}`))
		if err != nil || st != http.StatusAccepted {
			t.Fatalf("POST: %d %q %v", st, raw, err)
		}
		ev = nextEvent()
		if ev.Type != "reply" || !jsonEqual(decodeAny(t, []byte(ev.Data)), map[string]any{"type": "reply", "ref": "k1", "status": 200, "data": map[string]any{"echo": "hi"}}) {
			t.Fatalf("curl's reply event: %+v", ev)
		}
	})

	t.Run("stream h2c", func(t *testing.T) {
		t.Parallel()
		cp := startCurl(t, true, "--http2-prior-knowledge", "-sN", "-X", "POST",
			"-H", "Content-Type: application/x-ndjson", "-H", "X-User: curl-stream", "-T", "-", c.url("/live"))
		nextFrame := func() map[string]any {
			for {
				l := strings.TrimSpace(cp.line(t))
				if l == "" || l == `{"type":"ping"}` {
					continue
				}
				m, ok := decodeAny(t, []byte(l)).(map[string]any)
				if !ok {
					t.Fatalf("curl got a line that is not a JSON object: %q", l)
				}
				return m
			}
		}
		// curl (7.x) blocks on reading stdin while it uploads, so it only
		// gets to the response once stdin ends: end the request body after
		// the frame. The session goes on after the half-close.
		if _, err := io.WriteString(cp.stdin, `{"id":"c1","path":"/reply","data":{"from":"curl"}}`+"\n"); err != nil {
			t.Fatalf("write to curl: %v", err)
		}
		cp.stdin.Close()
		open := nextFrame()
		if open["type"] != "open" {
			t.Fatalf("curl's first line: %v, want open", open)
		}
		expectFrame(t, nextFrame(), map[string]any{"type": "reply", "ref": "c1", "status": 200, "data": map[string]any{"echo": map[string]any{"from": "curl"}}})
		if got := app.byMessageID(t, "c1"); got.Header.Get("Duplex-Transport") != "stream" {
			t.Errorf("app saw Duplex-Transport %q, want stream", got.Header.Get("Duplex-Transport"))
		}
		// The request body is done; pushes keep coming.
		sid, _ := open["session"].(string)
		c.mustPublish(t, map[string]any{"session": sid, "data": "after eof"}, 1)
		expectFrame(t, nextFrame(), map[string]any{"type": "push", "seq": 1, "data": "after eof"})
		c.mustPublish(t, map[string]any{"session": sid, "close": "curl done"}, 1)
		expectFrame(t, nextFrame(), map[string]any{"type": "close", "code": 4000, "reason": "curl done", "reconnect": false})
		select {
		case <-cp.exited:
			if cp.err != nil {
				t.Errorf("curl exited with %v (stderr %q), want success once the stream ended", cp.err, cp.stderr.String())
			}
		case <-time.After(frameWait):
			t.Errorf("curl still running %s after the close frame: the stream did not end", frameWait)
		}
	})
}

// --- stop and reload -------------------------------------------------------------

// openEverywhere opens one session per transport and protocol on path.
func openEverywhere(t *testing.T, e *duplexEnv, path, userPrefix string, xconnect bool) []*dxSession {
	t.Helper()
	var out []*dxSession
	for _, proto := range protos {
		for _, tr := range transports {
			if !transportAllowed(tr, proto, xconnect) {
				continue
			}
			out = append(out, openDX(t, tr, e.target(proto), path, hdrs("X-User", userPrefix+proto+"-"+tr)))
		}
	}
	return out
}

func TestCaddyStopEndsSessions(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(scenarioRoutes, "Upstream", app.Addr), "", xconnectEnv)
	c := e.c
	sessions := openEverywhere(t, e, "/live", "stop-", true)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, caddyBin, "stop", "--address", fmt.Sprintf("127.0.0.1:%d", c.Admin)).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("`caddy stop` did not return within 60s with sessions open:\n%s", out)
	}
	if err != nil {
		t.Fatalf("`caddy stop`: %v\n%s", err, out)
	}
	var wg sync.WaitGroup
	for _, s := range sessions {
		wg.Go(func() { s.expectCloseAsync(t, 4012, true) })
	}
	wg.Wait()
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("caddy still running 30s after `caddy stop` returned")
	}
}

// expectCloseAsync is expectClose for use from another goroutine: it
// reports with t.Errorf.
func (s *dxSession) expectCloseAsync(t *testing.T, code int, reconnect bool) {
	err := func() error {
		next := func() (dxEvent, error) {
			select {
			case e := <-s.conn.frames():
				return e, nil
			case <-time.After(frameWait):
				return dxEvent{}, fmt.Errorf("nothing from the server within %s", frameWait)
			}
		}
		e, err := next()
		if err != nil {
			return err
		}
		if e.frame == nil || e.frame["type"] != "close" {
			return fmt.Errorf("want a close frame, got %v", e)
		}
		if e.frame["code"] != float64(code) || e.frame["reconnect"] != reconnect {
			return fmt.Errorf("close frame %s, want code %d reconnect %v", e.raw, code, reconnect)
		}
		if e.sse != nil && e.sse.Type != "close" {
			return fmt.Errorf("close frame in an SSE event of type %q", e.sse.Type)
		}
		if e, err = next(); err != nil {
			return err
		}
		if s.transport == "websocket" {
			if e.wsClose != code {
				return fmt.Errorf("want a WebSocket close frame %d, got %v", code, e)
			}
			if e, err = next(); err != nil {
				return err
			}
		}
		if e.end == nil {
			return fmt.Errorf("want the connection to end, got %v", e)
		}
		return nil
	}()
	if err != nil {
		t.Errorf("%s: %v", s.name, err)
	}
}

func TestConfigReloadEndsSessions(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(scenarioRoutes, "Upstream", app.Addr), "", xconnectEnv)
	c := e.c
	old := openEverywhere(t, e, "/live", "old-", true)

	cf, err := os.ReadFile(filepath.Join(c.Dir, "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	changed := bytes.Replace(cf, []byte("heartbeat 5s"), []byte("heartbeat 6s"), 1)
	if bytes.Equal(cf, changed) {
		t.Fatalf("the Caddyfile has no line to change:\n%s", cf)
	}
	// A reload must not wait for open sessions: httpc's timeout bounds it.
	c.reload(t, string(changed))

	var wg sync.WaitGroup
	for _, s := range old {
		wg.Go(func() { s.expectCloseAsync(t, 4012, true) })
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	// Their sessions wait to be resumed: publishing to them still counts.
	for _, s := range old {
		if st, m := c.publish(t, map[string]any{"session": s.Session, "data": 1}); st != http.StatusOK || m["delivered"] != float64(1) {
			t.Errorf("publish to %s (told to reconnect by the reload): %d %v, want 200 delivered 1", s.name, st, m)
		}
	}

	// Sessions opened after the reload run on the new config and get
	// pushes and replies.
	fresh := openEverywhere(t, e, "/live", "new-", true)
	for i, s := range fresh {
		if s.open["heartbeat"] != float64(6) {
			t.Errorf("%s: open frame %v, want heartbeat 6 (the reloaded config)", s.name, s.open)
		}
		st, m := c.publish(t, map[string]any{"session": s.Session, "data": map[string]any{"after": "reload"}})
		if st != http.StatusOK || m["delivered"] != float64(1) {
			t.Fatalf("publish to %s after the reload: %d %v", s.name, st, m)
		}
		s.expectPush(t, "", map[string]any{"after": "reload"})
		id := fmt.Sprintf("reload-%d", i)
		expectFrame(t, s.call(t, id, "/reply", i), map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": i}})
	}
}
