package duplex

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// inboxSize is how many client messages may wait for the route per
// session; a client that sends faster is slowed down by the transport
// (its socket is not read while the inbox is full).
const inboxSize = 64

// inbox hands a connection's client messages to the route, at most
// max_inflight at a time (counted per session), in arrival order. A
// goroutine drains it only while it holds messages, so an idle session
// costs no goroutine and no buffer here.
type inbox struct {
	a        *attachment
	mu       sync.Mutex
	q        []inMsg
	draining bool
	space    chan struct{}  // signalled when a queued message is taken
	wg       sync.WaitGroup // the drain goroutine and the messages it started
}

type inMsg struct {
	b      []byte
	binary bool
}

func newInbox(a *attachment) *inbox {
	return &inbox{a: a, space: make(chan struct{}, 1)}
}

// put queues a message, waiting while inboxSize messages wait already; it
// reports false once the connection has ended.
func (in *inbox) put(b []byte, binary bool) bool {
	for {
		in.mu.Lock()
		if len(in.q) < inboxSize {
			in.q = append(in.q, inMsg{b, binary})
			if !in.draining {
				in.draining = true
				in.wg.Go(in.drain)
			}
			in.mu.Unlock()
			return true
		}
		in.mu.Unlock()
		select {
		case <-in.space:
		case <-in.a.ctx.Done():
			return false
		}
	}
}

// take pops the next message; when there is none, the drain goroutine
// ends.
func (in *inbox) take() (inMsg, bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.q) == 0 {
		in.draining, in.q = false, nil
		return inMsg{}, false
	}
	m := in.q[0]
	in.q[0] = inMsg{}
	in.q = in.q[1:]
	select {
	case in.space <- struct{}{}:
	default:
	}
	return m, true
}

// stop waits, once the reader puts no more, for the queued messages and
// those under way. Messages already taken keep running if the connection
// drops (their answers go to the connection the session has then, if
// any); those still queued are dropped with it.
func (in *inbox) stop() { in.wg.Wait() }

func (in *inbox) drain() {
	for {
		m, ok := in.take()
		if !ok {
			return
		}
		in.handle(m)
	}
}

// handle checks a message against the rate limit and decodes it, then
// starts serving it once the session has a max_inflight slot.
func (in *inbox) handle(m inMsg) {
	a, s := in.a, in.a.s
	if a.ctx.Err() != nil || s.ctx.Err() != nil {
		return // the connection or session ended
	}
	var f *clientFrame
	body, contentType := m.b, "application/octet-stream"
	if ok, abuse := s.gate.allow(); !ok {
		if abuse {
			s.terminate(closeRateAbuse)
			return
		}
		metrics.messages.WithLabelValues("rate_limited").Inc()
		var ref json.RawMessage
		if !m.binary {
			if frame, ferr := decodeClientFrame(m.b); ferr == nil && hasID(frame.ID) {
				ref = frame.ID
			}
		}
		s.send(frameErr, encodeError(ref, http.StatusTooManyRequests, "message rate limit exceeded"))
		return
	}
	if !m.binary {
		frame, ferr := decodeClientFrame(m.b)
		if ferr != nil {
			metrics.messages.WithLabelValues("bad_frame").Inc()
			s.send(frameErr, encodeError(frame.ID, ferr.status, ferr.msg))
			return
		}
		if frame.Type == frameAck {
			s.ack(frame.Seq)
			return
		}
		f, body, contentType = &frame, frame.Data, "application/json"
	}
	// A slot of the session's max_inflight; taking it in arrival
	// order keeps messages in order when max_inflight is 1.
	select {
	case s.sem <- struct{}{}:
	case <-s.ctx.Done():
		return
	}
	in.wg.Go(func() {
		defer func() { <-s.sem }()
		a.serve(f, body, contentType)
	})
}

// serve runs one client message through the rest of the route as an
// ordinary HTTP request and sends the answer back on the session. f is nil
// for binary messages, which are fire-and-forget.
func (a *attachment) serve(f *clientFrame, body []byte, contentType string) {
	s := a.s
	var ref []byte
	method, target := http.MethodPost, ""
	if f != nil {
		if hasID(f.ID) {
			ref = f.ID
		}
		if f.Method != "" {
			method = f.Method
		}
		target = f.Path
	}
	answer := func(result string, typ string, b []byte) {
		if f == nil {
			result = "fire_and_forget"
		} else {
			s.send(typ, b)
		}
		metrics.messages.WithLabelValues(result).Inc()
	}
	if a.h.cleaned.Load() {
		// Caddy unloaded this config: its handler chain is gone.
		answer("app_error", frameErr, encodeError(ref, http.StatusServiceUnavailable, "server restarting; resume to continue"))
		return
	}

	req, err := a.messageRequest(method, target, f, body, contentType)
	if err != nil {
		answer("bad_frame", frameErr, encodeError(ref, http.StatusBadRequest, err.Error()))
		return
	}
	// The opening request's context values (server, placeholders…), but
	// not its cancellation: a message outlives a dropped connection; it
	// ends with the session or at message_timeout.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(a.r.Context()), time.Duration(a.h.MessageTimeout))
	defer cancel()
	stop := context.AfterFunc(s.ctx, cancel)
	defer stop()
	req = req.WithContext(ctx)
	rec := newRecorder(a.h.SendQueue)
	req = a.prepare(req, rec)

	done := make(chan error, 1)
	start := time.Now()
	go func() {
		defer func() {
			if p := recover(); p != nil {
				a.h.logger.Error("panic serving message", zap.String("session", s.id), zap.Any("panic", p))
				done <- caddyhttp.Error(http.StatusInternalServerError, fmt.Errorf("panic: %v", p))
			}
		}()
		done <- a.next.ServeHTTP(rec, req)
	}()
	select {
	case err = <-done:
	case <-ctx.Done():
	}
	metrics.appLatency.Observe(time.Since(start).Seconds())
	if s.ctx.Err() != nil {
		return // the session ended meanwhile
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		answer("timeout", frameErr, encodeError(ref, http.StatusGatewayTimeout, "the app did not answer within message_timeout"))
		return
	}
	if err != nil {
		status := http.StatusInternalServerError
		var he caddyhttp.HandlerError
		if errors.As(err, &he) && he.StatusCode != 0 {
			status = he.StatusCode
		}
		a.h.logger.Debug("message failed", zap.String("session", s.id), zap.Int("status", status), zap.Error(err))
		answer("app_error", frameErr, encodeError(ref, status, ""))
		return
	}

	closeReason, closeAfter := s.applyControlHeaders(rec.header)
	status := rec.statusCode()
	switch {
	case rec.overflow:
		answer("app_error", frameErr, encodeError(ref, http.StatusBadGateway, "the app's answer is larger than send_queue"))
	case status >= 400:
		answer("app_error", frameErr, encodeError(ref, status, errorText(status, rec.body.Bytes())))
	case ref == nil:
		// no id: the client asked for no answer
		metrics.messages.WithLabelValues("served").Inc()
	case rec.body.Len() == 0:
		answer("ack", frameAck, encodeAck(ref))
	default:
		answer("reply", frameReply, encodeReply(ref, status, rec.header.Get("Content-Type"), rec.body.Bytes()))
	}
	if closeAfter {
		s.terminate(closedByApp(closeReason))
	}
}

