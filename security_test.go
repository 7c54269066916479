package duplex_test

// Security: spoofed Duplex-* and X-Forwarded-* headers, cross-
// origin openings and SSE POSTs, the session token never in Caddy's logs
// nor at the app, no resuming another user's session, and hostile input
// (deep nesting, oversize, invalid UTF-8, unknown frame types, WebSocket
// protocol errors) answered with errors, never a panic or a stuck session.

import (
	"bytes"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

const secHookRoutes = `
	route /live* {
		duplex {
			messages {
				path *
			}
			connect
			disconnect /gone
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
`

// TestSecuritySpoofedHeaders: whatever Duplex-* and X-Forwarded-* headers a
// client sends, the app sees the real ones on the connect hook, the
// messages and the disconnect hook: Duplex-* set by the plugin only, and
// X-Forwarded-* as Caddy's reverse_proxy sets them for an untrusted client
// (no trusted_proxies: the client's own X-Forwarded-For is replaced by its
// address, Proto and Host are the real ones).
func TestSecuritySpoofedHeaders(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(secHookRoutes, "Upstream", app.Addr), "")
	c := e.c
	for _, proto := range protos {
		for _, tr := range transports {
			if !transportAllowed(tr, proto, false) {
				continue
			}
			t.Run(proto+"/"+tr, func(t *testing.T) {
				t.Parallel()
				tg := e.target(proto)
				user := "real-" + proto + "-" + tr
				spoof := hdrs("X-User", user,
					"X-Forwarded-For", "6.6.6.6", "X-Forwarded-Proto", "gopher", "X-Forwarded-Host", "evil.example",
					"Duplex-User", "evil", "Duplex-Session", "fake-session", "Duplex-Connect", "resume",
					"Duplex-Transport", "pigeon", "Duplex-Message-Id", "fake-id", "Duplex-Resume", "garbage:1")
				if tr != "stream" {
					spoof.Set("Duplex-Token", "fake-token") // (a POST with it is an SSE POST)
				}
				s := openDX(t, tr, tg, "/live/spoof", spoof)
				s.call(t, "m1", "/reply", "x")
				c.mustPublish(t, map[string]any{"session": s.Session, "close": "done"}, 1)
				s.expectClose(t, 4000, "done", false)
				app.waitGone(t, s.Session, user, tr, "done")

				host := strings.TrimPrefix(strings.TrimPrefix(tg.base, "http://"), "https://")
				scheme := "http"
				if proto == "h2" {
					scheme = "https"
				}
				reqs := append(append(app.connects(s.Session), app.of("message", "Duplex-Session", s.Session)...), app.goneOf(s.Session)...)
				if len(reqs) != 3 {
					t.Fatalf("app got %d requests of the session, want connect, message, disconnect", len(reqs))
				}
				for _, r := range reqs {
					want := map[string]string{
						"X-Forwarded-For":   "127.0.0.1",
						"X-Forwarded-Proto": scheme,
						"X-Forwarded-Host":  host,
						"Duplex-User":       user,
						"Duplex-Session":    s.Session,
						"Duplex-Transport":  tr,
					}
					switch r.Kind {
					case "connect":
						want["Duplex-Connect"] = "open"
					case "message":
						want["Duplex-Message-Id"] = "m1"
					case "disconnect":
						want["Duplex-Disconnect"] = "done"
					}
					for k, v := range want {
						if got := r.Header.Values(k); len(got) != 1 || got[0] != v {
							t.Errorf("%s request: %s = %q, want [%q]", r.Kind, k, got, v)
						}
					}
					for k := range r.Header {
						if strings.HasPrefix(k, "Duplex-") && want[k] == "" {
							t.Errorf("%s request carries %s: %q", r.Kind, k, r.Header.Values(k))
						}
					}
				}
			})
		}
	}
}

