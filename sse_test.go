package duplex_test

// The SSE + POST fallback: the test's own event-stream parser (checked on
// tricky input first), the event stream the server writes, and the answers
// to posted frames.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// --- the parser --------------------------------------------------------------------

func TestSSEParser(t *testing.T) {
	t.Parallel()
	type ev = sseEvent
	cases := []struct {
		name     string
		in       string
		want     []ev
		retry    int
		comments []string
	}{
		{
			name: "multi-line data joined with LF, default type",
			in:   "data: a\ndata: b\ndata:\ndata: c\n\n",
			want: []ev{{Type: "message", Data: "a\nb\n\nc", Retry: -1}},
		},
		{
			name:     "comments are ignored, also inside an event",
			in:       ": ping\n\n:\ndata: x\n: between\nevent: e\n\n",
			want:     []ev{{Type: "e", Data: "x", Retry: -1}},
			comments: []string{" ping", "", " between"},
		},
		{
			name: "CRLF, CR and LF line endings, mixed",
			in:   "data: 1\r\ndata: 2\rdata: 3\n\r\nevent: t\rdata: 4\r\r",
			want: []ev{{Type: "message", Data: "1\n2\n3", Retry: -1}, {Type: "t", Data: "4", Retry: -1}},
		},
		{
			name:  "retry: digits only",
			in:    "retry: 3000\n\nretry: 12a\nretry: -5\nretry: 1.5\nretry:\ndata: d\n\nretry:7\n\n",
			want:  []ev{{Type: "message", Data: "d", Retry: 3000}},
			retry: 7,
		},
		{
			name: "only one leading space is stripped",
			in:   "data:  two\ndata:none\ndata: \n\n",
			want: []ev{{Type: "message", Data: " two\nnone\n", Retry: -1}},
		},
		{
			name: "a field without colon has an empty value",
			in:   "data\n\ndata\ndata\n\nevent\ndata: x\n\n",
			want: []ev{{Type: "message", Data: "", Retry: -1}, {Type: "message", Data: "\n", Retry: -1}, {Type: "message", Data: "x", Retry: -1}},
		},
		{
			name: "id sets the last event id, kept by later events; NUL ignored; empty id resets",
			in:   "id: 7\ndata: a\n\ndata: b\n\nid: x\x00y\ndata: c\n\nid\ndata: d\n\nid: 8\n\ndata: e\n\n",
			want: []ev{
				{Type: "message", Data: "a", ID: "7", HasID: true, Retry: -1},
				{Type: "message", Data: "b", ID: "7", Retry: -1},
				{Type: "message", Data: "c", ID: "7", Retry: -1},
				{Type: "message", Data: "d", ID: "", HasID: true, Retry: -1},
				{Type: "message", Data: "e", ID: "8", Retry: -1},
			},
		},
		{
			name: "no data: nothing dispatched, the type does not leak into the next event",
			in:   "event: ghost\n\ndata: real\n\n",
			want: []ev{{Type: "message", Data: "real", Retry: -1}},
		},
		{
			name: "unknown fields ignored, field names are case-sensitive, colon in the value kept",
			in:   "foo: bar\nData: no\ndata: a: b\nEVENT: x\n\n",
			want: []ev{{Type: "message", Data: "a: b", Retry: -1}},
		},
		{
			name: "leading BOM stripped once; an unfinished event at the end is not dispatched",
			in:   "\uFEFFdata: 1\n\n\uFEFFdata: 2\n\ndata: 3\n",
			want: []ev{{Type: "message", Data: "1", Retry: -1}},
		},
		{
			name: "the server's shapes",
			in:   "retry: 2000\n\nevent: open\ndata: {\"type\":\"open\"}\n\n: ping\n\nid: tok:1\nevent: push\ndata: {\"type\":\"push\",\"seq\":1}\n\nevent: reply\ndata: {}\n\n",
			want: []ev{
				{Type: "open", Data: `{"type":"open"}`, Retry: 2000},
				{Type: "push", Data: `{"type":"push","seq":1}`, ID: "tok:1", HasID: true, Retry: 2000},
				{Type: "reply", Data: `{}`, ID: "tok:1", Retry: 2000},
			},
			retry:    2000,
			comments: []string{" ping"},
		},
	}
	for _, tc := range cases {
		wantRetry := tc.retry
		if wantRetry == 0 {
			wantRetry = -1
		}
		// Whole, byte by byte, and in chunks that split CRLFs.
		for _, chunk := range []int{len(tc.in) + 1, 1, 2, 3, 5} {
			p := newSSEParser()
			var comments []string
			p.OnComment = func(s string) { comments = append(comments, s) }
			var got []sseEvent
			for i := 0; i < len(tc.in); i += chunk {
				got = append(got, p.Feed([]byte(tc.in[i:min(i+chunk, len(tc.in))]))...)
			}
			if len(got) == 0 {
				got = nil
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("%s (chunks of %d):\n got %+v\nwant %+v", tc.name, chunk, got, tc.want)
			}
			if p.Retry != wantRetry {
				t.Errorf("%s (chunks of %d): retry %d, want %d", tc.name, chunk, p.Retry, wantRetry)
			}
			if len(comments) == 0 {
				comments = nil
			}
			if !reflect.DeepEqual(comments, tc.comments) {
				t.Errorf("%s (chunks of %d): comments %q, want %q", tc.name, chunk, comments, tc.comments)
			}
		}
	}
}

