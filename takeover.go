package duplex

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// takeOver hijacks the HTTP/1.1 connection of an SSE or stream opening, so
// its session can outlive the request (see attachment.start): an idle
// session then keeps neither the request's goroutine with Caddy's handler
// stack nor net/http's connection buffers. It returns the network
// connection and what the client sent behind its request head that the
// server had read already (the start of a stream's body). ok is false when
// the response cannot be taken over (a wrapper without Hijack); the
// session then stays inside its request.
//
// The response head is then the session's to write (see responseHead):
// Caddy's access log line for the opening is written when the handler
// returns, and `header` operations deferred to the response's head and an
// `encode` in front do not apply, as for a WebSocket (README, logging).
func takeOver(w http.ResponseWriter) (conn net.Conn, early []byte, ok bool) {
	conn, rw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return nil, nil, false
	}
	return rawConn(conn), takeBuffered(rw.Reader), true
}

// takeBuffered returns a copy of what the server had read from a hijacked
// connection beyond the request head, and drops the buffer: net/http's
// connection keeps pointing at it after the hijack, and nothing reads its
// 4 KiB any more.
func takeBuffered(br *bufio.Reader) (early []byte) {
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		early = bytes.Clone(b)
	}
	*br = bufio.Reader{}
	return early
}

// responseHead is the head of a 200 response written on a connection taken
// over: the headers set on w so far (by handlers in front, e.g. CORS), the
// transport's own, and Connection: close, since the body (NDJSON lines or
// events, neither chunked nor sized) ends when the connection does.
func responseHead(h http.Header) []byte {
	h.Del("Transfer-Encoding")
	h.Del("Content-Length")
	h.Set("Connection", "close")
	if _, ok := h["Date"]; !ok {
		h.Set("Date", time.Now().UTC().Format(http.TimeFormat))
	}
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 200 OK\r\n")
	_ = h.Write(&b) // writing to a bytes.Buffer does not fail
	b.WriteString("\r\n")
	return b.Bytes()
}

// canTakeOver reports whether the opening r runs on an HTTP/1.1 connection
// the session may take over.
func canTakeOver(r *http.Request) bool { return r.ProtoMajor == 1 }

// earlyReader reads what the server had buffered, then the connection.
func earlyReader(conn net.Conn, early []byte) io.Reader {
	if len(early) == 0 {
		return conn
	}
	return io.MultiReader(bytes.NewReader(early), conn)
}

// drainUntilGone reads and discards what the client of a connection taken
// over sends on it (an SSE client sends nothing) until it is closed or
// fails; it returns why.
func drainUntilGone(conn net.Conn) error {
	var b [64]byte
	for {
		if _, err := conn.Read(b[:]); err != nil {
			return fmt.Errorf("duplex: connection gone: %w", err)
		}
	}
}
