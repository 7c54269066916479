package duplex_test

// Clients for the three transports (websocket, stream, sse) behind one
// small interface, so the same scenarios run over each of them, over
// HTTP/1.1, TLS HTTP/2 and h2c; plus the Caddy setup (plain HTTP site +
// `tls internal` HTTPS site) they run against. SSE is parsed by
// sseparser_helpers_test.go.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"github.com/gobwas/ws"
	"golang.org/x/net/http2"
)

// ---------------------------------------------------------------------------
// Caddy with a plain HTTP site (HTTP/1.1 and h2c) and a `tls internal`
// HTTPS site (HTTP/2 over TLS) serving the same routes.

type duplexEnv struct {
	c     *caddyProc
	HTTPS int
	roots *x509.CertPool
}

// startDuplexEnv starts Caddy with routes (a Caddyfile fragment, using
// {{.Upstream}}-style placeholders already substituted by the caller)
// served on http://127.0.0.1:{{.HTTP}} and https://127.0.0.1:{{.HTTPS}}.
// serverExtra goes inside the global `servers` block (protocols h1 h2 h2c
// are always on).
func startDuplexEnv(t *testing.T, routes, serverExtra string, env ...string) *duplexEnv {
	t.Helper()
	httpsPort := freePorts(t, 1)[0]
	cf := `{
	admin 127.0.0.1:{{.Admin}}
	auto_https disable_redirects
	skip_install_trust
	storage file_system {{.Storage}}
	servers {
		protocols h1 h2 h2c
` + serverExtra + `
	}
}
(routes) {
` + routes + `
}
http://127.0.0.1:{{.HTTP}} {
	import routes
}
https://127.0.0.1:{{.HTTPS}} {
	tls internal
	import routes
}
`
	c := startCaddy(t, sub(cf, "HTTPS", strconv.Itoa(httpsPort)), env...)
	e := &duplexEnv{c: c, HTTPS: httpsPort}

	// Trust Caddy's local root, then wait for the site certificate.
	rootPath := filepath.Join(c.Dir, "storage", "pki", "authorities", "local", "root.crt")
	var lastErr error
	waitUntil(t, "the HTTPS site with a certificate from Caddy's local CA", 30*time.Second, func() bool {
		pem, err := os.ReadFile(rootPath)
		if err != nil {
			lastErr = err
			return false
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			lastErr = fmt.Errorf("no certificate in %s", rootPath)
			return false
		}
		d := tls.Dialer{Config: &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}}}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", httpsPort))
		if err != nil {
			lastErr = err
			return false
		}
		conn.Close()
		e.roots = pool
		return true
	})
	_ = lastErr
	return e
}

// target says how a client reaches Caddy: over HTTP/1.1, TLS HTTP/2 or h2c.
type target struct {
	proto string // "h1", "h2" (TLS) or "h2c"
	base  string // scheme://host:port
	roots *x509.CertPool
}

func (e *duplexEnv) target(proto string) target {
	switch proto {
	case "h2":
		return target{proto: proto, base: fmt.Sprintf("https://127.0.0.1:%d", e.HTTPS), roots: e.roots}
	case "h1", "h2c":
		return target{proto: proto, base: fmt.Sprintf("http://127.0.0.1:%d", e.c.HTTP)}
	}
	panic("unknown proto " + proto)
}

func (tg target) url(path string) string { return tg.base + path }

// protoMajor is the HTTP major version responses must come with.
func (tg target) protoMajor() int {
	if tg.proto == "h1" {
		return 1
	}
	return 2
}

func (tg target) tlsConfig() *tls.Config {
	return &tls.Config{RootCAs: tg.roots, NextProtos: []string{"h2"}}
}

// connTracker remembers the connections a test's transport dialed, so they
// can all be closed at the end whatever state their streams are in.
type connTracker struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (ct *connTracker) add(c net.Conn) net.Conn {
	ct.mu.Lock()
	ct.conns = append(ct.conns, c)
	ct.mu.Unlock()
	return c
}

func (ct *connTracker) closeAll() {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	for _, c := range ct.conns {
		c.Close()
	}
	ct.conns = nil
}

