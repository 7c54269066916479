package duplex

import (
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/caddy-duplex/duplex/protocol"
)

// ServeHTTP opens a session for a session-opening request and serves it
// until it ends; an SSE session's POST is taken for its session; any other
// request goes to the next handler. Client Duplex-* headers are removed
// from every request first. A session's own messages and hooks are refused
// here (403), wherever the route places duplex.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if isSubrequest(r) {
		return errSubrequest
	}
	next = h.keepNext(next)
	token := r.Header.Get("Duplex-Token")
	resume := r.Header.Get("Duplex-Resume")
	stripDuplexHeaders(r.Header)
	if token != "" && r.Method == http.MethodPost && slices.Contains(h.Transports, transportSSE) {
		h.servePost(w, r, token)
		return nil
	}

	name := negotiate(r)
	if name == "" {
		return next.ServeHTTP(w, r)
	}
	if name == transportStream && r.ProtoMajor == 1 {
		// A refusal below must not wait for the client to finish its
		// body (a stream client never does): Go's HTTP/1.1 server drains
		// an unread body before answering unless the connection is to be
		// closed. acceptStream takes this back when it goes full duplex.
		w.Header().Set("Connection", "close")
	}
	if !slices.Contains(h.Transports, name) {
		// Say which transports are enabled, so a client can fall back.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Duplex-Transports", strings.Join(h.Transports, ", "))
		w.WriteHeader(http.StatusBadRequest)
		_, _ = fmt.Fprintf(w, "duplex: transport %s is not enabled here; enabled: %s\n",
			name, strings.Join(h.Transports, ", "))
		return nil
	}
	// Refusals are answered here rather than returned as errors: Caddy
	// logs a failed request whole, and an opening may carry a resume
	// cursor, whose token must never reach a log.
	if !h.originAllowed(r) {
		h.refuse(w, r, http.StatusForbidden, "origin not allowed")
		return nil
	}
	if ok, err := h.authorized(r); !ok {
		if err != nil {
			h.logger.Error("auth matchers failed", zap.Error(err))
		}
		h.refuse(w, r, http.StatusUnauthorized, "the opening request does not satisfy the auth matchers")
		return nil
	}

	op := &opening{w: w, r: r, next: next, transport: name, bind: func(*session) {}}
	// ?ping=text: heartbeats also as {"type":"ping"} text frames, which
	// browser scripts can see (they cannot see WebSocket ping frames).
	op.textPing = takeQuery(r, "ping") == "text"
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	op.user, op.channels = h.identity(repl)
	op.cursor = takeCursor(r, name, resume)
	h.serveOpening(op)
	return nil
}

// opening is a session-opening request on its way: admitted by the
// transport, origin and auth checks, then (with connect) by the app, then
// resuming the session its cursor names or opening a new one.
type opening struct {
	w         http.ResponseWriter
	r         *http.Request
	next      caddyhttp.Handler
	transport string
	cursor    string   // resume cursor, "" if none
	textPing  bool     // heartbeats also as text frames (WebSocket)
	user      string   // identity the opening proves
	channels  []string // initial subscriptions
	// resumable is the session the cursor names, if it may be resumed
	// from lastSeq by this opening's user.
	resumable *session
	lastSeq   uint64
	// data is the connect hook's answer for the open frame, and bind
	// gives its push stream the session it is for (nil: none).
	data json.RawMessage
	bind func(*session)
}

// serveOpening decides what the opening becomes and serves it.
func (h *Handler) serveOpening(op *opening) {
	var err error
	op.resumable, op.lastSeq, err = h.hub.resumable(op.r.Context(), h, op.cursor)
	if err != nil {
		h.unavailable(op, err)
		return
	}
	var fresh *session // the new session, if the opening gets one
	if h.Connect {
		fresh = newSession(h, op.user)
		if !h.connect(op, fresh) {
			return
		}
		fresh.user = op.user
	}
	if !op.mayResume(true) {
		op.resumable = nil // a session of another user: this opening starts a new one
	}
	if op.resumable != nil {
		if outcome := h.resume(op); outcome != resumeGone {
			// Served (or refused: the client has its answer).
			if fresh != nil {
				fresh.end(closeInfo{Reason: "resumed instead"})
			}
			return
		}
		// resumeGone: the session ended meanwhile, or the pushes after the
		// cursor are gone: the client starts over with a new session
		// (resumed:false).
	}
	if op.cursor != "" {
		metrics.resumes.WithLabelValues("failed").Inc()
	}
	if fresh == nil {
		fresh = newSession(h, op.user)
	}
	h.open(op, fresh)
}

