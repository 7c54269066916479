package duplex_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// --- auth -------------------------------------------------------------------

func TestAuthMatchers(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
			auth {
				header Authorization "Bearer *"
			}
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))

	t.Run("rejected without matching header", func(t *testing.T) {
		if st := rejectedStatus(t, c.wsURL("/live"), nil); st != http.StatusUnauthorized {
			t.Errorf("no Authorization: status %d, want 401", st)
		}
		if st := rejectedStatus(t, c.wsURL("/live"), hdrs("Authorization", "Basic Zm9vOmJhcg==")); st != http.StatusUnauthorized {
			t.Errorf("Basic Authorization: status %d, want 401", st)
		}
		if n := len(app.requests()); n != 0 {
			t.Errorf("app got %d requests from rejected openings, want 0:%s", n, app.describe())
		}
	})

	t.Run("accepted, identity and headers reach the app", func(t *testing.T) {
		ws := dialWS(t, c.wsURL("/live/room?q=1&r=two"), hdrs("Authorization", "Bearer t0k3n", "X-User", "alice", "Cookie", "sid=42"))
		open := ws.expectOpen(t)
		if open["heartbeat"] != float64(25) {
			t.Errorf("open heartbeat = %v, want 25 (default)", open["heartbeat"])
		}
		f := ws.call(t, "a1", "/echo-headers", map[string]any{"hello": "world"})
		if f["type"] != "reply" || f["status"] != float64(200) {
			t.Fatalf("want reply 200, got %v", f)
		}
		got := app.byMessageID(t, "a1")
		checks := map[string]string{
			"Duplex-User":      "alice",
			"Duplex-Session":   ws.Session,
			"Duplex-Transport": "websocket",
			"Authorization":    "Bearer t0k3n",
			"X-User":           "alice",
			"Cookie":           "sid=42",
			"Content-Type":     "application/json",
		}
		for k, want := range checks {
			if v := got.Header.Values(k); len(v) != 1 || v[0] != want {
				t.Errorf("app saw %s = %q, want [%q]", k, v, want)
			}
		}
		for _, k := range []string{"Upgrade", "Sec-Websocket-Key", "Sec-Websocket-Version", "Sec-Websocket-Extensions"} {
			if v := got.Header.Values(k); len(v) != 0 {
				t.Errorf("app saw %s = %q, want it removed", k, v)
			}
		}
		if got.Header.Get("Duplex-Session") == ws.Token || strings.Contains(fmt.Sprint(got.Header), ws.Token) {
			t.Errorf("the session token reached the app")
		}
		if got.Method != http.MethodPost || got.Path != "/echo-headers" {
			t.Errorf("app saw %s %s, want POST /echo-headers", got.Method, got.Path)
		}
		if got.Query != "q=1&r=two" {
			t.Errorf("app saw query %q, want the opening request's q=1&r=two", got.Query)
		}
		if !jsonEqual(decodeAny(t, got.Body), map[string]any{"hello": "world"}) {
			t.Errorf("app saw body %q, want the frame's data", got.Body)
		}
		// method from the frame; no data → no body
		ws.send(t, map[string]any{"id": "a2", "method": "PUT", "path": "/empty"})
		if f := ws.readFrame(t); f["type"] != "ack" || f["ref"] != "a2" {
			t.Fatalf("want ack a2, got %v", f)
		}
		got = app.byMessageID(t, "a2")
		if got.Method != http.MethodPut || got.Path != "/empty" || len(got.Body) != 0 {
			t.Errorf("app saw %s %s body %q, want PUT /empty without body", got.Method, got.Path, got.Body)
		}
		// default path: the opening request's path
		ws.send(t, map[string]any{"id": "a3", "data": 1})
		if f := ws.readFrame(t); f["ref"] != "a3" {
			t.Fatalf("want an answer to a3, got %v", f)
		}
		if got := app.byMessageID(t, "a3"); got.Path != "/live/room" || got.Method != http.MethodPost {
			t.Errorf("message without path/method reached the app as %s %s, want POST /live/room", got.Method, got.Path)
		}
	})

	t.Run("no user when the template is empty", func(t *testing.T) {
		ws := dialWS(t, c.wsURL("/live"), hdrs("Authorization", "Bearer x"))
		ws.expectOpen(t)
		ws.call(t, "nu1", "/empty", nil)
		if v := app.byMessageID(t, "nu1").Header.Values("Duplex-User"); len(v) != 0 {
			t.Errorf("app saw Duplex-User %q for a session without user, want none", v)
		}
	})
}