// dialFunc dials TCP connections (nil: a net.Dialer).
type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// transport returns an HTTP transport speaking tg.proto (and nothing else)
// over connections that ct records, so that they can all be closed
// whatever state their streams are in; closeIdle drops its pool.
// transparentGzip leaves Go's own Accept-Encoding/gunzip on (HTTP/1.1
// only).
func (tg target) transport(ct *connTracker, dial dialFunc, transparentGzip bool) (rt http.RoundTripper, closeIdle func()) {
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	tracked := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return ct.add(c), nil
	}
	switch tg.proto {
	case "h2", "h2c":
		tr := &http2.Transport{
			AllowHTTP:          tg.proto == "h2c",
			TLSClientConfig:    tg.tlsConfig(),
			DisableCompression: true,
			DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
				c, err := tracked(ctx, network, addr)
				if err != nil || tg.proto == "h2c" {
					return c, err
				}
				tc := tls.Client(c, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					c.Close()
					return nil, err
				}
				return tc, nil
			},
		}
		return tr, tr.CloseIdleConnections
	}
	tr := &http.Transport{
		Proxy:              nil,
		DialContext:        tracked,
		DisableCompression: !transparentGzip,
		TLSNextProto:       map[string]func(string, *tls.Conn) http.RoundTripper{},
	}
	return tr, tr.CloseIdleConnections
}

// roundTripper is tg.transport, closed with every connection it made when
// the test ends.
func (tg target) roundTripper(t *testing.T, transparentGzip bool) http.RoundTripper {
	ct := &connTracker{}
	rt, closeIdle := tg.transport(ct, nil, transparentGzip)
	t.Cleanup(func() {
		closeIdle()
		ct.closeAll()
	})
	return rt
}

func (tg target) httpClient(t *testing.T) *http.Client {
	return &http.Client{Transport: tg.roundTripper(t, false)}
}

// ---------------------------------------------------------------------------
// The client interface

// dxEvent is what a client connection yields, in order: server frames, for
// WebSocket the close frame, and finally the end of the connection.
type dxEvent struct {
	frame   map[string]any
	raw     []byte
	session string    // the session id of its connection's open frame
	sse     *sseEvent // the event that carried the frame (sse)
	text    bool      // it came in a WebSocket text message (websocket)
	// wsClose is the code of a WebSocket close frame (websocket), 0 if none.
	wsClose  int
	wsReason string
	// end is set on the last event: the connection or stream ended.
	end error
}

func (e dxEvent) String() string {
	switch {
	case e.end != nil:
		return fmt.Sprintf("end of connection (%v)", e.end)
	case e.wsClose != 0:
		return fmt.Sprintf("WebSocket close frame %d %q", e.wsClose, e.wsReason)
	default:
		return fmt.Sprintf("frame %s", e.raw)
	}
}

// duplexConn is one client connection of any transport.
type duplexConn interface {
	// frames yields the server's frames, then one event with end set.
	frames() <-chan dxEvent
	// send sends one client frame (a JSON object).
	send(frame []byte) error
	// close ends the connection in order (a WebSocket close frame first)
	// and waits for its reader.
	close()
	// shutdown runs closer once and waits for the reader.
	shutdown(closer func())
}

// rawConn is one connection dialed by dialConn. cut ends it the way a
// network failure would: the TCP connection is closed under it, with no
// WebSocket close frame and no orderly end of stream.
type rawConn struct {
	duplexConn
	cutf  func()
	major int // the HTTP version it was opened over
}

func (c *rawConn) cut() { c.shutdown(c.cutf) }

// end closes the connection in order, then every network connection it
// used (a pooled HTTP/2 connection included).
func (c *rawConn) end() {
	c.close()
	c.cutf()
}

// eventPump is the reading half shared by the implementations.
type eventPump struct {
	session string // from the open frame; only the reader touches it
	events  chan dxEvent
	quit    chan struct{}
	exited  chan struct{}
	once    sync.Once
}

func newEventPump() eventPump {
	return eventPump{events: make(chan dxEvent, 4096), quit: make(chan struct{}), exited: make(chan struct{})}
}

func (p *eventPump) emit(e dxEvent) bool {
	select {
	case p.events <- e:
		return true
	case <-p.quit:
		return false
	}
}

func (p *eventPump) frames() <-chan dxEvent { return p.events }

// shutdown runs closer once and waits for the reader to exit.
func (p *eventPump) shutdown(closer func()) {
	p.once.Do(func() {
		close(p.quit)
		closer()
		<-p.exited
	})
}

// emitFrame decodes a server frame and emits it.
// text: it came in a WebSocket text message.
func (p *eventPump) emitFrame(raw []byte, sse *sseEvent, text bool) bool {
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return p.emit(dxEvent{raw: raw, sse: sse, text: text, end: fmt.Errorf("server frame is not a JSON object (%v): %q", err, raw)})
	}
	if m["type"] == "open" {
		p.session, _ = m["session"].(string)
	}
	return p.emit(dxEvent{frame: m, raw: append([]byte(nil), raw...), sse: sse, text: text, session: p.session})
}

// answers records, per session, the refs answered so far, as the tests
// read them. The server may send an answer again after a resume (when it
// cannot know the client saw it); a client ignores the second one, and so
// do the test clients' readers (next, nextEvent).
var answers = answerLog{m: map[string]map[string]bool{}}

