package duplex_test

// Helpers for the resume tests: client connections over any transport that
// the test can cut abruptly (the TCP connection is closed, no close frame,
// no end of stream), resume cursors sent the three documented ways, and
// error-returning variants of the usual helpers so they can run in worker
// goroutines (t.Fatal is only allowed on the test's own goroutine).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// resumeSite is a Caddyfile serving liveRoute with the duplex options
// opts, on HTTP/1.1 and h2c.
func resumeSite(opts ...string) string {
	return globalOpts("\tservers {\n\t\tprotocols h1 h2 h2c\n\t}") + liveSite(opts...)
}

// rdial says how a connection is opened: transport, protocol (h1 or h2c)
// and, for websocket and stream, whether the resume cursor goes in the
// Duplex-Resume header or the ?resume= query parameter (SSE sends it as
// Last-Event-ID, or in the query when via is "query").
type rdial struct {
	transport string
	proto     string
	via       string // "header" or "query"
}

func (d rdial) String() string {
	if d.transport == "sse" && d.via == "" {
		return d.transport + "/" + d.proto
	}
	return d.transport + "/" + d.proto + "/" + d.via
}

// rdials lists every way of opening a connection; workers cycle through
// it so resumes switch transports.
var rdials = []rdial{
	{"websocket", "h1", "header"},
	{"stream", "h2c", "query"},
	{"sse", "h1", ""},
	{"websocket", "h2c", "query"},
	{"stream", "h1", "header"},
	{"sse", "h2c", ""},
	{"websocket", "h1", "query"},
	{"stream", "h2c", "header"},
	{"websocket", "h2c", "header"},
	{"stream", "h1", "query"},
	{"sse", "h2c", "query"}, // a new EventSource cannot set Last-Event-ID
}

// rconn is one client connection of a session, of any transport, dialed
// the way d says.
type rconn struct {
	*rawConn
	d rdial
}

// withCursor adds the resume cursor to the opening the way d says.
func withCursor(d rdial, path string, hdr http.Header, cursor string) (string, http.Header) {
	h := hdr.Clone()
	if h == nil {
		h = http.Header{}
	}
	if cursor == "" {
		return path, h
	}
	switch {
	case d.transport == "sse" && d.via != "query":
		h.Set("Last-Event-ID", cursor)
	case d.via == "query":
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		path += sep + "resume=" + url.QueryEscape(cursor)
	default:
		h.Set("Duplex-Resume", cursor)
	}
	return path, h
}

// dialR opens a connection (base is http://127.0.0.1:port) and returns it
// once the server accepted the opening; it does not read the open frame.
// cursor, if not empty, asks to resume. The connection is cut when the
// test ends. It never calls t.Fatal, so workers may use it.
func dialR(t *testing.T, base string, d rdial, path string, hdr http.Header, cursor string) (*rconn, error) {
	return dialRWith(t, base, d, path, hdr, cursor, connOpts{})
}

// dialRWith is dialR with dialConn's options o.
func dialRWith(t *testing.T, base string, d rdial, path string, hdr http.Header, cursor string, o connOpts) (*rconn, error) {
	path, hdr = withCursor(d, path, hdr, cursor)
	tg := target{proto: d.proto, base: base}
	rc, status, err := dialConn(tg, d.transport, path, hdr, o)
	if err != nil {
		if status == 0 {
			err = noAnswerError{err}
		}
		return nil, fmt.Errorf("%s: %w", d, err)
	}
	if rc.major != tg.protoMajor() {
		rc.cut()
		return nil, fmt.Errorf("%s: opened over HTTP/%d", d, rc.major)
	}
	t.Cleanup(rc.cut)
	return &rconn{rawConn: rc, d: d}, nil
}

// noAnswerError is a dial that got no HTTP answer at all: the connection
// (or, for HTTP/2, its setup) failed before the server said anything.
type noAnswerError struct{ error }

func (e noAnswerError) Unwrap() error { return e.error }

// smallWindowDial dials with a tiny receive buffer and segment size, so a
// client that stops reading makes the server's writes block after ~100 KB
// instead of the several MB loopback sockets otherwise absorb.
func smallWindowDial(ctx context.Context, network, addr string) (net.Conn, error) {
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if e := syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096); e != nil {
				serr = e
			}
			if e := syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536); e != nil {
				serr = e
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return d.DialContext(ctx, network, addr)
}

// ---------------------------------------------------------------------------
// A session seen from the client: its id, token and the last push seq it
// got, over whichever connection it has now.

type rsess struct {
	name      string
	base      string
	path      string
	hdr       http.Header
	id, token string
	last      int // seq of the last push received
	conn      *rconn
	open      map[string]any // the latest open frame
	resumes   int
}

