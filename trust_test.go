package duplex_test

// What the app may trust (README: "Security defaults", "Hooks: connect and
// disconnect", "What the app sees"): a hook from a message to the hook's
// path, Duplex-* headers on the demo's other route, tokens used on another
// site, cross-origin openings and POSTs, and resume cursors in the logs.

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

// TestTrustDisconnectHookNotForgeable: a session's frame to the disconnect
// hook's path reaches the app without Duplex-Disconnect (even when the
// opening request carried one), the real hook with it: the app can tell
// them apart.
func TestTrustDisconnectHookNotForgeable(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			disconnect /live/gone
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	s := sxOpenWS(t, c.wsURL("/live"), hdrs("Duplex-Disconnect", "forged-header", "Duplex-Connect", "open"))
	sid := s.open.str("session")
	s.send(t, map[string]any{"id": "f", "path": "/live/gone", "data": map[string]any{"reason": "forged"}})
	if f := sxNextRef(t, s.next, "f"); f.typ() != "reply" {
		t.Fatalf("the forged hook message: %v, want the app's reply", f)
	}
	c.mustPublish(t, map[string]any{"session": sid, "close": "logout"}, 1)
	waitUntil(t, "the disconnect hook", sxWait, func() bool { return len(app.byPath("/live/gone")) == 2 })

	var forged, real []recordedReq
	for _, r := range app.byPath("/live/gone") {
		if r.Header.Get("Duplex-Session") != sid {
			t.Fatalf("a request on the hook path not of the session: %v", r.Header)
		}
		if _, ok := r.Header["Duplex-Disconnect"]; ok {
			real = append(real, r)
		} else {
			forged = append(forged, r)
		}
		if _, ok := r.Header["Duplex-Connect"]; ok {
			t.Errorf("a request on the hook path carries Duplex-Connect: %v", r.Header)
		}
	}
	if len(forged) != 1 || len(real) != 1 {
		t.Fatalf("requests on the hook path: %d without Duplex-Disconnect, %d with it; want 1 and 1:%s", len(forged), len(real), app.describe())
	}
	if id := forged[0].Header.Get("Duplex-Message-Id"); id != "f" {
		t.Errorf("the message's Duplex-Message-Id = %q, want f", id)
	}
	if id, ok := real[0].Header["Duplex-Message-Id"]; ok {
		t.Errorf("the real hook carries Duplex-Message-Id %v", id)
	}
	reason := real[0].Header.Get("Duplex-Disconnect")
	var body struct{ Reason string }
	if err := json.Unmarshal(real[0].Body, &body); err != nil || reason == "" || reason == "forged-header" || body.Reason != reason {
		t.Errorf("real hook: Duplex-Disconnect %q, body %s (%v): want the same reason in both", reason, real[0].Body, err)
	}
	if !strings.Contains(reason, "logout") {
		t.Errorf("real hook reason %q, want it to say logout", reason)
	}
}

// TestTrustDemoStripsDuplexHeaders: in the demo's layout
// (testdata/demo/Caddyfile, as is), a client calling the app through the
// catch-all route, or a non-session request on /live, cannot hand it a
// Duplex-User; other headers still pass.
func TestTrustDemoStripsDuplexHeaders(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, demoCaddyfile(t, app.Addr))
	spoof := []string{"Duplex-User", "admin", "Duplex-Session", "s", "Duplex-Disconnect", "x", "Duplex-Connect", "open", "X-Other", "kept"}
	for _, p := range []string{"/rooms/lobby", "/healthz", "/live/rooms/lobby"} {
		if st, _ := doJSON(t, http.MethodGet, c.url(p), nil, spoof...); st != http.StatusOK {
			t.Fatalf("GET %s: %d", p, st)
		}
		rs := app.byPath(p)
		if len(rs) != 1 {
			t.Fatalf("GET %s: the app got %d requests:%s", p, len(rs), app.describe())
		}
		for name := range rs[0].Header {
			if strings.HasPrefix(strings.ToLower(name), "duplex-") {
				t.Errorf("GET %s reached the app with %s: %q", p, name, rs[0].Header.Get(name))
			}
		}
		if rs[0].Header.Get("X-Other") != "kept" {
			t.Errorf("GET %s: other headers do not reach the app: %v", p, rs[0].Header)
		}
	}
}