type answerLog struct {
	mu sync.Mutex
	m  map[string]map[string]bool // session id → refs answered
}

// repeated reports whether frame answers a ref of session that was
// answered before, and records it otherwise.
func (l *answerLog) repeated(session string, frame map[string]any) bool {
	switch frame["type"] {
	case "ack", "reply", "error":
	default:
		return false
	}
	ref, ok := frame["ref"]
	if !ok || session == "" {
		return false
	}
	key, _ := json.Marshal(ref)
	l.mu.Lock()
	defer l.mu.Unlock()
	refs := l.m[session]
	if refs == nil {
		refs = map[string]bool{}
		l.m[session] = refs
	}
	if refs[string(key)] {
		return true
	}
	refs[string(key)] = true
	return false
}

// stallGate stops a reader after a number of messages: it reads nothing
// more from its connection (not even pings) until unstalled.
type stallGate struct {
	stall chan struct{} // nil: the reader never stalls
	after int
}

// unstall lets a stalled reader go on.
func (g *stallGate) unstall() { close(g.stall) }

// pass returns once a reader that has read n messages may read on: at
// once before it stalls, else when it is unstalled. It reports false if
// the reader must quit instead.
func (g *stallGate) pass(n int, quit <-chan struct{}) bool {
	if g.stall == nil || n < g.after {
		return true
	}
	select {
	case <-g.stall:
		return true
	case <-quit:
		return false
	}
}

// --- websocket ---------------------------------------------------------------

type wsDuplex struct {
	eventPump
	stallGate
	r      io.Reader
	w      io.Writer
	wmu    sync.Mutex
	closer func()
}

func (c *wsDuplex) writeFrame(f ws.Frame) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var buf bytes.Buffer // one Write per frame
	if err := ws.WriteFrame(&buf, ws.MaskFrame(f)); err != nil {
		return err
	}
	_, err := c.w.Write(buf.Bytes())
	return err
}

func (c *wsDuplex) send(b []byte) error { return c.writeFrame(ws.NewTextFrame(b)) }

// close sends a normal close frame and waits (bounded) for the server's
// next frame or the end of the connection before closing it: cutting the
// connection at once could lose the close frame (over HTTP/2 it is still
// on its way to the socket).
func (c *wsDuplex) close() {
	c.shutdown(func() {
		if c.writeFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))) == nil {
			select {
			case <-c.exited:
			case <-time.After(frameWait):
			}
		}
		c.closer()
	})
}

func (c *wsDuplex) readLoop() {
	defer close(c.exited)
	var msg []byte
	var msgOp ws.OpCode
	for n := 0; ; {
		if !c.pass(n, c.quit) {
			return
		}
		h, err := ws.ReadHeader(c.r)
		if err != nil {
			c.emit(dxEvent{end: err})
			return
		}
		payload := make([]byte, h.Length)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			c.emit(dxEvent{end: err})
			return
		}
		if h.Masked {
			ws.Cipher(payload, h.Mask, 0)
		}
		switch h.OpCode {
		case ws.OpPing:
			c.writeFrame(ws.NewPongFrame(payload))
			continue
		case ws.OpPong:
			continue
		case ws.OpClose:
			code, reason := ws.ParseCloseFrameData(payload)
			if !c.emit(dxEvent{wsClose: int(code), wsReason: reason}) {
				return
			}
			c.writeFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(code, "")))
			continue
		case ws.OpContinuation:
			msg = append(msg, payload...)
		default:
			msg, msgOp = payload, h.OpCode
		}
		if h.Fin {
			if !c.emitFrame(msg, nil, msgOp == ws.OpText) {
				return
			}
			msg = nil
			n++
		}
	}
}

// connOpts are dialConn's options; the zero value is the usual client.
type connOpts struct {
	dial            dialFunc // dials TCP (nil: a net.Dialer)
	transparentGzip bool     // HTTP/1.1: Go's own Accept-Encoding/gunzip
	// stall: a WebSocket or SSE reader that stops after stallAfter
	// messages (0: it reads nothing, not even pings) until unstalled.
	stall      bool
	stallAfter int
}

// gate is the stallGate of a reader dialed with o.
func (o connOpts) gate() stallGate {
	if !o.stall {
		return stallGate{}
	}
	return stallGate{stall: make(chan struct{}), after: o.stallAfter}
}

// wsConn starts the reader of a WebSocket connection.
func (o connOpts) wsConn(r io.Reader, w io.Writer, closer func()) *wsDuplex {
	wc := &wsDuplex{eventPump: newEventPump(), stallGate: o.gate(), r: r, w: w, closer: closer}
	go wc.readLoop()
	return wc
}

