package duplex

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"go.uber.org/zap"
)

// The SSE + POST fallback, for clients that cannot hold a duplex
// connection: server frames go out as Server-Sent Events on a GET, client
// frames come in as POSTs to the same URL carrying the session's token in
// a Duplex-Token header.

// sseRetry is the reconnection delay (ms) suggested to EventSource.
const sseRetry = 2000

// sseConn is the SSE transport of one session.
type sseConn struct {
	token   string
	reqDone <-chan struct{}

	wmu sync.Mutex // guards the burst writer and token
	burstWriter
	rc *http.ResponseController

	// inbound holds client frames posted and not yet read by the session.
	mu      sync.Mutex
	inbound [][]byte
	ended   bool
	notify  chan struct{}
	gone    chan struct{}
}

var errInboxFull = errors.New("duplex: inbound queue full")

// acceptSSE starts the event stream.
func acceptSSE(w http.ResponseWriter, r *http.Request) (*sseConn, error) {
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, "retry: "+strconv.Itoa(sseRetry)+"\n\n"); err != nil {
		return nil, fmt.Errorf("duplex: sse: %w", err)
	}
	if err := rc.Flush(); err != nil {
		return nil, fmt.Errorf("duplex: sse: flushing headers: %w", err)
	}
	return &sseConn{
		reqDone:     r.Context().Done(),
		burstWriter: burstWriter{out: w},
		rc:          rc,
		notify:      make(chan struct{}, 1),
		gone:        make(chan struct{}),
	}, nil
}

// setToken names the session whose cursors the event ids carry.
func (c *sseConn) setToken(token string) {
	c.wmu.Lock()
	c.token = token
	c.wmu.Unlock()
}

func (c *sseConn) readMessage() ([]byte, bool, error) {
	for {
		c.mu.Lock()
		if len(c.inbound) > 0 {
			m := c.inbound[0]
			c.inbound[0] = nil
			c.inbound = c.inbound[1:]
			c.mu.Unlock()
			return m, false, nil
		}
		c.mu.Unlock()
		select {
		case <-c.notify:
		case <-c.gone:
			return nil, false, io.EOF
		case <-c.reqDone:
			return nil, false, io.EOF
		}
	}
}

// offer queues posted frames, all or none.
func (c *sseConn) offer(frames [][]byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return errUnknownSession
	}
	if len(c.inbound)+len(frames) > inboxSize {
		return errInboxFull
	}
	c.inbound = append(c.inbound, frames...)
	select {
	case c.notify <- struct{}{}:
	default:
	}
	return nil
}

var (
	sseID    = []byte("id: ")
	sseEvent = []byte("event: ")
	sseData  = []byte("data: ")
	// ssePing is a real event, not a comment: EventSource and fetch-based
	// readers never see comments, and a client finds a dead stream by
	// missing pings.
	ssePing = []byte("event: ping\ndata: {\"type\":\"ping\"}\n\n")
	sseEnd  = []byte("\n\n")
)

// writeFrame writes a frame as an event. Pushes carry the resume cursor
// <token>:<seq> as their event id, and so does the open event (the cursor
// the session starts at), so EventSource resumes even before a push.
func (c *sseConn) writeFrame(typ string, seq uint64, a, b, cc []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var head [128]byte
	buf := head[:0]
	if typ == framePush || typ == frameOpen {
		buf = append(buf, sseID...)
		buf = append(buf, c.token...)
		buf = append(buf, ':')
		buf = strconv.AppendUint(buf, seq, 10)
		buf = append(buf, '\n')
	}
	buf = append(buf, sseEvent...)
	buf = append(buf, typ...)
	buf = append(buf, '\n')
	buf = append(buf, sseData...)
	bw := c.buffer()
	for _, p := range [5][]byte{buf, a, b, cc, sseEnd} {
		if _, err := bw.Write(p); err != nil {
			return err
		}
	}
	return nil
}

func (c *sseConn) flush() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.flushBurst(); err != nil {
		return err
	}
	return c.rc.Flush()
}

