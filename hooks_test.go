package duplex_test

// The app's hooks: `connect` (accept, reject, identity,
// channels, open data, timeouts, resume, upstream push streams over h2c
// and HTTP/1.1) and `disconnect` (once per session for every way a session
// ends for good, never on a detach that resumes, retried, never blocking
// teardown). The upstream app (hkApp) is shared with limits_test.go and
// security_test.go.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// The upstream app

// hkReq is one request the app got.
type hkReq struct {
	Kind       string // "connect", "disconnect" or "message"
	Method     string
	Path       string
	Query      string
	ProtoMajor int
	Header     http.Header
	Body       []byte
	Status     int // what the app answered (0 for streams and cut requests)
}

// hkFeed is a connect answer that streams pushes (SSE or NDJSON).
type hkFeed struct {
	sid   string
	kind  string      // "sse" or "ndjson"
	more  chan string // chunks to write to the stream
	end   chan struct{}
	ended chan struct{} // closed when the handler returned
	why   atomic.Value  // "app" (the test ended it) or "client" (request context ended)
	once  sync.Once
}

// hkApp is the upstream behind Caddy for the hook, limit and security
// tests. It tells the connect hook (requests with Duplex-Connect), the
// disconnect hook (POST /gone) and messages apart, records all of them,
// and acts on headers the client set on its opening request (they reach
// the connect hook and every message):
//
//	X-Connect: accept (default) | empty | text | reject | busy | slow | sse | ndjson
//	X-Want-User: <user>        connect answers Duplex-User: <user>
//	X-Want-Channels: <a, b>    connect answers Duplex-Subscribe: <a, b>
//	X-Refuse-Resume: 1         connect answers 403 when Duplex-Connect is resume
//
// Disconnect hooks of users named flaky-* fail (500) twice per session;
// those of users named hang-* never answer.
// Message paths: /reply (JSON echo), /empty (204), /close (Duplex-Close:
// bye), /hold (waits for release()), /echo-headers, anything else 204.
type hkApp struct {
	t     *testing.T
	Addr  string
	srv   *http.Server
	conns atomic.Int64 // TCP connections accepted
	wg    sync.WaitGroup

	mu      sync.Mutex
	reqs    []hkReq
	feeds   map[string]*hkFeed
	gone    map[string]int // disconnect attempts per session
	hold    chan struct{}
	holding atomic.Int64 // /hold requests waiting now
}

// newHookApp starts the app. protocols: "h1" (HTTP/1.1 only), "h2c"
// (prior-knowledge cleartext HTTP/2 only) or "both".
func newHookApp(t *testing.T, protocols string) *hkApp {
	t.Helper()
	a := &hkApp{t: t, feeds: map[string]*hkFeed{}, gone: map[string]int{}, hold: make(chan struct{})}
	var p http.Protocols
	switch protocols {
	case "h1":
		p.SetHTTP1(true)
	case "h2c":
		p.SetUnencryptedHTTP2(true)
	default:
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.Addr = ln.Addr().String()
	a.srv = &http.Server{
		Handler:   http.HandlerFunc(a.serve),
		Protocols: &p,
		ConnState: func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				a.conns.Add(1)
			}
		},
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		a.srv.Serve(ln)
	}()
	t.Cleanup(func() {
		a.release()
		a.mu.Lock()
		for _, f := range a.feeds {
			f.stop()
		}
		a.mu.Unlock()
		a.srv.Close()
		<-served
		done := make(chan struct{})
		go func() { a.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Errorf("the upstream app's handlers did not return within 20s of its close")
		}
	})
	return a
}

func (f *hkFeed) stop() { f.once.Do(func() { close(f.end) }) }

func (a *hkApp) record(r hkReq) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reqs = append(a.reqs, r)
	return len(a.reqs) - 1
}

func (a *hkApp) setStatus(i, status int) {
	a.mu.Lock()
	a.reqs[i].Status = status
	a.mu.Unlock()
}

func (a *hkApp) serve(w http.ResponseWriter, r *http.Request) {
	a.wg.Add(1)
	defer a.wg.Done()
	body, _ := io.ReadAll(r.Body)
	rec := hkReq{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, ProtoMajor: r.ProtoMajor, Header: r.Header.Clone(), Body: body}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/gone":
		rec.Kind = "disconnect"
		a.serveGone(w, r, rec)
	case r.Header.Get("Duplex-Connect") != "":
		rec.Kind = "connect"
		a.serveConnect(w, r, rec)
	default:
		rec.Kind = "message"
		a.serveMessage(w, r, rec)
	}
}

func (a *hkApp) serveGone(w http.ResponseWriter, r *http.Request, rec hkReq) {
	sid, user := r.Header.Get("Duplex-Session"), r.Header.Get("Duplex-User")
	a.mu.Lock()
	a.gone[sid]++
	attempt := a.gone[sid]
	a.mu.Unlock()
	i := a.record(rec)
	switch {
	case strings.HasPrefix(user, "flaky-") && attempt <= 2:
		a.setStatus(i, 500)
		http.Error(w, "not now", http.StatusInternalServerError)
	case strings.HasPrefix(user, "hang-"):
		<-r.Context().Done()
	default:
		a.setStatus(i, 204)
		w.WriteHeader(http.StatusNoContent)
	}
}

func (a *hkApp) serveConnect(w http.ResponseWriter, r *http.Request, rec hkReq) {
	i := a.record(rec)
	status := func(st int) { a.setStatus(i, st) }
	if u := r.Header.Get("X-Want-User"); u != "" {
		w.Header().Set("Duplex-User", u)
	}
	if c := r.Header.Get("X-Want-Channels"); c != "" {
		w.Header().Set("Duplex-Subscribe", c)
	}
	mode := r.Header.Get("X-Connect")
	if r.Header.Get("X-Refuse-Resume") == "1" && r.Header.Get("Duplex-Connect") == "resume" {
		mode = "refuse"
	}
	switch mode {
	case "", "accept":
		status(200)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"welcome": r.Header.Get("X-Want-User"), "connect": r.Header.Get("Duplex-Connect")})
	case "empty":
		status(204)
		w.WriteHeader(http.StatusNoContent)
	case "text":
		status(200)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "hi there")
	case "reject":
		status(401)
		w.Header().Set("WWW-Authenticate", `Bearer realm="duplex"`)
		w.Header().Set("X-App", "said no")
		w.Header().Set("Duplex-Secret", "must not reach the client")
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, "go away")
	case "busy":
		status(503)
		w.Header().Set("Retry-After", "7")
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, `{"error":"busy"}`)
	case "refuse":
		status(403)
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, "resume refused")
	case "slow":
		select {
		case <-r.Context().Done():
			status(499) // cut by Caddy
		case <-time.After(60 * time.Second):
		}
	case "sse", "ndjson":
		a.serveFeed(w, r, mode)
	default:
		status(400)
		http.Error(w, "unknown X-Connect "+mode, http.StatusBadRequest)
	}
}