// --- the event stream ---------------------------------------------------------------

func TestSSEEventStream(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(liveRoute("heartbeat 1s"), "Upstream", app.Addr), "")
	c := e.c
	// Opened together, so the heartbeat waits overlap.
	opened := map[string]*dxSession{}
	for _, proto := range protos {
		opened[proto] = dialDX(t, "sse", e.target(proto), "/live", hdrs("X-User", "evs-"+proto))
	}
	for _, proto := range protos {
		t.Run(proto, func(t *testing.T) {
			user := "evs-" + proto
			s := opened[proto]
			sc := s.conn.(*sseDuplex)
			ev := s.next(t)
			if ev.sse == nil || ev.frame == nil || ev.frame["type"] != "open" {
				t.Fatalf("first event: %v, want the open event", ev)
			}
			if ev.sse.Retry <= 0 {
				t.Errorf("no retry: hint before the open event (retry %d)", ev.sse.Retry)
			}
			s.Session, _ = ev.frame["session"].(string)
			s.Token, _ = ev.frame["token"].(string)
			// Event ids are resume cursors: the open event may carry the
			// cursor the session starts at, nothing else.
			if ev.sse.HasID && ev.sse.ID != s.Token+":0" {
				t.Errorf("the open event's id is %q, want none or the cursor %q", ev.sse.ID, s.Token+":0")
			}
			if ev.frame["heartbeat"] != float64(1) {
				t.Errorf("open frame %v, want heartbeat 1", ev.frame)
			}

			waitUntil(t, "two ping events", 20*time.Second, func() bool { return sc.pings.Load() >= 2 })

			for i := 1; i <= 3; i++ {
				c.mustPublish(t, map[string]any{"user": user, "data": i}, 1)
				s.expectPush(t, "", i) // checks id: <token>:<seq>
			}
			s.send(t, map[string]any{"id": user + "-r", "path": "/reply", "data": "x"})
			ev = s.next(t)
			if ev.frame == nil || ev.frame["type"] != "reply" || ev.sse.Type != "reply" {
				t.Fatalf("want a reply event, got %v", ev)
			}
			if ev.sse.ID != s.Token+":3" {
				t.Errorf("last event id after 3 pushes and a reply = %q, want the cursor %q", ev.sse.ID, s.Token+":3")
			}
		})
	}
}

// --- posted frames ------------------------------------------------------------------