// dialConn opens a connection of transport to tg.url(path): a WebSocket
// over HTTP/1.1 (h1) or an HTTP/2 extended CONNECT stream (h2, h2c), a
// stream or an event stream. It returns once the server accepted the
// opening, without reading the open frame, or the HTTP status of a
// refused opening. It never calls t.Fatal, so workers may use it.
func dialConn(tg target, transport, path string, hdr http.Header, o connOpts) (*rawConn, int, error) {
	dial := o.dial
	name := transport + "/" + tg.proto + " " + path
	ct := &connTracker{}
	rc := &rawConn{major: tg.protoMajor()}
	if transport == "websocket" && tg.proto == "h1" {
		if dial == nil {
			var nd net.Dialer
			dial = nd.DialContext
		}
		d := ws.Dialer{Timeout: frameWait, Header: ws.HandshakeHeaderHTTP(hdr),
			NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return ct.add(c), nil
			}}
		conn, br, _, err := d.Dial(context.Background(), "ws"+strings.TrimPrefix(tg.url(path), "http"))
		if err != nil {
			ct.closeAll()
			var se ws.StatusError
			if errors.As(err, &se) {
				return nil, int(se), fmt.Errorf("%s: %w", name, err)
			}
			return nil, 0, fmt.Errorf("%s: %w", name, err)
		}
		var r io.Reader = conn
		if br != nil {
			r = br // holds frames the server sent right after the handshake
		}
		wc := o.wsConn(r, conn, ct.closeAll)
		rc.duplexConn, rc.cutf = wc, ct.closeAll
		return rc, http.StatusSwitchingProtocols, nil
	}

	rt, closeIdle := tg.transport(ct, dial, o.transparentGzip)
	hc := &http.Client{Transport: rt}
	var (
		resp   *http.Response
		pw     *io.PipeWriter
		cancel context.CancelFunc
		err    error
	)
	switch transport {
	case "websocket":
		var pr *io.PipeReader
		pr, pw = io.Pipe()
		var ctx context.Context
		ctx, cancel = context.WithCancel(context.Background())
		var req *http.Request
		if req, err = http.NewRequestWithContext(ctx, http.MethodConnect, tg.url(path), pr); err != nil {
			break
		}
		for k, v := range hdr {
			req.Header[k] = v
		}
		req.Header.Set(":protocol", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		resp, err = roundTripWithin(rt, req)
	case "stream":
		resp, pw, cancel, err = startStream(hc, tg.url(path), hdr)
	case "sse":
		resp, cancel, err = startSSE(hc, tg.url(path), hdr)
	default:
		return nil, 0, fmt.Errorf("unknown transport %q", transport)
	}
	rc.cutf = func() {
		ct.closeAll() // the TCP connection first: no RST_STREAM, no END_STREAM
		if pw != nil {
			pw.CloseWithError(errors.New("cut"))
		}
		if cancel != nil {
			cancel()
		}
		if resp != nil {
			resp.Body.Close()
		}
		closeIdle()
	}
	if err != nil {
		rc.cutf()
		return nil, 0, fmt.Errorf("%s: %w", name, err)
	}
	wantType := map[string]string{"stream": "application/x-ndjson", "sse": "text/event-stream"}[transport]
	if resp.StatusCode != http.StatusOK || wantType != "" && mediaTypeOf(resp.Header.Get("Content-Type")) != wantType {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		rc.cutf()
		return nil, resp.StatusCode, fmt.Errorf("%s: status %d (%q), Content-Type %q; want 200 %s", name, resp.StatusCode, b, resp.Header.Get("Content-Type"), wantType)
	}
	rc.major = resp.ProtoMajor
	if transport == "websocket" {
		rc.duplexConn = o.wsConn(resp.Body, pw, rc.cutf)
		return rc, http.StatusOK, nil
	}
	body, err := decodedBody(resp)
	if err != nil {
		rc.cutf()
		return nil, resp.StatusCode, fmt.Errorf("%s: %w", name, err)
	}
	if transport == "stream" {
		sc := &streamDuplex{eventPump: newEventPump(), pw: pw, resp: resp, cancel: cancel}
		rc.duplexConn = sc
		go sc.readLoop(body)
	} else {
		sc := &sseDuplex{eventPump: newEventPump(), stallGate: o.gate(), hc: hc, url: tg.url(path), resp: resp, cancel: cancel}
		sc.retry.Store(-1)
		rc.duplexConn = sc
		go sc.readLoop(body)
	}
	return rc, http.StatusOK, nil
}

// roundTripWithin runs a round trip, giving up after frameWait.
func roundTripWithin(rt http.RoundTripper, req *http.Request) (*http.Response, error) {
	type result struct {
		resp *http.Response
		err  error
	}
	rc := make(chan result, 1)
	go func() {
		resp, err := rt.RoundTrip(req)
		rc <- result{resp, err}
	}()
	select {
	case res := <-rc:
		return res.resp, res.err
	case <-time.After(frameWait):
		return nil, fmt.Errorf("no response within %s", frameWait)
	}
}

