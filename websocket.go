package duplex

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"
)

// isWebSocketOpening reports whether r asks for a WebSocket: an HTTP/1.1
// Upgrade, or an HTTP/2 (RFC 8441) or HTTP/3 (RFC 9220) extended CONNECT.
func isWebSocketOpening(r *http.Request) bool {
	switch {
	case r.Method == http.MethodGet && r.ProtoMajor == 1:
		return headerHasToken(r.Header, "Connection", "upgrade") &&
			strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
	case r.Method == http.MethodConnect && r.ProtoMajor == 2:
		return strings.EqualFold(r.Header.Get(":protocol"), "websocket")
	case r.Method == http.MethodConnect && r.ProtoMajor == 3:
		return strings.EqualFold(r.Proto, "websocket")
	}
	return false
}

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// wsConn is the WebSocket transport, framed with gobwas/ws over a hijacked
// HTTP/1.1 connection or over an HTTP/2 (or HTTP/3) stream.
//
// An idle session holds no write buffer (a pooled one is taken for each
// burst of writes) and a small read buffer, enough for a short message to
// come in with one read.
type wsConn struct {
	br       *bufio.Reader
	hijacked bool // an HTTP/1.1 connection taken over from the server
	maxSize  int64
	idle     time.Duration // a peer silent this long is dead
	// textPing: heartbeats also go out as {"type":"ping"} text frames.
	textPing bool
	setRead  func(time.Time) error
	release  func() error // closes the connection or stream

	frameWriter

	closeOnce sync.Once
}

// wsReadBuffer is the size of a WebSocket connection's read buffer.
const wsReadBuffer = 512

// acceptWebSocket completes the WebSocket handshake on r and returns the
// transport. Errors are already answered to the client.
func acceptWebSocket(w http.ResponseWriter, r *http.Request, maxSize int64, idle time.Duration, textPing bool) (*wsConn, error) {
	if r.ProtoMajor == 1 {
		conn, early, err := upgradeHTTP1(w, r)
		if err != nil {
			return nil, err
		}
		conn = rawConn(conn)
		// Frames the client sent right behind its handshake may be in the
		// server's read buffer; read those first, then the connection.
		return &wsConn{
			br:       bufio.NewReaderSize(earlyReader(conn, early), wsReadBuffer),
			hijacked: true,
			textPing: textPing,
			frameWriter: frameWriter{
				wd:          writeDeadline{set: conn.SetWriteDeadline, idle: idle},
				burstWriter: burstWriter{out: conn},
			},
			maxSize: maxSize,
			idle:    idle,
			setRead: conn.SetReadDeadline,
			release: conn.Close,
		}, nil
	}

	// Extended CONNECT (RFC 8441 §5): answer 200 and frame over the stream.
	if r.Header.Get("Sec-WebSocket-Version") != "13" {
		w.Header().Set("Sec-WebSocket-Version", "13")
		http.Error(w, "unsupported Sec-WebSocket-Version", http.StatusBadRequest)
		return nil, fmt.Errorf("duplex: websocket: unsupported version %q", r.Header.Get("Sec-WebSocket-Version"))
	}
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return nil, fmt.Errorf("duplex: websocket over HTTP/%d: flushing headers: %w", r.ProtoMajor, err)
	}
	body := r.Body
	return &wsConn{
		br: bufio.NewReaderSize(body, wsReadBuffer),
		frameWriter: frameWriter{
			wd:          writeDeadline{set: rc.SetWriteDeadline, idle: idle},
			burstWriter: burstWriter{out: w, rc: rc},
		},
		maxSize:  maxSize,
		idle:     idle,
		textPing: textPing,
		setRead:  rc.SetReadDeadline,
		release: func() error {
			_ = rc.SetReadDeadline(time.Now())
			return body.Close()
		},
	}, nil
}

// upgradeHTTP1 completes the handshake of WebSocket opening r on its
// HTTP/1.1 connection with gobwas/ws, which takes the connection over and
// writes the 101 (through Caddy's wrapper, so the access log counts it);
// a refusal is written and the connection closed. early is what the
// client sent behind its handshake, read by the server already.
func upgradeHTTP1(w http.ResponseWriter, r *http.Request) (conn net.Conn, early []byte, err error) {
	conn, rw, _, err := ws.HTTPUpgrader{}.Upgrade(r, w)
	if err != nil {
		if conn != nil {
			_ = conn.Close()
		}
		return nil, nil, fmt.Errorf("duplex: websocket upgrade: %w", err)
	}
	return conn, takeBuffered(rw.Reader), nil
}

func (c *wsConn) name() string          { return transportWebSocket }
func (c *wsConn) attached(string)       {}
func (c *wsConn) outlivesRequest() bool { return c.hijacked }

