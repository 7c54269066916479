package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// conn is one connection of a session, over any transport. One goroutine
// reads it and one writes it; close may be called from anywhere, any
// number of times.
type conn interface {
	// read returns the next server frame. A nil frame with a nil error is
	// a heartbeat the transport consumed itself (a WebSocket ping, an SSE
	// comment).
	read() ([]byte, error)
	// write sends frames in order. n counts the frames that may have
	// reached the server (a frame whose write failed half-way counts:
	// it must not be sent again).
	write(ctx context.Context, frames [][]byte) (n int, err error)
	// bye asks the server to end the session, if the transport can say
	// so (a WebSocket close frame), and reports whether it did; the
	// server then ends the connection.
	bye() bool
	// close ends the connection.
	close()
	// transport is the transport's name.
	transport() string
}

// retryAfter is a write the server refused for now (SSE POST 429).
type retryAfter struct{ d time.Duration }

func (e *retryAfter) Error() string { return fmt.Sprintf("duplex client: retry after %s", e.d) }

// frameRefused is a write of which frame i was refused for good (SSE POST
// 400 or 413); the frames before it were sent.
type frameRefused struct {
	i   int
	err *Error
}

func (e *frameRefused) Error() string { return e.err.Error() }

// tracker remembers the network connections made for one session
// connection, so that ending it closes them all.
type tracker struct {
	dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// lost, if set, is called when reading a connection fails: it ends a
	// request body that would otherwise keep Go's HTTP/1.1 transport
	// waiting for it after the connection is gone.
	lost func()

	mu     sync.Mutex // guards conns and closed
	conns  []net.Conn
	closed bool
	idle   []func() // CloseIdleConnections of the HTTP transports
}

func (t *tracker) dialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := t.dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	t.conns = append(t.conns, c)
	if t.lost != nil {
		return &watchedConn{Conn: c, lost: t.lost}, nil
	}
	return c, nil
}

// watchedConn calls lost when a read fails.
type watchedConn struct {
	net.Conn
	lost func()
}

func (c *watchedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil {
		c.lost()
	}
	return n, err
}

func (t *tracker) closeAll() {
	t.mu.Lock()
	t.closed = true
	conns, idle := t.conns, t.idle
	t.conns, t.idle = nil, nil
	t.mu.Unlock()
	for _, f := range idle {
		f()
	}
	for _, c := range conns {
		c.Close()
	}
}

// roundTripper returns an HTTP transport for one session connection, all
// of whose network connections the tracker holds.
func (d *dialer) roundTripper(t *tracker) http.RoundTripper {
	tlsConf := d.opts.TLSConfig.Clone()
	if tlsConf == nil {
		tlsConf = &tls.Config{}
	}
	var rt http.RoundTripper
	var idle func()
	if d.opts.HTTP == HTTP2 {
		h2 := &http2.Transport{
			AllowHTTP:          d.u.Scheme == "http",
			TLSClientConfig:    tlsConf,
			DisableCompression: true,
			DialTLSContext: func(ctx context.Context, network, addr string, cfg *tls.Config) (net.Conn, error) {
				raw, err := t.dialContext(ctx, network, addr)
				if err != nil || d.u.Scheme == "http" {
					return raw, err
				}
				tc := tls.Client(raw, cfg)
				if err := tc.HandshakeContext(ctx); err != nil {
					raw.Close()
					return nil, err
				}
				return tc, nil
			},
		}
		rt, idle = h2, h2.CloseIdleConnections
	} else {
		h1 := &http.Transport{
			Proxy:              nil,
			DialContext:        t.dialContext,
			TLSClientConfig:    tlsConf,
			DisableCompression: true,
			ForceAttemptHTTP2:  d.opts.HTTP == HTTPAuto,
		}
		if d.opts.HTTP == HTTP1 {
			h1.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		rt, idle = h1, h1.CloseIdleConnections
	}
	t.mu.Lock()
	t.idle = append(t.idle, idle)
	t.mu.Unlock()
	return rt
}

// dialer opens connections to one session URL.
type dialer struct {
	u    *url.URL // http or https
	opts *Options
}

func parseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("duplex client: bad URL: %w", err)
	}
	switch u.Scheme {
	case "http", "https":
	case "ws":
		u.Scheme = "http"
	case "wss":
		u.Scheme = "https"
	default:
		return nil, fmt.Errorf("duplex client: URL scheme %q: want http, https, ws or wss", u.Scheme)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("duplex client: URL %q has no host", raw)
	}
	u.Fragment = ""
	return u, nil
}