// --- stream ------------------------------------------------------------------

type streamDuplex struct {
	eventPump
	pw     *io.PipeWriter
	wmu    sync.Mutex
	resp   *http.Response
	cancel context.CancelFunc
	pings  atomic.Int64
}

// send writes one line of the request body.
func (c *streamDuplex) send(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	line := append(append([]byte(nil), b...), '\n')
	done := make(chan error, 1)
	go func() {
		_, err := c.pw.Write(line)
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(frameWait):
		c.pw.CloseWithError(errors.New("write timed out"))
		<-done
		return fmt.Errorf("stream: request body not consumed within %s", frameWait)
	}
}

// halfClose ends the request body; the response goes on.
func (c *streamDuplex) halfClose() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.pw.Close()
}

func (c *streamDuplex) close() {
	c.shutdown(func() {
		c.pw.CloseWithError(errors.New("client closed"))
		c.cancel()
		c.resp.Body.Close()
	})
}

func (c *streamDuplex) readLoop(body io.Reader) {
	defer close(c.exited)
	br := bufio.NewReaderSize(body, 64<<10)
	for {
		line, err := br.ReadBytes('\n')
		if t := bytes.TrimSpace(line); len(t) > 0 {
			if bytes.Equal(t, []byte(`{"type":"ping"}`)) {
				c.pings.Add(1)
			} else if !c.emitFrame(t, nil, false) {
				return
			}
		}
		if err != nil {
			c.emit(dxEvent{end: err})
			return
		}
	}
}

// startStream sends the stream opening request and returns the response
// (whatever its status) with the body writer.
func startStream(hc *http.Client, url string, hdr http.Header) (*http.Response, *io.PipeWriter, context.CancelFunc, error) {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, pr)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Content-Type", "application/x-ndjson")
	type result struct {
		resp *http.Response
		err  error
	}
	rc := make(chan result, 1)
	go func() {
		resp, err := hc.Do(req)
		rc <- result{resp, err}
	}()
	select {
	case res := <-rc:
		if res.err != nil {
			pw.Close()
			cancel()
			return nil, nil, nil, res.err
		}
		return res.resp, pw, cancel, nil
	case <-time.After(frameWait):
		pw.CloseWithError(errors.New("timeout"))
		cancel()
		<-rc
		return nil, nil, nil, fmt.Errorf("stream: no response headers within %s", frameWait)
	}
}

// decodedBody undoes a Content-Encoding the client asked for itself (Go
// only decompresses transparently when it set Accept-Encoding). The gzip
// header is read lazily, by the reader goroutine.
func decodedBody(resp *http.Response) (io.Reader, error) {
	switch ce := strings.ToLower(resp.Header.Get("Content-Encoding")); ce {
	case "", "identity":
		return resp.Body, nil
	case "gzip":
		return &lazyGzip{src: resp.Body}, nil
	default:
		return nil, fmt.Errorf("unexpected Content-Encoding %q", ce)
	}
}

type lazyGzip struct {
	src io.Reader
	zr  *gzip.Reader
}

func (l *lazyGzip) Read(p []byte) (int, error) {
	if l.zr == nil {
		zr, err := gzip.NewReader(l.src)
		if err != nil {
			return 0, err
		}
		l.zr = zr
	}
	return l.zr.Read(p)
}

func mediaTypeOf(v string) string {
	mt, _, _ := strings.Cut(v, ";")
	return strings.ToLower(strings.TrimSpace(mt))
}

// --- sse ---------------------------------------------------------------------

type sseDuplex struct {
	eventPump
	stallGate
	hc     *http.Client
	url    string
	resp   *http.Response
	cancel context.CancelFunc
	pings  atomic.Int64 // heartbeat events
	retry  atomic.Int64

	mu    sync.Mutex
	token string
}

func (c *sseDuplex) getToken() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.token
}

// post POSTs body for the session with its token; it returns status,
// response body and headers.
func (c *sseDuplex) post(contentType string, body []byte, hdr ...string) (int, []byte, http.Header, error) {
	return ssePost(c.hc, c.url, c.getToken(), contentType, body, hdr...)
}

func ssePost(hc *http.Client, url, token, contentType string, body []byte, hdr ...string) (int, []byte, http.Header, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return 0, nil, nil, err
	}
	if token != "" {
		req.Header.Set("Duplex-Token", token)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	return resp.StatusCode, raw, resp.Header, err
}

// send posts one frame as application/json and wants 202.
func (c *sseDuplex) send(b []byte) error {
	if c.getToken() == "" {
		return errors.New("sse: no token yet (open event not seen)")
	}
	st, raw, _, err := c.post("application/json", b)
	if err != nil {
		return err
	}
	if st != http.StatusAccepted {
		return fmt.Errorf("sse POST: status %d %q, want 202", st, raw)
	}
	return nil
}