// TestSecurityCrossOrigin: a browser page of another origin can open no
// session over any transport and protocol (CSWSH), before the connect hook
// runs, and cannot post frames into an SSE session even with its token.
func TestSecurityCrossOrigin(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(secHookRoutes, "Upstream", app.Addr), "", xconnectEnv)
	c := e.c
	for _, proto := range protos {
		for _, tr := range transports {
			t.Run(proto+"/"+tr, func(t *testing.T) {
				t.Parallel()
				tg := e.target(proto)
				probe := "xo-" + proto + "-" + tr
				for _, origin := range []string{"http://evil.example", "null", "https://127.0.0.1.evil.example", "http://127.0.0.1"} {
					st, _, _ := hkRefused(t, tr, tg, "/live", hdrs("Origin", origin, "Cookie", "session=victim", "X-User", probe))
					if st != http.StatusForbidden {
						t.Errorf("opening from origin %q: %d, want 403", origin, st)
					}
				}
				if n := len(app.of("connect", "X-User", probe)); n != 0 {
					t.Errorf("cross-origin openings reached the connect hook %d times", n)
				}
				s := openDX(t, tr, tg, "/live", hdrs("Origin", tg.base, "X-User", probe+"-ok"))
				s.call(t, "ok", "/empty", nil)
			})
		}
	}
	t.Run("sse POST", func(t *testing.T) {
		tg := e.target("h1")
		s := openDX(t, "sse", tg, "/live", hdrs("X-User", "post-victim"))
		sc := s.conn.(*sseDuplex)
		st, raw, _, err := sc.post("application/json", []byte(`{"id":"evil","path":"/reply","data":"csrf"}`), "Origin", "http://evil.example")
		if err != nil || st != http.StatusForbidden {
			t.Errorf("cross-origin SSE POST with the token: %d %q %v, want 403", st, raw, err)
		}
		st, raw, _, err = sc.post("application/x-ndjson", []byte("{\"id\":\"evil2\",\"path\":\"/reply\"}\n"), "Origin", "null")
		if err != nil || st != http.StatusForbidden {
			t.Errorf("SSE POST from origin null: %d %q %v, want 403", st, raw, err)
		}
		st, raw, _, err = sc.post("application/json", []byte(`{"id":"same","path":"/empty"}`), "Origin", tg.base)
		if err != nil || st != http.StatusAccepted {
			t.Errorf("same-origin SSE POST: %d %q %v, want 202", st, raw, err)
		}
		if f := s.readFrame(t); f["type"] != "ack" || f["ref"] != "same" {
			t.Errorf("want the ack of the same-origin POST, got %v", f)
		}
		for _, id := range []string{"evil", "evil2"} {
			if n := len(app.of("message", "Duplex-Message-Id", id)); n != 0 {
				t.Errorf("a cross-origin POST reached the app (%s)", id)
			}
		}
		c.mustPublish(t, map[string]any{"session": s.Session, "data": "after"}, 1)
		s.expectPush(t, "", "after")
	})
}

// TestSecurityTokenNeverLogged: with Caddy logging at DEBUG, sessions over
// every transport (HTTP/1.1 and h2c) open, exchange messages and pushes,
// resume (header, query, Last-Event-ID) and end; no session token appears
// anywhere in Caddy's output, nor in any request the app got.
func TestSecurityTokenNeverLogged(t *testing.T) {
	t.Parallel()
	secTokenScenario(t, false)
}

// TestSecurityTokenNeverLoggedRefusedResume: the same when resumes of live
// sessions are refused: by the handler's auth matchers (401, cursor in the
// query or in Duplex-Resume), by the origin check (403) and by the connect
// hook (403).
func TestSecurityTokenNeverLoggedRefusedResume(t *testing.T) {
	t.Parallel()
	secTokenScenario(t, true)
}