// hkInitial is what a feed writes as soon as it starts, and the pushes it
// must become (in order).
func hkInitial(kind, sid string) (string, []any) {
	j := func(n int) map[string]any { return map[string]any{"sid": sid, "n": n} }
	if kind == "sse" {
		return ": a comment\n" +
				"retry: 1000\n\n" + // no data: no event
				"event: tick\nid: 1\ndata: " + fmt.Sprintf(`{"sid":%q,"n":1}`, sid) + "\n\n" +
				"data: " + fmt.Sprintf(`{"sid":%q,"n":2}`, sid) + "\n\n" +
				"data: " + fmt.Sprintf(`{"sid":%q,`, sid) + "\ndata: \"n\":3}\n\n" + // two data lines, joined with \n
				"data: plain text " + sid + "\n\n" +
				"data:" + fmt.Sprintf(`{"sid":%q,"n":5}`, sid) + "\r\n\r\n" +
				"data: two\ndata: lines\n\n",
			[]any{j(1), j(2), j(3), "plain text " + sid, j(5), "two\nlines"}
	}
	return fmt.Sprintf(`{"sid":%q,"n":1}`, sid) + "\n" +
			"\n" +
			fmt.Sprintf(`{"sid":%q,"n":2}`, sid) + "\r\n" +
			"plain text " + sid + "\n" +
			fmt.Sprintf(`{"sid":%q,"n":4}`, sid) + "\n",
		[]any{j(1), j(2), "plain text " + sid, j(4)}
}

// hkLive is one more event written while the stream is open, and its push.
func hkLive(kind, sid string, n int) (string, any) {
	line := fmt.Sprintf(`{"sid":%q,"n":%d}`, sid, n)
	if kind == "sse" {
		return "data: " + line + "\n\n", map[string]any{"sid": sid, "n": n}
	}
	return line + "\n", map[string]any{"sid": sid, "n": n}
}

func (a *hkApp) serveFeed(w http.ResponseWriter, r *http.Request, kind string) {
	sid := r.Header.Get("Duplex-Session")
	f := &hkFeed{sid: sid, kind: kind, more: make(chan string), end: make(chan struct{}), ended: make(chan struct{})}
	a.mu.Lock()
	a.feeds[sid] = f
	a.mu.Unlock()
	defer close(f.ended)
	if kind == "sse" {
		w.Header().Set("Content-Type", "text/event-stream")
	} else {
		w.Header().Set("Content-Type", "application/x-ndjson")
	}
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	initial, _ := hkInitial(kind, sid)
	io.WriteString(w, initial)
	rc.Flush()
	for {
		select {
		case chunk := <-f.more:
			io.WriteString(w, chunk)
			rc.Flush()
		case <-f.end:
			f.why.Store("app")
			return
		case <-r.Context().Done():
			f.why.Store("client")
			return
		}
	}
}

// feed returns the feed of session sid.
func (a *hkApp) feed(t *testing.T, sid string) *hkFeed {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	f := a.feeds[sid]
	if f == nil {
		t.Fatalf("the app has no connect stream for session %s", sid)
	}
	return f
}

// write sends a chunk down the feed.
func (f *hkFeed) write(t *testing.T, chunk string) {
	t.Helper()
	select {
	case f.more <- chunk:
	case <-f.ended:
		t.Fatalf("feed of %s: the stream has ended (%v), cannot write %q", f.sid, f.why.Load(), chunk)
	case <-time.After(frameWait):
		t.Fatalf("feed of %s: write not taken within %s", f.sid, frameWait)
	}
}

func (a *hkApp) serveMessage(w http.ResponseWriter, r *http.Request, rec hkReq) {
	i := a.record(rec)
	switch r.URL.Path {
	case "/reply":
		var v any
		if len(rec.Body) > 0 && json.Unmarshal(rec.Body, &v) != nil {
			v = "not json: " + string(rec.Body)
		}
		a.setStatus(i, 200)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"echo": v, "user": r.Header.Get("Duplex-User")})
	case "/close":
		a.setStatus(i, 200)
		w.Header().Set("Duplex-Close", "bye")
		w.WriteHeader(http.StatusNoContent)
	case "/hold":
		a.holding.Add(1)
		a.mu.Lock()
		hold := a.hold
		a.mu.Unlock()
		select {
		case <-hold:
		case <-r.Context().Done():
		}
		a.holding.Add(-1)
		a.setStatus(i, 204)
		w.WriteHeader(http.StatusNoContent)
	case "/echo-headers":
		a.setStatus(i, 200)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(r.Header)
	default:
		a.setStatus(i, 204)
		w.WriteHeader(http.StatusNoContent)
	}
}

// release lets every /hold request (now and later) finish.
func (a *hkApp) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	select {
	case <-a.hold:
	default:
		close(a.hold)
	}
}

func (a *hkApp) all() []hkReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]hkReq(nil), a.reqs...)
}

// of returns the requests of a kind whose header name has value v ("" for
// any).
func (a *hkApp) of(kind, name, v string) []hkReq {
	var out []hkReq
	for _, r := range a.all() {
		if r.Kind == kind && (name == "" || r.Header.Get(name) == v) {
			out = append(out, r)
		}
	}
	return out
}

// connects returns the connect hook requests for session sid.
func (a *hkApp) connects(sid string) []hkReq { return a.of("connect", "Duplex-Session", sid) }

// goneOf returns the disconnect hook attempts for session sid.
func (a *hkApp) goneOf(sid string) []hkReq { return a.of("disconnect", "Duplex-Session", sid) }

// waitGone waits for a successful disconnect hook call for sid and checks
// it: POST /gone, Duplex-Session, Duplex-User, Duplex-Transport, body
// {"reason": reason}.
func (a *hkApp) waitGone(t *testing.T, sid, user, transport, reason string) hkReq {
	t.Helper()
	var ok hkReq
	waitUntil(t, "the disconnect hook of "+sid+" ("+reason+")", 30*time.Second, func() bool {
		for _, r := range a.goneOf(sid) {
			if r.Status == 204 {
				ok = r
				return true
			}
		}
		return false
	})
	hkCheckGone(t, ok, sid, user, transport, reason)
	return ok
}