// nextEvent waits (bounded) for the next event of the connection.
func (s *rsess) nextEvent(d time.Duration) (dxEvent, error) {
	timeout := time.After(d)
	for {
		select {
		case e := <-s.conn.frames():
			if answers.repeated(e.session, e.frame) {
				continue // a client ignores a second answer to the same ref
			}
			return e, nil
		case <-timeout:
			return dxEvent{}, fmt.Errorf("%s (%s): nothing from the server within %s (last seq %d)", s.name, s.conn.d, d, s.last)
		}
	}
}

// nextFrame returns the next server frame.
func (s *rsess) nextFrame() (map[string]any, dxEvent, error) {
	e, err := s.nextEvent(frameWait)
	if err != nil {
		return nil, e, err
	}
	if e.frame == nil {
		return nil, e, fmt.Errorf("%s (%s): want a frame, got %v (last seq %d)", s.name, s.conn.d, e, s.last)
	}
	if e.sse != nil && e.sse.Type != e.frame["type"] {
		return nil, e, fmt.Errorf("%s: SSE event type %q carries a %v frame", s.name, e.sse.Type, e.frame["type"])
	}
	return e.frame, e, nil
}

// openR opens a new session and reads its open frame (resumed:false).
func openR(t *testing.T, name, base string, d rdial, path string, hdr http.Header) (*rsess, error) {
	return openRWith(t, name, base, d, path, hdr, connOpts{})
}

// openStalledR opens a new session over d (websocket or sse) on a TCP
// connection with a tiny receive window (smallWindowDial) whose client
// reads the open frame, then nothing, until its reader is unstalled.
func openStalledR(t *testing.T, name, base string, d rdial, path string, hdr http.Header) (*rsess, error) {
	return openRWith(t, name, base, d, path, hdr, connOpts{dial: smallWindowDial, stall: true, stallAfter: 1})
}

// openRWith is openR with dialConn's options o.
func openRWith(t *testing.T, name, base string, d rdial, path string, hdr http.Header, o connOpts) (*rsess, error) {
	s := &rsess{name: name, base: base, path: path, hdr: hdr}
	conn, err := dialRWith(t, base, d, path, hdr, "", o)
	if err != nil {
		return nil, fmt.Errorf("%s: open: %w", name, err)
	}
	s.conn = conn
	f, _, err := s.nextFrame()
	if err != nil {
		return nil, err
	}
	if f["type"] != "open" || f["resumed"] != false {
		return nil, fmt.Errorf("%s: want open resumed:false, got %v", name, f)
	}
	s.id, _ = f["session"].(string)
	s.token, _ = f["token"].(string)
	if s.id == "" || s.token == "" || s.id == s.token {
		return nil, fmt.Errorf("%s: open frame without distinct session and token: %v", name, f)
	}
	s.open = f
	return s, nil
}

// cursor is the session's resume cursor <token>:<last seq>.
func (s *rsess) cursor() string { return s.token + ":" + strconv.Itoa(s.last) }

// resumeOver opens a connection over d with the session's cursor and reads
// the open frame, which must say resumed:true with the same session and
// token (and, over SSE, carry the cursor as its event id). The previous
// connection must have been cut or closed by the caller.
func (s *rsess) resumeOver(t *testing.T, d rdial) error {
	conn, err := dialR(t, s.base, d, s.path, s.hdr, s.cursor())
	if err != nil {
		return fmt.Errorf("%s: resume from %d: %w", s.name, s.last, err)
	}
	s.conn = conn
	f, e, err := s.nextFrame()
	if err != nil {
		return err
	}
	if f["type"] != "open" || f["resumed"] != true || f["session"] != s.id || f["token"] != s.token {
		return fmt.Errorf("%s: resume over %s from seq %d: want open resumed:true session %s and the same token, got %s",
			s.name, d, s.last, s.id, e.raw)
	}
	if e.sse != nil && (!e.sse.HasID || e.sse.ID != s.cursor()) {
		return fmt.Errorf("%s: resumed open event over %s has id %q (own: %v), want the cursor %q", s.name, d, e.sse.ID, e.sse.HasID, s.cursor())
	}
	s.open = f
	s.resumes++
	return nil
}

// checkPush checks that e is the session's next push (seq last+1, over SSE
// with the event id <token>:<seq>) and records it.
func (s *rsess) checkPush(e dxEvent) (map[string]any, error) {
	f := e.frame
	if f == nil || f["type"] != "push" {
		return nil, fmt.Errorf("%s (%s): want push %d, got %v", s.name, s.conn.d, s.last+1, e)
	}
	seq, ok := f["seq"].(float64)
	if !ok || int(seq) != s.last+1 {
		return nil, fmt.Errorf("%s (%s): push seq %v, want %d (a gap or a duplicate): %s", s.name, s.conn.d, f["seq"], s.last+1, e.raw)
	}
	if e.sse != nil {
		want := s.token + ":" + strconv.Itoa(int(seq))
		if !e.sse.HasID || e.sse.ID != want {
			return nil, fmt.Errorf("%s: push event id %q (own: %v), want %q", s.name, e.sse.ID, e.sse.HasID, want)
		}
	}
	s.last = int(seq)
	return f, nil
}

