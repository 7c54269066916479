package duplex

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"go.uber.org/zap"
)

// inboxSize is how many client messages may wait for the route per
// session; a client that sends faster is slowed down by the transport
// (its socket is not read while the inbox is full), and an SSE POST that
// would overflow it is answered 429.
const inboxSize = 64

// inbox hands a session's client messages to the route, at most
// max_inflight at a time, in arrival order. It belongs to the session, not
// to a connection: a message read before the connection dropped is still
// served while the session is detached, and its answer is sent after the
// resume. A goroutine drains it only while it holds messages, so an idle
// session costs no goroutine and no buffer here.
//
// It serves until the session ends (stop), or, for a session that moved
// to another node of a cluster, until what it accepted is served (leave):
// the answers then go to where the session is now.
type inbox struct {
	s        *session
	mu       sync.Mutex // guards the fields below
	q        []inMsg
	draining bool
	busy     int           // messages taken and not finished yet
	leaving  bool          // the session moved away: serve what is here, then stop
	stopped  bool          // nothing more is taken or served
	space    chan struct{} // signalled when a queued message is taken
}

type inMsg struct {
	b      []byte
	binary bool
}

func newInbox(s *session) *inbox {
	return &inbox{s: s, space: make(chan struct{}, 1)}
}

// put queues a message, waiting while inboxSize messages wait already; it
// reports false once done (the connection that read it) has ended, or the
// inbox has stopped.
func (in *inbox) put(m inMsg, done <-chan struct{}) bool {
	for {
		queued, stopped := in.offer(m)
		switch {
		case stopped:
			return false
		case queued:
			return true
		}
		select {
		case <-in.space:
		case <-done:
			return false
		}
	}
}

// offer queues messages if they all fit, and reports whether they did, or
// that the inbox has stopped (nothing is queued then).
func (in *inbox) offer(msgs ...inMsg) (queued, stopped bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.stopped {
		return false, true
	}
	if len(in.q)+len(msgs) > inboxSize {
		return false, false
	}
	in.q = append(in.q, msgs...)
	if !in.draining {
		in.draining = true
		go in.drain()
	}
	return true, false
}

// take pops the next message; when there is none, the drain goroutine
// ends. The message counts as busy until finished.
func (in *inbox) take() (inMsg, bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.q) == 0 || in.stopped {
		in.draining, in.q = false, nil
		return inMsg{}, false
	}
	m := in.q[0]
	in.q[0] = inMsg{}
	in.q = in.q[1:]
	in.busy++
	select {
	case in.space <- struct{}{}:
	default:
	}
	return m, true
}

// finished says a taken message is done with (answered, or handed to the
// route and returned). The last one of a session that moved away stops
// the inbox.
func (in *inbox) finished() {
	in.mu.Lock()
	in.busy--
	stop := in.leftLocked()
	in.mu.Unlock()
	if stop {
		in.s.stopServing()
	}
}

// leftLocked stops a leaving inbox with nothing left to serve; it reports
// whether it did.
func (in *inbox) leftLocked() bool {
	if !in.leaving || in.stopped || in.busy > 0 || len(in.q) > 0 {
		return false
	}
	in.stopped = true
	return true
}

// stop ends serving at once: what waits is dropped, the route calls in
// flight are cancelled.
func (in *inbox) stop() {
	in.mu.Lock()
	in.stopped, in.q = true, nil
	in.mu.Unlock()
	in.s.stopServing()
}

// leave serves what the inbox holds and what it is still handed, then
// stops: the session moved to another node, which now serves what its
// client sends.
func (in *inbox) leave() {
	in.mu.Lock()
	in.leaving = true
	stop := in.leftLocked()
	in.mu.Unlock()
	if stop {
		in.s.stopServing()
	}
}

func (in *inbox) drain() {
	for {
		m, ok := in.take()
		if !ok {
			return
		}
		in.s.handle(m, in.finished)
	}
}