func (c *sseDuplex) close() {
	c.shutdown(func() {
		c.cancel()
		c.resp.Body.Close()
	})
}

func (c *sseDuplex) readLoop(body io.Reader) {
	defer close(c.exited)
	p := newSSEParser()
	buf := make([]byte, 32<<10)
	for frames := 0; ; {
		if !c.pass(frames, c.quit) {
			return
		}
		n, err := body.Read(buf)
		if n > 0 {
			for _, ev := range p.Feed(buf[:n]) {
				c.retry.Store(int64(p.Retry))
				ev := ev
				if ev.Type == "ping" {
					c.pings.Add(1)
					continue
				}
				var m map[string]any
				if json.Unmarshal([]byte(ev.Data), &m) == nil && m["type"] == "open" {
					if tok, _ := m["token"].(string); tok != "" {
						c.mu.Lock()
						c.token = tok
						c.mu.Unlock()
					}
				}
				if !c.emitFrame([]byte(ev.Data), &ev, false) {
					return
				}
				frames++
			}
			c.retry.Store(int64(p.Retry))
		}
		if err != nil {
			c.emit(dxEvent{end: err})
			return
		}
	}
}

// startSSE sends the event-stream opening request.
func startSSE(hc *http.Client, url string, hdr http.Header) (*http.Response, context.CancelFunc, error) {
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		cancel()
		return nil, nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Accept", "text/event-stream")
	type result struct {
		resp *http.Response
		err  error
	}
	rc := make(chan result, 1)
	go func() {
		resp, err := hc.Do(req)
		rc <- result{resp, err}
	}()
	select {
	case res := <-rc:
		if res.err != nil {
			cancel()
			return nil, nil, res.err
		}
		return res.resp, cancel, nil
	case <-time.After(frameWait):
		cancel()
		<-rc
		return nil, nil, fmt.Errorf("sse: no response headers within %s", frameWait)
	}
}

// --- the project's Go client -------------------------------------------------

// clientConn is a session held by the project's Go client (package client),
// seen through its OnFrame tap like the raw connections: every server frame
// in order, then, once the session is over, an event whose end is the
// session's Err (a *client.CloseError when the server closed it). The
// client answers heartbeats, acknowledges pushes and resumes the session
// across dropped connections itself.
type clientConn struct {
	eventPump
	s    *client.Session
	drop atomic.Value // errBox: why the last connection ended
}

type errBox struct{ err error }

func (c *clientConn) send(b []byte) error { return c.s.SendFrame(b) }

func (c *clientConn) close() { c.shutdown(func() { c.s.Close() }) }

// dialClient opens a session with the Go client (opts.OnFrame and
// opts.OnState are its own) and reads nothing.
func dialClient(t *testing.T, url string, hdr http.Header, opts client.Options) *dxSession {
	t.Helper()
	c := &clientConn{eventPump: newEventPump()}
	opts.Header = hdr
	opts.OnFrame = func(raw json.RawMessage) { c.emitFrame(raw, nil, true) }
	opts.OnDisconnect = func(err error) { c.drop.Store(errBox{err}) }
	opts.OnState = func(st client.State) {
		if st == client.StateClosed {
			c.emit(dxEvent{end: client.ErrClosed})
			close(c.exited)
		}
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = frameWait
	}
	ctx, cancel := context.WithTimeout(context.Background(), frameWait)
	defer cancel()
	s, err := client.Dial(ctx, url, opts)
	if err != nil {
		t.Fatalf("client: open %s: %v", url, err)
	}
	c.s = s
	t.Cleanup(c.close)
	return &dxSession{name: "client " + url, transport: s.Transport(), conn: c}
}

// openClient opens a session with the Go client over WebSocket (HTTP/1.1)
// and reads its open frame.
func openClient(t *testing.T, url string, hdr http.Header) *dxSession {
	t.Helper()
	s := dialClient(t, url, hdr, client.Options{Transports: []string{client.WebSocket}, HTTP: client.HTTP1})
	s.expectOpen(t)
	return s
}

// ---------------------------------------------------------------------------
// A session over any transport, with the assertions the scenarios use.

type dxSession struct {
	name      string
	transport string
	conn      duplexConn
	raw       *rawConn

	Session, Token string
	open           map[string]any // the open frame
	seq            float64
}

var transports = []string{"websocket", "stream", "sse"}

// openDX opens a session of the given transport and reads its open frame.
func openDX(t *testing.T, transport string, tg target, path string, hdr http.Header) *dxSession {
	t.Helper()
	s := dialDX(t, transport, tg, path, hdr)
	s.expectOpen(t)
	return s
}

