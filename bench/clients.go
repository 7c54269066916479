package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/gobwas/ws"
)

// Transports the harness drives, all over HTTP/1.1 on loopback.
const (
	transportWebSocket = "websocket"
	transportSSE       = "sse"
	transportStream    = "stream"
)

// openTimeout bounds one session opening (connect, handshake, open frame).
const openTimeout = 15 * time.Second

// frameFunc receives every server frame after the open frame, on the
// session's reader goroutine. It must not block for long.
type frameFunc func(frame []byte)

// clientSession is one client's session with a server, over one transport.
// A reader goroutine hands each server frame to the session's frameFunc.
type clientSession struct {
	transport string
	conn      net.Conn
	token     string
	sendFn    func(frame []byte) error

	wmu  sync.Mutex    // serialises writes to conn
	done chan struct{} // closed when the reader ends
}

// openSession opens a session on srv joined to channel and waits for its
// open frame. hc is used for SSE's POSTs.
func openSession(transport string, srv *server, channel string, hc *http.Client, onFrame frameFunc) (*clientSession, error) {
	path := srv.livePath + "?channel=" + url.QueryEscape(channel)
	cs := &clientSession{transport: transport, done: make(chan struct{})}
	var (
		read func() ([]byte, error) // next server frame
		err  error
	)
	switch transport {
	case transportWebSocket:
		read, err = cs.dialWebSocket(srv.host, path)
	case transportSSE:
		read, err = cs.dialSSE(srv.host, path, hc)
	case transportStream:
		read, err = cs.dialStream(srv.host, path)
	default:
		err = fmt.Errorf("unknown transport %q", transport)
	}
	if err != nil {
		return nil, err
	}
	_ = cs.conn.SetReadDeadline(time.Now().Add(openTimeout))
	open, err := read()
	if err != nil {
		cs.conn.Close()
		return nil, fmt.Errorf("%s: reading the open frame: %w", transport, err)
	}
	_ = cs.conn.SetReadDeadline(time.Time{})
	tok, ok := stringField(open, "token")
	if !bytes.HasPrefix(open, []byte(`{"type":"open"`)) || !ok {
		cs.conn.Close()
		return nil, fmt.Errorf("%s: first frame is not an open frame: %.200s", transport, open)
	}
	cs.token = tok
	go func() {
		defer close(cs.done)
		for {
			f, err := read()
			if err != nil {
				return
			}
			onFrame(f)
		}
	}()
	return cs, nil
}

// send sends one client frame.
func (cs *clientSession) send(frame []byte) error { return cs.sendFn(frame) }

// close drops the connection; the reader ends.
func (cs *clientSession) close() { cs.conn.Close() }

func dial(host string) (net.Conn, error) {
	conn, err := net.DialTimeout("tcp", host, openTimeout)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", host, err)
	}
	return conn, nil
}

// dialWebSocket opens a WebSocket (HTTP/1.1 Upgrade) with gobwas/ws.
func (cs *clientSession) dialWebSocket(host, path string) (func() ([]byte, error), error) {
	d := ws.Dialer{Timeout: openTimeout}
	conn, br, _, err := d.Dial(context.Background(), "ws://"+host+path)
	if err != nil {
		return nil, fmt.Errorf("websocket: %w", err)
	}
	cs.conn = conn
	var r io.Reader = conn
	if br != nil {
		r = br // holds what the server sent right after the handshake
	} else {
		r = bufio.NewReaderSize(conn, 2048)
	}
	cs.sendFn = func(frame []byte) error {
		f := ws.MaskFrameInPlace(ws.NewTextFrame(bytes.Clone(frame)))
		cs.wmu.Lock()
		defer cs.wmu.Unlock()
		return ws.WriteFrame(conn, f)
	}
	var buf []byte
	read := func() ([]byte, error) {
		for {
			h, err := ws.ReadHeader(r)
			if err != nil {
				return nil, err
			}
			if int64(cap(buf)) < h.Length {
				buf = make([]byte, h.Length)
			}
			p := buf[:h.Length]
			if _, err := io.ReadFull(r, p); err != nil {
				return nil, err
			}
			switch h.OpCode {
			case ws.OpPing:
				pong := ws.MaskFrameInPlace(ws.NewPongFrame(bytes.Clone(p)))
				cs.wmu.Lock()
				err = ws.WriteFrame(conn, pong)
				cs.wmu.Unlock()
				if err != nil {
					return nil, err
				}
			case ws.OpClose:
				return nil, io.EOF
			case ws.OpText, ws.OpBinary:
				return p, nil
			}
		}
	}
	return read, nil
}