func TestSSEPostAnswers(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(liveRoute("max_message_size 1KiB"), "Upstream", app.Addr), "")
	for _, proto := range protos {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			tg := e.target(proto)
			user := "post-" + proto
			s := openDX(t, "sse", tg, "/live", hdrs("X-User", user))
			sc := s.conn.(*sseDuplex)
			post := func(ct, body string, hdr ...string) (int, []byte, http.Header) {
				t.Helper()
				st, raw, h, err := sc.post(ct, []byte(body), hdr...)
				if err != nil {
					t.Fatalf("POST: %v", err)
				}
				return st, raw, h
			}
			wantJSONError := func(what string, st int, raw []byte, want int) {
				t.Helper()
				if st != want {
					t.Errorf("%s: status %d %q, want %d", what, st, raw, want)
					return
				}
				var m map[string]any
				if json.Unmarshal(raw, &m) != nil || m["error"] == nil || m["error"] == "" {
					t.Errorf("%s: body %q, want {\"error\": ...}", what, raw)
				}
			}
			id := func(s string) string { return user + "-" + s }

			// 202, empty, then the answer on the stream
			st, raw, _ := post("application/json", `{"id":"`+id("ok")+`","path":"/reply","data":1}`)
			if st != http.StatusAccepted || len(raw) != 0 {
				t.Fatalf("valid frame: %d %q, want 202 with no body", st, raw)
			}
			expectFrame(t, s.readFrame(t), map[string]any{"type": "reply", "ref": id("ok"), "status": 200, "data": map[string]any{"echo": 1}})

			// 401: unknown token
			st, raw, _, err := ssePost(sc.hc, sc.url, "not-a-token", "application/json", []byte(`{"id":"x","path":"/reply"}`))
			if err != nil {
				t.Fatal(err)
			}
			wantJSONError("unknown token", st, raw, http.StatusUnauthorized)

			// 400: malformed, nothing queued (also a batch with one bad line)
			st, raw, _ = post("application/json", "this is not json")
			wantJSONError("not JSON", st, raw, http.StatusBadRequest)
			st, raw, _ = post("application/json", `[1,2]`)
			wantJSONError("not an object", st, raw, http.StatusBadRequest)
			st, raw, _ = post("application/x-ndjson", `{"id":"`+id("in-bad-batch")+`","path":"/reply"}`+"\nnot json\n")
			wantJSONError("batch with a bad line", st, raw, http.StatusBadRequest)

			// 413: a frame over max_message_size, alone or in a batch
			big := `{"id":"` + id("big") + `","path":"/reply","data":"` + strings.Repeat("x", 2048) + `"}`
			st, raw, _ = post("application/json", big)
			wantJSONError("oversize frame", st, raw, http.StatusRequestEntityTooLarge)
			st, raw, _ = post("application/x-ndjson", `{"id":"`+id("before-big")+`","path":"/reply"}`+"\n"+big+"\n")
			wantJSONError("batch with an oversize frame", st, raw, http.StatusRequestEntityTooLarge)

			// 415: other content types
			st, raw, _ = post("text/plain", `{"id":"`+id("text")+`","path":"/reply"}`)
			wantJSONError("text/plain", st, raw, http.StatusUnsupportedMediaType)

			// 403: cross-origin; same origin is fine
			st, raw, _ = post("application/json", `{"id":"`+id("evil")+`","path":"/reply"}`, "Origin", "http://evil.example")
			wantJSONError("cross-origin", st, raw, http.StatusForbidden)
			st, raw, _ = post("application/json", `{"id":"`+id("same")+`","path":"/empty"}`, "Origin", tg.base)
			if st != http.StatusAccepted {
				t.Fatalf("same-origin POST: %d %q, want 202", st, raw)
			}
			// Nothing refused above was queued: the next frame answers "same".
			expectFrame(t, s.readFrame(t), map[string]any{"type": "ack", "ref": id("same")})
			for _, r := range app.requests() {
				mid := r.Header.Get("Duplex-Message-Id")
				for _, refused := range []string{"in-bad-batch", "big", "before-big", "text", "evil"} {
					if mid == id(refused) {
						t.Errorf("refused frame %q reached the app", mid)
					}
				}
			}

			// An NDJSON batch: every frame answered, in order.
			var batch strings.Builder
			var want []map[string]any
			for i := 0; i < 6; i++ {
				bid := id("b" + strconv.Itoa(i))
				if i%2 == 0 {
					fmt.Fprintf(&batch, `{"id":%q,"path":"/reply","data":%d}`+"\n", bid, i)
					want = append(want, map[string]any{"type": "reply", "ref": bid, "status": 200, "data": map[string]any{"echo": i}})
				} else {
					fmt.Fprintf(&batch, "{\"id\":%q,\"path\":\"/empty\"}\r\n\n", bid)
					want = append(want, map[string]any{"type": "ack", "ref": bid})
				}
			}
			st, raw, _ = post("application/x-ndjson", batch.String())
			if st != http.StatusAccepted {
				t.Fatalf("NDJSON batch: %d %q, want 202", st, raw)
			}
			for _, w := range want {
				expectFrame(t, s.readFrame(t), w)
			}

			// The app closes the session: the token is dead afterwards.
			expectFrame(t, s.call(t, id("close"), "/close", nil), map[string]any{"type": "reply", "ref": id("close"), "status": 200, "data": map[string]any{"closing": true}})
			s.expectClose(t, 4000, "bye", false)
			st, raw, _ = post("application/json", `{"id":"`+id("late")+`","path":"/reply"}`)
			wantJSONError("token of an ended session", st, raw, http.StatusUnauthorized)
		})
	}
}

