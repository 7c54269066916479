package duplex

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// The app's hooks: `connect` runs the opening request through the rest of
// the route once before the session opens (the app accepts, rejects, names
// the user, subscribes, or streams pushes); `disconnect` tells the app when
// a session has ended for good.

// connectResult is the app's answer to the connect hook.
type connectResult struct {
	status   int
	header   http.Header
	body     []byte
	err      error // the route failed (status from the error)
	timedOut bool
	// streaming: the answer is an open event stream now relaying pushes.
	streaming bool
	// bind gives a streaming answer the session its pushes are for (nil:
	// none, the stream is cut). Until then they are held.
	bind func(*session)
}

func (c *connectResult) accepted() bool {
	return c.err == nil && !c.timedOut && c.status >= 200 && c.status < 300
}

// runConnect serves the connect hook for an opening of s through next. It
// waits at most message_timeout for the app's answer; a streaming answer
// keeps relaying pushes to s until the stream or the session ends.
//
// Duplex-User tells the app the user the opening itself proves (the user
// template), never one taken from the session it claims to resume.
func (h *Handler) runConnect(r *http.Request, next caddyhttp.Handler, s *session, user, transport string, resumed bool) *connectResult {
	hdr := http.Header{
		"Duplex-Session":   {s.id},
		"Duplex-Transport": {transport},
		"Duplex-Connect":   {"open"},
	}
	if user != "" {
		hdr.Set("Duplex-User", user)
	}
	if resumed {
		hdr.Set("Duplex-Connect", "resume")
	}
	method := r.Method
	if method == http.MethodConnect {
		method = http.MethodGet // an RFC 8441 WebSocket opening
	}
	call := &routeCall{base: newRequestBase(r), next: next, method: method, header: hdr}
	// The hook must answer within message_timeout; a stream then lives as
	// long as the session it is bound to.
	ctx, cancel := context.WithCancel(context.Background())
	w := newHookWriter(h.SendQueue)
	req, err := call.request(ctx, w)
	if err != nil {
		cancel()
		return &connectResult{status: http.StatusBadRequest, err: err}
	}

	done := make(chan error, 1)
	go func() {
		defer cancel()
		err := call.serve(w, req)
		if err != nil && errorStatus(err, 0) == http.StatusInternalServerError {
			h.logger.Error("connect hook failed", zap.String("session", s.id), zap.Error(err))
		}
		w.finish()
		done <- err
	}()

	timer := time.NewTimer(time.Duration(h.MessageTimeout))
	defer timer.Stop()
	select {
	case err := <-done:
		res := w.result()
		res.err = err
		return res
	case <-w.decided:
		// A stream: it goes on in the goroutine; its pushes are held until
		// the opening is decided and bind names the session they are for.
		res := w.result()
		res.bind = func(final *session) {
			if final == nil || !final.upstream.CompareAndSwap(false, true) {
				cancel() // no session, or it has a stream already
				w.bindTo(nil)
				return
			}
			stop := context.AfterFunc(final.ctx, cancel)
			w.bindTo(final)
			go func() {
				<-done
				stop()
				final.upstream.Store(false)
			}()
		}
		return res
	case <-timer.C:
		cancel()
		return &connectResult{timedOut: true}
	}
}

// hookWriter is the ResponseWriter of the connect hook: it keeps a plain
// answer, or relays a streaming one (SSE or NDJSON) as pushes to the
// session.
type hookWriter struct {
	limit   int64
	header  http.Header
	decided chan struct{} // closed when a streaming answer started

	// mu guards the fields below: the route writes the answer while the
	// opening reads it and binds the stream to its session. It is taken
	// before the target session's mu (deliver pushes under it, keeping
	// the stream's order).
	mu        sync.Mutex
	status    int
	body      bytes.Buffer
	streaming bool
	sse       bool
	pending   []byte // a partial line of the stream
	event     []string
	overflow  bool
	// target receives the stream's pushes once bound; held keeps them
	// until then; cut drops them (no session took the stream).
	target *session
	held   []json.RawMessage
	cut    bool
}

