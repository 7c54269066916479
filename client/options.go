package client

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"time"
)

// Transport names, as in the server's `transports` option.
const (
	WebSocket = "websocket"
	Stream    = "stream"
	SSE       = "sse"
)

// HTTP versions for Options.HTTP.
const (
	// HTTPAuto: HTTP/1.1 for http:// URLs; for https:// URLs the stream
	// and SSE transports use HTTP/2 when the server offers it (ALPN), and
	// WebSocket uses HTTP/1.1.
	HTTPAuto = ""
	// HTTP1 uses HTTP/1.1 only.
	HTTP1 = "h1"
	// HTTP2 uses HTTP/2 only: over TLS for https:// URLs, h2c (prior
	// knowledge) for http:// URLs. WebSocket then opens with an RFC 8441
	// extended CONNECT, which the server must enable (Caddy runs with
	// GODEBUG=http2xconnect=1).
	HTTP2 = "h2"
)

// Options configure a session. The zero value is usable.
type Options struct {
	// Transports to try, in order, at every (re)connection; the first
	// that opens is used. Default: websocket, stream, sse.
	Transports []string
	// HTTP selects the HTTP version (HTTPAuto, HTTP1, HTTP2).
	HTTP string
	// Header is sent with every opening request and SSE POST (e.g.
	// Authorization); Duplex-* headers in it are dropped (the client sets
	// its own).
	Header http.Header
	// TLSConfig for https:// and wss:// URLs (nil: the system roots).
	TLSConfig *tls.Config
	// DialContext dials TCP connections (nil: a net.Dialer). The client
	// keeps its own HTTP transports on top, so that it holds, and can
	// close, every connection it makes.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)

	// DialTimeout bounds one opening, from the first byte to the open
	// frame. Default 30s.
	DialTimeout time.Duration
	// CallTimeout bounds a Call on top of its context. Default 30s;
	// negative: none.
	CallTimeout time.Duration
	// MinBackoff and MaxBackoff bound the reconnection delay (full
	// jitter, doubling from MinBackoff up to MaxBackoff). Defaults 500ms
	// and 20s.
	MinBackoff, MaxBackoff time.Duration
	// AckInterval is how often the client acknowledges pushes at most
	// (an ack lets the server drop them from its resume buffer; acks
	// count against the session's message rate). Default 1s.
	AckInterval time.Duration
	// MaxFrameSize bounds one server frame. Default 16 MiB.
	MaxFrameSize int64

	// The callbacks run on the session's reader goroutine, in the order
	// of the frames: they must return soon, and must not call Close or
	// wait for a Call of the same session (its answer could not be read).

	// OnPush, if set, receives every push, in order, exactly once;
	// Pushes then stays empty.
	OnPush func(Push)
	// OnOpen is called for every opened connection, the first included
	// (before Dial returns).
	OnOpen func(Open)
	// OnClose is called for every close frame from the server.
	OnClose func(CloseInfo)
	// OnState is called when the session's state changes.
	OnState func(State)
	// OnFrame, if set, sees every server frame as received (pings
	// aside), before the session acts on it: a tap for logging and
	// tools.
	OnFrame func(json.RawMessage)
	// OnDisconnect, if set, is called when a connection ends, with why:
	// a *WebSocketClose when the server's WebSocket close frame ended it
	// (also when it answers Close's), ErrClosed when Close ended it
	// otherwise, else the error that ended it. It runs on the session's
	// connection loop, before the next connection is dialed: it must
	// return promptly and must not call the session's methods that wait
	// for a connection (Call, Close); hand slow work to a goroutine.
	OnDisconnect func(error)
}

func (o Options) withDefaults() (Options, error) {
	if len(o.Transports) == 0 {
		o.Transports = []string{WebSocket, Stream, SSE}
	}
	for _, t := range o.Transports {
		if !slices.Contains([]string{WebSocket, Stream, SSE}, t) {
			return o, fmt.Errorf("duplex client: unknown transport %q", t)
		}
	}
	switch o.HTTP {
	case HTTPAuto, HTTP1, HTTP2:
	default:
		return o, fmt.Errorf("duplex client: unknown HTTP version %q (want \"\", h1 or h2)", o.HTTP)
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 30 * time.Second
	}
	if o.CallTimeout == 0 {
		o.CallTimeout = 30 * time.Second
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = 500 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 20 * time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = o.MinBackoff
	}
	if o.AckInterval <= 0 {
		o.AckInterval = time.Second
	}
	if o.MaxFrameSize <= 0 {
		o.MaxFrameSize = 16 << 20
	}
	if o.DialContext == nil {
		var d net.Dialer
		o.DialContext = d.DialContext
	}
	return o, nil
}
