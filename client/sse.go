package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// sseConn is the SSE + POST transport: server frames arrive as events on a
// GET, client frames go out as POSTs to the same URL with the session's
// token in Duplex-Token (README, "SSE + POST, step by step with curl").
type sseConn struct {
	br      *bufio.Reader
	max     int64
	hc      *http.Client // the connection's own transport, for POSTs
	url     string
	header  http.Header
	timeout time.Duration // bounds one POST

	mu    sync.Mutex // guards token
	token string

	closeOnce sync.Once
	release   func()
}

func (c *sseConn) transport() string { return SSE }

func (d *dialer) dialSSE(ctx context.Context, cursor string) (conn, error) {
	header := d.header("")
	header.Set("Cache-Control", "no-cache")
	if cursor != "" {
		header.Set("Last-Event-ID", cursor) // event ids are cursors
	}
	x, err := d.open(ctx, httpOpening{
		method: http.MethodGet, header: header, accept: "text/event-stream",
		name: SSE, transport: SSE,
	})
	if err != nil {
		return nil, err
	}
	return &sseConn{
		br:      bufio.NewReader(x.resp.Body),
		max:     d.opts.MaxFrameSize,
		hc:      &http.Client{Transport: x.rt},
		url:     d.u.String(),
		header:  d.header(""),
		timeout: d.opts.DialTimeout,
		release: x.release,
	}, nil
}

// setToken names the session the POSTs are for, from its open frame.
func (c *sseConn) setToken(token string) {
	c.mu.Lock()
	c.token = token
	c.mu.Unlock()
}

// read returns the data of the next event (a frame), or nil for a comment
// (the old heartbeat form, ": ping").
func (c *sseConn) read() ([]byte, error) {
	var data []byte
	for {
		line, err := readLine(c.br, c.max)
		if err != nil {
			return nil, err
		}
		switch {
		case len(line) == 0:
			if len(data) > 0 {
				return bytes.TrimSuffix(data, []byte("\n")), nil
			}
		case line[0] == ':':
			if len(data) == 0 {
				return nil, nil
			}
		default:
			field, value, _ := bytes.Cut(line, []byte(":"))
			value = bytes.TrimPrefix(value, []byte(" "))
			if string(field) == "data" {
				if int64(len(data)+len(value)) > c.max {
					return nil, fmt.Errorf("duplex client: sse event larger than %d bytes", c.max)
				}
				data = append(append(data, value...), '\n')
			}
			// event (the frame names its type itself), id (the client
			// keeps its own cursor) and retry are not needed.
		}
	}
}

func (c *sseConn) write(ctx context.Context, frames [][]byte) (int, error) {
	n, err := c.post(ctx, frames)
	var bad *Error
	if !errors.As(err, &bad) {
		return n, err
	}
	if len(frames) == 1 {
		return 0, &frameRefused{i: 0, err: bad}
	}
	// One of them is bad: send them one by one to know which.
	for i := range frames {
		n, err := c.post(ctx, frames[i:i+1])
		if errors.As(err, &bad) {
			return i, &frameRefused{i: i, err: bad}
		}
		if err != nil {
			return i + n, err
		}
	}
	return len(frames), nil
}

// post sends frames in one POST. It returns an *Error for frames the
// server refused as bad (400, 413), a *retryAfter for 429, and counts the
// frames as sent when the server took them (202) or may have (the request
// was written, then the connection failed).
func (c *sseConn) post(ctx context.Context, frames [][]byte) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var wrote atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest: func(httptrace.WroteRequestInfo) { wrote.Store(true) },
	})
	body := bytes.Join(frames, []byte("\n"))
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return 0, fmt.Errorf("duplex client: sse post: %w", err)
	}
	req.Header = c.header.Clone()
	c.mu.Lock()
	req.Header.Set("Duplex-Token", c.token)
	c.mu.Unlock()
	if len(frames) == 1 {
		req.Header.Set("Content-Type", "application/json")
	} else {
		req.Header.Set("Content-Type", "application/x-ndjson")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if wrote.Load() {
			return len(frames), fmt.Errorf("duplex client: sse post: %w", err)
		}
		return 0, fmt.Errorf("duplex client: sse post: %w", err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	switch resp.StatusCode {
	case http.StatusAccepted:
		return len(frames), nil
	case http.StatusGatewayTimeout:
		// A cluster node forwarding the POST got no answer in time from
		// the node holding the session, which may still take the frames:
		// they count as sent, as a POST whose answer was lost does (their
		// calls wait for an answer on the event stream, or time out).
		return len(frames), nil
	case http.StatusTooManyRequests:
		secs, _ := strconv.Atoi(resp.Header.Get("Retry-After"))
		return 0, &retryAfter{d: time.Duration(max(secs, 1)) * time.Second}
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		var e struct{ Error string }
		_ = json.Unmarshal(raw, &e)
		return 0, &Error{Status: resp.StatusCode, Message: e.Error}
	}
	// 401 (session ended), 409 (no event stream), …: not taken.
	return 0, fmt.Errorf("duplex client: sse post: status %d %s", resp.StatusCode, bytes.TrimSpace(raw))
}

// bye: the transport cannot end the session (the server keeps it for
// its resume window).
func (c *sseConn) bye() bool { return false }

func (c *sseConn) close() { c.closeOnce.Do(c.release) }