func TestBasicAuthBeforeDuplex(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		basic_auth {
			alice {{.Hash}}
		}
		duplex {
			messages {
				path *
			}
			user {http.auth.user.id}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr, "Hash", string(hash)))

	if st := rejectedStatus(t, c.wsURL("/live"), nil); st != http.StatusUnauthorized {
		t.Errorf("no credentials: status %d, want 401", st)
	}
	bad := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:wrong"))
	if st := rejectedStatus(t, c.wsURL("/live"), hdrs("Authorization", bad)); st != http.StatusUnauthorized {
		t.Errorf("wrong password: status %d, want 401", st)
	}

	good := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	ws := dialWS(t, c.wsURL("/live"), hdrs("Authorization", good))
	ws.expectOpen(t)
	for i := 0; i < 3; i++ {
		id := "b" + strconv.Itoa(i)
		if f := ws.call(t, id, "/echo-headers", nil); f["type"] != "reply" {
			t.Fatalf("want reply, got %v", f)
		}
		got := app.byMessageID(t, id)
		if v := got.Header.Values("Duplex-User"); len(v) != 1 || v[0] != "alice" {
			t.Errorf("app saw Duplex-User %q, want [alice]", v)
		}
		if v := got.Header.Get("Authorization"); v != good {
			t.Errorf("app saw Authorization %q, want the opening request's %q", v, good)
		}
	}
}

// --- spoofing ---------------------------------------------------------------

func TestSpoofedDuplexHeaders(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))

	spoof := hdrs("Duplex-User", "evil", "Duplex-Session", "fake-session", "Duplex-Message-Id", "fake-id",
		"Duplex-Transport", "carrier-pigeon", "Duplex-Token", "fake-token", "X-User", "bob")
	ws := dialWS(t, c.wsURL("/live"), spoof)
	ws.expectOpen(t)
	ws.call(t, "s1", "/echo-headers", nil)
	got := app.byMessageID(t, "s1")
	want := map[string]string{"Duplex-User": "bob", "Duplex-Session": ws.Session, "Duplex-Message-Id": "s1", "Duplex-Transport": "websocket"}
	for k, w := range want {
		if v := got.Header.Values(k); len(v) != 1 || v[0] != w {
			t.Errorf("app saw %s = %q, want [%q]", k, v, w)
		}
	}
	if v := got.Header.Values("Duplex-Token"); len(v) != 0 {
		t.Errorf("app saw client-sent Duplex-Token %q", v)
	}

	// A message without id: the client's Duplex-Message-Id must not show up.
	ws.send(t, map[string]any{"path": "/no-id", "data": "x"})
	ws.call(t, "s2", "/empty", nil) // sync: max_inflight 1 keeps order
	noID := app.byPath("/no-id")
	if len(noID) != 1 {
		t.Fatalf("app got %d requests on /no-id, want 1", len(noID))
	}
	if v := noID[0].Header.Values("Duplex-Message-Id"); len(v) != 0 {
		t.Errorf("message without id reached the app with Duplex-Message-Id %q", v)
	}

	// No user at the opening but a spoofed one: no Duplex-User at all.
	ws2 := dialWS(t, c.wsURL("/live"), hdrs("Duplex-User", "evil"))
	ws2.expectOpen(t)
	ws2.call(t, "s3", "/empty", nil)
	if v := app.byMessageID(t, "s3").Header.Values("Duplex-User"); len(v) != 0 {
		t.Errorf("app saw Duplex-User %q for a session without user", v)
	}

	// A plain request through the same route: passed on, minus Duplex-*.
	st, body := doJSON(t, http.MethodGet, c.url("/live/plain"), nil, "Duplex-User", "evil", "Duplex-Session", "x", "X-Keep", "1")
	if st != http.StatusOK || string(body) != "app:/live/plain" {
		t.Fatalf("plain request: %d %q, want 200 from the app", st, body)
	}
	plain := app.byPath("/live/plain")
	if len(plain) != 1 {
		t.Fatalf("app got %d plain requests, want 1", len(plain))
	}
	for _, k := range []string{"Duplex-User", "Duplex-Session"} {
		if v := plain[0].Header.Values(k); len(v) != 0 {
			t.Errorf("plain request reached the app with %s = %q", k, v)
		}
	}
	if plain[0].Header.Get("X-Keep") != "1" {
		t.Errorf("plain request lost its ordinary headers: %v", plain[0].Header)
	}
}