func secTokenScenario(t *testing.T, refusals bool) {
	app := newHookApp(t, "h1")
	c := startCaddy(t, sub(globalOpts("\tlog {\n\t\tlevel DEBUG\n\t}\n\tservers {\n\t\tprotocols h1 h2 h2c\n\t}")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			messages {
				path *
			}
			auth {
				header Authorization "Bearer *"
			}
			connect
			disconnect /gone
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr), xconnectEnv)
	e := &duplexEnv{c: c}
	var tokens, ids []string
	auth := "Bearer let-me-in"
	for _, proto := range []string{"h1", "h2c"} {
		for _, tr := range transports {
			tg := e.target(proto)
			user := "log-" + proto + "-" + tr
			h := hdrs("X-User", user, "Authorization", auth)
			s := openDX(t, tr, tg, "/live/log?q=1", h)
			tokens, ids = append(tokens, s.Token), append(ids, s.Session)
			sid, tok := s.Session, s.Token
			s.call(t, "a", "/reply", map[string]any{"n": 1})
			c.mustPublish(t, map[string]any{"session": sid, "data": "p1"}, 1)
			s.expectPush(t, "", "p1")
			s.send(t, map[string]any{"type": "ack", "seq": 1})

			// resume: header
			hkDrop(s)
			hkWaitDetached(t, c, sid)
			r := dialDX(t, tr, tg, "/live/log?q=1", hkHeaderWith(h, "Duplex-Resume", tok+":1"))
			hkExpectResumed(t, r, sid, tok)
			r.seq = 1
			r.call(t, "b", "/reply", 2)
			// resume: query parameter
			hkDrop(r)
			hkWaitDetached(t, c, sid)
			r = dialDX(t, tr, tg, "/live/log?q=1&resume="+url.QueryEscape(tok+":1"), h)
			hkExpectResumed(t, r, sid, tok)
			r.seq = 1
			r.call(t, "c", "/reply", 3)
			if tr == "sse" {
				// resume: Last-Event-ID, as EventSource does
				hkDrop(r)
				hkWaitDetached(t, c, sid)
				r = dialDX(t, tr, tg, "/live/log?q=1", hkHeaderWith(h, "Last-Event-ID", tok+":1"))
				hkExpectResumed(t, r, sid, tok)
				r.seq = 1
				r.call(t, "d", "/reply", 4)
			}
			if refusals {
				secRefusedResumes(t, tr, tg, h, tok+":1")
			}
			// end
			reason := "bye"
			if tr == "websocket" {
				reason = "closed by the client"
				r.close()
			} else {
				c.mustPublish(t, map[string]any{"session": sid, "close": "bye"}, 1)
				r.expectClose(t, 4000, "bye", false)
			}
			app.waitGone(t, sid, user, tr, reason)
		}
	}
	c.stop(t)
	logs := c.logs()
	if !strings.Contains(logs, `"level":"debug"`) || !strings.Contains(logs, ids[0]) {
		t.Fatalf("Caddy's output has no debug lines or no session ids: the scan would prove nothing")
	}
	for i, tok := range tokens {
		if tok == ids[i] || strings.Contains(tok, ids[i]) || strings.Contains(ids[i], tok) {
			t.Errorf("session %s: token and id overlap (%s)", ids[i], tok)
		}
		for j, other := range tokens {
			if i != j && tok == other {
				t.Errorf("two sessions share a token")
			}
		}
		if n := strings.Count(logs, tok); n > 0 {
			t.Errorf("token of session %s appears %d times in Caddy's output:\n%s", ids[i], n, strings.Join(linesWith(logs, tok), "\n"))
		}
		for _, r := range app.all() {
			blob := fmt.Sprint(r.Header) + " " + r.Path + "?" + r.Query + " " + string(r.Body)
			if strings.Contains(blob, tok) {
				t.Errorf("token of session %s reached the app in a %s request %s %s?%s", ids[i], r.Kind, r.Method, r.Path, r.Query)
			}
		}
	}
}