// gateApp is an upstream whose /hold/<name> requests wait until the test
// opens gate <name>; every request's Duplex-Message-Id is recorded in
// arrival order.
type gateApp struct {
	Addr string
	srv  *httptest.Server

	mu      sync.Mutex
	ids     []string
	gates   map[string]chan struct{}
	entered map[string]chan struct{}
}

func newGateApp(t *testing.T) *gateApp {
	g := &gateApp{gates: map[string]chan struct{}{}, entered: map[string]chan struct{}{}}
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Duplex-Message-Id")
		g.mu.Lock()
		g.ids = append(g.ids, id)
		g.mu.Unlock()
		switch {
		case strings.HasPrefix(r.URL.Path, "/hold/"):
			name := strings.TrimPrefix(r.URL.Path, "/hold/")
			gate, entered := g.gate(name)
			select {
			case entered <- struct{}{}:
			default:
			}
			select {
			case <-gate:
			case <-r.Context().Done():
			}
			w.WriteHeader(http.StatusNoContent)
		case r.URL.Path == "/reply":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, "{\"id\":%q}", id)
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	}))
	g.Addr = strings.TrimPrefix(g.srv.URL, "http://")
	t.Cleanup(func() {
		g.mu.Lock()
		for name, ch := range g.gates {
			close(ch)
			delete(g.gates, name)
		}
		g.mu.Unlock()
		g.srv.Close()
	})
	return g
}

func (g *gateApp) gate(name string) (chan struct{}, chan struct{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.gates[name] == nil {
		g.gates[name] = make(chan struct{})
		g.entered[name] = make(chan struct{}, 1)
	}
	return g.gates[name], g.entered[name]
}

func (g *gateApp) open(name string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if ch := g.gates[name]; ch != nil {
		close(ch)
		delete(g.gates, name)
	}
}

func (g *gateApp) seen() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.ids...)
}

