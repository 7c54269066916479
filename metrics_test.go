package duplex_test

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMetrics checks the Prometheus metrics on the admin endpoint follow
// what sessions do, and survive a config reload.
func TestMetrics(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	cf := sub(globalOpts("")+siteLive, "Upstream", app.Addr)
	c := startCaddy(t, cf)

	ws := openSession(t, c.wsURL("/live"), nil)
	expectAnswer(t, ws.call(t, "m1", "/reply", map[string]any{"x": 1}), "reply")
	expectAnswer(t, ws.call(t, "m2", "/empty", nil), "ack")
	expectAnswer(t, ws.call(t, "m3", "/boom", nil), "error")
	ws.sendRaw(t, []byte("not json"))
	ws.expectType(t, "error")
	c.mustPublish(t, map[string]any{"channel": "lobby", "data": 1}, 1)
	ws.expectPush(t, "lobby", 1.0)
	if st, _ := c.publish(t, map[string]any{"session": "nope", "data": 1}); st != http.StatusNotFound {
		t.Fatalf("publish to unknown session: %d", st)
	}

	m := scrape(t, c)
	want := map[string]float64{
		`caddy_duplex_connections{transport="websocket"}`:               1,
		`caddy_duplex_sessions_opened_total{transport="websocket"}`:     1,
		`caddy_duplex_messages_total{result="reply"}`:                   1,
		`caddy_duplex_messages_total{result="ack"}`:                     1,
		`caddy_duplex_messages_total{result="app_error"}`:               1,
		`caddy_duplex_messages_total{result="bad_frame"}`:               1,
		`caddy_duplex_pushes_total{result="delivered"}`:                 1,
		`caddy_duplex_publish_requests_total{result="ok"}`:              1,
		`caddy_duplex_publish_requests_total{result="unknown_session"}`: 1,
		`caddy_duplex_app_latency_seconds_count`:                        3,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}

	// A reload (of a changed config: Caddy ignores an unchanged one) keeps
	// the counters (and the series) going.
	changed := strings.Replace(renderedConfig(t, c), "duplex {", "duplex {\n\t\t\theartbeat 20s", 1)
	c.reload(t, changed)
	ws.expectType(t, "close") // the connection of the old config is told to reconnect
	ws2 := openSession(t, c.wsURL("/live"), nil)
	expectAnswer(t, ws2.call(t, "m4", "/reply", map[string]any{"x": 2}), "reply")
	waitUntil(t, "metrics after reload", 10*time.Second, func() bool {
		m = scrape(t, c)
		return m[`caddy_duplex_messages_total{result="reply"}`] == 2 &&
			m[`caddy_duplex_sessions_opened_total{transport="websocket"}`] == 2 &&
			m[`caddy_duplex_connections{transport="websocket"}`] == 1
	})
	ws2.closeGracefully()
	waitUntil(t, "session end counted", 10*time.Second, func() bool {
		return scrape(t, c)[`caddy_duplex_sessions_ended_total{reason="client"}`] == 1
	})
}

// renderedConfig is the Caddyfile c runs, as written by startCaddy.
func renderedConfig(t *testing.T, c *caddyProc) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(c.Dir, "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// expectAnswer asserts the type of an answer frame.
func expectAnswer(t *testing.T, f map[string]any, typ string) {
	t.Helper()
	if f["type"] != typ {
		t.Fatalf("answer %v, want type %s", f, typ)
	}
}

// TestSessionLogs checks the one line per session open and end, with the
// fields an operator needs, and that message bodies stay out of the logs at
// the default level.
func TestSessionLogs(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	ws := openSession(t, c.wsURL("/live"), hdrs("X-User", "logged-user"))
	const secret = "body-that-must-not-be-logged"
	expectAnswer(t, ws.call(t, "l1", "/reply", map[string]any{"s": secret}), "reply")
	ws.closeGracefully()

	var opened, closed map[string]any
	waitUntil(t, "session log lines", 10*time.Second, func() bool {
		opened, closed = nil, nil
		for _, e := range logEntries[map[string]any](c) {
			if e["session"] != ws.Session {
				continue
			}
			switch e["msg"] {
			case "session opened":
				opened = e
			case "session closed":
				closed = e
			}
		}
		return opened != nil && closed != nil
	})
	for _, f := range []string{"user", "transport", "remote"} {
		if opened[f] == nil || opened[f] == "" {
			t.Errorf("open line lacks %s: %v", f, opened)
		}
	}
	if opened["user"] != "logged-user" || opened["transport"] != "websocket" || opened["logger"] != "http.handlers.duplex" {
		t.Errorf("open line: %v", opened)
	}
	if closed["reason"] != "closed by the client" || closed["messages"] != 1.0 || closed["duration"] == nil {
		t.Errorf("close line: %v", closed)
	}
	if strings.Contains(c.logs(), secret) {
		t.Errorf("a message body reached the logs")
	}
	if strings.Contains(c.logs(), ws.Token) {
		t.Errorf("the token reached the logs")
	}
}