// dialDX opens the connection without reading anything.
func dialDX(t *testing.T, transport string, tg target, path string, hdr http.Header) *dxSession {
	t.Helper()
	rc, status, err := dialConn(tg, transport, path, hdr, connOpts{})
	if err != nil {
		t.Fatalf("%s over %s %s: status %d, %v", transport, tg.proto, path, status, err)
	}
	t.Cleanup(rc.end)
	if rc.major != tg.protoMajor() {
		t.Fatalf("%s over %s: the session was opened over HTTP/%d, want HTTP/%d", transport, tg.proto, rc.major, tg.protoMajor())
	}
	return &dxSession{name: transport + "/" + tg.proto + path, transport: transport, conn: rc.duplexConn, raw: rc}
}

func (s *dxSession) next(t *testing.T) dxEvent {
	t.Helper()
	return s.nextWithin(t, frameWait)
}

func (s *dxSession) nextWithin(t *testing.T, d time.Duration) dxEvent {
	t.Helper()
	timeout := time.After(d)
	for {
		select {
		case e := <-s.conn.frames():
			if answers.repeated(e.session, e.frame) {
				continue // a client ignores a second answer to the same ref
			}
			return e
		case <-timeout:
			t.Fatalf("%s: nothing from the server within %s", s.name, d)
			return dxEvent{}
		}
	}
}

// readFrame returns the next server frame.
func (s *dxSession) readFrame(t *testing.T) map[string]any {
	t.Helper()
	e := s.next(t)
	if e.frame == nil {
		t.Fatalf("%s: want a frame, got %v", s.name, e)
	}
	if e.sse != nil && e.sse.Type != e.frame["type"] {
		t.Fatalf("%s: SSE event type %q does not match the frame type %v: %s", s.name, e.sse.Type, e.frame["type"], e.raw)
	}
	return e.frame
}

func (s *dxSession) expectType(t *testing.T, typ string) map[string]any {
	t.Helper()
	f := s.readFrame(t)
	if f["type"] != typ {
		t.Fatalf("%s: want a %q frame, got %v", s.name, typ, f)
	}
	return f
}

func (s *dxSession) expectOpen(t *testing.T) map[string]any {
	t.Helper()
	f := s.expectType(t, "open")
	sid, _ := f["session"].(string)
	tok, _ := f["token"].(string)
	if sid == "" || tok == "" || sid == tok {
		t.Fatalf("%s: open frame without distinct session and token: %v", s.name, f)
	}
	if f["resumed"] != false {
		t.Fatalf("%s: open frame resumed = %v, want false", s.name, f["resumed"])
	}
	if _, ok := f["heartbeat"].(float64); !ok {
		t.Fatalf("%s: open frame without numeric heartbeat: %v", s.name, f)
	}
	s.Session, s.Token, s.open = sid, tok, f
	return f
}

// expectPush reads the next frame: a push with the next seq, the channel
// ("" = absent) and data. Over SSE the event must carry id <token>:<seq>.
func (s *dxSession) expectPush(t *testing.T, channel string, data any) map[string]any {
	t.Helper()
	e := s.next(t)
	if e.frame == nil || e.frame["type"] != "push" {
		t.Fatalf("%s: want a push, got %v", s.name, e)
	}
	f := e.frame
	seq, ok := f["seq"].(float64)
	if !ok || seq != s.seq+1 {
		t.Fatalf("%s: push seq = %v, want %v (frame %v)", s.name, f["seq"], s.seq+1, f)
	}
	s.seq = seq
	if channel == "" {
		if ch, has := f["channel"]; has {
			t.Fatalf("%s: push has channel %v, want none", s.name, ch)
		}
	} else if f["channel"] != channel {
		t.Fatalf("%s: push channel = %v, want %q", s.name, f["channel"], channel)
	}
	if !jsonEqual(f["data"], data) {
		t.Fatalf("%s: push data = %v, want %v", s.name, f["data"], data)
	}
	if e.sse != nil {
		want := s.Token + ":" + strconv.Itoa(int(seq))
		if e.sse.Type != "push" || !e.sse.HasID || e.sse.ID != want {
			t.Fatalf("%s: push event: type %q, id %q (own id field: %v), want type push with id %q", s.name, e.sse.Type, e.sse.ID, e.sse.HasID, want)
		}
	}
	return f
}

func (s *dxSession) sendRaw(t *testing.T, b []byte) {
	t.Helper()
	if err := s.conn.send(b); err != nil {
		t.Fatalf("%s: send %s: %v", s.name, b, err)
	}
}

func (s *dxSession) send(t *testing.T, frame map[string]any) {
	t.Helper()
	b, err := json.Marshal(frame)
	if err != nil {
		t.Fatal(err)
	}
	s.sendRaw(t, b)
}