// TestTrustTokenScopedToSite: a token from a session opened on site A is
// refused by site B's duplex (another port, and another host on the same
// port): an SSE POST gets 401, a resume opens a new session.
func TestTrustTokenScopedToSite(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	other := freePorts(t, 1)[0]
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
http://localhost:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
http://127.0.0.1:{{.Other}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr, "Other", strconv.Itoa(other)))
	a := sxOpenSSE(t, c.url("/live"), nil)
	sid, tok := a.open.str("session"), a.token()
	sites := map[string]string{
		"other port": "http://127.0.0.1:" + strconv.Itoa(other),
		"other host": "http://localhost:" + strconv.Itoa(c.HTTP),
	}
	for name, base := range sites {
		frame := []byte(`{"id":"x","path":"/live/steal"}`)
		if st, b := sxPost(t, base+"/live", tok, "application/json", frame); st != http.StatusUnauthorized {
			t.Errorf("%s: SSE POST with site A's token: %d %s, want 401", name, st, b)
		}
		r := sxOpenSSE(t, base+"/live", hdrs("Last-Event-ID", tok+":0"))
		if r.open["resumed"] != false || r.open.str("session") == sid {
			t.Errorf("%s: SSE resume with site A's cursor: %v, want a new session (resumed:false)", name, r.open)
		}
		r.drop()
		u := strings.Replace(base, "http://", "ws://", 1) + "/live"
		w := sxOpenWS(t, u, hdrs("Duplex-Resume", tok+":0"))
		if w.open["resumed"] != false || w.open.str("session") == sid {
			t.Errorf("%s: WebSocket resume with site A's cursor: %v, want a new session", name, w.open)
		}
		w.shut()
		w2 := sxOpenWS(t, u+"?resume="+url.QueryEscape(tok+":0"), nil)
		if w2.open["resumed"] != false || w2.open.str("session") == sid {
			t.Errorf("%s: WebSocket resume (query) with site A's cursor: %v, want a new session", name, w2.open)
		}
		w2.shut()
	}
	if rs := app.byPath("/live/steal"); len(rs) != 0 {
		t.Fatalf("a frame posted with site A's token on another site reached the app")
	}
	// On site A the token works: the session was neither taken nor ended.
	if st, b := sxPost(t, c.url("/live"), tok, "application/json", []byte(`{"id":"own","path":"/live/own"}`)); st != http.StatusAccepted {
		t.Fatalf("SSE POST on site A: %d %s", st, b)
	}
	if f := sxNextRef(t, a.next, "own"); f.typ() != "reply" {
		t.Fatalf("answer on site A: %v", f)
	}
	a.drop()
	sxWaitDetached(t, c, sid)
	r := sxOpenSSE(t, c.url("/live"), hdrs("Last-Event-ID", tok+":0"))
	if r.open["resumed"] != true || r.open.str("session") != sid {
		t.Fatalf("resume on site A: %v, want resumed:true", r.open)
	}
}

// TestTrustOriginScheme: on an http:// site, an Origin with the same host
// and port but another scheme, or with user info before the host, is
// refused (403) for WebSocket and SSE openings and for SSE POSTs; the
// site's own origin is accepted.
func TestTrustOriginScheme(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	host := "127.0.0.1:" + strconv.Itoa(c.HTTP)
	self := "http://" + host
	s := sxOpenSSE(t, c.url("/live"), hdrs("Origin", self))
	for _, origin := range []string{
		"https://" + host,
		"http://evil.com@" + host,
		"ws://" + host,
		"http://" + host + "@evil.com",
		"http://" + host + "/path",
		"null",
	} {
		if w, st, err := sxDialWS(t, c.wsURL("/live"), hdrs("Origin", origin), nil); err != nil || w != nil || st != http.StatusForbidden {
			t.Errorf("WebSocket opening with Origin %q: %d %v, want 403", origin, st, err)
		}
		if r, st, _ := sxStartSSE(t, c.url("/live"), hdrs("Origin", origin)); r != nil || st != http.StatusForbidden {
			t.Errorf("SSE opening with Origin %q: %d, want 403", origin, st)
		}
		if st, b := sxPost(t, c.url("/live"), s.token(), "application/json", []byte(`{"path":"/live/o"}`), "Origin", origin); st != http.StatusForbidden {
			t.Errorf("SSE POST with Origin %q: %d %s, want 403", origin, st, b)
		}
	}
	if rs := app.byPath("/live/o"); len(rs) != 0 {
		t.Errorf("a cross-origin POST's frame reached the app")
	}
	// The site's own origin passes everywhere.
	sxOpenWS(t, c.wsURL("/live"), hdrs("Origin", self)).shut()
	if st, b := sxPost(t, c.url("/live"), s.token(), "application/json", []byte(`{"id":"o","path":"/live/o"}`), "Origin", self); st != http.StatusAccepted {
		t.Fatalf("same-origin SSE POST: %d %s", st, b)
	}
	if f := sxNextRef(t, s.next, "o"); f.typ() != "reply" {
		t.Fatalf("same-origin POST's answer: %v", f)
	}
}