func hkCheckGone(t *testing.T, r hkReq, sid, user, transport, reason string) {
	t.Helper()
	if r.Method != http.MethodPost || r.Path != "/gone" {
		t.Errorf("disconnect hook of %s: %s %s, want POST /gone", sid, r.Method, r.Path)
	}
	if v := r.Header.Values("Duplex-Session"); len(v) != 1 || v[0] != sid {
		t.Errorf("disconnect hook of %s: Duplex-Session %q", sid, v)
	}
	if v := r.Header.Values("Duplex-User"); user != "" && (len(v) != 1 || v[0] != user) {
		t.Errorf("disconnect hook of %s: Duplex-User %q, want [%q]", sid, v, user)
	}
	if transport != "" && r.Header.Get("Duplex-Transport") != transport {
		t.Errorf("disconnect hook of %s: Duplex-Transport %q, want %q", sid, r.Header.Get("Duplex-Transport"), transport)
	}
	if mediaTypeOf(r.Header.Get("Content-Type")) != "application/json" {
		t.Errorf("disconnect hook of %s: Content-Type %q, want application/json", sid, r.Header.Get("Content-Type"))
	}
	var body map[string]any
	if err := json.Unmarshal(r.Body, &body); err != nil || len(body) != 1 || body["reason"] != reason {
		t.Errorf("disconnect hook of %s: body %s, want {\"reason\":%q}", sid, r.Body, reason)
	}
}

// ---------------------------------------------------------------------------
// Client helpers

// hkDrop ends a client connection without a WebSocket close frame (the
// session detaches and may be resumed).
func hkDrop(s *dxSession) {
	if c, ok := s.conn.(*wsDuplex); ok {
		c.shutdown(c.closer)
		return
	}
	s.close()
}

// hkExpectResumed reads the open frame of a resume of s's session.
func hkExpectResumed(t *testing.T, s *dxSession, session, token string) map[string]any {
	t.Helper()
	f := s.expectType(t, "open")
	if f["resumed"] != true || f["session"] != session || f["token"] != token {
		t.Fatalf("%s: open frame %v, want a resume of session %s", s.name, f, session)
	}
	s.Session, s.Token, s.open = session, token, f
	return f
}

// hkWaitDetached waits until the sessions API shows sid detached.
func hkWaitDetached(t *testing.T, c *caddyProc, sid string) {
	t.Helper()
	waitUntil(t, "session "+sid+" detached", 30*time.Second, func() bool {
		st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+sid), nil)
		if st != http.StatusOK {
			t.Fatalf("GET /duplex/sessions/%s: %d %s (want the detached session)", sid, st, raw)
		}
		m, _ := decode(t, raw).(map[string]any)
		return m["attached"] == false
	})
}

// hkSessionInfo is GET /duplex/sessions/<id>.
func hkSessionInfo(t *testing.T, c *caddyProc, sid string) map[string]any {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+sid), nil)
	if st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions/%s: %d %s", sid, st, raw)
	}
	m, ok := decode(t, raw).(map[string]any)
	if !ok {
		t.Fatalf("session info is not an object: %s", raw)
	}
	return m
}

