package duplex_test

// Raw attack clients for the security tests (scope_test.go,
// postbounds_test.go, detached_test.go, answers_test.go, trust_test.go):
// a bare WebSocket (gobwas/ws), a bare SSE stream and SSE POSTs (net/http),
// so a test sends exactly the bytes an attacker would. Ordinary sessions in
// those tests use the project's Go client.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"github.com/gobwas/ws"
)

// sxWait is the give-up limit of one wait for a server frame.
const sxWait = 20 * time.Second

// sxFrame is one server frame, decoded.
type sxFrame map[string]any

func (f sxFrame) typ() string         { s, _ := f["type"].(string); return s }
func (f sxFrame) ref() string         { s, _ := f["ref"].(string); return s }
func (f sxFrame) status() int         { n, _ := f["status"].(float64); return int(n) }
func (f sxFrame) str(k string) string { s, _ := f[k].(string); return s }

// sxWS is a bare WebSocket session connection. A goroutine reads its text
// frames (answering pings) into frames; it ends with the connection.
type sxWS struct {
	conn   net.Conn
	wmu    sync.Mutex
	frames chan sxFrame
	ended  chan struct{}
	quit   chan struct{}
	once   sync.Once
	err    error // why reading ended; valid once ended is closed
	close  ws.StatusCode

	open sxFrame
}

// sxDialWS opens a WebSocket to url with hdr; for a refused opening it
// returns the HTTP status (and a nil connection). dial, if not nil, dials
// the TCP connection (e.g. from another loopback source address).
func sxDialWS(t testing.TB, url string, hdr http.Header, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*sxWS, int, error) {
	t.Helper()
	status := 0
	d := ws.Dialer{
		Header:        ws.HandshakeHeaderHTTP(hdr),
		NetDial:       dial,
		OnStatusError: func(st int, _ []byte, _ io.Reader) { status = st },
		Timeout:       sxWait,
	}
	ctx, cancel := context.WithTimeout(context.Background(), sxWait)
	defer cancel()
	conn, br, _, err := d.Dial(ctx, url)
	if err != nil {
		var se ws.StatusError
		if errors.As(err, &se) {
			return nil, int(se), nil
		}
		if status != 0 {
			return nil, status, nil
		}
		return nil, 0, fmt.Errorf("duplex test: dial %s: %w", url, err)
	}
	c := &sxWS{conn: conn, frames: make(chan sxFrame, 1024), ended: make(chan struct{}), quit: make(chan struct{})}
	var r io.Reader = conn
	if br != nil {
		r = io.MultiReader(br, conn)
	}
	go c.readLoop(r)
	t.Cleanup(c.shut)
	return c, http.StatusSwitchingProtocols, nil
}

// sxOpenWS opens a WebSocket session and reads its open frame.
func sxOpenWS(t testing.TB, url string, hdr http.Header) *sxWS {
	t.Helper()
	c, st, err := sxDialWS(t, url, hdr, nil)
	if err != nil {
		t.Fatal(err)
	}
	if c == nil {
		t.Fatalf("WebSocket opening %s refused: %d", url, st)
	}
	c.open = c.mustNext(t)
	if c.open.typ() != "open" {
		t.Fatalf("first frame %v, want open", c.open)
	}
	return c
}