// --- reply / ack / error mapping -------------------------------------------

func TestReplyMapping(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}}
	}
	route /slowlive* {
		duplex {
			messages {
				path *
			}
			message_timeout 1s
		}
		reverse_proxy {{.Upstream}}
	}
	route /dead* {
		duplex {
			messages {
				path *
			}
		}
		reverse_proxy {{.Dead}}
	}
}
`, "Upstream", app.Addr, "Dead", deadAddr(t)))

	ws := openClient(t, c.wsURL("/live"), nil)

	f := ws.call(t, "r1", "/reply", map[string]any{"a": 1, "b": []any{1, "two"}})
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "r1", "status": 200, "data": map[string]any{"echo": map[string]any{"a": 1, "b": []any{1, "two"}}}})

	f = ws.call(t, "r2", "/text", nil)
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "r2", "status": 200, "data": "hello text"})

	f = ws.call(t, "r3", "/binary", nil)
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "r3", "status": 200,
		"data": base64.StdEncoding.EncodeToString([]byte{0, 1, 2, 0xff}), "encoding": "base64"})

	f = ws.call(t, "r4", "/empty", nil)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": "r4"})

	f = ws.call(t, "r5", "/notfound", nil)
	expectError(t, f, "r5", 404, "nope")

	f = ws.call(t, "r6", "/boom", nil)
	expectError(t, f, "r6", 500, "boom")

	// A numeric id comes back as the same number.
	ws.send(t, map[string]any{"id": 7, "path": "/empty"})
	f = ws.readFrame(t)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": 7})

	t.Run("unreachable app → 502", func(t *testing.T) {
		dead := openClient(t, c.wsURL("/dead"), nil)
		f := dead.call(t, "d1", "/reply", map[string]any{"x": 1})
		expectError(t, f, "d1", 502, "")
		f = dead.call(t, "d2", "/empty", nil) // session still there
		expectError(t, f, "d2", 502, "")
	})

	t.Run("slow app → 504, session survives", func(t *testing.T) {
		slow := openClient(t, c.wsURL("/slowlive"), nil)
		f := slow.call(t, "t1", "/slow", nil)
		expectError(t, f, "t1", 504, "")
		f = slow.call(t, "t2", "/empty", nil)
		expectFrame(t, f, map[string]any{"type": "ack", "ref": "t2"})
		if n := len(app.byPath("/slow")); n != 1 {
			t.Errorf("app got %d /slow requests, want 1", n)
		}
	})
}

// expectFrame asserts the frame is exactly want (as JSON).
func expectFrame(t *testing.T, got, want map[string]any) {
	t.Helper()
	if !jsonEqual(got, want) {
		gj, _ := json.Marshal(got)
		wj, _ := json.Marshal(want)
		t.Fatalf("frame\n got %s\nwant %s", gj, wj)
	}
}

// expectError asserts an error frame with ref, status and (if msg != "") an
// error text containing msg.
func expectError(t *testing.T, f map[string]any, ref any, status int, msg string) {
	t.Helper()
	if f["type"] != "error" || f["status"] != float64(status) {
		t.Fatalf("want error %d, got %v", status, f)
	}
	if ref == nil {
		if r, has := f["ref"]; has {
			t.Fatalf("error frame has ref %v, want none: %v", r, f)
		}
	} else if !jsonEqual(f["ref"], ref) {
		t.Fatalf("error frame ref = %v, want %v", f["ref"], ref)
	}
	e, ok := f["error"].(string)
	if !ok || e == "" {
		t.Fatalf("error frame without error text: %v", f)
	}
	if msg != "" && !strings.Contains(e, msg) {
		t.Fatalf("error text %q does not contain %q", e, msg)
	}
}

func decodeAny(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("not JSON (%v): %q", err, b)
	}
	return v
}

// --- order ------------------------------------------------------------------

func TestThousandMessagesInOrder(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
			max_inflight 1
			# 1,000 messages back to back: over the default rate limit
			rate off
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	ws := openClient(t, c.wsURL("/live"), nil)

	const n = 1000
	werr := make(chan error, 1)
	go func() {
		for i := 0; i < n; i++ {
			b, _ := json.Marshal(map[string]any{"id": "m" + strconv.Itoa(i), "path": "/seq", "data": map[string]any{"n": i}})
			if err := ws.conn.send(b); err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	for i := 0; i < n; i++ {
		f := ws.readFrame(t)
		id := "m" + strconv.Itoa(i)
		if i%2 == 0 {
			expectFrame(t, f, map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"n": i}})
		} else {
			expectFrame(t, f, map[string]any{"type": "ack", "ref": id})
		}
	}
	if err := <-werr; err != nil {
		t.Fatalf("writing messages: %v", err)
	}
	got := app.seqs()
	if len(got) != n {
		t.Fatalf("app got %d messages, want %d", len(got), n)
	}
	for i, v := range got {
		if v != i {
			t.Fatalf("app got message %d at position %d (want in order); first 20: %v", v, i, got[:min(20, len(got))])
		}
	}
}

// --- subscribe / hidden headers / close via header --------------------------

func TestSubscribeViaResponseHeader(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	ws := openClient(t, c.wsURL("/live"), nil)
	other := openClient(t, c.wsURL("/live"), nil)

	f := ws.call(t, "u1", "/subscribe", nil)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": "u1"})
	c.mustPublish(t, map[string]any{"channel": "room:2", "data": "to room 2"}, 1)
	ws.expectPush(t, "room:2", "to room 2")

	// A reply carrying Duplex-* headers: none of them visible to the client.
	ws.send(t, map[string]any{"id": "u2", "path": "/subscribe-reply"})
	e := ws.next(t)
	if !e.text || e.frame == nil {
		t.Fatalf("want a text frame, got %v", e)
	}
	if bytes.Contains(bytes.ToLower(e.raw), []byte("duplex-")) || bytes.Contains(e.raw, []byte("room:7")) {
		t.Errorf("reply frame leaks Duplex-* response headers: %s", e.raw)
	}
	reply := e.frame
	expectFrame(t, reply, map[string]any{"type": "reply", "ref": "u2", "status": 200, "data": map[string]any{"ok": true}})

	c.mustPublish(t, map[string]any{"channel": "room:7", "data": "to room 7"}, 1)
	ws.expectPush(t, "room:7", "to room 7")

	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+ws.Session), nil)
	if st != http.StatusOK {
		t.Fatalf("GET session: %d %s", st, raw)
	}
	chans := stringSet(decode(t, raw).(map[string]any)["channels"])
	for _, ch := range []string{"lobby", "room:2", "room:7"} {
		if !chans[ch] {
			t.Errorf("session channels %v lack %q", chans, ch)
		}
	}

	f = ws.call(t, "u3", "/unsubscribe", nil)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": "u3"})
	c.mustPublish(t, map[string]any{"channel": "room:2", "data": "gone"}, 0)
	c.mustPublish(t, map[string]any{"channel": "lobby", "data": "marker"}, 2)
	ws.expectPush(t, "lobby", "marker")
	other.expectPush(t, "lobby", "marker") // the other session got none of the room pushes
}

func TestCloseViaResponseHeader(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	ws := openClient(t, c.wsURL("/live"), nil)
	keep := openClient(t, c.wsURL("/live"), nil)

	f := ws.call(t, "c1", "/close", nil)
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "c1", "status": 200, "data": map[string]any{"closing": true}})
	ws.expectClosed(t, 4000, "bye")

	if st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+ws.Session), nil); st != http.StatusNotFound {
		t.Errorf("GET closed session: %d %s, want 404", st, raw)
	}
	if st, m := c.publish(t, map[string]any{"session": ws.Session, "data": 1}); st != http.StatusNotFound {
		t.Errorf("publish to closed session: %d %v, want 404", st, m)
	}
	// The other session is untouched.
	keep.call(t, "k1", "/empty", nil)
	c.mustPublish(t, map[string]any{"channel": "lobby", "data": "still here"}, 1)
	keep.expectPush(t, "lobby", "still here")
}

// --- bad frames -------------------------------------------------------------

func TestOversizeMessage(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
			max_message_size 1KiB
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	ws := openSession(t, c.wsURL("/live"), nil)

	ws.send(t, map[string]any{"id": "big", "path": "/reply", "data": strings.Repeat("x", 2048)})
	expectError(t, ws.readFrame(t), nil, 413, "")
	if n := len(app.byPath("/reply")); n != 0 {
		t.Errorf("oversize message reached the app (%d requests)", n)
	}
	// still works, also with a message just under the limit
	f := ws.call(t, "ok1", "/reply", strings.Repeat("y", 900))
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "ok1", "status": 200, "data": map[string]any{"echo": strings.Repeat("y", 900)}})
	ws.send(t, map[string]any{"id": "big2", "path": "/reply", "data": strings.Repeat("z", 64*1024)})
	expectError(t, ws.readFrame(t), nil, 413, "")
	f = ws.call(t, "ok2", "/empty", nil)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": "ok2"})
}

func TestMalformedFrames(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	ws := openSession(t, c.wsURL("/live"), nil)

	ws.sendRaw(t, []byte("this is not json"))
	expectError(t, ws.readFrame(t), nil, 400, "")
	ws.sendRaw(t, []byte(`[1,2,3]`))
	expectError(t, ws.readFrame(t), nil, 400, "")
	ws.sendRaw(t, []byte(`{"id":"u1","type":"bogus"}`))
	expectError(t, ws.readFrame(t), "u1", 400, "")

	f := ws.call(t, "g1", "/reply", map[string]any{"fine": true})
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "g1", "status": 200, "data": map[string]any{"echo": map[string]any{"fine": true}}})
	ws.send(t, map[string]any{"type": "message", "id": "g2", "path": "/empty"})
	expectFrame(t, ws.readFrame(t), map[string]any{"type": "ack", "ref": "g2"})
	if n := len(app.requests()); n != 2 {
		t.Errorf("app got %d requests, want 2 (bad frames must not reach it):%s", n, app.describe())
	}
}

// --- origin -----------------------------------------------------------------

func TestOriginCheck(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}}
	}
	route /wide* {
		duplex {
			messages {
				path *
			}
			allowed_origins http://evil.example https://also.example
		}
		reverse_proxy {{.Upstream}}
	}
	route /any* {
		duplex {
			messages {
				path *
			}
			allowed_origins *
		}
		reverse_proxy {{.Upstream}}
	}
	route /authed* {
		duplex {
			messages {
				path *
			}
			auth {
				header Authorization "Bearer *"
			}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	same := fmt.Sprintf("http://127.0.0.1:%d", c.HTTP)

	if st := rejectedStatus(t, c.wsURL("/live"), hdrs("Origin", "http://evil.example")); st != http.StatusForbidden {
		t.Errorf("cross-origin: status %d, want 403", st)
	}
	openSession(t, c.wsURL("/live"), hdrs("Origin", same)).call(t, "o1", "/empty", nil)
	openSession(t, c.wsURL("/live"), nil).call(t, "o2", "/empty", nil) // no Origin: allowed

	openSession(t, c.wsURL("/wide"), hdrs("Origin", "http://evil.example")).call(t, "o3", "/empty", nil)
	openSession(t, c.wsURL("/wide"), hdrs("Origin", "https://also.example")).call(t, "o4", "/empty", nil)
	openSession(t, c.wsURL("/wide"), hdrs("Origin", same)).call(t, "o5", "/empty", nil)
	if st := rejectedStatus(t, c.wsURL("/wide"), hdrs("Origin", "http://other.example")); st != http.StatusForbidden {
		t.Errorf("origin outside allowed_origins: status %d, want 403", st)
	}
	openSession(t, c.wsURL("/any"), hdrs("Origin", "http://whatever.example")).call(t, "o6", "/empty", nil)

	// Origin is checked first: cross-origin without credentials is 403, not 401.
	if st := rejectedStatus(t, c.wsURL("/authed"), hdrs("Origin", "http://evil.example")); st != http.StatusForbidden {
		t.Errorf("cross-origin without credentials: status %d, want 403", st)
	}
	for _, r := range app.requests() {
		if r.Header.Get("Duplex-Message-Id") == "" {
			t.Errorf("a rejected opening reached the app: %s %s", r.Method, r.Path)
		}
	}
}

// --- HTTP/2 extended CONNECT (RFC 8441) over h2c ----------------------------

func dialH2WS(t *testing.T, c *caddyProc, path string, hdr http.Header) *dxSession {
	t.Helper()
	return dialDX(t, "websocket", target{proto: "h2c", base: fmt.Sprintf("http://127.0.0.1:%d", c.HTTP)}, path, hdr)
}

func TestHTTP2ExtendedConnectH2C(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("\tservers {\n\t\tprotocols h1 h2 h2c\n\t}")+siteLive, "Upstream", app.Addr),
		"GODEBUG=http2xconnect=1")

	ws := dialH2WS(t, c, "/live", hdrs("X-User", "h2user", "X-Room", "9"))
	ws.expectOpen(t)

	f := ws.call(t, "h1", "/reply", map[string]any{"over": "h2"})
	expectFrame(t, f, map[string]any{"type": "reply", "ref": "h1", "status": 200, "data": map[string]any{"echo": map[string]any{"over": "h2"}}})
	got := app.byMessageID(t, "h1")
	if got.Header.Get("Duplex-User") != "h2user" || got.Header.Get("Duplex-Session") != ws.Session || got.Header.Get("Duplex-Transport") != "websocket" {
		t.Errorf("app saw Duplex headers %v", got.Header)
	}
	for _, k := range []string{"Sec-Websocket-Version", ":protocol", "Upgrade"} {
		if v := got.Header.Values(k); len(v) != 0 {
			t.Errorf("app saw %s = %q, want it removed", k, v)
		}
	}
	f = ws.call(t, "h2", "/empty", nil)
	expectFrame(t, f, map[string]any{"type": "ack", "ref": "h2"})

	c.mustPublish(t, map[string]any{"user": "h2user", "data": map[string]any{"n": 1}}, 1)
	ws.expectPush(t, "", map[string]any{"n": 1})
	c.mustPublish(t, map[string]any{"channel": "room:9", "data": "two"}, 1)
	ws.expectPush(t, "room:9", "two")

	// An HTTP/1.1 WebSocket on the same server still works alongside.
	h1 := openSession(t, c.wsURL("/live"), hdrs("X-Room", "9"))
	c.mustPublish(t, map[string]any{"channel": "room:9", "data": "both"}, 2)
	ws.expectPush(t, "room:9", "both")
	h1.expectPush(t, "room:9", "both")

	// Server-side close over the HTTP/2 stream.
	c.mustPublish(t, map[string]any{"session": ws.Session, "close": "h2 done"}, 1)
	ws.expectClosed(t, 4000, "h2 done")
}

// --- goroutines -------------------------------------------------------------

var (
	goroutineTotal = regexp.MustCompile(`goroutine profile: total (\d+)`)
	goroutineGroup = regexp.MustCompile(`(?m)^(\d+) @ `)
)

// goroutines returns the total count and the stacks (debug=1 groups) that
// mention the plugin's package.
func goroutines(t *testing.T, c *caddyProc) (int, int, []string) {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/debug/pprof/goroutine?debug=1"), nil)
	if st != http.StatusOK {
		t.Fatalf("pprof goroutine: %d %s", st, raw)
	}
	m := goroutineTotal.FindSubmatch(raw)
	if m == nil {
		t.Fatalf("unexpected pprof output: %.500s", raw)
	}
	total, _ := strconv.Atoi(string(m[1]))
	var dup []string
	dupCount := 0
	for _, block := range strings.Split(string(raw), "\n\n") {
		if strings.Contains(block, "caddy-duplex/duplex") {
			dup = append(dup, block)
			if g := goroutineGroup.FindStringSubmatch(block); g != nil {
				n, _ := strconv.Atoi(g[1])
				dupCount += n
			} else {
				t.Fatalf("cannot read the goroutine count of:\n%s", block)
			}
		}
	}
	return total, dupCount, dup
}

func sessionCount(t *testing.T, c *caddyProc) int {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions"), nil)
	if st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions: %d %s", st, raw)
	}
	l, ok := decode(t, raw).([]any)
	if !ok {
		t.Fatalf("sessions list is not an array: %s", raw)
	}
	return len(l)
}

func TestNoGoroutineLeak(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}} {
			transport http {
				keepalive off
			}
		}
	}
}
`, "Upstream", app.Addr))

	// warm-up
	w := openSession(t, c.wsURL("/live"), nil)
	w.call(t, "w", "/reply", "warm")
	w.closeGracefully()
	waitUntil(t, "the warm-up session to end", 30*time.Second, func() bool { return sessionCount(t, c) == 0 })
	var base, baseDup int
	var baseStacks []string
	waitUntil(t, "a stable goroutine count", 30*time.Second, func() bool {
		a, _, _ := goroutines(t, c)
		time.Sleep(200 * time.Millisecond)
		base, baseDup, baseStacks = goroutines(t, c)
		return a == base
	})
	t.Logf("baseline: %d goroutines, %d in the plugin", base, baseDup)

	const n = 50
	clients := make([]*dxSession, n)
	for i := range clients {
		clients[i] = openSession(t, c.wsURL("/live"), nil)
	}
	for i, ws := range clients {
		ws.send(t, map[string]any{"id": "x" + strconv.Itoa(i), "path": "/reply", "data": i})
	}
	for i, ws := range clients {
		f := ws.readFrame(t)
		expectFrame(t, f, map[string]any{"type": "reply", "ref": "x" + strconv.Itoa(i), "status": 200, "data": map[string]any{"echo": i}})
	}
	if got := sessionCount(t, c); got != n {
		t.Errorf("sessions listed: %d, want %d", got, n)
	}
	during, _, _ := goroutines(t, c)
	t.Logf("with %d sessions open: %d goroutines", n, during)

	// Half close from the client side, half are deleted by the server.
	for i, ws := range clients {
		if i%2 == 0 {
			ws.closeGracefully()
		} else {
			if st, raw := doJSON(t, http.MethodDelete, c.adminURL("/duplex/sessions/"+ws.Session), nil); st != http.StatusNoContent {
				t.Fatalf("DELETE session: %d %s", st, raw)
			}
			ws.expectClosed(t, 4000, "deleted")
			ws.Close()
		}
	}

	waitUntil(t, "all sessions to end", 30*time.Second, func() bool { return sessionCount(t, c) == 0 })
	var total, dup int
	var stacks []string
	deadline := time.Now().Add(30 * time.Second)
	for {
		total, dup, stacks = goroutines(t, c)
		if total <= base+5 && dup == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines did not go back after the sessions ended: %d now, baseline %d; plugin goroutines %d (baseline %d):\n%s\n--- baseline plugin stacks:\n%s",
				total, base, dup, baseDup, strings.Join(stacks, "\n\n"), strings.Join(baseStacks, "\n\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func stringSet(v any) map[string]bool {
	out := map[string]bool{}
	l, _ := v.([]any)
	for _, x := range l {
		if s, ok := x.(string); ok {
			out[s] = true
		}
	}
	return out
}

func sortedKeys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