// secRefusedResumes tries resumes with a live session's cursor that are
// refused before the session is touched.
func secRefusedResumes(t *testing.T, tr string, tg target, h http.Header, cursor string) {
	t.Helper()
	noAuth := h.Clone()
	noAuth.Del("Authorization")
	q := "/live/log?resume=" + url.QueryEscape(cursor)
	if st, _, _ := hkRefused(t, tr, tg, q, noAuth); st != http.StatusUnauthorized {
		t.Errorf("resume without credentials (cursor in the query): %d, want 401", st)
	}
	if st, _, _ := hkRefused(t, tr, tg, "/live/log", hkHeaderWith(noAuth, "Duplex-Resume", cursor)); st != http.StatusUnauthorized {
		t.Errorf("resume without credentials (Duplex-Resume): %d, want 401", st)
	}
	if st, _, _ := hkRefused(t, tr, tg, "/live/log", hkHeaderWith(h, "Duplex-Resume", cursor, "Origin", "http://evil.example")); st != http.StatusForbidden {
		t.Errorf("cross-origin resume: %d, want 403", st)
	}
	if st, _, _ := hkRefused(t, tr, tg, q, hkHeaderWith(h, "X-Refuse-Resume", "1")); st != http.StatusForbidden {
		t.Errorf("resume refused by the connect hook: %d, want 403", st)
	}
}

