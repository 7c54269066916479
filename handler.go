package duplex

import (
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
	if !slices.Contains(h.Transports, name) {
		// Say which transports are enabled, so a client can fall back.
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Duplex-Transports", strings.Join(h.Transports, ", "))
		w.WriteHeader(http.StatusBadRequest)
		_, _ = fmt.Fprintf(w, "duplex: transport %s is not enabled here; enabled: %s\n",
			name, strings.Join(h.Transports, ", "))
		return nil
	}
	if !h.originAllowed(r) {
		return caddyhttp.Error(http.StatusForbidden,
			fmt.Errorf("duplex: origin %q is not allowed", r.Header.Get("Origin")))
	}
	if ok, err := h.authorized(r); !ok {
		if err == nil {
			err = fmt.Errorf("duplex: the opening request does not satisfy the auth matchers")
		}
		return caddyhttp.Error(http.StatusUnauthorized, err)
	}

	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	user, channels := h.identity(repl)
	cursor := takeCursor(r, name, resume)
	resumeAsked := cursor != ""
	old, lastSeq := h.resumable(cursor, user)

	idle := 2 * time.Duration(h.Heartbeat)
	var t transport
	var err error
	switch name {
	case transportWebSocket:
		h.extendIdleTimeouts(r, idle, idle)
		t, err = acceptWebSocket(w, r, h.MaxMessageSize, idle)
	case transportStream:
		// The client need not send anything; liveness comes from writes.
		h.extendIdleTimeouts(r, silentPeer, idle)
		t, err = acceptStream(w, r, h.MaxMessageSize)
	case transportSSE:
		h.extendIdleTimeouts(r, silentPeer, idle)
		t, err = acceptSSE(w, r)
	}
	if err != nil {
		h.logger.Debug("session opening failed", zap.String("transport", name),
			zap.String("remote", r.RemoteAddr), zap.Error(err))
		return nil // the client was answered already
	}

	if old != nil {
		a := newAttachment(old, h, r, next, name, t)
		if old.attach(a, true, lastSeq) {
			metrics.resumes.WithLabelValues("resumed").Inc()
			h.logger.Info("session resumed",
				zap.String("session", old.id),
				zap.String("user", old.user),
				zap.String("transport", name),
				zap.String("remote", r.RemoteAddr),
				zap.Uint64("from_seq", lastSeq))
			a.run()
			return nil
		}
		// Ended meanwhile, or the pushes after the cursor are gone: the
		// client starts over with a new session (resumed:false).
	}
	if resumeAsked {
		metrics.resumes.WithLabelValues("failed").Inc()
	}
	s := newSession(h, user)
	a := newAttachment(s, h, r, next, name, t)
	h.hub.add(s, channels)
	s.attach(a, false, 0)
	metrics.opened.WithLabelValues(name).Inc()
	h.logger.Info("session opened",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", name),
		zap.String("remote", r.RemoteAddr))
	a.run()
	return nil
}

// takeCursor returns the resume cursor of an opening: Last-Event-ID for SSE
// (event ids are cursors), the Duplex-Resume header or the resume query
// parameter for the others. The parameter is removed from the request, so
// the token never reaches the app with the messages' query.
func takeCursor(r *http.Request, transport, header string) string {
	q := r.URL.Query()
	param := q.Get("resume")
	if q.Has("resume") {
		q.Del("resume")
		r.URL.RawQuery = q.Encode()
	}
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

// resumable finds the session a cursor names, if the opening may resume
// it: the token matches (compared in constant time) and the opening is by
// the same user.
func (h *Handler) resumable(cursor, user string) (*session, uint64) {
	if cursor == "" {
		return nil, 0
	}
	token, seq, ok := parseCursor(cursor)
	if !ok {
		return nil, 0
	}
	s := h.hub.byToken(token)
	if s == nil || !s.tokenMatches(token) || s.user != user {
		return nil, 0
	}
	return s, seq
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