// dialSSE opens an event stream with a hand-written HTTP/1.1 GET; client
// frames are POSTed with the session's Duplex-Token through hc.
func (cs *clientSession) dialSSE(host, path string, hc *http.Client) (func() ([]byte, error), error) {
	conn, err := dial(host)
	if err != nil {
		return nil, err
	}
	cs.conn = conn
	req := "GET " + path + " HTTP/1.1\r\nHost: " + host + "\r\nAccept: text/event-stream\r\n\r\n"
	body, err := startResponse(conn, req, http.MethodGet)
	if err != nil {
		return nil, fmt.Errorf("sse: %w", err)
	}
	postURL := "http://" + host + path
	cs.sendFn = func(frame []byte) error {
		req, err := http.NewRequest(http.MethodPost, postURL, bytes.NewReader(frame))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Duplex-Token", cs.token)
		resp, err := hc.Do(req)
		if err != nil {
			return fmt.Errorf("sse post: %w", err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			return fmt.Errorf("sse post: status %d", resp.StatusCode)
		}
		return nil
	}
	var data []byte
	read := func() ([]byte, error) {
		data = data[:0]
		for {
			line, err := body.ReadSlice('\n')
			if err != nil {
				return nil, err
			}
			line = bytes.TrimRight(line, "\r\n")
			switch {
			case len(line) == 0 && len(data) > 0:
				return data, nil
			case bytes.HasPrefix(line, []byte("data:")):
				data = append(data, bytes.TrimPrefix(line[5:], []byte(" "))...)
			}
		}
	}
	return read, nil
}

// dialStream opens an NDJSON stream: an HTTP/1.1 POST whose chunked body
// carries client frames while its response carries server frames.
func (cs *clientSession) dialStream(host, path string) (func() ([]byte, error), error) {
	conn, err := dial(host)
	if err != nil {
		return nil, err
	}
	cs.conn = conn
	req := "POST " + path + " HTTP/1.1\r\nHost: " + host +
		"\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
	body, err := startResponse(conn, req, http.MethodPost)
	if err != nil {
		return nil, fmt.Errorf("stream: %w", err)
	}
	cs.sendFn = func(frame []byte) error {
		chunk := make([]byte, 0, len(frame)+16)
		chunk = strconv.AppendInt(chunk, int64(len(frame)+1), 16)
		chunk = append(chunk, "\r\n"...)
		chunk = append(chunk, frame...)
		chunk = append(chunk, "\n\r\n"...)
		cs.wmu.Lock()
		defer cs.wmu.Unlock()
		_, err := conn.Write(chunk)
		return err
	}
	read := func() ([]byte, error) {
		for {
			line, err := body.ReadSlice('\n')
			if err != nil {
				return nil, err
			}
			if line = bytes.TrimSpace(line); len(line) > 0 {
				return line, nil
			}
		}
	}
	return read, nil
}

// startResponse writes a request head on conn and reads the response
// head; it returns a reader over the (de-chunked) response body.
func startResponse(conn net.Conn, head, method string) (*bufio.Reader, error) {
	_ = conn.SetDeadline(time.Now().Add(openTimeout))
	defer conn.SetDeadline(time.Time{})
	if _, err := io.WriteString(conn, head); err != nil {
		conn.Close()
		return nil, fmt.Errorf("writing request: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 2048), &http.Request{Method: method})
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading response head: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		conn.Close()
		return nil, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	return bufio.NewReaderSize(resp.Body, 4096), nil
}

// intField finds "key":<integer> in a JSON frame without decoding it.
func intField(frame []byte, key string) (int64, bool) {
	i := bytes.Index(frame, []byte(`"`+key+`":`))
	if i < 0 {
		return 0, false
	}
	rest := frame[i+len(key)+3:]
	j := 0
	for j < len(rest) && (rest[j] == '-' || (rest[j] >= '0' && rest[j] <= '9')) {
		j++
	}
	n, err := strconv.ParseInt(string(rest[:j]), 10, 64)
	return n, err == nil
}

// stringField finds "key":"<value>" (no escapes) in a JSON frame.
func stringField(frame []byte, key string) (string, bool) {
	i := bytes.Index(frame, []byte(`"`+key+`":"`))
	if i < 0 {
		return "", false
	}
	rest := frame[i+len(key)+4:]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return "", false
	}
	return string(rest[:j]), true
}

// openMany opens n sessions, conc at a time; open(i) opens the i-th. On
// the first error it stops, closes what it opened and returns the error.
func openMany(n, conc int, open func(i int) (*clientSession, error)) ([]*clientSession, error) {
	out := make([]*clientSession, n)
	var (
		mu       sync.Mutex
		firstErr error
		next     int
		wg       sync.WaitGroup
	)
	for range min(conc, n) {
		wg.Go(func() {
			for {
				mu.Lock()
				i := next
				next++
				stop := firstErr != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				cs, err := open(i)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("opening session %d of %d: %w", i+1, n, err)
					}
					mu.Unlock()
					return
				}
				out[i] = cs
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		closeAll(out)
		return nil, firstErr
	}
	return out, nil
}

// closeAll closes every session and waits (bounded) for their readers.
func closeAll(sessions []*clientSession) {
	for _, cs := range sessions {
		if cs != nil {
			cs.close()
		}
	}
	deadline := time.After(10 * time.Second)
	for _, cs := range sessions {
		if cs == nil {
			continue
		}
		select {
		case <-cs.done:
		case <-deadline:
			return
		}
	}
}

var errTimeout = errors.New("timed out")