// TestSecurityResumeOtherUser: a cursor with the right token presented by
// another user (user {http.request.header.X-User}) opens a new session of
// that user; the owner's session is untouched and still resumable. Also
// when the connect hook runs (and does not name the user itself).
func TestSecurityResumeOtherUser(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(`
	route /plain* {
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
	route /hooked* {
		duplex {
			messages {
				path *
			}
			connect
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	for _, path := range []string{"/plain", "/hooked"} {
		for _, tr := range transports {
			t.Run(strings.TrimPrefix(path, "/")+"/"+tr, func(t *testing.T) {
				t.Parallel()
				owner, thief := "owner"+path+"-"+tr, "thief"+path+"-"+tr
				s := openDX(t, tr, tg, path, hdrs("X-User", owner))
				sid, tok := s.Session, s.Token
				c.mustPublish(t, map[string]any{"session": sid, "data": "mine 1"}, 1)
				s.expectPush(t, "", "mine 1")
				hkDrop(s)
				hkWaitDetached(t, c, sid)
				c.mustPublish(t, map[string]any{"session": sid, "data": "mine 2"}, 1)

				x := dialDX(t, tr, tg, path, hdrs("X-User", thief, "Duplex-Resume", tok+":1"))
				f := x.expectType(t, "open")
				if f["resumed"] != false || f["session"] == sid || f["token"] == tok {
					t.Fatalf("another user presenting the owner's cursor got %v: the owner's session", f)
				}
				x.Session, x.Token = f["session"].(string), f["token"].(string)
				if info := hkSessionInfo(t, c, x.Session); info["user"] != thief {
					t.Errorf("the new session's user is %v, want %q", info["user"], thief)
				}
				if path == "/hooked" {
					for _, r := range app.of("connect", "X-User", thief) {
						if r.Header.Get("Duplex-Session") == sid || r.Header.Get("Duplex-User") == owner {
							t.Errorf("the connect hook was told another user's opening is %s of session %s (user %q)",
								r.Header.Get("Duplex-Connect"), r.Header.Get("Duplex-Session"), r.Header.Get("Duplex-User"))
						}
					}
				}
				c.mustPublish(t, map[string]any{"session": x.Session, "data": "thief's"}, 1)
				x.expectPush(t, "", "thief's") // and not "mine 2" first
				if info := hkSessionInfo(t, c, sid); info["user"] != owner || info["attached"] != false {
					t.Errorf("the owner's session after another user's attempt: %v", info)
				}
				// A forged token of the owner: a new session too.
				y := dialDX(t, tr, tg, path, hdrs("X-User", owner, "Duplex-Resume", sid+":1"))
				if f := y.expectType(t, "open"); f["resumed"] != false || f["session"] == sid {
					t.Errorf("a cursor made of the session id resumed it: %v", f)
				}
				// The owner still resumes and gets what was kept for it.
				o := dialDX(t, tr, tg, path, hdrs("X-User", owner, "Duplex-Resume", tok+":1"))
				hkExpectResumed(t, o, sid, tok)
				o.seq = 1
				o.expectPush(t, "", "mine 2")
			})
		}
	}
}

// TestSecurityResumeOtherUserIdentityFromHook: when the user comes only from
// the connect hook's Duplex-User (no user template: the app authenticates
// the opening itself), another user presenting the owner's cursor still
// gets a new session of their own, and nothing of that opening reaches the
// owner's session: in particular not the pushes of the hook's event stream
// (they belong to the session the opening became).
func TestSecurityResumeOtherUserIdentityFromHook(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(`
	route /ident* {
		duplex {
			messages {
				path *
			}
			connect
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			owner, thief := "owner-"+tr, "thief-"+tr
			s := openDX(t, tr, tg, "/ident", hdrs("X-Want-User", owner, "X-Connect", "accept"))
			sid, tok := s.Session, s.Token
			if info := hkSessionInfo(t, c, sid); info["user"] != owner {
				t.Fatalf("owner's session user %v, want %q (from the connect hook)", info["user"], owner)
			}
			hkDrop(s)
			hkWaitDetached(t, c, sid)

			// The thief has the owner's token; the app (its connect hook)
			// knows the thief and answers with the thief's event stream.
			x := dialDX(t, tr, tg, "/ident", hdrs("X-Want-User", thief, "X-Connect", "ndjson", "Duplex-Resume", tok+":0"))
			f := x.expectType(t, "open")
			if f["resumed"] != false || f["session"] == sid || f["token"] == tok {
				t.Fatalf("another user presenting the owner's cursor got %v: the owner's session", f)
			}
			x.Session, x.Token = f["session"].(string), f["token"].(string)
			if info := hkSessionInfo(t, c, x.Session); info["user"] != thief {
				t.Errorf("the new session's user is %v, want %q", info["user"], thief)
			}
			var feedSid string
			for _, r := range app.of("connect", "X-Want-User", thief) {
				feedSid = r.Header.Get("Duplex-Session")
			}
			// Nothing of it reaches the owner's session: the first push the
			// owner sees on resuming is the next one published to it.
			c.mustPublish(t, map[string]any{"session": sid, "data": "mine"}, 1)
			o := dialDX(t, tr, tg, "/ident", hdrs("X-Want-User", owner, "X-Connect", "accept", "Duplex-Resume", tok+":0"))
			hkExpectResumed(t, o, sid, tok)
			if f := o.readFrame(t); f["type"] != "push" || f["data"] != "mine" {
				t.Errorf("the owner's first push after the thief's attempt is %v, want \"mine\" (the thief's connect request was told session %s)", f, feedSid)
			}
			// The thief's stream goes to the thief's session.
			_, want := hkInitial("ndjson", feedSid)
			for _, w := range want {
				x.expectPush(t, "", w)
			}
			if info := hkSessionInfo(t, c, sid); info["user"] != owner {
				t.Errorf("the owner's session user is now %v", info["user"])
			}
		})
	}
}

