package duplex_test

// The JavaScript client (jsclient/duplex.js) in headless Chromium, loaded
// from a real Caddy through the duplex_client handler, against real
// sessions. Helpers are in browser_helpers_test.go.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// startBrowserCaddy starts Caddy with browserSite on plain HTTP, in front
// of a new browserApp.
func startBrowserCaddy(t *testing.T, duplexOpts string) (*caddyProc, *browserApp) {
	t.Helper()
	app := newBrowserApp(t)
	c := startCaddy(t, globalOpts("")+browserSite("http://:{{.HTTP}}", duplexOpts, app.Addr))
	return c, app
}

func wantSeqs(t *testing.T, name string, v sessionView, n int) {
	t.Helper()
	want := make([]int, n)
	for i := range want {
		want[i] = i + 1
	}
	if got := v.seqs(); !slices.Equal(got, want) {
		t.Fatalf("%s: pushes %v, want %v (exactly once, in order)", name, got, want)
	}
}

// publishSeq publishes pushes {"n":from}…{"n":to} to the session.
func publishSeq(t *testing.T, c *caddyProc, id string, from, to int) {
	t.Helper()
	for n := from; n <= to; n++ {
		c.mustPublish(t, map[string]any{"session": id, "data": map[string]any{"n": n}}, 1)
	}
}

// checkPushData checks that push i carries {"n": i}.
func checkPushData(t *testing.T, v sessionView) {
	t.Helper()
	for i, p := range v.Pushes {
		var d struct{ N int }
		if err := json.Unmarshal(p.Data, &d); err != nil || d.N != i+1 {
			t.Fatalf("push #%d (seq %d) carries %s, want {\"n\":%d}", i+1, p.Seq, p.Data, i+1)
		}
	}
}

func TestBrowserWebSocket(t *testing.T) {
	t.Parallel()
	c, app := startBrowserCaddy(t, "")
	b := newBrowser(t)
	b.open(t, c.url("/t"))

	// The module is served as JavaScript, with a strong ETag.
	var served struct {
		Type, ETag string
	}
	b.eval(t, `fetch("/duplex.js").then((r) => ({Type: r.headers.get("Content-Type"), ETag: r.headers.get("ETag")}))`, &served)
	if served.Type != "text/javascript; charset=utf-8" || !strings.HasPrefix(served.ETag, `"`) {
		t.Errorf("GET /duplex.js from the page: Content-Type %q, ETag %q", served.Type, served.ETag)
	}

	b.connect(t, "s", "/live", nil)
	v := b.waitOpen(t, "s", 1)
	if v.Transport != "websocket" || v.Opens[0].Resumed || v.Opens[0].Session != v.ID || v.ID == "" {
		t.Fatalf("first open: %+v, want a new session over websocket", v)
	}
	if !slices.Equal(v.States, []string{"open"}) {
		t.Errorf("statechange events %v, want [open]", v.States)
	}
	info, err := sessionInfo(t, c, v.ID)
	if err != nil || info["transport"] != "websocket" || info["attached"] != true {
		t.Fatalf("the server's view of session %s: %v %v", v.ID, info, err)
	}

	// Calls: a reply, an ack, an error frame.
	b.call(t, "s", "echo", "/live/echo", map[string]any{"hi": 1}, nil)
	b.call(t, "s", "ack", "/live/empty", nil, nil)
	b.call(t, "s", "boom", "/live/boom", nil, nil)
	b.call(t, "s", "outside", "/elsewhere", nil, nil)
	if r := b.result(t, "s", "echo"); r.Error != nil || string(r.Value) != `{"echo":{"hi":1}}` {
		t.Errorf("call /live/echo: %+v %s, want the reply's data", r.Error, r.Value)
	}
	if r := b.result(t, "s", "ack"); r.Error != nil || string(r.Value) != `"(undefined)"` {
		t.Errorf("call /live/empty: %+v %s, want undefined (an ack)", r.Error, r.Value)
	}
	r := b.result(t, "s", "boom")
	if e := r.Error; e == nil || e.Name != "DuplexError" || e.Code != "error" || e.Status == nil || *e.Status != 500 || !strings.Contains(e.Message, "boom") {
		t.Errorf("call /live/boom: %+v, want DuplexError code error status 500", r.Error)
	}
	if e := b.result(t, "s", "outside").Error; e == nil || e.Code != "error" || e.Status == nil || *e.Status != 403 {
		t.Errorf("call outside the session's paths: %+v, want DuplexError status 403", e)
	}

	// Pushes, in order; the client acks them so the server can trim its
	// buffer (the ack is a client frame the server accepts silently).
	publishSeq(t, c, v.ID, 1, 3)
	v = b.waitView(t, "s", "3 pushes", func(v sessionView) bool { return len(v.Pushes) >= 3 })
	wantSeqs(t, "s", v, 3)
	checkPushData(t, v)

	// send: fire and forget, reaches the app.
	b.eval(t, `T.s.s.s.send("/live/typing", {on: true}), true`, nil)
	waitUntil(t, "the app to get /live/typing", 30e9, func() bool {
		app.mu.Lock()
		defer app.mu.Unlock()
		return slices.Contains(app.paths, "/live/typing")
	})

	// close ends the session on the server too.
	b.eval(t, `T.s.s.s.close(), true`, nil)
	waitUntil(t, "the session to end on the server", 30e9, func() bool {
		_, err := sessionInfo(t, c, v.ID)
		return err == errNoSession
	})
	v = b.view(t, "s")
	if v.State != "closed" || len(v.Closes) != 1 || v.Closes[0].Code != 1000 {
		t.Errorf("after close(): state %s, close events %+v", v.State, v.Closes)
	}
	app.checkOnce(t)
}

var _ = fmt.Sprint
var _ = http.StatusOK
