package client

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
)

// streamConn is the stream transport: a POST whose request body carries
// client frames and whose response body carries server frames, one JSON
// object per line, both at once (README, "The session protocol").
type streamConn struct {
	br  *bufio.Reader
	max int64

	wmu sync.Mutex // guards writes to pw
	pw  *io.PipeWriter

	closeOnce sync.Once
	release   func()
}

func (c *streamConn) transport() string { return Stream }

func (d *dialer) dialStream(ctx context.Context, cursor string) (conn, error) {
	header := d.header(cursor)
	header.Set("Content-Type", "application/x-ndjson")
	x, err := d.open(ctx, httpOpening{
		method: http.MethodPost, header: header, pipe: true, accept: "application/x-ndjson",
		name: Stream, transport: Stream,
	})
	if err != nil {
		return nil, err
	}
	return &streamConn{
		br:      bufio.NewReader(x.resp.Body),
		max:     d.opts.MaxFrameSize,
		pw:      x.pw,
		release: x.release,
	}, nil
}

func (c *streamConn) read() ([]byte, error) {
	for {
		line, err := readLine(c.br, c.max)
		if err != nil {
			return nil, err
		}
		if line = bytes.TrimSpace(line); len(line) > 0 {
			return line, nil
		}
	}
}

// readLine reads one line of at most max bytes, without its line end.
func readLine(br *bufio.Reader, max int64) ([]byte, error) {
	var line []byte
	for {
		frag, err := br.ReadSlice('\n')
		if int64(len(line)+len(frag)) > max+2 {
			return nil, fmt.Errorf("duplex client: server frame larger than %d bytes", max)
		}
		line = append(line, frag...)
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return bytes.TrimRight(line, "\r\n"), nil
	}
}

func (c *streamConn) write(_ context.Context, frames [][]byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	for i, f := range frames {
		line := make([]byte, 0, len(f)+1)
		line = append(append(line, f...), '\n')
		if n, err := c.pw.Write(line); err != nil {
			if n > 0 {
				i++ // part of it went out: it must not be sent again
			}
			return i, fmt.Errorf("duplex client: stream write: %w", err)
		}
	}
	return len(frames), nil
}

// bye: the transport cannot end the session (the server keeps it for
// its resume window).
func (c *streamConn) bye() bool { return false }

func (c *streamConn) close() { c.closeOnce.Do(c.release) }