// expectPushN reads the next frame: push last+1 whose data.n is n.
func (s *rsess) expectPushN(n int) error {
	f, e, err := s.nextFrame()
	if err != nil {
		return err
	}
	if _, err := s.checkPush(e); err != nil {
		return err
	}
	if got := dataN(f); got != n {
		return fmt.Errorf("%s: push %d carries n=%d, want %d: %s", s.name, s.last, got, n, e.raw)
	}
	return nil
}

// readStalledPushes reads what a stalled client finds on the wire once it
// reads again: pushes, each the session's next with data.n equal to its
// seq, until the event for which end is true, which it returns.
func (s *rsess) readStalledPushes(t *testing.T, end func(dxEvent) bool) dxEvent {
	t.Helper()
	for {
		e, err := s.nextEvent(frameWait)
		must(t, err)
		if end(e) {
			return e
		}
		_, err = s.checkPush(e)
		must(t, err)
		if dataN(e.frame) != s.last {
			t.Fatalf("stalled: push %d carries %s", s.last, e.raw)
		}
	}
}

// dataN is data.n of a push (-1 if absent).
func dataN(f map[string]any) int {
	d, _ := f["data"].(map[string]any)
	n, ok := d["n"].(float64)
	if !ok {
		return -1
	}
	return int(n)
}

// expectCloseR reads the close frame (code, reconnect) and then the end of
// the connection (after a WebSocket close frame with the same code).
func (s *rsess) expectCloseR(code int, reconnect bool) error {
	f, e, err := s.nextFrame()
	if err != nil {
		return err
	}
	if f["type"] != "close" || f["code"] != float64(code) || f["reconnect"] != reconnect {
		return fmt.Errorf("%s (%s): want close code %d reconnect %v, got %s (last seq %d)", s.name, s.conn.d, code, reconnect, e.raw, s.last)
	}
	return s.expectEndR(code)
}

func (s *rsess) expectEndR(code int) error {
	e, err := s.nextEvent(frameWait)
	if err != nil {
		return err
	}
	if s.conn.d.transport == "websocket" {
		if e.wsClose != code {
			return fmt.Errorf("%s: want a WebSocket close frame %d, got %v", s.name, code, e)
		}
		if e, err = s.nextEvent(frameWait); err != nil {
			return err
		}
	}
	if e.end == nil {
		return fmt.Errorf("%s: want the connection to end, got %v", s.name, e)
	}
	return nil
}

// sendJSON sends a client frame on the current connection.
func (s *rsess) sendJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if err := s.conn.send(b); err != nil {
		return fmt.Errorf("%s (%s): send %s: %w", s.name, s.conn.d, b, err)
	}
	return nil
}

// ---------------------------------------------------------------------------
// Publishing from worker goroutines

// tryPublish posts body to the admin publish endpoint; it returns the
// status and the decoded answer.
func tryPublish(c *caddyProc, body any) (int, map[string]any, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	resp, err := httpc.Post(c.adminURL("/duplex/publish"), "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp.StatusCode, nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return resp.StatusCode, nil, fmt.Errorf("publish answer is not a JSON object (%v): %q", err, raw)
	}
	return resp.StatusCode, m, nil
}

// publishWant publishes and wants 200 with delivered = want.
func publishWant(c *caddyProc, body any, want int) error {
	st, m, err := tryPublish(c, body)
	if err != nil {
		return fmt.Errorf("publish %v: %w", body, err)
	}
	if st != http.StatusOK || m["delivered"] != float64(want) {
		return fmt.Errorf("publish %v: %d %v, want 200 with delivered %d", body, st, m, want)
	}
	return nil
}

// sessionInfoOf returns the admin API's description of a session (nil
// and 404 if it is unknown).
func sessionInfoOf(t *testing.T, c *caddyProc, id string) (int, map[string]any) {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+id), nil)
	if st != http.StatusOK {
		return st, nil
	}
	m, ok := decode(t, raw).(map[string]any)
	if !ok {
		t.Fatalf("GET /duplex/sessions/%s: not an object: %s", id, raw)
	}
	return st, m
}

// errs collects errors from worker goroutines.
type errs struct {
	mu   sync.Mutex
	list []error
}

func (e *errs) add(err error) {
	if err == nil {
		return
	}
	e.mu.Lock()
	e.list = append(e.list, err)
	e.mu.Unlock()
}

func (e *errs) failed() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.list) > 0
}

// report fails the test with the collected errors (at most 20 shown).
func (e *errs) report(t *testing.T) {
	t.Helper()
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, err := range e.list {
		if i == 20 {
			t.Errorf("... and %d more errors", len(e.list)-20)
			break
		}
		t.Error(err)
	}
	if len(e.list) > 0 {
		t.FailNow()
	}
}
