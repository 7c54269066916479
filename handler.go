package duplex

import (
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// ServeHTTP opens a session for a session-opening request and serves it
// until it ends; any other request goes to the next handler. Client
// Duplex-* headers are removed from every request first.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
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

	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	user, channels := h.identity(repl)
	cursor := takeCursor(r, name, resume)
	old, lastSeq := h.hub.resumable(cursor)
	if old != nil && user != "" && old.user != user {
		old = nil // a session of another user: this opening starts a new one
	}
	next = h.keepNext(next)

	var openData json.RawMessage
	bind := func(*session) {} // gives a connect stream its session
	if h.Connect {
		target := old
		if target == nil {
			target = newSession(h, user)
		}
		res := h.runConnect(r, next, target, user, name, old != nil)
		if !res.accepted() {
			if old == nil {
				target.end(closeInfo{Reason: "rejected by the connect hook"})
			}
			h.logger.Debug("opening rejected by the connect hook",
				zap.String("remote", r.RemoteAddr), zap.Int("status", res.status), zap.Bool("timeout", res.timedOut))
			rejectOpening(w, res)
			return nil
		}
		if u := strings.TrimSpace(res.header.Get("Duplex-User")); u != "" {
			user = u
		}
		channels = append(channels, headerList(res.header.Values("Duplex-Subscribe"))...)
		if !res.streaming && len(res.body) > 0 {
			openData, _ = embedBody(res.header.Get("Content-Type"), res.body)
		}
		if res.bind != nil {
			bind = res.bind
		}
		if old == nil {
			target.user = user
			return h.open(w, r, next, name, target, channels, openData, bind)
		}
	}
	if old != nil && old.user != user {
		old = nil // a session of another user: open a new one
	}
	if old != nil {
		if done := h.resume(w, r, next, name, old, lastSeq, user, channels, openData, bind); done {
			return nil
		}
		// The session ended meanwhile, or the pushes after the cursor are
		// gone: the client starts over with a new session (resumed:false).
	}
	if cursor != "" {
		metrics.resumes.WithLabelValues("failed").Inc()
	}
	return h.open(w, r, next, name, newSession(h, user), channels, openData, bind)
}

// accept completes the opening handshake of the transport. On error the
// client was answered already.
func (h *Handler) accept(w http.ResponseWriter, r *http.Request, name string) (transport, error) {
	idle := 2 * time.Duration(h.Heartbeat)
	switch name {
	case transportWebSocket:
		h.extendIdleTimeouts(r, idle, idle)
		// ?ping=text: heartbeats also as {"type":"ping"} text frames,
		// which browser scripts can see (they cannot see ping frames).
		textPing := takeQuery(r, "ping") == "text"
		return acceptWebSocket(w, r, h.MaxMessageSize, idle, textPing)
	case transportStream:
		// The client need not send anything; liveness comes from writes.
		h.extendIdleTimeouts(r, silentPeer, idle)
		return acceptStream(w, r, h.MaxMessageSize)
	default:
		h.extendIdleTimeouts(r, silentPeer, idle)
		return acceptSSE(w, r)
	}
}

// open serves a new session s on this request until its connection ends.
//
// bind is given the session a connect hook's stream is for (nil if none).
func (h *Handler) open(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, name string, s *session, channels []string, data json.RawMessage, bind func(*session)) error {
	if h.MaxSessions > 0 && h.hub.count() >= h.MaxSessions {
		bind(nil)
		s.end(closeInfo{Reason: "max_sessions reached"})
		w.Header().Set("Retry-After", "5")
		h.refuse(w, r, http.StatusServiceUnavailable, "max_sessions reached")
		return nil
	}
	t, err := h.accept(w, r, name)
	if err != nil {
		bind(nil)
		s.end(closeInfo{Reason: "opening failed"})
		h.logger.Debug("session opening failed", zap.String("transport", name),
			zap.String("remote", r.RemoteAddr), zap.Error(err))
		return nil
	}
	h.serveNew(r, next, name, t, s, channels, data, bind)
	return nil
}

// serveNew serves new session s on the accepted transport t.
func (h *Handler) serveNew(r *http.Request, next caddyhttp.Handler, name string, t transport, s *session, channels []string, data json.RawMessage, bind func(*session)) {
	bind(s) // before attach: pushes the stream already sent follow the open frame
	a := newAttachment(s, h, r, next, name, t)
	h.hub.add(s, channels)
	s.attach(a, false, 0, data)
	if h.MaxSessionsPerUser > 0 && s.user != "" {
		for _, old := range h.hub.oldestOf(s.user, h.MaxSessionsPerUser) {
			old.terminate(closeTooMany)
		}
	}
	metrics.opened.WithLabelValues(name).Inc()
	h.logger.Info("session opened",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", name),
		zap.String("remote", r.RemoteAddr))
	a.start()
}

// resume serves session s on this request, from the client's lastSeq. It
// reports false if s can no longer be resumed from there (nothing was
// written to the client then).
func (h *Handler) resume(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, name string, s *session, lastSeq uint64, user string, channels []string, data json.RawMessage, bind func(*session)) bool {
	s.mu.Lock()
	ok := !s.ended && s.resumableLocked(lastSeq)
	s.mu.Unlock()
	if !ok {
		return false
	}
	t, err := h.accept(w, r, name)
	if err != nil {
		bind(nil)
		h.logger.Debug("session resume failed", zap.String("transport", name),
			zap.String("remote", r.RemoteAddr), zap.Error(err))
		return true
	}
	a := newAttachment(s, h, r, next, name, t)
	if !s.attach(a, true, lastSeq, data) {
		// The session ended, or a push trimmed the buffer past the
		// cursor, since the check above: the client starts over on the
		// connection it has (resumed:false).
		metrics.resumes.WithLabelValues("failed").Inc()
		h.serveNew(r, next, name, t, newSession(h, user), channels, data, bind)
		return true
	}
	bind(s)
	if h.Connect && len(channels) > 0 {
		h.hub.subscribe(s, channels, nil)
	}
	metrics.resumes.WithLabelValues("resumed").Inc()
	h.logger.Info("session resumed",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", name),
		zap.String("remote", r.RemoteAddr),
		zap.Uint64("from_seq", lastSeq))
	a.start()
	return true
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
// Origin header is not from a browser page and passes; otherwise the origin
// must be the request's own host or one of allowed_origins.
func (h *Handler) originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	if slices.Contains(h.AllowedOrigins, "*") {
		return true
	}
	for _, a := range h.AllowedOrigins {
		if strings.EqualFold(strings.TrimSuffix(a, "/"), origin) {
			return true
		}
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" {
		return false
	}
	return strings.EqualFold(u.Host, r.Host)
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