// TestTrustCursorNotLogged: with Caddy's log at DEBUG, openings refused
// by duplex itself (auth matchers, origin, max_sessions, the connect hook)
// and SSE POSTs refused, each carrying a live session's resume cursor or
// token in the query, Duplex-Resume, Last-Event-ID or Duplex-Token, never
// put the token in a log line. Refusals by an auth handler before duplex
// are kept out by the README's log filter (logfilter_test.go); the same
// filter keeps a refused POST's Duplex-Token out too.
func TestTrustCursorNotLogged(t *testing.T) {
	t.Parallel()
	hook := newTestApp(t)
	denyConnect := sxDenyConnectApp(t)
	c := startCaddy(t, sub(globalOpts("\tlog {\n\t\tlevel DEBUG\n\t}")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
	route /auth* {
		duplex {
			auth {
				header Authorization "Bearer *"
			}
		}
		reverse_proxy {{.Upstream}}
	}
	route /full* {
		duplex {
			max_sessions 1
		}
		reverse_proxy {{.Upstream}}
	}
	route /hook* {
		duplex {
			connect
		}
		reverse_proxy {{.Deny}}
	}
}
`, "Upstream", hook.Addr, "Deny", denyConnect))
	s := sxOpenSSE(t, c.url("/live"), nil)
	tok := s.token()
	cursor := tok + ":0"
	refusals := 0
	for _, p := range []string{"/auth", "/full", "/hook", "/live"} {
		origin := ""
		if p == "/live" {
			origin = "http://evil.example" // refused by the origin check
		}
		for _, via := range []string{"query", "header"} {
			u, h := c.wsURL(p), hdrs()
			if via == "query" {
				u += "?resume=" + url.QueryEscape(cursor)
			} else {
				h.Set("Duplex-Resume", cursor)
			}
			if origin != "" {
				h.Set("Origin", origin)
			}
			if w, st, err := sxDialWS(t, u, h, nil); err != nil || w != nil || st < 400 {
				t.Fatalf("%s: WebSocket opening with the cursor in the %s: %d %v, want a refusal", p, via, st, err)
			}
			refusals++
		}
		h := hdrs("Last-Event-ID", cursor)
		if origin != "" {
			h.Set("Origin", origin)
		}
		if r, st, _ := sxStartSSE(t, c.url(p), h); r != nil || st < 400 {
			t.Fatalf("%s: SSE opening with Last-Event-ID: %d, want a refusal", p, st)
		}
		refusals++
	}
	// POSTs refused: cross-origin, and on another place (a 401).
	if st, _ := sxPost(t, c.url("/live"), tok, "application/json", []byte(`{}`), "Origin", "http://evil.example"); st != http.StatusForbidden {
		t.Fatalf("cross-origin POST: %d, want 403", st)
	}
	if st, _ := sxPost(t, c.url("/auth"), tok, "application/json", []byte(`{}`)); st != http.StatusUnauthorized {
		t.Fatalf("POST on another place: %d, want 401", st)
	}
	s.drop()
	c.stop(t)
	logs := c.logs()
	if n := strings.Count(logs, `"opening refused"`); n < refusals-3 {
		t.Fatalf("the debug log shows %d refused openings of %d: the scan would prove nothing\n%s", n, refusals, logs)
	}
	if strings.Contains(logs, tok) || strings.Contains(logs, url.QueryEscape(tok)) {
		t.Errorf("the session token appears in Caddy's log:\n%s", strings.Join(linesWith(logs, tok, url.QueryEscape(tok)), "\n"))
	}
}

// sxDenyConnectApp refuses every connect hook (403); it returns its
// address.
func sxDenyConnectApp(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Duplex-Connect") != "" {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// TestTrustPostRefusedByAuthFiltered: an SSE POST that an auth handler
// before duplex refuses (401, logged by Caddy with its headers) keeps its
// Duplex-Token out of the log under the README's log filter.
func TestTrustPostRefusedByAuthFiltered(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts(readmeLogFilter)+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		basic_auth {
			alice {{.Hash}}
		}
		duplex {
			transports sse
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr, "Hash", sxHash(t, "alicepass")))
	s := sxOpenSSE(t, c.url("/live"), hdrs("Authorization", sxBasic("alice", "alicepass")))
	tok := s.token()
	if st, _ := sxPost(t, c.url("/live"), tok, "application/json", []byte(`{"path":"/live/x"}`)); st != http.StatusUnauthorized {
		t.Fatalf("POST without credentials: %d, want 401", st)
	}
	if st, _ := sxPost(t, c.url("/live"), tok, "application/json", []byte(`{"path":"/live/x"}`), "Authorization", sxBasic("alice", "wrong")); st != http.StatusUnauthorized {
		t.Fatalf("POST with a wrong password: %d, want 401", st)
	}
	s.drop()
	c.stop(t)
	logs := c.logs()
	if strings.Count(logs, `"status":401`) < 2 {
		t.Fatalf("Caddy's debug log does not show the refused POSTs: the scan would prove nothing\n%s", logs)
	}
	if strings.Contains(logs, tok) {
		t.Errorf("the session token appears in Caddy's log:\n%s", strings.Join(linesWith(logs, tok), "\n"))
	}
}
