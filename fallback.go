package duplex

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"go.uber.org/zap"
)

// The SSE + POST fallback, for clients that cannot hold a duplex
// connection: server frames go out as Server-Sent Events on a GET, client
// frames come in as POSTs to the same URL carrying the session's token in
// a Duplex-Token header.

// sseRetry is the reconnection delay (ms) suggested to EventSource.
const sseRetry = 2000

// sseConn is the SSE transport of one session. Client frames do not come
// through it: POSTs hand them to the session's inbox.
//
// Over HTTP/1.1 it takes the connection over (see takeOver) and writes the
// events straight to it; over HTTP/2 and HTTP/3 it writes the request's
// response and stays inside the request.
type sseConn struct {
	token string
	// conn is the connection taken over, or nil inside the request.
	conn    net.Conn
	reqDone <-chan struct{}

	frameWriter // its wmu guards token too

	endOnce sync.Once
	gone    chan struct{} // closed by end
}

// acceptSSE starts the event stream. Its head goes out with the open
// event, which is queued at once, in one write.
func acceptSSE(w http.ResponseWriter, r *http.Request, idle time.Duration) (*sseConn, error) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	retry := "retry: " + strconv.Itoa(sseRetry) + "\n\n"
	if canTakeOver(r) {
		if conn, _, ok := takeOver(w); ok {
			c := &sseConn{
				conn: conn,
				frameWriter: frameWriter{
					wd:          writeDeadline{set: conn.SetWriteDeadline, idle: idle},
					burstWriter: burstWriter{out: conn},
				},
				gone: make(chan struct{}),
			}
			bw := c.buffer()
			_, _ = bw.Write(responseHead(h))
			_, _ = bw.WriteString(retry)
			return c, nil
		}
	}
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if _, err := io.WriteString(w, retry); err != nil {
		return nil, fmt.Errorf("duplex: sse: %w", err)
	}
	return &sseConn{
		reqDone: r.Context().Done(),
		frameWriter: frameWriter{
			wd:          writeDeadline{set: rc.SetWriteDeadline, idle: idle},
			burstWriter: burstWriter{out: w, rc: rc},
		},
		gone: make(chan struct{}),
	}, nil
}

func (c *sseConn) name() string          { return transportSSE }
func (c *sseConn) outlivesRequest() bool { return c.conn != nil }

// attached names the session whose cursors the event ids carry.
func (c *sseConn) attached(token string) {
	c.wmu.Lock()
	c.token = token
	c.wmu.Unlock()
}

// readMessage waits for the stream to end: an SSE client sends nothing on
// it.
func (c *sseConn) readMessage() ([]byte, bool, error) {
	if c.conn != nil {
		return nil, false, drainUntilGone(c.conn)
	}
	select {
	case <-c.gone:
	case <-c.reqDone:
	}
	return nil, false, io.EOF
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
	c.wd.refresh()
	var head [128]byte
	buf := head[:0]
	if typ == protocol.TypePush || typ == protocol.TypeOpen {
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

func (c *sseConn) ping() error { return c.writeNow(ssePing) }

// close ends the response: the close event was the last one, and there is
// no close handshake to wait for.
func (c *sseConn) close(int, string) error { return c.end() }

// end ends the response; a connection taken over is closed.
func (c *sseConn) end() error {
	c.endOnce.Do(func() {
		close(c.gone)
		if c.conn != nil {
			_ = c.conn.Close()
		}
	})
	return nil
}

// tokenKey is how the hub indexes sessions by token: by its SHA-256, so
// looking a token up does not compare secrets byte by byte.
func tokenKey(token string) [32]byte { return sha256.Sum256([]byte(token)) }

// Bounds of an SSE session's POSTs.
const (
	// maxPostsInFlight is how many POSTs of one session may be read at
	// once; more are answered 429.
	maxPostsInFlight = 4
	// postReadTimeout bounds the time to read one POST's body, so a
	// client trickling it cannot hold it open.
	postReadTimeout = 10 * time.Second
)

// servePost takes client frames posted for an SSE session: one JSON frame
// (application/json) or several (application/x-ndjson). The body is read
// as it arrives, each frame checked against max_message_size and decoded
// on the way, within postReadTimeout. The frames are queued all or none:
// 202 once queued (they are then served and answered, also across a
// resume); 401 unknown or ended token; 409 not an SSE session; 400
// malformed; 413 oversize; 415 another content type; 429 the session has
// maxPostsInFlight POSTs being read or a full inbox.
func (h *Handler) servePost(w http.ResponseWriter, r *http.Request, token string) {
	reject := func(status int, msg string) {
		if status == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "1")
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = w.Write(mustJSON(map[string]string{"error": msg}))
	}
	if !h.originAllowed(r) {
		reject(http.StatusForbidden, "origin not allowed")
		return
	}
	s := h.hub.byToken(token, h.key)
	var rs remoteSession // the session, if another node of a cluster holds it
	if s == nil {
		var ok bool
		var err error
		rs, ok, err = h.hub.brokerOf().locate(r.Context(), h, token)
		if err != nil {
			w.Header().Set("Retry-After", retryAfter)
			reject(http.StatusServiceUnavailable, "sessions are unavailable; retry later")
			return
		}
		if !ok {
			reject(http.StatusUnauthorized, "unknown or ended session token")
			return
		}
	} else if _, _, _, transport := s.route(); transport != transportSSE {
		reject(http.StatusConflict, "the session is not an SSE session: send frames on its connection")
		return
	}
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	ndjson := mt == "application/x-ndjson"
	if !ndjson && mt != "application/json" && mt != "" {
		reject(http.StatusUnsupportedMediaType, "post application/json (one frame) or application/x-ndjson (several)")
		return
	}
	limit := h.MaxMessageSize
	if ndjson {
		limit = (h.MaxMessageSize + 1) * inboxSize
	}
	if r.ContentLength > limit {
		reject(http.StatusRequestEntityTooLarge, "body larger than the frame limits")
		return
	}
	id := rs.id
	if s != nil {
		id = s.id
	}
	// Counted on the node reading them, whether it holds the session or
	// forwards them (the holder sees only what is forwarded).
	if !h.hub.posts.enter(id) {
		reject(http.StatusTooManyRequests, "too many POSTs in flight for this session; retry later")
		return
	}
	defer h.hub.posts.leave(id)
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(postReadTimeout))
	frames, perr := readPostFrames(r.Body, ndjson, h.MaxMessageSize, inboxSize)
	_ = rc.SetReadDeadline(time.Time{})
	if perr != nil {
		reject(perr.status, perr.msg)
		return
	}
	status, msg := 0, ""
	if s == nil {
		var err error
		status, err = h.hub.brokerOf().forward(r.Context(), rs, frames)
		if errors.Is(err, errForwardUnanswered) {
			reject(http.StatusGatewayTimeout, "the node holding the session did not answer in time; it may still take the frames: do not send them again")
			return
		}
		if err != nil {
			w.Header().Set("Retry-After", retryAfter)
			reject(http.StatusServiceUnavailable, "the node holding the session cannot be reached; retry later")
			return
		}
		msg = http.StatusText(status)
	} else {
		status, msg = s.takePost(frames)
	}
	if status != http.StatusAccepted {
		reject(status, msg)
		return
	}
	h.logger.Debug("frames posted", zap.String("session", id), zap.Int("frames", len(frames)), zap.Bool("forwarded", s == nil))
	w.WriteHeader(http.StatusAccepted)
}