// handle checks a message against the rate limit and decodes it, then
// serves it once the session has a max_inflight slot. The slot is held
// until the route call returns, also past message_timeout. With
// max_inflight 1 a message costs no goroutine of its own. It calls done
// once the message is done with.
func (s *session) handle(m inMsg, done func()) {
	async := false // a goroutine of its own serves it, and calls done
	defer func() {
		if !async {
			done()
		}
	}()
	var f *protocol.Message
	body, contentType := m.b, "application/octet-stream"
	if ok, abuse := s.gate.allow(); !ok {
		if abuse {
			s.end(closeRateAbuse)
			return
		}
		metrics.messages.WithLabelValues("rate_limited").Inc()
		var ref json.RawMessage
		if !m.binary {
			if frame, ferr := decodeClientFrame(m.b); ferr == nil && hasID(frame.ID) {
				ref = frame.ID
			}
		}
		s.send(protocol.TypeError, ref, encodeError(ref, http.StatusTooManyRequests, "message rate limit exceeded"))
		return
	}
	if !m.binary {
		frame, ferr := decodeClientFrame(m.b)
		if ferr != nil {
			metrics.messages.WithLabelValues("bad_frame").Inc()
			s.send(protocol.TypeError, frame.ID, encodeError(frame.ID, ferr.status, ferr.msg))
			return
		}
		if frame.Type == protocol.TypeAck {
			s.ack(frame.Seq)
			return
		}
		f, body, contentType = &frame, frame.Data, "application/json"
	}
	// A slot of the session's max_inflight; taking it in arrival order
	// keeps messages in order when max_inflight is 1.
	select {
	case s.sem <- struct{}{}:
	case <-s.serving.Done():
		return
	}
	if cap(s.sem) == 1 {
		// max_inflight 1 (the default): the next message waits for this
		// one anyway, so it is served here, on the inbox's goroutine.
		// With more slots it gets a goroutine of its own, so that the
		// inbox goes on filling slots as others free them.
		defer func() { <-s.sem }()
		s.serve(f, body, contentType)
		return
	}
	async = true
	go func() {
		defer done()
		defer func() { <-s.sem }()
		s.serve(f, body, contentType)
	}()
}

