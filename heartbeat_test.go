package duplex_test

import (
	"testing"
	"time"
)

// A WebSocket opened with ?ping=text gets {"type":"ping"} text frames as
// heartbeats (browser scripts cannot see ping frames), and the app never
// sees the parameter on messages.
func TestWebSocketTextPings(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, globalOpts("")+sub(`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			heartbeat 1s
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))

	ws := openSession(t, c.wsURL("/live?room=1&ping=text"), nil)
	if f := ws.readFrame(t); f["type"] != "ping" || len(f) != 1 {
		t.Fatalf("want a {\"type\":\"ping\"} text frame as heartbeat, got %v", f)
	}
	if f := ws.call(t, "q", "", nil); f["type"] == "error" {
		t.Fatalf("message to the opening path: %v", f)
	}
	reqs := app.byPath("/live")
	if len(reqs) != 1 || reqs[0].Query != "room=1" {
		t.Fatalf("app saw %d requests on /live, query %q; want one, with room=1 and no ping parameter", len(reqs), reqsQuery(reqs))
	}

	// Without the parameter, heartbeats are ping frames only (answered by
	// the client's pongs): the next text frame is the answer to a call.
	plain := openSession(t, c.wsURL("/live"), nil)
	time.Sleep(2500 * time.Millisecond) // two heartbeats of 1s
	if f := plain.call(t, "p", "/live/x", "x"); f["type"] != "reply" {
		t.Fatalf("want the reply as the next text frame (no text pings), got %v", f)
	}
}

func reqsQuery(reqs []recordedReq) string {
	if len(reqs) == 0 {
		return ""
	}
	return reqs[0].Query
}