func (c *wsConn) readMessage() ([]byte, bool, error) {
	var (
		msg    []byte
		op     ws.OpCode
		tooBig bool
	)
	for {
		_ = c.setRead(time.Now().Add(c.idle))
		hdr, err := readHeader(c.br)
		if err != nil {
			return nil, false, err
		}
		if !hdr.Masked || hdr.Rsv != 0 {
			c.protocolError("client frames must be masked and use no extensions")
			return nil, false, ws.ErrProtocolMaskRequired
		}
		if hdr.OpCode.IsControl() {
			if err := c.control(hdr); err != nil {
				return nil, false, err
			}
			continue
		}
		switch {
		case hdr.OpCode == ws.OpContinuation && op == 0,
			hdr.OpCode != ws.OpContinuation && op != 0,
			hdr.OpCode != ws.OpContinuation && hdr.OpCode != ws.OpText && hdr.OpCode != ws.OpBinary:
			c.protocolError("unexpected frame")
			return nil, false, ws.ErrProtocolContinuationUnexpected
		}
		if op == 0 {
			op = hdr.OpCode
		}
		if tooBig || int64(len(msg))+hdr.Length > c.maxSize {
			tooBig = true
			msg = nil
			if _, err := io.CopyN(io.Discard, c.br, hdr.Length); err != nil {
				return nil, false, err
			}
		} else {
			start := len(msg)
			msg = append(msg, make([]byte, hdr.Length)...)
			if _, err := io.ReadFull(c.br, msg[start:]); err != nil {
				return nil, false, err
			}
			ws.Cipher(msg[start:], hdr.Mask, 0)
		}
		if hdr.Fin {
			if tooBig {
				return nil, false, errTooBig
			}
			return msg, op == ws.OpBinary, nil
		}
	}
}

// readHeader reads a frame header from the buffer, as ws.ReadHeader does
// but without allocating.
func readHeader(br *bufio.Reader) (h ws.Header, err error) {
	p, err := br.Peek(2)
	if err != nil {
		return h, err
	}
	h.Fin = p[0]&0x80 != 0
	h.Rsv = (p[0] & 0x70) >> 4
	h.OpCode = ws.OpCode(p[0] & 0x0f)
	h.Masked = p[1]&0x80 != 0
	n := 2
	length := p[1] & 0x7f
	switch length {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	if h.Masked {
		n += 4
	}
	if p, err = br.Peek(n); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return h, err
	}
	switch length {
	case 126:
		h.Length = int64(binary.BigEndian.Uint16(p[2:4]))
	case 127:
		if p[2]&0x80 != 0 {
			return h, ws.ErrHeaderLengthMSB
		}
		h.Length = int64(binary.BigEndian.Uint64(p[2:10]))
	default:
		h.Length = int64(length)
	}
	if h.Masked {
		copy(h.Mask[:], p[n-4:n])
	}
	_, _ = br.Discard(n)
	return h, nil
}

// control handles a ping, pong or close frame from the client.
func (c *wsConn) control(hdr ws.Header) error {
	if hdr.Length > 125 || !hdr.Fin {
		c.protocolError("invalid control frame")
		return ws.ErrProtocolControlPayloadOverflow
	}
	payload := make([]byte, hdr.Length)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return err
	}
	ws.Cipher(payload, hdr.Mask, 0)
	switch hdr.OpCode {
	case ws.OpPing:
		return c.writeControl(ws.NewPongFrame(payload))
	case ws.OpClose:
		code, _ := ws.ParseCloseFrameData(payload)
		if code == 0 {
			code = ws.StatusNormalClosure
		}
		c.closeOnce.Do(func() {
			_ = c.writeControl(ws.NewCloseFrame(ws.NewCloseFrameBody(code, "")))
		})
		return errClientClosed
	}
	return nil // pong: reading it already proved the peer alive
}

func (c *wsConn) protocolError(reason string) {
	c.closeOnce.Do(func() {
		_ = c.writeControl(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusProtocolError, reason)))
	})
}

// writeControl writes control frame f (a pong, the close frame) at once.
func (c *wsConn) writeControl(f ws.Frame) error {
	return c.writeNowWith(func(w io.Writer) error { return ws.WriteFrame(w, f) })
}

func (c *wsConn) writeFrame(_ string, _ uint64, a, b, cc []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wd.refresh()
	hdr := ws.Header{Fin: true, OpCode: ws.OpText, Length: int64(len(a) + len(b) + len(cc))}
	bw := c.buffer()
	if err := ws.WriteHeader(bw, hdr); err != nil {
		return err
	}
	for _, p := range [3][]byte{a, b, cc} {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

// wsPing is the heartbeat: a ping frame, after a {"type":"ping"} text
// frame for ?ping=text (wsPingText).
var (
	wsPing     = ws.MustCompileFrame(ws.NewPingFrame(nil))
	wsPingText = append(ws.MustCompileFrame(ws.NewTextFrame([]byte(`{"type":"ping"}`))), wsPing...)
)

func (c *wsConn) ping() error {
	if c.textPing {
		return c.writeNow(wsPingText)
	}
	return c.writeNow(wsPing)
}

func (c *wsConn) close(code int, reason string) error {
	c.closeOnce.Do(func() {
		if len(reason) > 120 {
			reason = reason[:120]
		}
		_ = c.writeControl(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusCode(code), reason)))
	})
	return nil
}

// end releases the connection.
func (c *wsConn) end() error { return c.release() }

// rawConn returns the network connection under a hijacked one. Caddy wraps
// a hijacked connection to count its bytes for the access log, and reads
// those counts when the request's handler returns; the session outlives
// the request and keeps reading and writing, so it must not go through
// the wrapper (the access log line of a WebSocket over HTTP/1.1 counts its
// handshake only). Any other connection is returned as it is.
func rawConn(c net.Conn) net.Conn {
	v := reflect.ValueOf(c)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct ||
		v.Elem().Type().Name() != "hijackedConn" {
		return c
	}
	f := v.Elem().FieldByName("Conn")
	if !f.IsValid() || !f.CanInterface() {
		return c
	}
	if inner, ok := f.Interface().(net.Conn); ok && inner != nil {
		return inner
	}
	return c
}