// header is the opening request's header: the user's, then the resume
// cursor.
func (d *dialer) header(cursor string) http.Header {
	h := d.opts.Header.Clone()
	if h == nil {
		h = http.Header{}
	}
	for k := range h {
		if len(k) > 7 && http.CanonicalHeaderKey(k[:7]) == "Duplex-" {
			delete(h, k)
		}
	}
	if cursor != "" {
		h.Set("Duplex-Resume", cursor)
	}
	return h
}

// dial opens a connection of the named transport; cursor resumes a
// session. The connection ends when ctx does, until dial returns.
func (d *dialer) dial(ctx context.Context, transport, cursor string) (conn, error) {
	switch transport {
	case WebSocket:
		if d.opts.HTTP == HTTP2 {
			return d.dialWebSocketH2(ctx, cursor)
		}
		return d.dialWebSocket(ctx, cursor)
	case Stream:
		return d.dialStream(ctx, cursor)
	case SSE:
		return d.dialSSE(ctx, cursor)
	}
	return nil, fmt.Errorf("duplex client: unknown transport %q", transport)
}

// errConnLost ends the request body of a connection that is gone.
var errConnLost = errors.New("duplex client: connection lost")

// errNotOpen is an opening whose first frame is not an open frame.
var errNotOpen = errors.New("duplex client: the server's first frame is not an open frame")

// exchange is the request that carries one connection of the stream, SSE
// or WebSocket-over-HTTP/2 transport, with its response once the head is
// in (see open). The transports that send up the request (stream, and
// WebSocket over HTTP/2) give it a pipe as its body and write their frames
// into pw; an SSE GET has no body (its frames go up as POSTs through rt).
type exchange struct {
	resp   *http.Response
	pw     *io.PipeWriter    // nil without a pipe
	rt     http.RoundTripper // the connection's own HTTP transport
	t      *tracker
	cancel context.CancelFunc // ends the request
	stop   func() bool        // unties the request from the dial's context
}

// httpOpening is the request with which a transport opens a connection.
type httpOpening struct {
	method string
	header http.Header
	// pipe gives the request a body the transport writes its frames into.
	pipe bool
	// accept, if set, is the media type asked for (the Accept header) and
	// the one the response must have.
	accept string
	// name is the transport in errors; transport, in a refused opening's
	// statusError (a WebSocket is refused as one whatever it runs over).
	name, transport string
}

// open sends a connection's request and returns once the server has
// accepted it: status 200, with o.accept's content type if set; any other
// answer is a statusError. The exchange then lives on after ctx (the
// dial's context) is done; until open returns, ctx ending ends it. Every
// failure ends the exchange.
func (d *dialer) open(ctx context.Context, o httpOpening) (*exchange, error) {
	t := &tracker{dial: d.opts.DialContext}
	x := &exchange{t: t}
	var body io.Reader // none, unless o.pipe
	if o.pipe {
		// The pipe must end when the connection does, or a failed round
		// trip waits for it forever.
		pr, pw := io.Pipe()
		body, x.pw = pr, pw
		t.lost = func() { pw.CloseWithError(errConnLost) }
	}
	x.rt = d.roundTripper(t)
	life, cancel := context.WithCancel(context.Background())
	x.cancel = cancel
	x.stop = context.AfterFunc(ctx, func() {
		cancel()
		x.endPipe(ctx.Err())
	})
	req, err := http.NewRequestWithContext(life, o.method, d.u.String(), body)
	if err != nil {
		return nil, x.fail(fmt.Errorf("duplex client: %s: %w", o.name, err))
	}
	req.Header = o.header
	if o.accept != "" {
		req.Header.Set("Accept", o.accept)
	}
	resp, err := x.rt.RoundTrip(req)
	if err != nil {
		return nil, x.fail(fmt.Errorf("duplex client: %s: %w", o.name, err))
	}
	x.resp = resp
	if mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type")); resp.StatusCode != http.StatusOK || (o.accept != "" && mt != o.accept) {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, x.fail(&statusError{transport: o.transport, status: resp.StatusCode, body: strings.TrimSpace(string(b))})
	}
	// Accepted: untie the exchange from ctx (unless it ended first), so
	// that from now on only release ends it.
	if !x.stop() {
		return nil, x.fail(fmt.Errorf("duplex client: %s: %w", o.name, ctx.Err()))
	}
	return x, nil
}

// endPipe ends the request's body with err (nil: a normal end), if it is
// a pipe.
func (x *exchange) endPipe(err error) {
	if x.pw != nil {
		x.pw.CloseWithError(err)
	}
}

// fail ends an exchange that did not open and returns err.
func (x *exchange) fail(err error) error {
	x.stop()
	x.release()
	return err
}

// release ends the exchange: the pipe, the response (if it came) and its
// connections.
func (x *exchange) release() {
	x.endPipe(nil)
	if x.resp != nil {
		x.resp.Body.Close()
	}
	x.cancel()
	x.t.closeAll()
}