func (c *sxWS) readLoop(r io.Reader) {
	defer close(c.ended)
	var msg []byte
	var op ws.OpCode
	for {
		h, err := ws.ReadHeader(r)
		if err != nil {
			c.err = err
			return
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(r, p); err != nil {
			c.err = err
			return
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		switch h.OpCode {
		case ws.OpPing:
			_ = c.write(ws.NewPongFrame(p))
			continue
		case ws.OpPong:
			continue
		case ws.OpClose:
			c.close, _ = ws.ParseCloseFrameData(p)
			_ = c.write(ws.NewCloseFrame(ws.NewCloseFrameBody(c.close, "")))
			c.err = fmt.Errorf("close frame %d", c.close)
			return
		case ws.OpContinuation:
			msg = append(msg, p...)
		default:
			op, msg = h.OpCode, p
		}
		if !h.Fin || op != ws.OpText {
			continue
		}
		var f sxFrame
		if json.Unmarshal(msg, &f) != nil {
			f = sxFrame{"type": "!not-json", "raw": string(msg)}
		}
		if f.typ() == "ping" {
			continue
		}
		select {
		case c.frames <- f:
		case <-c.quit:
			c.err = errors.New("closed by the test")
			return
		}
	}
}

func (c *sxWS) write(f ws.Frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var buf bytes.Buffer
	if err := ws.WriteFrame(&buf, ws.MaskFrame(f)); err != nil {
		return err
	}
	_ = c.conn.SetWriteDeadline(time.Now().Add(sxWait))
	_, err := c.conn.Write(buf.Bytes())
	return err
}

// send writes one client frame (a value marshalled to JSON, or raw bytes).
func (c *sxWS) send(t testing.TB, v any) {
	t.Helper()
	b, ok := v.([]byte)
	if !ok {
		var err error
		if b, err = json.Marshal(v); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.write(ws.NewTextFrame(b)); err != nil {
		t.Fatalf("WebSocket write: %v", err)
	}
}

// next returns the next server frame; ok is false when the connection
// ended (or nothing came within sxWait).
func (c *sxWS) next() (sxFrame, bool) { return sxNextOf(c.frames, c.ended) }

// sxNextOf returns the next frame a reader passed on frames; ok is false
// once the reader ended (ended closed) with none left, or when none came
// within sxWait.
func sxNextOf(frames <-chan sxFrame, ended <-chan struct{}) (sxFrame, bool) {
	select {
	case f := <-frames:
		return f, true
	case <-ended:
		select {
		case f := <-frames:
			return f, true
		default:
		}
		return nil, false
	case <-time.After(sxWait):
		return nil, false
	}
}

func (c *sxWS) mustNext(t testing.TB) sxFrame {
	t.Helper()
	f, ok := c.next()
	if !ok {
		t.Fatalf("no frame from the server within %s (connection ended: %v)", sxWait, c.endedErr())
	}
	return f
}

// sxAwaitAnswers reads frames with next until each of refs has an answer,
// handing every answer that comes (a frame with a ref) to check. It fails
// on a close frame, or when no frame comes.
func sxAwaitAnswers(t *testing.T, next func() (sxFrame, bool), refs []string, check func(sxFrame)) {
	t.Helper()
	missing := map[string]bool{}
	for _, r := range refs {
		missing[r] = true
	}
	for len(missing) > 0 {
		f, ok := next()
		switch {
		case !ok:
			t.Fatalf("no answer to %v", sortedKeys(missing))
		case f.typ() == "close":
			t.Fatalf("session closed with %d messages unanswered (%v): %v", len(missing), sortedKeys(missing), f)
		case f.ref() != "":
			check(f)
			delete(missing, f.ref())
		}
	}
}

// sxNextRef reads frames with next (a raw WebSocket's or SSE stream's)
// until the answer to ref, failing on a close frame (no answer follows
// one on its connection).
func sxNextRef(t testing.TB, next func() (sxFrame, bool), ref string) sxFrame {
	t.Helper()
	for {
		f, ok := next()
		switch {
		case !ok:
			t.Fatalf("no answer to %s", ref)
		case f.ref() == ref:
			return f
		case f.typ() == "close":
			t.Fatalf("session closed before the answer to %s: %v", ref, f)
		}
	}
}

func (c *sxWS) endedErr() error {
	select {
	case <-c.ended:
		return c.err
	default:
		return nil
	}
}

// drop cuts the TCP connection without a close handshake.
func (c *sxWS) drop() {
	c.once.Do(func() { close(c.quit) })
	if tc, ok := c.conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.conn.Close()
	<-c.ended
}

// halfClose ends the client's side of the TCP connection (FIN) without
// a WebSocket close: the server reads what was sent, then loses the
// connection.
func (c *sxWS) halfClose(t testing.TB) {
	t.Helper()
	tc, ok := c.conn.(*net.TCPConn)
	if !ok {
		t.Fatalf("not a TCP connection: %T", c.conn)
	}
	if err := tc.CloseWrite(); err != nil {
		t.Fatalf("half-close: %v", err)
	}
}

func (c *sxWS) shut() {
	c.once.Do(func() { close(c.quit) })
	c.conn.Close()
	<-c.ended
}

// ---------------------------------------------------------------------------
// SSE

// sxSSE is a bare SSE stream: its events' frames, in order.
type sxSSE struct {
	resp   *http.Response
	cancel context.CancelFunc
	frames chan sxFrame
	ended  chan struct{}
	open   sxFrame
	quit   chan struct{}
	once   sync.Once
}

// sxSSEClient is an HTTP/1.1 client without a timeout (streams stay open)
// and without idle connections, which would outlive the tests.
var sxSSEClient = &http.Client{Transport: &http.Transport{Proxy: nil, DisableCompression: true, DisableKeepAlives: true}}

// sxStartSSE opens an SSE stream; for a refused opening it returns the
// status and body and a nil stream.
func sxStartSSE(t testing.TB, url string, hdr http.Header) (*sxSSE, int, string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Accept", "text/event-stream")
	resp, err := sxSSEClient.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("SSE GET %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		cancel()
		return nil, resp.StatusCode, string(b)
	}
	s := &sxSSE{resp: resp, cancel: cancel, frames: make(chan sxFrame, 1024), ended: make(chan struct{}), quit: make(chan struct{})}
	go s.readLoop()
	t.Cleanup(s.shut)
	return s, resp.StatusCode, ""
}

// sxOpenSSE opens an SSE session and reads its open frame.
func sxOpenSSE(t testing.TB, url string, hdr http.Header) *sxSSE {
	t.Helper()
	s, st, body := sxStartSSE(t, url, hdr)
	if s == nil {
		t.Fatalf("SSE opening %s refused: %d %s", url, st, body)
	}
	s.open = s.mustNext(t)
	if s.open.typ() != "open" {
		t.Fatalf("first SSE frame %v, want open", s.open)
	}
	return s
}

// readLoop parses the stream with the tests' event stream parser and
// passes on each event's frame, but for heartbeats (and data that is not
// JSON).
func (s *sxSSE) readLoop() {
	defer close(s.ended)
	p := newSSEParser()
	buf := make([]byte, 32<<10)
	for {
		n, err := s.resp.Body.Read(buf)
		for _, ev := range p.Feed(buf[:n]) {
			var f sxFrame
			if json.Unmarshal([]byte(ev.Data), &f) != nil || f.typ() == "ping" {
				continue
			}
			select {
			case s.frames <- f:
			case <-s.quit:
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// next returns the next frame of the stream; ok is false when it ended
// (or nothing came within sxWait).
func (s *sxSSE) next() (sxFrame, bool) { return sxNextOf(s.frames, s.ended) }

func (s *sxSSE) mustNext(t testing.TB) sxFrame {
	t.Helper()
	f, ok := s.next()
	if !ok {
		t.Fatalf("no SSE frame within %s (or the stream ended)", sxWait)
	}
	return f
}

func (s *sxSSE) token() string { return s.open.str("token") }

// drop ends the stream from the client's side.
func (s *sxSSE) drop() {
	s.once.Do(func() { close(s.quit) })
	s.cancel()
	s.resp.Body.Close()
	<-s.ended
}

func (s *sxSSE) shut() { s.drop() }

// sxPost sends an SSE POST for token; it returns the status and body.
func sxPost(t testing.TB, url, token, contentType string, body []byte, hdr ...string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Duplex-Token", token)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatalf("SSE POST %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// ---------------------------------------------------------------------------
// misc

// sxClient opens an ordinary session with the project's Go client.
func sxClient(t testing.TB, url, transport string, hdr http.Header, opts ...func(*client.Options)) *client.Session {
	t.Helper()
	o := client.Options{Transports: []string{transport}, HTTP: client.HTTP1, Header: hdr, MinBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}
	for _, f := range opts {
		f(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), sxWait)
	defer cancel()
	s, err := client.Dial(ctx, url, o)
	if err != nil {
		t.Fatalf("client.Dial %s (%s): %v", url, transport, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// sxRSS is the resident set size of process pid, in bytes (VmRSS).
func sxRSS(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatalf("read /proc/%d/status: %v", pid, err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest)
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				t.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// sxEnvInt reads a size from the environment, or def.
func sxEnvInt(t testing.TB, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

// sxAppRequests is what an upstream app of these tests received.
type sxAppRequests struct {
	mu   sync.Mutex
	reqs []recordedReq
}

func (a *sxAppRequests) add(r *http.Request, body []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.reqs = append(a.reqs, recordedReq{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header.Clone(), Body: body})
}

func (a *sxAppRequests) all() []recordedReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]recordedReq(nil), a.reqs...)
}

// sxGoStats forces a garbage collection in Caddy (through the admin
// endpoint's pprof handler), then reads Go's heap in use and goroutine
// count from its /metrics.
func sxGoStats(t testing.TB, c *caddyProc) (heapInuse, goroutines float64) {
	t.Helper()
	for _, p := range []string{"/debug/pprof/heap?gc=1", "/metrics"} {
		resp, err := httpc.Get(c.adminURL(p))
		if err != nil {
			t.Fatalf("GET %s: %v", p, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d", p, resp.StatusCode)
		}
		if p != "/metrics" {
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			f := strings.Fields(l)
			if len(f) != 2 {
				continue
			}
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				continue
			}
			switch f[0] {
			case "go_memstats_heap_inuse_bytes":
				heapInuse = v
			case "go_goroutines":
				goroutines = v
			}
		}
	}
	if heapInuse == 0 || goroutines == 0 {
		t.Fatalf("no go_memstats_heap_inuse_bytes or go_goroutines in Caddy's /metrics")
	}
	return heapInuse, goroutines
}

// sxMemLimit is the environment of the Caddy whose memory a test
// measures. Caddy otherwise sets GOMEMLIMIT to most of the machine's
// memory, and the Go runtime then keeps freed heap for a long while: its
// RSS would show the garbage of a flood, not what the server holds. The
// limit is soft: a server that holds more still grows past it.
const sxMemLimit = "GOMEMLIMIT=160MiB"

var (
	sxPlainOnce sync.Once
	sxPlainBin  string
	sxPlainErr  error
)

// sxPlainCaddy builds Caddy with the plugin without the race detector,
// once per test run: the memory tests measure its RSS, which the race
// detector's own bookkeeping (it grows with every goroutine ever run)
// would drown.
func sxPlainCaddy(t testing.TB) string {
	t.Helper()
	sxPlainOnce.Do(func() {
		sxPlainBin = filepath.Join(binDir, "caddy-plain")
		out, err := exec.Command("go", "build", "-o", sxPlainBin, "./cmd/caddy").CombinedOutput()
		if err != nil {
			sxPlainErr = fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	})
	if sxPlainErr != nil {
		t.Fatal(sxPlainErr)
	}
	return sxPlainBin
}