// hkRefused opens a session expecting a refusal and returns the status,
// headers and body the client got. A WebSocket over HTTP/1.1 is refused
// before the upgrade: the handshake is tried with gobwas/ws (which must
// report the status) and again as a plain HTTP request to read the
// headers and body.
func hkRefused(t *testing.T, transport string, tg target, path string, hdr http.Header) (int, http.Header, string) {
	t.Helper()
	switch transport {
	case "websocket":
		if tg.proto == "h1" {
			rc, status, err := dialConn(tg, "websocket", path, hdr, connOpts{})
			if err == nil {
				rc.cut()
				t.Fatalf("websocket %s: upgraded, want a refusal", path)
			}
			if status == 0 {
				t.Fatalf("websocket %s: %v, want an HTTP status (ws.StatusError)", path, err)
			}
			// Again as plain HTTP, for the headers and body.
			key := make([]byte, 16)
			rand.Read(key)
			req, _ := http.NewRequest(http.MethodGet, tg.url(path), nil)
			for k, v := range hdr {
				req.Header[k] = v
			}
			req.Header.Set("Connection", "Upgrade")
			req.Header.Set("Upgrade", "websocket")
			req.Header.Set("Sec-WebSocket-Version", "13")
			req.Header.Set("Sec-WebSocket-Key", base64.StdEncoding.EncodeToString(key))
			resp, err := tg.httpClient(t).Do(req)
			if err != nil {
				t.Fatalf("websocket %s as plain HTTP: %v", path, err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != status {
				t.Errorf("websocket %s: gobwas saw status %d, plain HTTP %d", path, status, resp.StatusCode)
			}
			return resp.StatusCode, resp.Header, string(b)
		}
		rc, status, err := dialConn(tg, "websocket", path, hdr, connOpts{})
		if err == nil {
			rc.cut()
			t.Fatalf("websocket %s %s: opened, want a refusal", tg.proto, path)
		}
		if status == 0 {
			t.Fatalf("websocket %s %s: %v, want an HTTP status", tg.proto, path, err)
		}
		// dialConn keeps the body only in the error text.
		return status, nil, err.Error()
	case "stream":
		resp, pw, cancel, err := startStream(tg.httpClient(t), tg.url(path), hdr)
		if err != nil {
			t.Fatalf("stream %s %s: %v", tg.proto, path, err)
		}
		defer func() { pw.Close(); cancel() }()
		return hkRefusalBody(t, "stream "+tg.proto+" "+path, resp, cancel)
	default:
		resp, cancel, err := startSSE(tg.httpClient(t), tg.url(path), hdr)
		if err != nil {
			t.Fatalf("sse %s %s: %v", tg.proto, path, err)
		}
		defer cancel()
		return hkRefusalBody(t, "sse "+tg.proto+" "+path, resp, cancel)
	}
}

// hkRefusalBody reads a refused opening's answer. An opening that was not
// refused (200: a session stream) fails the test at once.
func hkRefusalBody(t *testing.T, what string, resp *http.Response, cancel func()) (int, http.Header, string) {
	t.Helper()
	if resp.StatusCode == http.StatusOK {
		resp.Body.Close()
		t.Fatalf("%s: opened (200), want a refusal", what)
	}
	timer := time.AfterFunc(frameWait, cancel) // a body that never ends
	defer timer.Stop()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	if err != nil {
		t.Fatalf("%s: reading the refusal's body: %v", what, err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

// hkHeaderWith returns hdr plus kv.
func hkHeaderWith(hdr http.Header, kv ...string) http.Header {
	h := hdr.Clone()
	if h == nil {
		h = http.Header{}
	}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Set(kv[i], kv[i+1])
	}
	return h
}

// ---------------------------------------------------------------------------
// connect

const hkConnectRoutes = `
	route /live* {
		duplex {
			messages {
				path *
			}
			connect
			user {http.request.header.X-User}
			channels base
			heartbeat 5s
		}
		reverse_proxy {{.Upstream}}
	}
	route /slow* {
		duplex {
			messages {
				path *
			}
			connect
			user {http.request.header.X-User}
			message_timeout 1s
		}
		reverse_proxy {{.Upstream}}
	}
`

// TestConnectHook: over every transport and protocol, the connect hook
// sees the opening request (method and path unchanged, no upgrade headers,
// Duplex-Connect: open), its 2xx answer sets user, channels and the open
// frame's data, and any other answer refuses the opening with the app's
// status, headers and body before anything is upgraded.
func TestConnectHook(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(hkConnectRoutes, "Upstream", app.Addr), "", xconnectEnv)
	c := e.c
	for _, proto := range protos {
		for _, tr := range transports {
			t.Run(proto+"/"+tr, func(t *testing.T) {
				t.Parallel()
				tg := e.target(proto)
				tag := proto + "-" + tr

				// Accepted: identity from Duplex-User, channels from
				// Duplex-Subscribe, data from the JSON body.
				user := "hook-" + tag
				s := openDX(t, tr, tg, "/live/hook?x=1", hdrs("X-User", "templ-"+tag, "X-Want-User", user,
					"X-Want-Channels", "chA-"+tag+", chB-"+tag, "X-Connect", "accept"))
				if !jsonEqual(s.open["data"], map[string]any{"welcome": user, "connect": "open"}) {
					t.Errorf("open frame data = %v, want the connect answer's JSON body", s.open["data"])
				}
				cr := app.connects(s.Session)
				if len(cr) != 1 {
					t.Fatalf("app got %d connect requests for %s, want 1", len(cr), s.Session)
				}
				hkCheckConnectRequest(t, cr[0], tr, "/live/hook", "x=1", "open", "templ-"+tag)

				info := hkSessionInfo(t, c, s.Session)
				if info["user"] != user {
					t.Errorf("session user = %v, want %q (Duplex-User of the connect answer)", info["user"], user)
				}
				if got := stringSet(info["channels"]); !got["chA-"+tag] || !got["chB-"+tag] || !got["base"] || len(got) != 3 {
					t.Errorf("session channels = %v, want base, chA-%s, chB-%s", info["channels"], tag, tag)
				}
				c.mustPublish(t, map[string]any{"user": user, "data": "to user"}, 1)
				s.expectPush(t, "", "to user")
				c.mustPublish(t, map[string]any{"channel": "chB-" + tag, "data": "to channel"}, 1)
				s.expectPush(t, "chB-"+tag, "to channel")
				c.mustPublish(t, map[string]any{"user": "templ-" + tag, "data": "nobody"}, 0)
				f := s.call(t, "m1", "/reply", "hi")
				if f["type"] != "reply" || !jsonEqual(f["data"], map[string]any{"echo": "hi", "user": user}) {
					t.Errorf("message: %v, want a reply with the hook's user", f)
				}
				if n := len(app.connects(s.Session)); n != 1 {
					t.Errorf("app got %d connect requests for one opening and a message, want 1", n)
				}

				// 2xx without a body: no data; text body: a string.
				s2 := openDX(t, tr, tg, "/live/empty", hdrs("X-User", "e-"+tag, "X-Connect", "empty"))
				if d, has := s2.open["data"]; has {
					t.Errorf("connect answered 204: open frame has data %v", d)
				}
				if info := hkSessionInfo(t, c, s2.Session); info["user"] != "e-"+tag {
					t.Errorf("without Duplex-User the template's user stays: got %v", info["user"])
				}
				s3 := openDX(t, tr, tg, "/live/text", hdrs("X-Connect", "text"))
				if s3.open["data"] != "hi there" {
					t.Errorf("connect answered text: open frame data %v, want \"hi there\"", s3.open["data"])
				}

				// Refused: the app's status, headers and body.
				before := len(sessionsOfUser(t, c, "nobody-"+tag))
				st, h, body := hkRefused(t, tr, tg, "/live/no", hdrs("X-Connect", "reject", "X-User", "nobody-"+tag))
				if st != http.StatusUnauthorized {
					t.Errorf("connect answered 401: the opening got %d, want 401", st)
				}
				if h != nil {
					if h.Get("WWW-Authenticate") != `Bearer realm="duplex"` || h.Get("X-App") != "said no" {
						t.Errorf("refusal headers %v, want the app's WWW-Authenticate and X-App", h)
					}
					if v := h.Values("Duplex-Secret"); len(v) != 0 {
						t.Errorf("the app's Duplex-* header reached the client: %q", v)
					}
					if strings.TrimSpace(body) != "go away" {
						t.Errorf("refusal body %q, want the app's \"go away\"", body)
					}
					if mediaTypeOf(h.Get("Content-Type")) == "text/event-stream" || mediaTypeOf(h.Get("Content-Type")) == "application/x-ndjson" {
						t.Errorf("refusal came as a session stream: Content-Type %q", h.Get("Content-Type"))
					}
				} else if !strings.Contains(body, "go away") {
					t.Errorf("refusal body (in %q), want the app's \"go away\"", body)
				}
				st, h, body = hkRefused(t, tr, tg, "/live/busy", hdrs("X-Connect", "busy", "X-User", "nobody-"+tag))
				if st != http.StatusServiceUnavailable {
					t.Errorf("connect answered 503: the opening got %d", st)
				}
				if h != nil && (h.Get("Retry-After") != "7" || strings.TrimSpace(body) != `{"error":"busy"}`) {
					t.Errorf("503 refusal: Retry-After %q body %q, want the app's 7 and {\"error\":\"busy\"}", h.Get("Retry-After"), body)
				}
				if n := len(sessionsOfUser(t, c, "nobody-"+tag)); n != before {
					t.Errorf("refused openings left %d sessions of their user", n-before)
				}

				// A slow hook is cut at message_timeout: 504.
				st, _, _ = hkRefused(t, tr, tg, "/slow/x", hdrs("X-Connect", "slow", "X-User", "slow-"+tag))
				if st != http.StatusGatewayTimeout {
					t.Errorf("connect hook that never answers: the opening got %d, want 504", st)
				}
				if n := len(sessionsOfUser(t, c, "slow-"+tag)); n != 0 {
					t.Errorf("a timed-out opening left %d sessions", n)
				}
				waitUntil(t, "the timed-out connect request to be cut", frameWait, func() bool {
					rs := app.of("connect", "X-User", "slow-"+tag)
					for _, r := range rs {
						if r.Status != 499 {
							return false
						}
					}
					return len(rs) > 0
				})
			})
		}
	}
}

// hkCheckConnectRequest checks what the app saw of an opening.
func hkCheckConnectRequest(t *testing.T, r hkReq, transport, path, query, connect, user string) {
	t.Helper()
	wantMethod := http.MethodGet
	if transport == "stream" {
		wantMethod = http.MethodPost
	}
	if r.Method != wantMethod || r.Path != path || r.Query != query {
		t.Errorf("connect request %s %s?%s, want %s %s?%s (the opening's method and path)", r.Method, r.Path, r.Query, wantMethod, path, query)
	}
	want := map[string]string{"Duplex-Connect": connect, "Duplex-Transport": transport}
	if user != "" {
		want["Duplex-User"] = user
	}
	for k, v := range want {
		if got := r.Header.Values(k); len(got) != 1 || got[0] != v {
			t.Errorf("connect request %s = %q, want [%q]", k, got, v)
		}
	}
	if r.Header.Get("Duplex-Session") == "" {
		t.Errorf("connect request without Duplex-Session")
	}
	for k := range r.Header {
		lk := strings.ToLower(k)
		if lk == "upgrade" || strings.HasPrefix(lk, "sec-websocket-") || lk == ":protocol" || lk == "duplex-resume" || lk == "duplex-token" || lk == "last-event-id" {
			t.Errorf("connect request carries %s: %q", k, r.Header.Values(k))
		}
		if lk == "connection" {
			for _, v := range r.Header.Values(k) {
				if strings.Contains(strings.ToLower(v), "upgrade") {
					t.Errorf("connect request carries Connection: %q", v)
				}
			}
		}
	}
	if len(r.Body) != 0 {
		t.Errorf("connect request has a body %q, want none", r.Body)
	}
}

// TestConnectHookOnResume: the hook runs again when a session is resumed
// (Duplex-Connect: resume, the same Duplex-Session, the session's user,
// never the token), and its refusal refuses the resume while the session
// stays resumable.
func TestConnectHookOnResume(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(hkConnectRoutes, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			user := "res-" + tr
			s := openDX(t, tr, tg, "/live/r?k=v", hdrs("X-User", user))
			sid, tok := s.Session, s.Token
			c.mustPublish(t, map[string]any{"session": sid, "data": 1}, 1)
			s.expectPush(t, "", 1)
			hkDrop(s)
			hkWaitDetached(t, c, sid)
			c.mustPublish(t, map[string]any{"session": sid, "data": 2}, 1)

			// The app refuses the resume: its status, and the session is
			// still there (detached).
			cursor := tok + ":1"
			st, _, body := hkRefused(t, tr, tg, "/live/r?k=v&resume="+cursor, hdrs("X-User", user, "X-Refuse-Resume", "1"))
			if st != http.StatusForbidden || !strings.Contains(body, "resume refused") {
				t.Errorf("connect refused the resume: client got %d %q, want 403 \"resume refused\"", st, body)
			}
			if info := hkSessionInfo(t, c, sid); info["attached"] != false {
				t.Errorf("after a refused resume the session is %v, want it detached", info)
			}

			// Accepted: resumed, the push after the cursor, then live.
			r := dialDX(t, tr, tg, "/live/r?k=v", hdrs("X-User", user, "Duplex-Resume", cursor))
			f := hkExpectResumed(t, r, sid, tok)
			if !jsonEqual(f["data"], map[string]any{"welcome": "", "connect": "resume"}) {
				t.Errorf("resumed open frame data %v, want the resume's connect answer", f["data"])
			}
			r.seq = 1
			r.expectPush(t, "", 2)
			c.mustPublish(t, map[string]any{"session": sid, "data": 3}, 1)
			r.expectPush(t, "", 3)

			// open, the refused resume (tried twice for an HTTP/1.1
			// WebSocket: see hkRefused), the resume
			cr := app.connects(sid)
			wantN := 3
			if tr == "websocket" {
				wantN = 4
			}
			if len(cr) != wantN {
				t.Fatalf("app got %d connect requests for %s, want %d (open, refused resume, resume)", len(cr), sid, wantN)
			}
			hkCheckConnectRequest(t, cr[0], tr, "/live/r", "k=v", "open", user)
			for _, x := range cr[1:] {
				hkCheckConnectRequest(t, x, tr, "/live/r", "k=v", "resume", user)
			}
			for _, x := range cr {
				if strings.Contains(fmt.Sprint(x.Header, x.Query), tok) {
					t.Errorf("the token reached the app's connect hook: %v ?%s", x.Header, x.Query)
				}
			}
			r.call(t, "after", "/empty", nil)
		})
	}
}

// ---------------------------------------------------------------------------
// upstream push streams

// TestConnectStream: a connect answer that is an event stream (SSE or
// NDJSON) and stays open is relayed as pushes to its session, in order,
// until either side ends; its end does not end the session. Through
// reverse_proxy to an h2c upstream, 20 sessions share one connection;
// over HTTP/1.1 each stream has its own.
func TestConnectStream(t *testing.T) {
	t.Parallel()
	h2app := newHookApp(t, "h2c")
	h1app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(`
	route /h2c* {
		duplex {
			messages {
				path *
			}
			connect
			user {http.request.header.X-User}
		}
		reverse_proxy h2c://{{.H2C}}
	}
	route /h1* {
		duplex {
			messages {
				path *
			}
			connect
			user {http.request.header.X-User}
		}
		reverse_proxy {{.H1}}
	}
`, "H2C", h2app.Addr, "H1", h1app.Addr), "")
	c := e.c
	tg := e.target("h1")

	type feedSession struct {
		s    *dxSession
		kind string
		user string
		app  *hkApp
	}
	open := func(app *hkApp, prefix string, n int) []*feedSession {
		var out []*feedSession
		for i := 0; i < n; i++ {
			kind := []string{"sse", "ndjson"}[i%2]
			tr := transports[i%3]
			user := fmt.Sprintf("%s-%d", prefix, i)
			s := openDX(t, tr, tg, "/"+prefix+"/feed", hdrs("X-User", user, "X-Connect", kind))
			out = append(out, &feedSession{s: s, kind: kind, user: user, app: app})
		}
		return out
	}
	h2 := open(h2app, "h2c", 20)
	h1 := open(h1app, "h1", 4)
	all := append(append([]*feedSession(nil), h2...), h1...)

	// Every session gets its own stream's events, in order, from seq 1.
	for _, fs := range all {
		_, want := hkInitial(fs.kind, fs.s.Session)
		for _, w := range want {
			fs.s.expectPush(t, "", w)
		}
	}
	// Live events, one of them split over two writes.
	for i, fs := range all {
		f := fs.app.feed(t, fs.s.Session)
		chunk, want := hkLive(fs.kind, fs.s.Session, 100+i)
		f.write(t, chunk[:7])
		f.write(t, chunk[7:])
		fs.s.expectPush(t, "", want)
	}
	// Publishes interleave with the stream in one seq.
	for _, fs := range all {
		c.mustPublish(t, map[string]any{"session": fs.s.Session, "data": "published"}, 1)
		fs.s.expectPush(t, "", "published")
	}

	for _, r := range h2app.of("connect", "", "") {
		if r.ProtoMajor != 2 {
			t.Errorf("the h2c upstream got a connect request over HTTP/%d", r.ProtoMajor)
		}
	}
	if n := h2app.conns.Load(); n < 1 || n > 2 {
		t.Errorf("the h2c upstream accepted %d connections for %d concurrent streams, want them multiplexed on 1 (at most 2)", n, len(h2))
	} else {
		t.Logf("h2c upstream: %d connection(s) for %d streams", n, len(h2))
	}
	if n := h1app.conns.Load(); n < int64(len(h1)) {
		t.Errorf("the HTTP/1.1 upstream accepted %d connections for %d open streams", n, len(h1))
	}

	// Half the streams are ended by the app: their sessions go on.
	for i, fs := range all {
		if i%2 != 0 {
			continue
		}
		f := fs.app.feed(t, fs.s.Session)
		f.stop()
		<-f.ended
		id := fmt.Sprintf("after-%d", i)
		r := fs.s.call(t, id, "/reply", i)
		if r["type"] != "reply" || !jsonEqual(r["data"], map[string]any{"echo": i, "user": fs.user}) {
			t.Errorf("%s: after its stream ended, a message got %v", fs.s.name, r)
		}
		c.mustPublish(t, map[string]any{"session": fs.s.Session, "data": "still alive"}, 1)
		fs.s.expectPush(t, "", "still alive")
		if info := hkSessionInfo(t, c, fs.s.Session); info["attached"] != true {
			t.Errorf("%s: after its stream ended the session is %v", fs.s.name, info)
		}
	}
	// The other half end on the session's side: the upstream request ends.
	for i, fs := range all {
		if i%2 == 0 {
			continue
		}
		f := fs.app.feed(t, fs.s.Session)
		c.mustPublish(t, map[string]any{"session": fs.s.Session, "close": "done"}, 1)
		fs.s.expectClose(t, 4000, "done", false)
		select {
		case <-f.ended:
			if f.why.Load() != "client" {
				t.Errorf("%s: the stream ended by %v, want by the session's end", fs.s.name, f.why.Load())
			}
		case <-time.After(frameWait):
			t.Errorf("%s: the session ended but its connect stream is still open after %s", fs.s.name, frameWait)
		}
	}
	// Nothing else arrived on the live sessions.
	for i, fs := range all {
		if i%2 == 0 {
			c.mustPublish(t, map[string]any{"session": fs.s.Session, "data": "marker"}, 1)
			fs.s.expectPush(t, "", "marker")
		}
	}
}