// call sends a message with id and path (and data unless nil) and returns
// the next frame, which must answer it.
func (s *dxSession) call(t *testing.T, id, path string, data any) map[string]any {
	t.Helper()
	m := map[string]any{"id": id, "path": path}
	if data != nil {
		m["data"] = data
	}
	s.send(t, m)
	f := s.readFrame(t)
	if f["ref"] != id {
		t.Fatalf("%s: answer to %q has ref %v: %v", s.name, id, f["ref"], f)
	}
	return f
}

// expectClose reads the close frame (code, reason unless "", reconnect),
// then — WebSocket only — a close frame with the same code, then the end of
// the connection.
func (s *dxSession) expectClose(t *testing.T, code int, reason string, reconnect bool) {
	t.Helper()
	f := s.expectType(t, "close")
	if f["code"] != float64(code) {
		t.Fatalf("%s: close frame %v, want code %d", s.name, f, code)
	}
	if reason != "" && f["reason"] != reason {
		t.Fatalf("%s: close frame %v, want reason %q", s.name, f, reason)
	}
	rc, _ := f["reconnect"].(bool)
	if rc != reconnect {
		t.Fatalf("%s: close frame %v, want reconnect %v", s.name, f, reconnect)
	}
	e := s.expectEnd(t, code)
	if reason != "" && s.transport == "websocket" && e.wsReason != reason {
		t.Fatalf("%s: WebSocket close reason %q, want %q", s.name, e.wsReason, reason)
	}
}

// expectClosed asserts the server ends the session for good with code and
// reason (reason checked in the close frame and the WebSocket close frame).
func (s *dxSession) expectClosed(t *testing.T, code int, reason string) {
	t.Helper()
	s.expectClose(t, code, reason, false)
}

// expectEnd asserts the connection ends next (after a WebSocket close frame
// with code, for websocket, which it returns).
func (s *dxSession) expectEnd(t *testing.T, code int) dxEvent {
	t.Helper()
	e := s.next(t)
	closeFrame := e
	if cc, ok := s.conn.(*clientConn); ok {
		// The session is over: the client saw the server close it.
		var ce *client.CloseError
		if e.end == nil || !errors.As(cc.s.Err(), &ce) || ce.Code != code {
			t.Fatalf("%s: want the session closed by the server with %d, got %v (session error: %v)", s.name, code, e, cc.s.Err())
		}
		// Over WebSocket, the connection ended with a close frame of the
		// same code and reason.
		drop, _ := cc.drop.Load().(errBox)
		var wsc *client.WebSocketClose
		if s.transport == "websocket" && (!errors.As(drop.err, &wsc) || wsc.Code != code || wsc.Reason != ce.Reason) {
			t.Fatalf("%s: the connection ended with %v, want a WebSocket close frame %d %q", s.name, drop.err, code, ce.Reason)
		}
		return dxEvent{wsClose: ce.Code, wsReason: ce.Reason}
	}
	if s.transport == "websocket" {
		if e.wsClose != code {
			t.Fatalf("%s: want a WebSocket close frame %d, got %v", s.name, code, e)
		}
		e = s.next(t)
	}
	if e.end == nil {
		t.Fatalf("%s: want the connection to end, got %v", s.name, e)
	}
	return closeFrame
}

// close ends the connection in order (a WebSocket close frame first).
func (s *dxSession) close() { s.conn.close() }

// closeGracefully is close.
func (s *dxSession) closeGracefully() { s.conn.close() }

// Close cuts the connection: no close frame, no end of stream (a Go
// client session is closed).
func (s *dxSession) Close() {
	if s.raw == nil {
		s.conn.close()
		return
	}
	s.raw.cut()
}

// writeFrame writes one WebSocket frame as it is (websocket only).
func (s *dxSession) writeFrame(f ws.Frame) error { return s.conn.(*wsDuplex).writeFrame(f) }

// ---------------------------------------------------------------------------
// misc

// sessionExists asks the admin API whether the session is listed.
func sessionExists(t *testing.T, c *caddyProc, id string) bool {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+id), nil)
	switch st {
	case http.StatusOK:
		return true
	case http.StatusNotFound:
		return false
	}
	t.Fatalf("GET /duplex/sessions/%s: %d %s", id, st, raw)
	return false
}

// sessionsOfUser lists the ids of a user's sessions.
func sessionsOfUser(t *testing.T, c *caddyProc, user string) []string {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions?user="+user), nil)
	if st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions?user=%s: %d %s", user, st, raw)
	}
	var l []map[string]any
	if err := json.Unmarshal(raw, &l); err != nil {
		t.Fatalf("sessions list: %v: %s", err, raw)
	}
	var ids []string
	for _, s := range l {
		id, _ := s["id"].(string)
		ids = append(ids, id)
	}
	return ids
}