// serve runs one client message through the rest of the route as an
// ordinary HTTP request and sends the answer back on the session: exactly
// one ack, reply or error for a message with an id. f is nil for binary
// messages, which are fire-and-forget. It returns when the route call
// does; past message_timeout the client is answered 504 at once.
func (s *session) serve(f *protocol.Message, body []byte, contentType string) {
	var ref json.RawMessage
	method, target := http.MethodPost, ""
	if f != nil {
		if hasID(f.ID) {
			ref = f.ID
		}
		if f.Method != "" {
			method = strings.ToUpper(f.Method)
		}
		target = f.Path
	}
	var answered atomic.Bool
	// answer sends the message's one answer, unless it had one (the 504
	// of message_timeout); it reports whether this call sent it.
	answer := func(result string, typ string, b []byte) bool {
		if !answered.CompareAndSwap(false, true) {
			return false
		}
		if f == nil {
			result = "fire_and_forget"
		} else {
			s.send(typ, ref, b)
		}
		metrics.messages.WithLabelValues(result).Inc()
		return f != nil
	}
	h, base, next, transport := s.route()
	if h.cleaned.Load() {
		// Caddy unloaded this config: its handler chain is gone.
		answer("app_error", protocol.TypeError, encodeError(ref, http.StatusServiceUnavailable, "server restarting; resume to continue"))
		return
	}
	if !validMethod(method) {
		answer("bad_frame", protocol.TypeError, encodeError(ref, http.StatusBadRequest, fmt.Sprintf("method %q is not allowed", method)))
		return
	}
	call := &routeCall{base: base, next: next, method: method, target: target,
		header: s.messageHeader(f, transport), body: body, contentType: contentType}
	// Not the connection's cancellation: a message outlives a dropped
	// connection (and its session's move to another node); it ends with
	// the session or at message_timeout.
	ctx, cancel := context.WithTimeout(s.serving, time.Duration(h.MessageTimeout))
	defer cancel()
	rec := newRecorder(h.SendQueue)
	req, err := call.request(ctx, rec)
	if err != nil {
		answer("bad_frame", protocol.TypeError, encodeError(ref, http.StatusBadRequest, err.Error()))
		return
	}
	if !h.inScope(req, base) {
		answer("forbidden", protocol.TypeError, encodeError(ref, http.StatusForbidden, "the path is outside this session's messages scope"))
		return
	}

	timeout := time.AfterFunc(time.Duration(h.MessageTimeout), func() {
		if s.serving.Err() == nil {
			answer("timeout", protocol.TypeError, encodeError(ref, http.StatusGatewayTimeout, "the app did not answer within message_timeout"))
		}
	})
	start := time.Now()
	err = call.serve(rec, req)
	timeout.Stop()
	metrics.appLatency.Observe(time.Since(start).Seconds())
	if s.serving.Err() != nil || answered.Load() {
		return // the session ended meanwhile, or the client had its 504
	}
	if err != nil {
		status := errorStatus(err, http.StatusInternalServerError)
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			status = http.StatusGatewayTimeout
		}
		h.logger.Debug("message failed", zap.String("session", s.id), zap.Int("status", status), zap.Error(err))
		answer("app_error", protocol.TypeError, encodeError(ref, status, ""))
		return
	}

	closeReason, closeAfter := s.applyControlHeaders(rec.header)
	status := rec.statusCode()
	var result, typ string
	var b []byte
	switch {
	case rec.overflow:
		result, typ, b = "app_error", protocol.TypeError, encodeError(ref, http.StatusBadGateway, "the app's answer is larger than send_queue")
	case status >= 400:
		result, typ, b = "app_error", protocol.TypeError, encodeError(ref, status, errorText(status, rec.body.Bytes()))
	case ref == nil:
		// no id: the client asked for no answer
		answered.Store(true)
		metrics.messages.WithLabelValues("served").Inc()
	case rec.body.Len() == 0:
		result, typ, b = "ack", protocol.TypeAck, encodeAck(ref)
	default:
		result, typ, b = "reply", protocol.TypeReply, encodeReply(ref, status, rec.header.Get("Content-Type"), rec.body.Bytes())
	}
	sent := typ != "" && answer(result, typ, b)
	if closeAfter && !s.end(closedByApp(closeReason)) && s.hasMovedAway() {
		// The session is on another node now: close it there, after this
		// answer, which goes with the close (again, if it went already:
		// the session may have moved after send queued it here, and the
		// held answers travel on their own).
		var with []heldAnswer
		if sent && hasID(ref) {
			with = []heldAnswer{{typ: typ, b: b}}
		}
		s.hub.brokerOf().answer(s, with, closeReason)
	}
}

// messageHeader is what a message adds to the base's headers: the
// session's identity. Client messages never carry Duplex-Connect or
// Duplex-Disconnect, so the app can tell them from hooks.
func (s *session) messageHeader(f *protocol.Message, transport string) http.Header {
	hdr := http.Header{
		"Duplex-Session":   {s.id},
		"Duplex-Transport": {transport},
	}
	if s.user != "" {
		hdr["Duplex-User"] = []string{s.user}
	}
	if f != nil && hasID(f.ID) {
		hdr["Duplex-Message-Id"] = []string{idText(f.ID)}
	}
	return hdr
}

// inScope reports whether a message request may be served: it satisfies
// the messages matchers, or by default its path is the opening path or
// below it.
func (h *Handler) inScope(req *http.Request, base *requestBase) bool {
	if h.messages == nil {
		return underPath(req.URL.Path, base.path)
	}
	ok, err := h.messages.MatchWithError(req)
	if err != nil {
		h.logger.Error("messages matchers failed", zap.Error(err))
		return false
	}
	return ok
}

