package client

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"
)

// wsConn is the WebSocket transport, framed with gobwas/ws (client frames
// masked) over an HTTP/1.1 connection or an HTTP/2 extended CONNECT stream
// (RFC 8441).
type wsConn struct {
	r        io.Reader
	max      int64
	deadline func(time.Time) error // write deadline, where the connection has one
	release  func()                // closes the connection or stream

	wmu sync.Mutex // guards writes to w
	w   io.Writer

	byeOnce   sync.Once
	closeOnce sync.Once
	msg       []byte // the fragments of a message being read
}

func (c *wsConn) transport() string { return WebSocket }

// dialWebSocket opens a WebSocket over HTTP/1.1 (Upgrade).
func (d *dialer) dialWebSocket(ctx context.Context, cursor string) (conn, error) {
	t := &tracker{dial: d.opts.DialContext}
	wd := ws.Dialer{
		Header:    ws.HandshakeHeaderHTTP(d.header(cursor)),
		NetDial:   t.dialContext,
		TLSConfig: d.opts.TLSConfig,
	}
	u := *d.u
	u.Scheme = strings.Replace(u.Scheme, "http", "ws", 1)
	nc, br, _, err := wd.Dial(ctx, u.String())
	if err != nil {
		t.closeAll()
		var se ws.StatusError
		if errors.As(err, &se) {
			return nil, &statusError{transport: WebSocket, status: int(se)}
		}
		return nil, fmt.Errorf("duplex client: websocket: %w", err)
	}
	var r io.Reader = nc
	if br != nil {
		r = br // frames the server sent right behind its handshake
	}
	return &wsConn{
		r: r, w: nc, max: d.opts.MaxFrameSize,
		deadline: nc.SetWriteDeadline,
		release:  func() { nc.Close(); t.closeAll() },
	}, nil
}

// dialWebSocketH2 opens a WebSocket with an HTTP/2 extended CONNECT.
func (d *dialer) dialWebSocketH2(ctx context.Context, cursor string) (conn, error) {
	header := d.header(cursor)
	header.Set(":protocol", "websocket")
	header.Set("Sec-WebSocket-Version", "13")
	x, err := d.open(ctx, httpOpening{
		method: http.MethodConnect, header: header, pipe: true,
		name: "websocket over HTTP/2", transport: WebSocket,
	})
	if err != nil {
		return nil, err
	}
	return &wsConn{r: x.resp.Body, w: x.pw, max: d.opts.MaxFrameSize, release: x.release}, nil
}

func (c *wsConn) read() ([]byte, error) {
	for {
		hdr, err := ws.ReadHeader(c.r)
		if err != nil {
			return nil, err
		}
		if hdr.Length > c.max || int64(len(c.msg))+hdr.Length > c.max {
			return nil, fmt.Errorf("duplex client: websocket frame larger than %d bytes", c.max)
		}
		payload := make([]byte, hdr.Length)
		if _, err := io.ReadFull(c.r, payload); err != nil {
			return nil, err
		}
		if hdr.Masked {
			ws.Cipher(payload, hdr.Mask, 0)
		}
		switch hdr.OpCode {
		case ws.OpPing:
			if err := c.writeFrame(ws.NewPongFrame(payload)); err != nil {
				return nil, err
			}
			return nil, nil
		case ws.OpPong:
			return nil, nil
		case ws.OpClose:
			code, reason := ws.ParseCloseFrameData(payload)
			c.sendClose(code)
			return nil, &WebSocketClose{Code: int(code), Reason: reason}
		case ws.OpContinuation:
			c.msg = append(c.msg, payload...)
		default:
			c.msg = payload
			if hdr.OpCode != ws.OpText {
				c.msg = nil // binary messages are not frames
			}
		}
		if hdr.Fin && c.msg != nil {
			m := c.msg
			c.msg = nil
			return m, nil
		}
		if hdr.Fin {
			return nil, nil
		}
	}
}

// writeFrame writes one masked frame in one write (an HTTP/2 stream sends
// each write as its own DATA frame).
func (c *wsConn) writeFrame(f ws.Frame) error {
	_, err := c.writeFrameN(f)
	return err
}

// writeFrameN is writeFrame, also returning how many bytes went out.
func (c *wsConn) writeFrameN(f ws.Frame) (int, error) {
	var buf bytes.Buffer
	if err := ws.WriteFrame(&buf, ws.MaskFrame(f)); err != nil {
		return 0, err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.w.Write(buf.Bytes())
}

func (c *wsConn) write(_ context.Context, frames [][]byte) (int, error) {
	for i, f := range frames {
		if n, err := c.writeFrameN(ws.NewTextFrame(f)); err != nil {
			if n > 0 {
				i++ // part of it went out: it must not be sent again
			}
			return i, fmt.Errorf("duplex client: websocket write: %w", err)
		}
	}
	return len(frames), nil
}

// sendClose sends a close frame once, with a short write deadline where
// the connection has one.
func (c *wsConn) sendClose(code ws.StatusCode) {
	c.byeOnce.Do(func() {
		if c.deadline != nil {
			_ = c.deadline(time.Now().Add(time.Second))
		}
		_ = c.writeFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(code, "")))
	})
}

// bye sends a normal close frame, which ends the session on the server.
func (c *wsConn) bye() bool {
	c.sendClose(ws.StatusNormalClosure)
	return true
}

func (c *wsConn) close() { c.closeOnce.Do(c.release) }
