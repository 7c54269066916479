package duplex

import (
	"fmt"
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
	stripDuplexHeaders(r.Header)

	transport := negotiate(r)
	if transport == "" {
		return next.ServeHTTP(w, r)
	}
	if !slices.Contains(h.Transports, transport) {
		return caddyhttp.Error(http.StatusBadRequest,
			fmt.Errorf("duplex: transport %s is not enabled here (enabled: %s)", transport, strings.Join(h.Transports, ", ")))
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

	idle := 2*time.Duration(h.Heartbeat) + 5*time.Second
	h.extendIdleTimeouts(r, idle)

	t, err := acceptWebSocket(w, r, h.MaxMessageSize, idle)
	if err != nil {
		h.logger.Debug("websocket handshake failed", zap.String("remote", r.RemoteAddr), zap.Error(err))
		return nil // the handshake error was answered already
	}
	s := newSession(h, r, next, transport, user)
	s.run(t, channels)
	return nil
}

// negotiate names the transport a request opens, or "" if it opens none.
func negotiate(r *http.Request) string {
	if isWebSocketOpening(r) {
		return transportWebSocket
	}
	return ""
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

// extendIdleTimeouts replaces Caddy's body-read and write idle timeouts for
// this long-lived request: heartbeats keep both directions busy, so a peer
// silent for idle is dead.
func (h *Handler) extendIdleTimeouts(r *http.Request, idle time.Duration) {
	reader, writer := caddyhttp.IdleTimeoutsFromContext(r.Context())
	if reader != nil {
		reader.Override(idle, 0)
	}
	if writer != nil {
		writer.Override(idle, 0, 0)
	}
}