// A client that posts faster than the app serves gets 429 once the
// session's inbound queue is full, and every frame that was accepted is
// answered exactly once, in order.
func TestSSEPostQueueFull(t *testing.T) {
	t.Parallel()
	g := newGateApp(t)
	e := startDuplexEnv(t, sub(`
	route /q* {
		duplex {
			messages {
				path *
			}
			max_inflight 1
			message_timeout 2m
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", g.Addr), "")
	for _, proto := range []string{"h1", "h2c"} {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			s := openDX(t, "sse", e.target(proto), "/q", nil)
			sc := s.conn.(*sseDuplex)
			pfx := "qf-" + proto + "-"

			_, entered := g.gate(proto)
			st, raw, _, err := sc.post("application/json", []byte(`{"id":"`+pfx+`hold","path":"/hold/`+proto+`"}`))
			if err != nil || st != http.StatusAccepted {
				t.Fatalf("POST hold: %d %q %v", st, raw, err)
			}
			select {
			case <-entered:
			case <-time.After(frameWait):
				t.Fatalf("the held message did not reach the app")
			}

			// Post batches of 8 until the queue is full.
			var accepted []string
			full := false
			n := 0
			for batchNo := 0; batchNo < 100 && !full; batchNo++ {
				var b strings.Builder
				var ids []string
				for i := 0; i < 8; i++ {
					id := fmt.Sprintf("%sm%d", pfx, n)
					n++
					ids = append(ids, id)
					path := "/empty"
					if n%3 == 0 {
						path = "/reply"
					}
					fmt.Fprintf(&b, `{"id":%q,"path":%q}`+"\n", id, path)
				}
				st, raw, h, err := sc.post("application/x-ndjson", []byte(b.String()))
				if err != nil {
					t.Fatalf("POST batch %d: %v", batchNo, err)
				}
				switch st {
				case http.StatusAccepted:
					accepted = append(accepted, ids...)
				case http.StatusTooManyRequests:
					full = true
					var m map[string]any
					if json.Unmarshal(raw, &m) != nil || m["error"] == nil {
						t.Errorf("429 body %q, want {\"error\": ...}", raw)
					}
					if h.Get("Retry-After") == "" {
						t.Errorf("429 without Retry-After")
					}
				default:
					t.Fatalf("POST batch %d: %d %q, want 202 or 429", batchNo, st, raw)
				}
			}
			if !full {
				t.Fatalf("posted %d frames while the app held one message: never 429", n)
			}
			// Single frames may still fit; then they are refused too.
			full = false
			for i := 0; i < 20 && !full; i++ {
				id := fmt.Sprintf("%ss%d", pfx, i)
				st, raw, h, err := sc.post("application/json", []byte(`{"id":"`+id+`","path":"/empty"}`))
				if err != nil {
					t.Fatalf("POST single %d: %v", i, err)
				}
				switch st {
				case http.StatusAccepted:
					accepted = append(accepted, id)
				case http.StatusTooManyRequests:
					full = true
					if h.Get("Retry-After") == "" {
						t.Errorf("429 without Retry-After")
					}
				default:
					t.Fatalf("POST single %d: %d %q, want 202 or 429", i, st, raw)
				}
			}
			if !full {
				t.Fatalf("single frames on a full queue: never 429")
			}
			t.Logf("%d frames accepted before 429", len(accepted))

			g.open(proto)
			// hold, then every accepted frame, each answered exactly once,
			// in order; nothing for the refused ones.
			want := append([]string{pfx + "hold"}, accepted...)
			for _, id := range want {
				f := s.readFrame(t)
				if f["ref"] != id || (f["type"] != "ack" && f["type"] != "reply") {
					t.Fatalf("want the answer to %s, got %v", id, f)
				}
			}
			final := pfx + "final"
			expectFrame(t, s.call(t, final, "/empty", nil), map[string]any{"type": "ack", "ref": final})
			var seen []string
			for _, id := range g.seen() {
				if strings.HasPrefix(id, pfx) {
					seen = append(seen, id)
				}
			}
			if !reflect.DeepEqual(seen, append(want, final)) {
				t.Errorf("the app got %d messages %v,\nwant the %d accepted ones in order %v", len(seen), seen, len(want)+1, append(want, final))
			}
		})
	}
}