// mayResume reports whether the opening may resume the session its cursor
// names: only a session of the same user. Before the connect hook has run
// (userFinal false), an opening without a user yet may still get one from
// the hook, so it passes; the check is made again once the user is final.
func (op *opening) mayResume(userFinal bool) bool {
	s := op.resumable
	return s != nil && (s.user == op.user || (!userFinal && op.user == ""))
}

// connect runs the connect hook for op (fresh is the session it would
// open); false means the app refused and the client has its answer.
func (h *Handler) connect(op *opening, fresh *session) bool {
	target, resuming := fresh, false
	if op.mayResume(false) {
		target, resuming = op.resumable, true
	}
	res := h.runConnect(op.r, op.next, target, op.user, op.transport, resuming)
	if !res.accepted() {
		fresh.end(closeInfo{Reason: "rejected by the connect hook"})
		h.logger.Debug("opening rejected by the connect hook",
			zap.String("remote", op.r.RemoteAddr), zap.Int("status", res.status), zap.Bool("timeout", res.timedOut))
		rejectOpening(op.w, res)
		return false
	}
	if u := strings.TrimSpace(res.header.Get("Duplex-User")); u != "" {
		op.user = u
	}
	op.channels = append(op.channels, headerList(res.header.Values("Duplex-Subscribe"))...)
	if !res.streaming && len(res.body) > 0 {
		op.data, _ = embedBody(res.header.Get("Content-Type"), res.body)
	}
	if res.bind != nil {
		op.bind = res.bind
	}
	return true
}

// accept completes the opening handshake of the transport. On error the
// client was answered already.
func (h *Handler) accept(op *opening) (transport, error) {
	w, r := op.w, op.r
	idle := 2 * time.Duration(h.Heartbeat)
	switch op.transport {
	case transportWebSocket:
		h.extendIdleTimeouts(r, idle, idle)
		return acceptWebSocket(w, r, h.MaxMessageSize, idle, op.textPing)
	case transportStream:
		// The client need not send anything; liveness comes from writes.
		h.extendIdleTimeouts(r, silentPeer, idle)
		return acceptStream(w, r, h.MaxMessageSize, idle)
	default:
		h.extendIdleTimeouts(r, silentPeer, idle)
		return acceptSSE(w, r, idle)
	}
}

// open serves new session s on the opening until its connection ends.
func (h *Handler) open(op *opening, s *session) {
	ad, err := h.hub.admit(h, clientIP(op.r))
	if err != nil {
		op.bind(nil)
		s.end(closeInfo{Reason: err.Error()})
		status := http.StatusServiceUnavailable
		if errors.Is(err, errMaxPerIP) {
			status = http.StatusTooManyRequests
		}
		op.w.Header().Set("Retry-After", "5")
		h.refuse(op.w, op.r, status, err.Error())
		return
	}
	s.transport, s.remote = op.transport, op.r.RemoteAddr // not shared yet: no lock
	if err := h.hub.brokerOf().register(op.r.Context(), s, op.channels, op.r.URL.Path, op.r.Host); err != nil {
		h.hub.release(ad)
		s.end(closeInfo{Reason: err.Error()})
		h.unavailable(op, err)
		return
	}
	t, err := h.accept(op)
	if err != nil {
		h.hub.release(ad)
		op.bind(nil)
		s.end(closeInfo{Reason: "opening failed"})
		h.hub.brokerOf().ended(s)
		h.logger.Debug("session opening failed", zap.String("transport", op.transport),
			zap.String("remote", op.r.RemoteAddr), zap.Error(err))
		return
	}
	h.serveNew(op, t, s, ad, true)
}

// unavailable answers an opening the broker cannot serve now: 503 with
// Retry-After.
func (h *Handler) unavailable(op *opening, err error) {
	op.bind(nil)
	h.logger.Error("opening refused: broker unavailable", zap.Error(err))
	op.w.Header().Set("Retry-After", retryAfter)
	h.refuse(op.w, op.r, http.StatusServiceUnavailable, "sessions are unavailable; retry later")
}