func (c *sseConn) ping() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.buffer().Write(ssePing); err != nil {
		return err
	}
	if err := c.flushBurst(); err != nil {
		return err
	}
	return c.rc.Flush()
}

// close ends the response: the close event was the last one, and there is
// no close handshake to wait for.
func (c *sseConn) close(int, string) error { return c.end() }

func (c *sseConn) end() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.ended {
		c.ended = true
		close(c.gone)
	}
	return nil
}

// sseConn is the SSE transport the session is attached to, if it is.
func (s *session) sseConn() *sseConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return nil
	}
	c, _ := s.cur.t.(*sseConn)
	return c
}

// tokenKey is how the hub indexes sessions by token: by its SHA-256, so
// looking a token up does not compare secrets byte by byte.
func tokenKey(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// servePost takes client frames posted for an SSE session: one JSON frame
// (application/json) or several (application/x-ndjson). They are queued
// all or none: 202 once queued; 401 unknown or ended token; 400 malformed;
// 413 oversize; 429 the session's inbound queue is full.
func (h *Handler) servePost(w http.ResponseWriter, r *http.Request, token string) {
	reject := func(status int, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write(mustJSON(map[string]string{"error": msg}))
	}
	if !h.originAllowed(r) {
		reject(http.StatusForbidden, "origin not allowed")
		return
	}
	s := h.hub.byToken(token)
	if s == nil {
		reject(http.StatusUnauthorized, "unknown or ended session token")
		return
	}
	sc := s.sseConn()
	if sc == nil {
		reject(http.StatusConflict, "the session has no event stream open: reconnect it (with Last-Event-ID) first")
		return
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	limit := h.MaxMessageSize
	if mt == "application/x-ndjson" {
		limit = h.MaxMessageSize * inboxSize
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			reject(http.StatusRequestEntityTooLarge, "body larger than max_message_size")
			return
		}
		reject(http.StatusBadRequest, "reading body: "+err.Error())
		return
	}
	var frames [][]byte
	switch mt {
	case "application/x-ndjson":
		for line := range bytes.Lines(body) {
			line = bytes.TrimSpace(line)
			if len(line) == 0 {
				continue
			}
			if int64(len(line)) > h.MaxMessageSize {
				reject(http.StatusRequestEntityTooLarge, "a frame is larger than max_message_size")
				return
			}
			frames = append(frames, line)
		}
	case "application/json", "":
		frames = [][]byte{bytes.TrimSpace(body)}
	default:
		reject(http.StatusUnsupportedMediaType, "post application/json (one frame) or application/x-ndjson (several)")
		return
	}
	if len(frames) == 0 {
		reject(http.StatusBadRequest, "no frame in the body")
		return
	}
	if len(frames) > inboxSize {
		reject(http.StatusRequestEntityTooLarge, fmt.Sprintf("at most %d frames per POST", inboxSize))
		return
	}
	for i, f := range frames {
		if _, ferr := decodeClientFrame(f); ferr != nil {
			reject(http.StatusBadRequest, fmt.Sprintf("frame %d: %s", i, ferr.msg))
			return
		}
	}
	switch err := sc.offer(frames); {
	case errors.Is(err, errInboxFull):
		w.Header().Set("Retry-After", "1")
		reject(http.StatusTooManyRequests, "the session's inbound queue is full; retry later")
		return
	case err != nil:
		reject(http.StatusUnauthorized, "unknown or ended session token")
		return
	}
	h.logger.Debug("frames posted", zap.String("session", s.id), zap.Int("frames", len(frames)))
	w.WriteHeader(http.StatusAccepted)
}

// acceptsEventStream reports whether the request accepts text/event-stream.
func acceptsEventStream(r *http.Request) bool {
	for _, v := range r.Header.Values("Accept") {
		for _, part := range strings.Split(v, ",") {
			mt, _, _ := mime.ParseMediaType(strings.TrimSpace(part))
			if mt == "text/event-stream" {
				return true
			}
		}
	}
	return false
}