func newHookWriter(limit int64) *hookWriter {
	return &hookWriter{limit: limit, header: make(http.Header), decided: make(chan struct{})}
}

// deliver pushes a stream payload to the bound session, or holds it.
func (w *hookWriter) deliver(data json.RawMessage) {
	switch {
	case w.target != nil:
		w.target.pushData(data)
	case !w.cut:
		w.held = append(w.held, data)
	}
}

// bindTo names the session the stream's pushes are for (nil: none).
func (w *hookWriter) bindTo(s *session) {
	w.mu.Lock()
	defer w.mu.Unlock()
	held := w.held
	w.held = nil
	if s == nil {
		w.cut = true
		return
	}
	w.target = s
	for _, d := range held {
		s.pushData(d)
	}
}

func (w *hookWriter) Header() http.Header { return w.header }

func (w *hookWriter) WriteHeader(code int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.status != 0 || (code >= 100 && code < 200) {
		return
	}
	w.status = code
	mt, _, _ := mime.ParseMediaType(w.header.Get("Content-Type"))
	if code >= 200 && code < 300 && (mt == "text/event-stream" || mt == "application/x-ndjson") {
		w.streaming, w.sse = true, mt == "text/event-stream"
		close(w.decided)
	}
}

func (w *hookWriter) Write(p []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.streaming {
		if int64(w.body.Len()+len(p)) > w.limit {
			w.overflow = true
			return len(p), nil
		}
		return w.body.Write(p)
	}
	w.pending = append(w.pending, p...)
	for {
		i := bytes.IndexByte(w.pending, '\n')
		if i < 0 {
			break
		}
		line := strings.TrimRight(string(w.pending[:i]), "\r")
		w.pending = w.pending[i+1:]
		w.line(line)
	}
	if int64(len(w.pending)) > w.limit {
		return 0, errors.New("duplex: connect stream line larger than send_queue")
	}
	return len(p), nil
}

// line handles one line of a streaming answer: an NDJSON line is a push;
// SSE lines are gathered into events whose data is a push.
func (w *hookWriter) line(line string) {
	if !w.sse {
		if strings.TrimSpace(line) != "" {
			w.deliver(pushValue([]byte(line)))
		}
		return
	}
	switch {
	case line == "":
		if len(w.event) > 0 {
			w.deliver(pushValue([]byte(strings.Join(w.event, "\n"))))
			w.event = w.event[:0]
		}
	case strings.HasPrefix(line, ":"):
		// comment
	case line == "data" || strings.HasPrefix(line, "data:"):
		v := strings.TrimPrefix(strings.TrimPrefix(line, "data"), ":")
		w.event = append(w.event, strings.TrimPrefix(v, " "))
	}
}

// pushValue is a streamed payload as push data: JSON as is, anything else
// as a JSON string.
func pushValue(b []byte) json.RawMessage {
	b = bytes.TrimSpace(b)
	if json.Valid(b) {
		return b
	}
	return mustJSON(string(b))
}

// Flush is a no-op: stream lines are handled as they are written.
func (w *hookWriter) Flush() {}

// finish is called when the hook's handler returned.
func (w *hookWriter) finish() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.streaming && w.sse && len(w.event) > 0 {
		w.deliver(pushValue([]byte(strings.Join(w.event, "\n"))))
		w.event = nil
	}
}

func (w *hookWriter) result() *connectResult {
	w.mu.Lock()
	defer w.mu.Unlock()
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	res := &connectResult{status: status, header: w.header.Clone(), streaming: w.streaming}
	if !w.streaming {
		if w.overflow {
			res.status, res.err = http.StatusBadGateway, errors.New("connect answer larger than send_queue")
		}
		res.body = bytes.Clone(w.body.Bytes())
	}
	return res
}