// serveNew serves new session s on the accepted transport t; registered
// says the broker knows it already.
func (h *Handler) serveNew(op *opening, t transport, s *session, ad *admission, registered bool) {
	op.bind(s) // before attach: pushes the stream already sent follow the open frame
	a := newAttachment(s, h, op.r, op.next, t)
	var regErr error
	if !registered {
		s.transport, s.remote = op.transport, op.r.RemoteAddr // not shared yet: no lock
		regErr = h.hub.brokerOf().register(op.r.Context(), s, op.channels, op.r.URL.Path, op.r.Host)
	}
	h.hub.add(s, op.channels, ad)
	if !s.attach(a, false, 0, op.data) {
		// Ended already (its user was closed by the app meanwhile).
		a.drop()
		return
	}
	if regErr != nil {
		// The connection is open already: tell the client to come back.
		h.logger.Error("session not registered: broker unavailable", zap.String("session", s.id), zap.Error(regErr))
		s.end(closeInfo{Code: protocol.CodeRestart, Reason: "sessions are unavailable; retry later", Reconnect: true, kind: "broker"})
		a.start()
		return
	}
	h.hub.brokerOf().hold(s)
	if h.MaxSessionsPerUser > 0 && s.user != "" {
		for _, old := range h.hub.oldestOf(s.user, h.MaxSessionsPerUser) {
			old.end(closeTooMany)
		}
	}
	metrics.opened.WithLabelValues(op.transport).Inc()
	h.logger.Info("session opened",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", op.transport),
		zap.String("remote", op.r.RemoteAddr))
	a.start()
}

// What resume did with an opening.
type resumeOutcome int

const (
	resumeServed  resumeOutcome = iota // served: resumed, or (see resume) a new session on the accepted connection
	resumeGone                         // not resumable from the cursor; nothing was written to the client
	resumeRefused                      // the transport could not be accepted; the client has its answer
)

// resume serves op.resumable on this opening, from the client's lastSeq.
// If the session can no longer be resumed from there once the connection
// is accepted (it ended, or a push trimmed the buffer past the cursor in
// between), the client starts over on that connection with a new session
// (resumed:false), which is also resumeServed.
func (h *Handler) resume(op *opening) resumeOutcome {
	s, lastSeq := op.resumable, op.lastSeq
	channels, err := h.hub.brokerOf().claim(op.r.Context(), s, lastSeq, op.transport, op.r.RemoteAddr)
	if errors.Is(err, errUnknownSession) {
		return resumeGone
	}
	if err != nil {
		h.unavailable(op, err)
		return resumeRefused
	}
	s.mu.Lock()
	ok := s.state != stateEnded && s.resumableLocked(lastSeq)
	s.mu.Unlock()
	if !ok {
		return resumeGone
	}
	t, err := h.accept(op)
	if err != nil {
		op.bind(nil)
		if s.claimed {
			h.hub.brokerOf().detached(s, time.Duration(h.ResumeWindow))
		}
		h.logger.Debug("session resume failed", zap.String("transport", op.transport),
			zap.String("remote", op.r.RemoteAddr), zap.Error(err))
		return resumeRefused
	}
	a := newAttachment(s, h, op.r, op.next, t)
	if s.claimed {
		// A session this node did not hold: it joins the hub now. A
		// resume is not refused by the session limits.
		s.claimed = false
		h.hub.add(s, channels, nil)
		s.mu.Lock()
		s.state = stateDetached
		s.mu.Unlock()
	}
	if !s.attach(a, true, lastSeq, op.data) {
		// A resume is not refused by the session limits, so this new
		// session is admitted regardless.
		metrics.resumes.WithLabelValues("failed").Inc()
		h.serveNew(op, t, newSession(h, op.user), nil, false)
		return resumeServed
	}
	h.hub.brokerOf().hold(s)
	op.bind(s)
	if h.Connect && len(op.channels) > 0 {
		if err := h.hub.subscribe(op.r.Context(), s, op.channels, nil); err != nil {
			h.logger.Error("connect hook's channels not recorded", zap.String("session", s.id), zap.Error(err))
		}
	}
	metrics.resumes.WithLabelValues("resumed").Inc()
	h.logger.Info("session resumed",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", op.transport),
		zap.String("remote", op.r.RemoteAddr),
		zap.Uint64("from_seq", lastSeq))
	a.start()
	return resumeServed
}

// clientIP is the opening's client IP as Caddy determined it (honouring
// trusted_proxies), or its remote host.
func clientIP(r *http.Request) string {
	if ip, ok := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string); ok && ip != "" {
		return ip
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// keepNext remembers the handler chain after duplex (it is the same for
// every request through this handler), for hooks run outside a request.
func (h *Handler) keepNext(next caddyhttp.Handler) caddyhttp.Handler {
	if h.next.Load() == nil {
		h.next.CompareAndSwap(nil, &next)
	}
	return next
}

// refuse answers an opening that gets no session.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, status int, why string) {
	h.logger.Debug("opening refused", zap.Int("status", status), zap.String("why", why),
		zap.String("remote", r.RemoteAddr))
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, "duplex: %s\n", why)
}

