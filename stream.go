package duplex

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// streamConn is the `stream` transport: one full-duplex HTTP request whose
// body carries client frames and whose response carries server frames, one
// JSON object per line (NDJSON). It runs over HTTP/2 (TLS or h2c) and over
// HTTP/1.1 with full duplex enabled.
type streamConn struct {
	br      *bufio.Reader
	body    io.ReadCloser
	maxSize int64
	reqDone <-chan struct{}

	wmu sync.Mutex // guards the burst writer
	burstWriter
	rc *http.ResponseController

	gone     chan struct{} // closed by end
	goneOnce sync.Once
}

var pingLine = []byte(`{"type":"ping"}` + "\n")

// acceptStream starts the stream response. Its headers go out with the
// open frame, which is queued at once, in one write.
func acceptStream(w http.ResponseWriter, r *http.Request, maxSize int64) (*streamConn, error) {
	rc := http.NewResponseController(w)
	if r.ProtoMajor == 1 {
		w.Header().Del("Connection") // set by ServeHTTP for refusals
		if err := rc.EnableFullDuplex(); err != nil {
			http.Error(w, "duplex: the stream transport needs HTTP/2, or HTTP/1.1 with full duplex", http.StatusHTTPVersionNotSupported)
			return nil, fmt.Errorf("duplex: stream: enabling full duplex: %w", err)
		}
	}
	h := w.Header()
	h.Set("Content-Type", "application/x-ndjson")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	h.Set("Incremental", "?1")
	w.WriteHeader(http.StatusOK)
	return &streamConn{
		br:          bufio.NewReader(r.Body),
		body:        r.Body,
		maxSize:     maxSize,
		reqDone:     r.Context().Done(),
		burstWriter: burstWriter{out: w},
		rc:          rc,
		gone:        make(chan struct{}),
	}, nil
}

func (c *streamConn) name() string          { return transportStream }
func (c *streamConn) attached(string)       {}
func (c *streamConn) outlivesRequest() bool { return false }

func (c *streamConn) readMessage() ([]byte, bool, error) {
	for {
		line, err := readLine(c.br, c.maxSize)
		if errors.Is(err, io.EOF) {
			// The client half-closed its body: it may still receive.
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
	bw := c.buffer()
	for _, p := range [4][]byte{a, b, cc, newline} {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

var newline = []byte{'\n'}

func (c *streamConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.flushBurst(); err != nil {
		return err
	}
	return c.rc.Flush()
}

func (c *streamConn) ping() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.buffer().Write(pingLine); err != nil {
		return err
	}
	if err := c.flushBurst(); err != nil {
		return err
	}
	return c.rc.Flush()
}

// close ends the response: the close frame was the last line, and there is
// no close handshake to wait for.
func (c *streamConn) close(int, string) error { return c.end() }

func (c *streamConn) end() error {
	c.goneOnce.Do(func() {
		close(c.gone)
		_ = c.rc.SetReadDeadline(time.Now())
		_ = c.body.Close()
	})
	return nil
}