// TestSecurityHostileInput: deeply nested JSON, frames over
// max_message_size, invalid UTF-8 and unknown frame types are answered with
// error frames (or the SSE POST's HTTP status) over every transport; the
// session then serves a normal message. WebSocket protocol errors close
// the connection (1002). Caddy never panics (the harness checks).
func TestSecurityHostileInput(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(`
	route /live* {
		duplex {
			messages {
				path *
			}
			max_message_size 256KiB
			rate off
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")

	deepArray := `{"id":"deep","path":"/reply","data":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	deepObject := `{"id":"deepo","data":` + strings.Repeat(`{"a":`, 40000) + "1" + strings.Repeat("}", 40000) + `}`
	cases := []struct {
		name   string
		frame  []byte
		status int  // of the error frame (SSE: of the POST)
		ref    any  // of the error frame, nil: absent; "?" either
		silent bool // no answer (not an error)
		// sseLate: the frame is well-formed, so an SSE POST may take it
		// (202) and the error frame come on the event stream instead.
		sseLate bool
	}{
		{"deeply nested arrays", []byte(deepArray), 400, "?", false, false},
		{"deeply nested objects", []byte(deepObject), 400, "?", false, false},
		{"100000 [", []byte(strings.Repeat("[", 100000)), 400, nil, false, false},
		{"unterminated object", []byte(`{"id":"open","data":` + strings.Repeat(`{"a":[`, 20000)), 400, "?", false, false},
		{"over max_message_size", []byte(`{"id":"huge","data":"` + strings.Repeat("h", 300<<10) + `"}`), 413, nil, false, false},
		{"huge nested over max_message_size", []byte(strings.Repeat("[", 1<<20)), 413, nil, false, false},
		{"invalid UTF-8", []byte("{\"id\":\"utf\",\"data\":\"\xff\xfe\xfd\"}"), 400, "?", false, false},
		{"invalid UTF-8 in a key", []byte("{\"id\":\"utf2\",\"\xc3\x28\":1}"), 400, "?", false, false},
		{"unknown type", []byte(`{"id":"t1","type":"subscribe","data":1}`), 400, "t1", false, false},
		{"server frame type", []byte(`{"id":"t2","type":"open"}`), 400, "t2", false, false},
		{"push type", []byte(`{"id":"t3","type":"push","seq":1}`), 400, "t3", false, false},
		{"type not a string", []byte(`{"id":"t4","type":7}`), 400, "?", false, false},
		{"id an object", []byte(`{"id":{"x":1},"path":"/reply"}`), 400, nil, false, false},
		{"id with a newline", []byte(`{"id":"a\nb","path":"/reply"}`), 400, nil, false, false},
		{"ack with a negative seq", []byte(`{"id":"t5","type":"ack","seq":-1}`), 400, "?", false, false},
		{"null", []byte(`null`), 400, nil, false, false},
		{"number", []byte(`12345`), 400, nil, false, false},
		{"string", []byte(`"hello"`), 400, nil, false, false},
		{"bad path", []byte(`{"id":"p1","path":"no-slash"}`), 400, "p1", false, true},
		{"bad method", []byte(`{"id":"p2","method":"GE T","path":"/reply"}`), 400, "p2", false, true},
		{"CONNECT method", []byte(`{"id":"p3","method":"CONNECT","path":"/reply"}`), 400, "p3", false, true},
		{"ack beyond seq", []byte(`{"type":"ack","seq":18446744073709551615}`), 0, nil, true, false},
	}
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			s := openDX(t, tr, tg, "/live", nil)
			for i, tc := range cases {
				wantFrame := !tc.silent
				if tr == "sse" {
					st, raw, _, err := s.conn.(*sseDuplex).post("application/json", tc.frame)
					if err != nil {
						t.Fatalf("%s: POST: %v", tc.name, err)
					}
					want := tc.status
					if tc.silent || tc.sseLate && st == http.StatusAccepted {
						want = http.StatusAccepted
					}
					if st != want {
						t.Errorf("%s: POST answered %d %.200q, want %d", tc.name, st, raw, want)
					}
					// An error answered on the POST is not also sent on the
					// event stream.
					wantFrame = wantFrame && st == http.StatusAccepted
				} else {
					s.sendRaw(t, tc.frame)
				}
				if wantFrame {
					f := s.readFrame(t)
					if f["type"] != "error" || f["status"] != float64(tc.status) {
						t.Errorf("%s: got %.300v, want an error frame %d", tc.name, f, tc.status)
					}
					if ref, has := f["ref"]; tc.ref == nil && has || tc.ref != nil && tc.ref != "?" && ref != tc.ref {
						t.Errorf("%s: error frame ref %v, want %v", tc.name, ref, tc.ref)
					}
				}
				id := fmt.Sprintf("ok%d", i)
				f := s.call(t, id, "/reply", i)
				if f["type"] != "reply" || !jsonEqual(f["data"], map[string]any{"echo": i, "user": ""}) {
					t.Fatalf("after %s: a normal message got %v", tc.name, f)
				}
			}
			for _, r := range app.all() {
				switch r.Header.Get("Duplex-Message-Id") {
				case "deep", "deepo", "utf", "utf2", "t1", "t2", "t3", "t4", "t5", "p1", "p2", "p3", "huge":
					t.Errorf("a bad frame reached the app: %s %s id %s", r.Method, r.Path, r.Header.Get("Duplex-Message-Id"))
				}
			}
			c.mustPublish(t, map[string]any{"session": s.Session, "data": "fine"}, 1)
			s.expectPush(t, "", "fine")
		})
	}
	t.Run("publish API", func(t *testing.T) {
		for _, body := range []string{
			`{"channel":"x","data":` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`,
			strings.Repeat("[", 100000),
			`{"channel":"x","data":1,"id":` + strings.Repeat("[", 5000) + `}`,
		} {
			st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/publish"), body)
			if st != http.StatusBadRequest {
				t.Errorf("publish of hostile JSON: %d %.200q, want 400", st, raw)
			}
		}
	})
	t.Run("websocket protocol errors", func(t *testing.T) {
		for _, bad := range []struct {
			name  string
			frame func() []byte
		}{
			{"reserved opcode", func() []byte {
				return secRawFrame(t, ws.Header{Fin: true, OpCode: 0x3, Masked: true, Length: 2}, []byte("{}"))
			}},
			{"unmasked frame", func() []byte {
				return secRawFrame(t, ws.Header{Fin: true, OpCode: ws.OpText, Length: 2}, []byte("{}"))
			}},
			{"oversize ping", func() []byte {
				return secRawFrame(t, ws.Header{Fin: true, OpCode: ws.OpPing, Masked: true, Length: 200}, bytes.Repeat([]byte("p"), 200))
			}},
			{"continuation first", func() []byte {
				return secRawFrame(t, ws.Header{Fin: true, OpCode: ws.OpContinuation, Masked: true, Length: 2}, []byte("{}"))
			}},
		} {
			s := openDX(t, "websocket", tg, "/live", nil)
			s.call(t, "before", "/empty", nil)
			wc := s.conn.(*wsDuplex)
			wc.wmu.Lock()
			_, err := wc.w.Write(bad.frame())
			wc.wmu.Unlock()
			if err != nil {
				t.Fatalf("%s: write: %v", bad.name, err)
			}
			ev := s.next(t)
			if ev.wsClose != int(ws.StatusProtocolError) {
				t.Errorf("%s: got %v, want a close frame 1002", bad.name, ev)
			}
			waitEnd := time.After(frameWait)
		drain:
			for {
				select {
				case ev := <-s.conn.frames():
					if ev.end != nil {
						break drain
					}
				case <-waitEnd:
					t.Fatalf("%s: the connection is still open %s after the protocol error", bad.name, frameWait)
				}
			}
		}
		// The server still serves.
		s := openDX(t, "websocket", tg, "/live", nil)
		s.call(t, "after", "/empty", nil)
	})
}

// secRawFrame encodes a WebSocket frame as given (masking the payload if
// the header says so), also frames a well-behaved encoder would refuse.
func secRawFrame(t *testing.T, h ws.Header, payload []byte) []byte {
	t.Helper()
	p := append([]byte(nil), payload...)
	if h.Masked {
		h.Mask = [4]byte{1, 2, 3, 4}
		ws.Cipher(p, h.Mask, 0)
	}
	var buf bytes.Buffer
	if err := ws.WriteHeader(&buf, h); err != nil {
		t.Fatal(err)
	}
	buf.Write(p)
	return buf.Bytes()
}
