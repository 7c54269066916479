package duplex

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"time"
)

// streamConn is the `stream` transport: one full-duplex HTTP request whose
// body carries client frames and whose response carries server frames, one
// JSON object per line (NDJSON). It runs over HTTP/2 (TLS or h2c) inside
// its request, and over HTTP/1.1 on the connection taken over (see
// takeOver), reading the request's body (chunked or sized) itself.
type streamConn struct {
	br      *bufio.Reader
	body    io.ReadCloser // inside the request only
	conn    net.Conn      // the connection taken over, or nil
	maxSize int64
	reqDone <-chan struct{}

	frameWriter

	gone     chan struct{} // closed by end
	goneOnce sync.Once
}

var pingLine = []byte(`{"type":"ping"}` + "\n")

// streamReadBuffer is the size of the read buffers of a stream taken over
// (its chunk reader's and its line reader's): lines longer than it are
// read in several pieces.
const streamReadBuffer = 512

// acceptStream starts the stream response. Its head goes out with the
// open frame, which is queued at once, in one write.
func acceptStream(w http.ResponseWriter, r *http.Request, maxSize int64, idle time.Duration) (*streamConn, error) {
	h := w.Header()
	if r.ProtoMajor == 1 {
		h.Del("Connection") // set by ServeHTTP for refusals
	}
	h.Set("Content-Type", "application/x-ndjson")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	h.Set("Incremental", "?1")
	if canTakeOver(r) {
		if body, ok := bodyFraming(r); ok {
			if conn, early, ok := takeOver(w); ok {
				raw := bufio.NewReaderSize(earlyReader(conn, early), streamReadBuffer)
				c := &streamConn{
					br:      bufio.NewReaderSize(body(raw), streamReadBuffer),
					conn:    conn,
					maxSize: maxSize,
					frameWriter: frameWriter{
						wd:          writeDeadline{set: conn.SetWriteDeadline, idle: idle},
						burstWriter: burstWriter{out: conn},
					},
					gone: make(chan struct{}),
				}
				_, _ = c.buffer().Write(responseHead(h))
				return c, nil
			}
		}
	}
	rc := http.NewResponseController(w)
	if r.ProtoMajor == 1 {
		if err := rc.EnableFullDuplex(); err != nil {
			http.Error(w, "duplex: the stream transport needs HTTP/2, or HTTP/1.1 with full duplex", http.StatusHTTPVersionNotSupported)
			return nil, fmt.Errorf("duplex: stream: enabling full duplex: %w", err)
		}
	}
	w.WriteHeader(http.StatusOK)
	return &streamConn{
		br:      bufio.NewReader(r.Body),
		body:    r.Body,
		maxSize: maxSize,
		reqDone: r.Context().Done(),
		frameWriter: frameWriter{
			wd:          writeDeadline{set: rc.SetWriteDeadline, idle: idle},
			burstWriter: burstWriter{out: w, rc: rc},
		},
		gone: make(chan struct{}),
	}, nil
}

// bodyFraming returns how to read the body of HTTP/1.1 request r from its
// connection: chunked, or of its Content-Length. ok is false for framing
// net/http would have to undo (another transfer coding).
func bodyFraming(r *http.Request) (func(*bufio.Reader) io.Reader, bool) {
	switch {
	case len(r.TransferEncoding) == 1 && r.TransferEncoding[0] == "chunked":
		return func(br *bufio.Reader) io.Reader { return httputil.NewChunkedReader(br) }, true
	case len(r.TransferEncoding) == 0 && r.ContentLength >= 0:
		n := r.ContentLength
		return func(br *bufio.Reader) io.Reader { return io.LimitReader(br, n) }, true
	}
	return nil, false
}

func (c *streamConn) name() string          { return transportStream }
func (c *streamConn) attached(string)       {}
func (c *streamConn) outlivesRequest() bool { return c.conn != nil }

func (c *streamConn) readMessage() ([]byte, bool, error) {
	for {
		line, err := readLine(c.br, c.maxSize)
		if errors.Is(err, io.EOF) {
			// The client half-closed its body: it may still receive.
			if c.conn != nil {
				return nil, false, drainUntilGone(c.conn)
			}
			select {
			case <-c.gone:
			case <-c.reqDone:
			}
			return nil, false, io.EOF
		}
		if err != nil {
			return nil, false, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		return line, false, nil
	}
}

// readLine reads one line of at most max bytes (without its newline). A
// longer line is consumed and reported as errTooBig.
func readLine(br *bufio.Reader, max int64) ([]byte, error) {
	var line []byte
	tooBig := false
	for {
		frag, err := br.ReadSlice('\n')
		if !tooBig {
			if int64(len(line)+len(bytes.TrimRight(frag, "\r\n"))) > max {
				tooBig, line = true, nil
			} else {
				line = append(line, frag...)
			}
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 && !tooBig {
				return bytes.TrimRight(line, "\r\n"), nil
			}
			return nil, err
		}
		if tooBig {
			return nil, errTooBig
		}
		return bytes.TrimRight(line, "\r\n"), nil
	}
}

func (c *streamConn) writeFrame(_ string, _ uint64, a, b, cc []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wd.refresh()
	bw := c.buffer()
	for _, p := range [4][]byte{a, b, cc, newline} {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

var newline = []byte{'\n'}

func (c *streamConn) ping() error { return c.writeNow(pingLine) }

// close ends the response: the close frame was the last line, and there is
// no close handshake to wait for.
func (c *streamConn) close(int, string) error { return c.end() }

func (c *streamConn) end() error {
	c.goneOnce.Do(func() {
		close(c.gone)
		if c.conn != nil {
			_ = c.conn.Close()
			return
		}
		_ = c.rc.SetReadDeadline(time.Now())
		_ = c.body.Close()
	})
	return nil
}