// rejectOpening answers an opening the connect hook refused with the app's
// status, headers and body.
func rejectOpening(w http.ResponseWriter, res *connectResult) {
	switch {
	case res.timedOut:
		http.Error(w, "duplex: the app did not answer the connect hook within message_timeout", http.StatusGatewayTimeout)
		return
	case res.err != nil:
		status := http.StatusBadGateway
		var he caddyhttp.HandlerError
		if errors.As(res.err, &he) && he.StatusCode != 0 {
			status = he.StatusCode
		}
		http.Error(w, http.StatusText(status), status)
		return
	}
	for k, v := range res.header {
		if isDuplexHeader(k) || k == "Content-Length" || k == "Connection" || k == "Transfer-Encoding" {
			continue
		}
		w.Header()[k] = v
	}
	w.WriteHeader(res.status)
	_, _ = w.Write(res.body)
}

// pushData pushes data to this session only (the connect stream's pushes).
func (s *session) pushData(data json.RawMessage) {
	s.push(newPush("", data))
}

// sendDisconnect tells the app that s ended for good: POST the
// disconnect path through the rest of the route, with Duplex-Session,
// Duplex-User, Duplex-Disconnect: <reason> and {"reason":…}; retried with
// backoff while the app fails. It runs in its own goroutine and never
// blocks the session's teardown.
func (h *Handler) sendDisconnect(s *session, reason string) {
	_, base, next, transport := s.route()
	if h.cleaned.Load() && !caddy.Exiting() {
		// The config it ran under is gone: use the handler that took its
		// place in the running config, if there is one.
		succ := h.hub.successor(h.key)
		if succ == nil {
			h.logger.Warn("disconnect hook not sent: its handler was unloaded", zap.String("session", s.id))
			return
		}
		sn := succ.next.Load()
		if sn == nil {
			h.logger.Warn("disconnect hook not sent: its handler has served nothing yet", zap.String("session", s.id))
			return
		}
		h, next = succ, *sn
	}
	hdr := s.messageHeader(nil, transport)
	hdr.Set("Duplex-Disconnect", headerSafe(reason))
	body := mustJSON(map[string]string{"reason": reason})
	h.hooks.add()
	go func() {
		defer h.hooks.done()
		backoff := 250 * time.Millisecond
		for attempt := 1; ; attempt++ {
			status, err := h.postHook(base, next, hdr, body)
			if err == nil && status < 300 {
				return
			}
			if attempt == disconnectAttempts {
				h.logger.Warn("disconnect hook failed",
					zap.String("session", s.id), zap.Int("attempts", attempt),
					zap.Int("status", status), zap.Error(err))
				return
			}
			time.Sleep(backoff)
			backoff *= 2
		}
	}()
}

// headerSafe makes s usable as a header value: control characters become
// spaces.
func headerSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

// pending counts work under way that Cleanup may wait for; unlike a
// WaitGroup, it may be added to while someone waits.
type pending struct {
	mu   sync.Mutex // guards n and idle
	n    int
	idle chan struct{} // closed when n drops to 0
}

func (p *pending) add() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		p.idle = make(chan struct{})
	}
	p.n++
}

func (p *pending) done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.n--
	if p.n == 0 {
		close(p.idle)
	}
}

// wait reports whether the count reached 0 within timeout.
func (p *pending) wait(timeout time.Duration) bool {
	p.mu.Lock()
	if p.n == 0 {
		p.mu.Unlock()
		return true
	}
	idle := p.idle
	p.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-idle:
		return true
	case <-t.C:
		return false
	}
}

const disconnectAttempts = 6

// postHook POSTs body to the disconnect path through next and returns the
// app's status.
func (h *Handler) postHook(base *requestBase, next caddyhttp.Handler, hdr http.Header, body []byte) (int, error) {
	call := &routeCall{base: base, next: next, method: http.MethodPost, target: h.Disconnect,
		header: hdr, body: body, contentType: "application/json"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(h.MessageTimeout))
	defer cancel()
	rec := newRecorder(1 << 16)
	req, err := call.request(ctx, rec)
	if err != nil {
		return 0, err
	}
	if err := call.serve(rec, req); err != nil {
		return 0, fmt.Errorf("duplex: disconnect hook: %w", err)
	}
	return rec.statusCode(), nil
}