// postsInFlight counts the SSE POSTs this node is reading, per session id
// (of a session it holds, or one it forwards them to).
type postsInFlight struct {
	mu sync.Mutex     // guards n
	n  map[string]int // by session id; no entry at 0
}

// enter counts a POST for session id unless maxPostsInFlight are being
// read already.
func (p *postsInFlight) enter(id string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n[id] >= maxPostsInFlight {
		return false
	}
	p.n[id]++
	return true
}

// leave uncounts a POST that enter counted.
func (p *postsInFlight) leave(id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n[id]--; p.n[id] <= 0 {
		delete(p.n, id)
	}
}

// takePost queues the frames of an SSE POST for s, all or none, and
// returns the status to answer with its reason: 202 queued, 409 not an
// SSE session, 429 the inbox is full, 401 the session ended.
func (s *session) takePost(frames [][]byte) (int, string) {
	if _, _, _, transport := s.route(); transport != transportSSE {
		return http.StatusConflict, "the session is not an SSE session: send frames on its connection"
	}
	msgs := make([]inMsg, len(frames))
	for i, f := range frames {
		msgs[i] = inMsg{b: f}
	}
	switch queued, stopped := s.in.offer(msgs...); {
	case stopped:
		return http.StatusUnauthorized, "unknown or ended session token"
	case !queued:
		return http.StatusTooManyRequests, "the session's inbound queue is full; retry later"
	}
	s.received.Add(int64(len(frames)))
	return http.StatusAccepted, ""
}

// readPostFrames reads the frames of a POST body as it arrives: one frame,
// or (ndjson) one per non-empty line, at most maxFrames, each at most
// maxSize bytes and decodable. Nothing beyond one frame's bytes is read
// ahead of its check.
func readPostFrames(body io.Reader, ndjson bool, maxSize int64, maxFrames int) ([][]byte, *clientError) {
	tooBig := &clientError{status: http.StatusRequestEntityTooLarge, msg: "a frame is larger than max_message_size"}
	if !ndjson {
		b, err := io.ReadAll(io.LimitReader(body, maxSize+1))
		switch {
		case err != nil:
			return nil, &clientError{status: http.StatusBadRequest, msg: "reading body: " + err.Error()}
		case int64(len(b)) > maxSize:
			return nil, tooBig
		}
		b = bytes.TrimSpace(b)
		if len(b) == 0 {
			return nil, badFrame("no frame in the body")
		}
		if _, ferr := decodeClientFrame(b); ferr != nil {
			return nil, badFrame("frame 0: %s", ferr.msg)
		}
		return [][]byte{b}, nil
	}
	var frames [][]byte
	br := bufio.NewReaderSize(body, 4096)
	for {
		line, err := readLine(br, maxSize)
		if errors.Is(err, errTooBig) {
			return nil, tooBig
		}
		if line = bytes.TrimSpace(line); len(line) > 0 {
			if len(frames) == maxFrames {
				return nil, &clientError{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("at most %d frames per POST", maxFrames)}
			}
			if _, ferr := decodeClientFrame(line); ferr != nil {
				return nil, badFrame("frame %d: %s", len(frames), ferr.msg)
			}
			frames = append(frames, line)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, &clientError{status: http.StatusBadRequest, msg: "reading body: " + err.Error()}
		}
	}
	if len(frames) == 0 {
		return nil, badFrame("no frame in the body")
	}
	return frames, nil
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