// ---------------------------------------------------------------------------
// disconnect

// TestDisconnectHook: the hook is POSTed exactly once per session, for
// every way a session ends for good, with Duplex-Session, Duplex-User,
// Duplex-Transport and {"reason":…}; never for a detach that resumes in
// time; retried while the app fails; and at `caddy stop` for the sessions
// still open. Exactly-once is checked after Caddy has exited (its
// Cleanup waits for hooks under way).
func TestDisconnectHook(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	e := startDuplexEnv(t, sub(`
	route /long* {
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
			disconnect /gone
			resume_window 1m
		}
		reverse_proxy {{.Upstream}}
	}
	route /short* {
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
			disconnect /gone
			resume_window 1s
		}
		reverse_proxy {{.Upstream}}
	}
	route /slow* {
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
			disconnect /gone
			resume_window 1s
			send_queue 64KiB
			heartbeat 3s
		}
		reverse_proxy {{.Upstream}}
	}
	route /aged* {
		duplex {
			messages {
				path *
			}
			auth {
				header Authorization "Bearer *"
			}
			connect
			user {http.request.header.X-User}
			disconnect /gone
			max_age 2s
			resume_window 1m
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	c := e.c
	tg := e.target("h1")

	// want: session → expected reason, user, transport
	type end struct{ user, transport, reason string }
	want := map[string]end{}
	var wmu sync.Mutex
	expect := func(sid, user, transport, reason string) {
		wmu.Lock()
		want[sid] = end{user, transport, reason}
		wmu.Unlock()
	}
	// Sessions left open for the shutdown.
	var shutdown []*dxSession

	t.Run("client close", func(t *testing.T) {
		s := openDX(t, "websocket", tg, "/long", hdrs("X-User", "u-close"))
		s.call(t, "x", "/empty", nil)
		s.close() // a WebSocket close frame from the client
		expect(s.Session, "u-close", "websocket", "closed by the client")
		app.waitGone(t, s.Session, "u-close", "websocket", "closed by the client")
	})

	t.Run("resume window expired", func(t *testing.T) {
		for _, tr := range transports {
			user := "u-expire-" + tr
			s := openDX(t, tr, tg, "/short", hdrs("X-User", user))
			hkDrop(s)
			expect(s.Session, user, tr, "resume window expired")
			app.waitGone(t, s.Session, user, tr, "resume window expired")
			if sessionExists(t, c, s.Session) {
				t.Errorf("%s: the disconnect hook ran but the session is still listed", s.name)
			}
		}
	})

	t.Run("kicked", func(t *testing.T) {
		a := openDX(t, "websocket", tg, "/long", hdrs("X-User", "u-kick-session"))
		c.mustPublish(t, map[string]any{"session": a.Session, "close": "kicked"}, 1)
		a.expectClose(t, 4000, "kicked", false)
		expect(a.Session, "u-kick-session", "websocket", "kicked")

		b := openDX(t, "sse", tg, "/long", hdrs("X-User", "u-kick-user"))
		c.mustPublish(t, map[string]any{"user": "u-kick-user", "close": "banned"}, 1)
		b.expectClose(t, 4000, "banned", false)
		expect(b.Session, "u-kick-user", "sse", "banned")

		d := openDX(t, "stream", tg, "/long", hdrs("X-User", "u-delete"))
		if st, raw := doJSON(t, http.MethodDelete, c.adminURL("/duplex/sessions/"+d.Session), nil); st != http.StatusNoContent {
			t.Fatalf("DELETE session: %d %s", st, raw)
		}
		d.expectClose(t, 4000, "deleted", false)
		expect(d.Session, "u-delete", "stream", "deleted")

		x := openDX(t, "websocket", tg, "/long", hdrs("X-User", "u-app-close"))
		x.call(t, "bye", "/close", nil)
		x.expectClose(t, 4000, "bye", false)
		expect(x.Session, "u-app-close", "websocket", "bye")

		app.waitGone(t, a.Session, "u-kick-session", "websocket", "kicked")
		app.waitGone(t, b.Session, "u-kick-user", "sse", "banned")
		app.waitGone(t, d.Session, "u-delete", "stream", "deleted")
		app.waitGone(t, x.Session, "u-app-close", "websocket", "bye")
	})

	t.Run("slow consumer not resumed", func(t *testing.T) {
		sid := hkStalledSession(t, c, "/slow", "u-slow")
		expect(sid, "u-slow", "websocket", "resume window expired")
		app.waitGone(t, sid, "u-slow", "websocket", "resume window expired")
	})

	t.Run("resumed in time", func(t *testing.T) {
		for i, tr := range transports {
			user := "u-resume-" + tr
			s := openDX(t, tr, tg, "/long", hdrs("X-User", user))
			sid, tok := s.Session, s.Token
			hkDrop(s)
			hkWaitDetached(t, c, sid)
			// resume over another transport
			rt := transports[(i+1)%3]
			r := dialDX(t, rt, tg, "/long", hdrs("X-User", user, "Duplex-Resume", tok+":0"))
			hkExpectResumed(t, r, sid, tok)
			r.call(t, "r", "/empty", nil)
			if n := len(app.goneOf(sid)); n != 0 {
				t.Errorf("%s: the disconnect hook ran %d times for a session that resumed", s.name, n)
			}
			// ends later, for good
			c.mustPublish(t, map[string]any{"session": sid, "close": "later"}, 1)
			r.expectClose(t, 4000, "later", false)
			expect(sid, user, rt, "later")
			app.waitGone(t, sid, user, rt, "later")
		}
	})

	t.Run("max_age", func(t *testing.T) {
		auth := "Bearer ok"
		s := openDX(t, "websocket", tg, "/aged", hdrs("X-User", "u-aged", "Authorization", auth))
		sid, tok := s.Session, s.Token
		s.expectClose(t, 4003, "", true)
		c.mustPublish(t, map[string]any{"session": sid, "data": "while away"}, 1)
		// Resuming passes the auth matchers again...
		if st, _, _ := hkRefused(t, "websocket", tg, "/aged", hdrs("X-User", "u-aged", "Duplex-Resume", tok+":0")); st != http.StatusUnauthorized {
			t.Errorf("resume after max_age without credentials: %d, want 401", st)
		}
		// ...and the connect hook.
		r := dialDX(t, "stream", tg, "/aged", hdrs("X-User", "u-aged", "Authorization", auth, "Duplex-Resume", tok+":0"))
		hkExpectResumed(t, r, sid, tok)
		r.expectPush(t, "", "while away")
		cr := app.connects(sid)
		if len(cr) != 2 || cr[0].Header.Get("Duplex-Connect") != "open" || cr[1].Header.Get("Duplex-Connect") != "resume" {
			var kinds []string
			for _, x := range cr {
				kinds = append(kinds, x.Header.Get("Duplex-Connect"))
			}
			t.Errorf("connect hook calls for the session: %v, want [open resume]", kinds)
		}
		// max_age applies to the new connection too; the session stays.
		r.expectClose(t, 4003, "", true)
		if n := len(app.goneOf(sid)); n != 0 {
			t.Errorf("max_age closes ran the disconnect hook %d times; the session is still resumable", n)
		}
		hkWaitDetached(t, c, sid)
		if st, raw := doJSON(t, http.MethodDelete, c.adminURL("/duplex/sessions/"+sid), nil); st != http.StatusNoContent {
			t.Fatalf("DELETE: %d %s", st, raw)
		}
		expect(sid, "u-aged", "stream", "deleted")
		app.waitGone(t, sid, "u-aged", "stream", "deleted")
	})

	t.Run("retried while the app fails", func(t *testing.T) {
		s := openDX(t, "websocket", tg, "/long", hdrs("X-User", "flaky-1"))
		s.close()
		expect(s.Session, "flaky-1", "websocket", "closed by the client")
		ok := app.waitGone(t, s.Session, "flaky-1", "websocket", "closed by the client")
		attempts := app.goneOf(s.Session)
		if len(attempts) != 3 || attempts[0].Status != 500 || attempts[1].Status != 500 || attempts[2].Status != 204 {
			var sts []int
			for _, a := range attempts {
				sts = append(sts, a.Status)
			}
			t.Errorf("disconnect attempts answered %v, want [500 500 204]", sts)
		}
		for _, a := range attempts {
			if !bytes.Equal(a.Body, ok.Body) {
				t.Errorf("a retry has another body: %s vs %s", a.Body, ok.Body)
			}
		}
	})

	for _, tr := range transports {
		user := "u-shutdown-" + tr
		s := openDX(t, tr, tg, "/long", hdrs("X-User", user))
		expect(s.Session, user, tr, "shutdown")
		shutdown = append(shutdown, s)
	}
	// A detached session also ends at shutdown.
	det := openDX(t, "websocket", tg, "/long", hdrs("X-User", "u-shutdown-detached"))
	hkDrop(det)
	hkWaitDetached(t, c, det.Session)
	expect(det.Session, "u-shutdown-detached", "websocket", "shutdown")

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, caddyBin, "stop", "--address", fmt.Sprintf("127.0.0.1:%d", c.Admin)).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	for _, s := range shutdown {
		s.expectClose(t, 4012, "shutdown", true)
	}
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("caddy still running 30s after `caddy stop`")
	}

	// Caddy has exited: every hook it was going to send has been sent.
	got := map[string][]hkReq{}
	for _, r := range app.of("disconnect", "", "") {
		sid := r.Header.Get("Duplex-Session")
		if r.Status == 204 {
			got[sid] = append(got[sid], r)
		}
	}
	for sid, w := range want {
		rs := got[sid]
		if len(rs) != 1 {
			t.Errorf("session %s (%s, %s): %d successful disconnect hook calls, want exactly 1", sid, w.user, w.reason, len(rs))
			continue
		}
		hkCheckGone(t, rs[0], sid, w.user, w.transport, w.reason)
	}
	for sid := range got {
		if _, ok := want[sid]; !ok {
			t.Errorf("disconnect hook for an unexpected session %s: %v", sid, got[sid])
		}
	}
}

// hkStalledSession opens a WebSocket session whose client reads its open
// frame and then nothing, and publishes to it until Caddy gives up on the
// connection (slow consumer): the session is then detached. It returns the
// session id.
func hkStalledSession(t *testing.T, c *caddyProc, path, user string) string {
	t.Helper()
	tg, p := wsTarget(t, c.wsURL(path))
	rc, status, err := dialConn(tg, "websocket", p, hdrs("X-User", user), connOpts{stall: true, stallAfter: 1,
		dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var nd net.Dialer
			conn, err := nd.DialContext(ctx, network, addr)
			if err == nil {
				conn.(*net.TCPConn).SetReadBuffer(4096)
			}
			return conn, err
		}})
	if err != nil {
		t.Fatalf("dial: status %d, %v", status, err)
	}
	t.Cleanup(rc.cut)
	open := (&dxSession{name: user, transport: "websocket", conn: rc.duplexConn, raw: rc}).expectType(t, "open")
	sid := open["session"].(string)
	// From now on the client reads nothing.
	data := strings.Repeat("x", 16<<10)
	batch := make([]map[string]any, 48)
	for i := range batch {
		batch[i] = map[string]any{"session": sid, "data": data}
	}
	slowBefore := scrape(t, c)["caddy_duplex_slow_consumer_closures_total"]
	for sent := 0; ; sent += len(batch) * len(data) {
		if sent > 256<<20 {
			t.Fatalf("published %d MiB to a client that reads nothing and the session is still attached", sent>>20)
		}
		st, m := c.publish(t, batch)
		if st != http.StatusOK {
			t.Fatalf("publish: %d %v", st, m)
		}
		if scrape(t, c)["caddy_duplex_slow_consumer_closures_total"] > slowBefore {
			break
		}
		if info := hkSessionInfo(t, c, sid); info["attached"] != true {
			t.Fatalf("the stalled session detached before its send queue filled (no slow-consumer closure): %v", info)
		}
	}
	hkWaitDetached(t, c, sid)
	return sid
}

// TestDisconnectNeverBlocksTeardown: an app whose disconnect endpoint never
// answers (each attempt is cut only at message_timeout, 20s here) does not
// hold up the end of its session, the publish and sessions API, other
// sessions, or `caddy stop`. (The bounds are generous: a teardown that
// waited for the hook would take 20s per attempt.)
func TestDisconnectNeverBlocksTeardown(t *testing.T) {
	t.Parallel()
	app := newHookApp(t, "h1")
	c := startCaddy(t, sub(globalOpts("")+liveSite("disconnect /gone", "message_timeout 20s"), "Upstream", app.Addr))
	fast := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Proxy: nil}}
	t.Cleanup(fast.CloseIdleConnections)
	quick := func(method, url string, body string) int {
		t.Helper()
		req, _ := http.NewRequest(method, url, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		resp, err := fast.Do(req)
		if err != nil {
			t.Fatalf("%s %s while disconnect hooks hang: %v", method, url, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	var hung []*dxSession
	for i := 0; i < 4; i++ {
		hung = append(hung, openClient(t, c.wsURL("/live"), hdrs("X-User", fmt.Sprintf("hang-%d", i))))
	}
	other := openClient(t, c.wsURL("/live"), hdrs("X-User", "fine"))

	// kicked by publish, by DELETE, by the app, by the client
	if st := quick(http.MethodPost, c.adminURL("/duplex/publish"), fmt.Sprintf(`{"session":%q,"close":"kick"}`, hung[0].Session)); st != http.StatusOK {
		t.Fatalf("publish close: %d", st)
	}
	hung[0].expectClosed(t, 4000, "kick")
	if st := quick(http.MethodDelete, c.adminURL("/duplex/sessions/"+hung[1].Session), ""); st != http.StatusNoContent {
		t.Fatalf("DELETE: %d", st)
	}
	hung[1].expectClosed(t, 4000, "deleted")
	hung[2].send(t, map[string]any{"id": "c", "path": "/close"})
	if f := hung[2].readFrame(t); f["type"] != "ack" && f["type"] != "reply" {
		t.Fatalf("answer to /close: %v", f)
	}
	hung[2].expectClosed(t, 4000, "bye")
	hung[3].closeGracefully()
	waitUntil(t, "the hanging disconnect hooks to be called", 30*time.Second, func() bool {
		for _, s := range hung {
			if len(app.goneOf(s.Session)) == 0 {
				return false
			}
		}
		return true
	})
	for _, s := range hung {
		if st := quick(http.MethodGet, c.adminURL("/duplex/sessions/"+s.Session), ""); st != http.StatusNotFound {
			t.Errorf("session %s: %d while its disconnect hook hangs, want 404 (ended)", s.Session, st)
		}
	}
	// Others are served meanwhile.
	other.call(t, "o1", "/empty", nil)
	if st := quick(http.MethodPost, c.adminURL("/duplex/publish"), `{"user":"fine","data":"ok"}`); st != http.StatusOK {
		t.Fatalf("publish: %d", st)
	}
	other.expectPush(t, "", "ok")
	n := openClient(t, c.wsURL("/live"), hdrs("X-User", "fine"))
	n.call(t, "n1", "/empty", nil)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	out, err := exec.CommandContext(ctx, caddyBin, "stop", "--address", fmt.Sprintf("127.0.0.1:%d", c.Admin)).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy stop with hanging disconnect hooks: %v\n%s", err, out)
	}
	select {
	case <-c.done:
	case <-time.After(45 * time.Second):
		t.Fatalf("caddy still running 45s after `caddy stop` with hanging disconnect hooks")
	}
	t.Logf("caddy stopped %s after `caddy stop`", time.Since(start).Round(time.Millisecond))
}