// applyControlHeaders honours the app's Duplex-Subscribe,
// Duplex-Unsubscribe and Duplex-Close response headers. They never reach
// the client: answers carry no headers.
func (s *session) applyControlHeaders(h http.Header) (closeReason string, closeAfter bool) {
	add := headerList(h.Values("Duplex-Subscribe"))
	remove := headerList(h.Values("Duplex-Unsubscribe"))
	if len(add) > 0 || len(remove) > 0 {
		if err := s.hub.subscribe(s.serving, s, add, remove); err != nil && !errors.Is(err, errUnknownSession) {
			s.h.logger.Error("channel change not recorded", zap.String("session", s.id), zap.Error(err))
		}
	}
	if v, ok := h["Duplex-Close"]; ok {
		reason := strings.TrimSpace(strings.Join(v, ", "))
		if reason == "" {
			reason = "closed by the app"
		}
		return reason, true
	}
	return "", false
}

// headerList splits comma-separated header values.
func headerList(values []string) []string {
	var out []string
	for _, v := range values {
		for _, item := range strings.Split(v, ",") {
			if item = strings.TrimSpace(item); item != "" {
				out = append(out, item)
			}
		}
	}
	return out
}

// removedHeaders are opening-request headers the app never sees on
// messages (README: what the app sees): hop-by-hop headers, the upgrade handshake, and
// those that describe the opening request's own body or stream.
var removedHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Connection": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Accept": true, "Last-Event-Id": true, "Content-Length": true, "Content-Type": true,
	"Content-Encoding": true, ":protocol": true,
}

// messageHeader is the opening request's header as messages carry it,
// copied in one pass (the values in one backing array, as Header.Clone
// does).
func messageHeader(opening http.Header) http.Header {
	var hop []string // the headers the opening's Connection names
	for _, c := range opening["Connection"] {
		for name := range strings.SplitSeq(c, ",") {
			if name = strings.TrimSpace(name); name != "" {
				hop = append(hop, http.CanonicalHeaderKey(name))
			}
		}
	}
	keep := func(name string) bool {
		return !removedHeaders[name] && !slices.Contains(hop, name) &&
			!strings.HasPrefix(name, "Sec-Websocket-") && !isDuplexHeader(name)
	}
	n, keys := 0, 0
	for name, vv := range opening {
		if keep(name) {
			n += len(vv)
			keys++
		}
	}
	h := make(http.Header, keys)
	values := make([]string, n)
	for name, vv := range opening {
		if !keep(name) {
			continue
		}
		if vv == nil {
			h[name] = nil
			continue
		}
		n = copy(values, vv)
		h[name] = values[:n:n]
		values = values[n:]
	}
	return h
}

// isDuplexHeader reports whether a canonical header name is one of ours.
func isDuplexHeader(name string) bool {
	return len(name) >= 7 && strings.EqualFold(name[:7], "Duplex-")
}

// stripDuplexHeaders removes every Duplex-* header a client sent, so the
// app can trust the ones we set.
func stripDuplexHeaders(h http.Header) {
	for name := range h {
		if isDuplexHeader(name) {
			delete(h, name)
		}
	}
}

// validMethod reports whether m (upper-cased) may be a message's method:
// an HTTP token, but not CONNECT, TRACE or PRI, which no app should be
// sent from a session.
func validMethod(m string) bool {
	if m == "" || len(m) > 32 {
		return false
	}
	for i := 0; i < len(m); i++ {
		c := m[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	switch m {
	case http.MethodConnect, http.MethodTrace, "PRI":
		return false
	}
	return true
}

// recorder is the ResponseWriter a message is served into: it keeps the
// status, headers and (up to a limit) the body of the app's answer.
type recorder struct {
	header   http.Header
	status   int
	body     bytes.Buffer
	limit    int64
	overflow bool
}

func newRecorder(limit int64) *recorder {
	return &recorder{header: make(http.Header), limit: limit}
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(code int) {
	if r.status != 0 || (code >= 100 && code < 200) {
		return
	}
	r.status = code
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.WriteHeader(http.StatusOK)
	}
	if int64(r.body.Len()+len(p)) > r.limit {
		r.overflow = true
		return len(p), nil
	}
	return r.body.Write(p)
}

// Flush is a no-op: the answer is sent as one frame.
func (r *recorder) Flush() {}

func (r *recorder) statusCode() int {
	if r.status == 0 {
		return http.StatusOK
	}
	return r.status
}