// messageRequest builds the request a client message becomes: method and
// path from the frame, query and headers from the connection's opening
// request.
func (a *attachment) messageRequest(method, target string, f *clientFrame, body []byte, contentType string) (*http.Request, error) {
	s, opening := a.s, a.r
	if !validMethod(method) {
		return nil, fmt.Errorf("invalid method %q", method)
	}
	u := &url.URL{Path: opening.URL.Path, RawPath: opening.URL.RawPath, RawQuery: opening.URL.RawQuery}
	if target != "" {
		if target[0] != '/' {
			return nil, fmt.Errorf("path must start with /")
		}
		pu, err := url.ParseRequestURI(target)
		if err != nil {
			return nil, fmt.Errorf("invalid path: %v", err)
		}
		u = &url.URL{Path: pu.Path, RawPath: pu.RawPath, RawQuery: pu.RawQuery}
		if u.RawQuery == "" {
			u.RawQuery = opening.URL.RawQuery
		}
	}

	hdr := messageHeader(opening.Header)
	hdr.Set("Duplex-Session", s.id)
	hdr.Set("Duplex-Transport", a.transport)
	if s.user != "" {
		hdr.Set("Duplex-User", s.user)
	}
	if f != nil && hasID(f.ID) {
		hdr.Set("Duplex-Message-Id", idText(f.ID))
	}
	var rb io.ReadCloser = http.NoBody
	if len(body) > 0 {
		hdr.Set("Content-Type", contentType)
		rb = io.NopCloser(bytes.NewReader(body))
	}
	req := &http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		Body:          rb,
		ContentLength: int64(len(body)),
		Host:          opening.Host,
		RemoteAddr:    opening.RemoteAddr,
		RequestURI:    u.RequestURI(),
		TLS:           opening.TLS,
	}
	if len(body) > 0 {
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	return req, nil
}

// prepare gives the message request its own replacer and vars, as Caddy's
// server does for every request, and makes the placeholders and vars set
// while the session was opened (e.g. {http.auth.user.id}) available too.
func (a *attachment) prepare(req *http.Request, w http.ResponseWriter) *http.Request {
	srv, _ := a.r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	repl := caddy.NewReplacer()
	req = caddyhttp.PrepareRequest(req, repl, w, srv)
	if a.repl != nil {
		opening := a.repl
		repl.Map(func(key string) (any, bool) { return opening.Get(key) })
	}
	if openVars, ok := a.r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		vars, _ := req.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		for k, v := range openVars {
			if _, set := vars[k]; !set && vars != nil {
				vars[k] = v
			}
		}
	}
	return req
}

// applyControlHeaders honours the app's Duplex-Subscribe,
// Duplex-Unsubscribe and Duplex-Close response headers. They never reach
// the client: answers carry no headers.
func (s *session) applyControlHeaders(h http.Header) (closeReason string, closeAfter bool) {
	add := headerList(h.Values("Duplex-Subscribe"))
	remove := headerList(h.Values("Duplex-Unsubscribe"))
	if len(add) > 0 || len(remove) > 0 {
		s.hub.subscribe(s, add, remove)
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
// messages (DESIGN §5): hop-by-hop headers, the upgrade handshake, and
// those that describe the opening request's own body or stream.
var removedHeaders = []string{
	"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate",
	"Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
	"Accept", "Last-Event-Id", "Content-Length", "Content-Type",
	"Content-Encoding", ":protocol",
}

// messageHeader is the opening request's header as messages carry it.
func messageHeader(opening http.Header) http.Header {
	h := opening.Clone()
	for _, c := range opening.Values("Connection") {
		for _, name := range strings.Split(c, ",") {
			h.Del(strings.TrimSpace(name))
		}
	}
	for _, name := range removedHeaders {
		delete(h, name)
		h.Del(name)
	}
	for name := range h {
		if strings.HasPrefix(name, "Sec-Websocket-") || isDuplexHeader(name) {
			delete(h, name)
		}
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
	return !strings.EqualFold(m, http.MethodConnect)
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