// takeCursor returns the resume cursor of an opening: Last-Event-ID for SSE
// (event ids are cursors), the Duplex-Resume header or the resume query
// parameter for the others. The parameter is removed from the request, so
// the token never reaches the app with the messages' query.
func takeCursor(r *http.Request, transport, header string) string {
	param := takeQuery(r, "resume")
	switch {
	case header != "":
		return header
	case param != "":
		return param
	case transport == transportSSE:
		return r.Header.Get("Last-Event-Id")
	}
	return ""
}

// takeQuery returns the value of a query parameter meant for duplex and
// removes it from the request, so the app never sees it on messages.
func takeQuery(r *http.Request, name string) string {
	if !strings.Contains(r.URL.RawQuery, name) {
		return ""
	}
	q := r.URL.Query()
	if !q.Has(name) {
		return ""
	}
	v := q.Get(name)
	q.Del(name)
	r.URL.RawQuery = q.Encode()
	return v
}

// silentPeer is the read idle timeout for transports whose clients need not
// send anything (stream, sse): dead peers are found by writes instead.
const silentPeer = 100 * 365 * 24 * time.Hour

// negotiate names the transport a request opens, or "" if it opens none.
func negotiate(r *http.Request) string {
	switch {
	case isWebSocketOpening(r):
		return transportWebSocket
	case r.Method == http.MethodPost && mediaType(r.Header.Get("Content-Type")) == "application/x-ndjson":
		return transportStream
	case r.Method == http.MethodGet && acceptsEventStream(r):
		return transportSSE
	}
	return ""
}

func mediaType(v string) string {
	mt, _, _ := mime.ParseMediaType(v)
	return mt
}

// authorized checks the opening request against the auth matchers.
func (h *Handler) authorized(r *http.Request) (bool, error) {
	if len(h.auth) == 0 {
		return true, nil
	}
	ok, err := h.auth.MatchWithError(r)
	if err != nil {
		return false, fmt.Errorf("duplex: auth matchers: %w", err)
	}
	return ok, nil
}

// identity expands the user and channel templates with the opening
// request's placeholders.
func (h *Handler) identity(repl *caddy.Replacer) (user string, channels []string) {
	expand := func(s string) string {
		if repl == nil {
			return s
		}
		return repl.ReplaceAll(s, "")
	}
	user = strings.TrimSpace(expand(h.User))
	for _, c := range h.Channels {
		if c = strings.TrimSpace(expand(c)); c != "" {
			channels = append(channels, c)
		}
	}
	return user, channels
}

// originAllowed implements the browser origin check: a request without an
// Origin header is not from a browser page and passes; otherwise the
// origin must be the request's own (same scheme, host and port) or one of
// allowed_origins.
func (h *Handler) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(h.AllowedOrigins, "*") {
		return true
	}
	o, ok := normalOrigin(origin)
	if !ok {
		return false
	}
	for _, a := range h.AllowedOrigins {
		if na, ok := normalOrigin(a); ok && na == o {
			return true
		}
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	self, ok := normalOrigin(scheme + "://" + r.Host)
	return ok && self == o
}

// normalOrigin is an origin as scheme://host:port, lower case, with the
// scheme's default port made explicit; ok is false for anything that is
// not a plain origin (user info, a path, a query).
func normalOrigin(s string) (string, bool) {
	u, err := url.Parse(strings.TrimSuffix(s, "/"))
	if err != nil || u.Host == "" || u.User != nil || u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return "", false
	}
	scheme := strings.ToLower(u.Scheme)
	port := u.Port()
	if port == "" {
		switch scheme {
		case "http", "ws":
			port = "80"
		case "https", "wss":
			port = "443"
		default:
			return "", false
		}
	}
	return scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port), true
}

// extendIdleTimeouts replaces Caddy's body-read and write idle timeouts
// (read_body_idle, write_idle) for this long-lived request: heartbeats keep
// the connection busy, so a peer idle for longer is dead.
func (h *Handler) extendIdleTimeouts(r *http.Request, readIdle, writeIdle time.Duration) {
	reader, writer := caddyhttp.IdleTimeoutsFromContext(r.Context())
	if reader != nil {
		reader.Override(readIdle, 0)
	}
	if writer != nil {
		writer.Override(writeIdle, 0, 0)
	}
}
