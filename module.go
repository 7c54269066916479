// Package duplex is a Caddy HTTP handler that turns matching requests into
// long-lived duplex sessions. The client authenticates once, at the opening;
// every message it sends afterwards is served by the rest of the Caddy route
// as an ordinary HTTP request, and the app pushes to sessions, users and
// channels through a publish API. README.md is the contract.
package duplex

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	_ "github.com/caddy-duplex/duplex/command"  // caddy duplex connect|publish|sessions
	_ "github.com/caddy-duplex/duplex/jsclient" // the duplex_client handler: the browser client
)

func init() {
	caddy.RegisterModule(App{})
	caddy.RegisterModule(Handler{})
	caddy.RegisterModule(Publish{})
	caddy.RegisterModule(AdminAPI{})
	caddy.RegisterModule(MemoryBroker{})
	caddy.RegisterModule(RedisBroker{})
}

// Defaults of the handler's options.
const (
	defaultHeartbeat      = 25 * time.Second
	defaultMaxMessageSize = 64 << 10
	defaultMaxInflight    = 1
	defaultMessageTimeout = 30 * time.Second
	defaultSendQueue      = 1 << 20
	defaultResumeWindow   = 2 * time.Minute
	defaultResumeBuffer   = 1000
	// defaultResumeBufferSize caps the bytes of a session's resume buffer.
	defaultResumeBufferSize = 8 << 20
	defaultMaxDetached      = 10000
	// maxPublishBody bounds a publish API request body.
	maxPublishBody = 1 << 20
)

// knownTransports lists the transports this build can serve, in the default
// order of preference.
var knownTransports = []string{transportWebSocket, transportStream, transportSSE}

// App holds the global options of the duplex plugin (the `duplex` global
// option in the Caddyfile). It is optional: without it the defaults apply.
type App struct {
	// AdminPublish serves the publish and sessions API under /duplex/ on
	// Caddy's admin endpoint. Default: true.
	AdminPublish *bool `json:"admin_publish,omitempty"`
	// BrokerRaw is the broker module that keeps the sessions: memory (the
	// default, this process only) or redis (several nodes sharing
	// sessions; see "Running a cluster" in the README).
	BrokerRaw json.RawMessage `json:"broker,omitempty" caddy:"namespace=duplex.brokers inline_key=broker"`
	// PublishListen are addresses on which the app serves the same API as
	// /duplex/ on the admin endpoint, itself, on a plain HTTP/1.1 server:
	// without Caddy's per-request admin work, for apps that publish at high
	// rates. Caddy network addresses of one port: host:port, or
	// unix//path. Like the admin endpoint it has no authentication: bind
	// it to loopback, a unix socket or a private interface. Requests from
	// browsers (Origin or Sec-Fetch-* headers) and, on TCP, requests for a
	// Host other than an IP address, localhost or the address's own host
	// are refused with 403. Default: none.
	PublishListen []string `json:"publish_listen,omitempty"`

	hub    *hub
	broker broker
	ctx    caddy.Context
	// publishAddrs are PublishListen parsed; publishLn serves them once
	// started.
	publishAddrs []caddy.NetworkAddress
	publishLn    *publishListener

	// places counts, per server, the duplex handlers provisioned under
	// this config so far; see Handler.key.
	places *placeCounter
}

// placeCounter counts duplex handlers per server within one config.
type placeCounter struct {
	mu sync.Mutex // guards n
	n  map[string]int
}

// place names the next duplex handler of server srv (its listen
// addresses) in this config: the server and the handler's rank among its
// duplex handlers.
func (a *App) place(srv string) string {
	a.places.mu.Lock()
	defer a.places.mu.Unlock()
	n := a.places.n[srv]
	a.places.n[srv] = n + 1
	return srv + "#" + strconv.Itoa(n)
}

// brokerOrMemory is the app's broker, or the memory broker.
func (a *App) brokerOrMemory() broker {
	if a.broker != nil {
		return a.broker
	}
	return a.hub.memory
}

// clustered reports whether the app's broker shares sessions between
// nodes.
func (a *App) clustered() bool {
	_, ok := a.broker.(*RedisBroker)
	return ok
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "duplex",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision attaches the app to the process-wide session hub and loads
// its broker.
func (a *App) Provision(ctx caddy.Context) error {
	a.hub = globalHub
	a.ctx = ctx
	a.places = &placeCounter{n: make(map[string]int)}
	addrs, err := parsePublishListen(a.PublishListen)
	if err != nil {
		return err
	}
	a.publishAddrs = addrs
	if a.BrokerRaw != nil {
		mod, err := ctx.LoadModule(a, "BrokerRaw")
		if err != nil {
			return fmt.Errorf("duplex: loading broker: %w", err)
		}
		b, ok := mod.(broker)
		if !ok {
			return fmt.Errorf("duplex: module %T is not a broker", mod)
		}
		a.broker = b
	}
	return nil
}

// Start applies the global options and starts the publish listeners. A
// new config's apps start before the old config's stop, so the new
// settings take over.
func (a *App) Start() error {
	if len(a.publishAddrs) > 0 {
		ln, err := startPublishListener(a.ctx, a.hub, a.publishAddrs)
		if err != nil {
			return err
		}
		a.publishLn = ln
	}
	if r, ok := a.broker.(*RedisBroker); ok {
		r.Start()
	}
	a.hub.app.Store(a)
	return nil
}

// Stop withdraws the options, unless a newer config's app replaced them,
// and stops the publish listeners' servers.
func (a *App) Stop() error {
	a.hub.app.CompareAndSwap(a, nil)
	a.publishLn.stop()
	return nil
}

// Handler is the `duplex` HTTP handler. It turns matching requests into
// duplex sessions; every message a client sends on a session is served by
// the handlers after it in the route (usually reverse_proxy to the app), and
// the answer goes back on the session. Requests that are not session
// openings are passed to the next handler.
type Handler struct {
	// AuthRaw is a matcher set the opening request must satisfy (any Caddy
	// request matcher, e.g. header or remote_ip). An opening that does not
	// match is answered 401 and no session is opened. Default: no check
	// beyond the handlers placed before duplex in the route.
	AuthRaw caddy.ModuleMap `json:"auth,omitempty" caddy:"namespace=http.matchers"`

	// MessagesRaw is a matcher set every client message must satisfy (any
	// Caddy request matchers, all of which must match, evaluated on the
	// request the message becomes: its method, path and the opening's
	// headers). A message that does not match is answered with an error
	// frame of status 403 and reaches no handler. Default: the opening
	// request's path and the paths below it (opening /live: /live and
	// /live/…, not /livex or /rooms/1).
	MessagesRaw caddy.ModuleMap `json:"messages,omitempty" caddy:"namespace=http.matchers"`

	// User is the identity of the session, a template expanded with the
	// opening request's placeholders, e.g. `{http.auth.user.id}`. Pushes can
	// target every session of a user. Default: empty (anonymous).
	User string `json:"user,omitempty"`

	// Channels the session is subscribed to when it opens; each entry is a
	// template expanded with the opening request's placeholders. Entries
	// that expand to an empty string are skipped. Default: none.
	Channels []string `json:"channels,omitempty"`

	// Transports enabled on this handler: "websocket", "stream" (NDJSON
	// over one full-duplex HTTP request) and "sse" (Server-Sent Events plus
	// POSTs). The order is the preference the JS client follows.
	// Default: websocket stream sse.
	Transports []string `json:"transports,omitempty"`

	// Heartbeat is the interval between pings the server sends. A peer
	// that sends nothing (not even a pong) for two heartbeats is considered
	// dead and its session ends. Default: 25s.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`

	// MaxMessageSize is the largest client message accepted, in bytes.
	// Larger messages are discarded and answered with an error frame of
	// status 413; the session stays open. Default: 64 KiB.
	MaxMessageSize int64 `json:"max_message_size,omitempty"`

	// MaxInflight is how many client messages of one session are served
	// concurrently. 1 serves them strictly in order. Default: 1.
	MaxInflight int `json:"max_inflight,omitempty"`

	// MessageTimeout bounds how long the route may take to serve one
	// client message; past it the client gets an error frame of status
	// 504. Default: 30s.
	MessageTimeout caddy.Duration `json:"message_timeout,omitempty"`

	// SendQueue bounds, in bytes, the frames queued for a session that
	// have not been written to its connection yet. A session that cannot
	// keep up is closed with code 4008 and reconnect:true. Default: 1 MiB.
	SendQueue int64 `json:"send_queue,omitempty"`

	// ResumeWindow is how long a session whose connection dropped stays
	// alive, buffering pushes, for the client to resume it with its cursor.
	// Default: 2m.
	ResumeWindow caddy.Duration `json:"resume_window,omitempty"`

	// ResumeBuffer is how many of its latest pushes a session keeps for a
	// resume (also capped at resume_buffer_size bytes); pushes the client
	// acked are dropped earlier. Default: 1000.
	ResumeBuffer int `json:"resume_buffer,omitempty"`

	// ResumeBufferSize caps, in bytes, the pushes a session keeps for a
	// resume (the second argument of resume_buffer). Default: 8 MiB.
	ResumeBufferSize int64 `json:"resume_buffer_size,omitempty"`

	// Rate is how many client messages per second one session may send
	// (a token bucket of Burst). A message over it is answered with an
	// error frame of status 429; a client that keeps sending over it (more
	// than 10 × burst refusals in a row) is closed with code 1008.
	// Negative turns the limit off. Default: 100.
	Rate float64 `json:"rate,omitempty"`

	// Burst is the token bucket's size for Rate. Default: 200.
	Burst int `json:"burst,omitempty"`

	// MaxSessionsPerUser caps the open sessions of one user; opening one
	// more closes that user's oldest session (code 4001). 0 is unlimited.
	// Default: 0.
	MaxSessionsPerUser int `json:"max_sessions_per_user,omitempty"`

	// MaxSessions caps the sessions open in the whole process (every
	// handler); an opening over it is answered 503. 0 is unlimited.
	// Default: 0.
	MaxSessions int `json:"max_sessions,omitempty"`

	// MaxSessionsPerIP caps the sessions (attached or detached) this
	// handler holds for one client IP (Caddy's client_ip, which honours
	// trusted_proxies); an opening over it is answered 429. Resuming a
	// session is never refused by it. 0 is unlimited. Default: 0.
	MaxSessionsPerIP int `json:"max_sessions_per_ip,omitempty"`

	// MaxDetached caps the sessions of this handler that wait, detached,
	// for their client to resume. Over it, the session detached longest
	// ends (its resume then opens a new session, resumed:false).
	// Default: 10000.
	MaxDetached int `json:"max_detached,omitempty"`

	// MaxAge closes a connection this long after it opened, with code 4003
	// and reconnect:true: the client reconnects through the auth handlers
	// (and the connect hook) again and resumes its session. 0 is
	// unlimited. Default: 0.
	MaxAge caddy.Duration `json:"max_age,omitempty"`

	// Connect runs the opening request (method and path unchanged, upgrade
	// headers removed, no body) through the rest of the route once before
	// the session opens, also when a session is resumed. A 2xx answer
	// accepts: its Duplex-User and Duplex-Subscribe headers set the
	// session's user and add channels, its body becomes the open frame's
	// data, and a text/event-stream or application/x-ndjson answer that
	// stays open is relayed as pushes to the session. Any other answer
	// rejects the opening with the app's status, headers and body. An app
	// that does not answer within message_timeout rejects it with 504.
	// Default: off.
	Connect bool `json:"connect,omitempty"`

	// Disconnect is a path the session's end is POSTed to through the rest
	// of the route, once per session, when it ends for good (closed by
	// either side, resume window over, shutdown), with Duplex-Session,
	// Duplex-User and a body {"reason":"…"}; retried with backoff while the
	// app fails. Default: none.
	Disconnect string `json:"disconnect,omitempty"`

	// AllowedOrigins lists the origins (scheme://host[:port]) browsers may
	// open sessions and post frames from, besides the request's own
	// origin (same scheme, host and port); "*" allows every origin.
	// Requests without an Origin header (non-browser clients) are always
	// allowed. Default: same origin only.
	AllowedOrigins []string `json:"allowed_origins,omitempty"`

	auth     caddyhttp.MatcherSet
	messages caddyhttp.MatcherSet // nil: the opening path and below
	hub      *hub
	logger   *zap.Logger
	// live tracks the connections this handler instance serves, so they
	// can be closed when Caddy unloads the config they run under.
	live *attachmentSet
	// cleaned is set once Caddy cleaned the handler up: its handler chain
	// must not serve messages any more.
	cleaned *atomic.Bool
	// key names the handler's place in the config (its server's listen
	// addresses and its rank among the duplex handlers of that server),
	// the same across reloads that do not add a duplex handler before it
	// on the same server. Sessions are scoped to it: a token is only accepted by the
	// handler in the place that opened it, and a session detached under an
	// unloaded config reaches the handler that replaced it (for its
	// disconnect hook).
	key string
	// next is the handler chain after duplex, kept from the first request.
	next *atomic.Pointer[caddyhttp.Handler]
	// hooks counts disconnect hooks under way.
	hooks *pending
	// srv is the server the handler is in (nil outside one).
	srv *caddyhttp.Server
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.duplex",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler: defaults, matchers and the session hub.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.AuthRaw != nil {
		mods, err := ctx.LoadModule(h, "AuthRaw")
		if err != nil {
			return fmt.Errorf("duplex: loading auth matchers: %w", err)
		}
		for _, m := range mods.(map[string]any) {
			h.auth = append(h.auth, m)
		}
	}
	if h.MessagesRaw != nil {
		mods, err := ctx.LoadModule(h, "MessagesRaw")
		if err != nil {
			return fmt.Errorf("duplex: loading messages matchers: %w", err)
		}
		for _, m := range mods.(map[string]any) {
			h.messages = append(h.messages, m)
		}
	}
	if len(h.Transports) == 0 {
		h.Transports = slices.Clone(knownTransports)
	}
	h.Heartbeat = cmp.Or(h.Heartbeat, caddy.Duration(defaultHeartbeat))
	h.MaxMessageSize = cmp.Or(h.MaxMessageSize, defaultMaxMessageSize)
	h.MaxInflight = cmp.Or(h.MaxInflight, defaultMaxInflight)
	h.MessageTimeout = cmp.Or(h.MessageTimeout, caddy.Duration(defaultMessageTimeout))
	h.SendQueue = cmp.Or(h.SendQueue, defaultSendQueue)
	h.ResumeWindow = cmp.Or(h.ResumeWindow, caddy.Duration(defaultResumeWindow))
	h.ResumeBuffer = cmp.Or(h.ResumeBuffer, defaultResumeBuffer)
	h.ResumeBufferSize = cmp.Or(h.ResumeBufferSize, defaultResumeBufferSize)
	h.MaxDetached = cmp.Or(h.MaxDetached, defaultMaxDetached)
	h.Rate = cmp.Or(h.Rate, defaultRate)
	h.Burst = cmp.Or(h.Burst, defaultBurst)
	if err := metrics.register(ctx); err != nil {
		return fmt.Errorf("duplex: registering metrics: %w", err)
	}
	h.hub = globalHub
	h.live = newAttachmentSet()
	h.cleaned = new(atomic.Bool)
	h.next = new(atomic.Pointer[caddyhttp.Handler])
	h.hooks = new(pending)
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	h.srv = srv
	app, err := ctx.App("duplex")
	if err != nil {
		return fmt.Errorf("duplex: loading the duplex app: %w", err)
	}
	server := ""
	switch {
	case srv == nil:
	case app.(*App).clustered():
		// The nodes of a cluster listen on different addresses (on one
		// machine, different ports) but run the same config: the server's
		// name (srv0… from the Caddyfile) is the same on every node.
		server = srv.Name()
	default:
		// Its listen addresses name the server: unlike its name (srv0…),
		// they do not change when other sites are added.
		server = strings.Join(srv.Listen, ",")
	}
	h.key = app.(*App).place(server)
	if node := app.(*App).brokerOrMemory().node(); node != "" {
		h.logger = h.logger.With(zap.String("node", node))
	}
	h.hub.register(h)
	// A server shutting down (reload or stop) waits for open requests
	// forever with the default grace period; an SSE or stream session is
	// one. End this handler's sessions as soon as the shutdown starts.
	if srv != nil {
		srv.RegisterOnShutdown(h.shutdown)
	}
	return nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	for _, t := range h.Transports {
		if !slices.Contains(knownTransports, t) {
			return fmt.Errorf("duplex: unknown transport %q (supported: %v)", t, knownTransports)
		}
	}
	switch {
	case h.Heartbeat < 0:
		return fmt.Errorf("duplex: heartbeat must be positive")
	case h.MaxMessageSize < 0:
		return fmt.Errorf("duplex: max_message_size must be positive")
	case h.MaxInflight < 0:
		return fmt.Errorf("duplex: max_inflight must be positive")
	case h.MessageTimeout < 0:
		return fmt.Errorf("duplex: message_timeout must be positive")
	case h.SendQueue < 0:
		return fmt.Errorf("duplex: send_queue must be positive")
	case h.ResumeWindow < 0:
		return fmt.Errorf("duplex: resume_window must be positive")
	case h.ResumeBuffer < 0, h.ResumeBufferSize < 0:
		return fmt.Errorf("duplex: resume_buffer must be positive")
	case h.Burst < 0, h.MaxSessionsPerUser < 0, h.MaxSessions < 0, h.MaxSessionsPerIP < 0, h.MaxDetached < 0, h.MaxAge < 0:
		return fmt.Errorf("duplex: burst, max_sessions_per_user, max_sessions, max_sessions_per_ip, max_detached and max_age must not be negative")
	}
	return nil
}

// Cleanup ends, asynchronously, the sessions opened under this handler
// that are still open: Caddy is unloading the handler chain their messages
// would be served by. They are told to reconnect (code 4012), which lands
// them on the new config. The hub itself lives on. (Usually the server's
// shutdown hook, registered in Provision, has closed them already.)
func (h *Handler) Cleanup() error {
	h.shutdown()
	if caddy.Exiting() && !h.hooks.wait(10*time.Second) {
		// The disconnect hooks of the sessions that ended had their
		// chance to reach the app before the process exits.
		h.logger.Warn("exiting before every disconnect hook was delivered")
	}
	h.cleaned.Store(true)
	h.hub.unregister(h)
	return nil
}

// shutdown runs when the server this handler belongs to starts shutting
// down (reload or exit), and again at Cleanup. On a reload, connections
// are closed with 4012 and reconnect:true, so their sessions resume on the
// new config. When the process exits, sessions cannot resume here: they
// end for good (and their disconnect hooks run).
func (h *Handler) shutdown() {
	if caddy.Exiting() {
		h.hub.endSessionsOf(h, closeShutdown)
	}
	h.live.closeAll(closeRestart)
}

// Publish is the `duplex_publish` handler: it serves the publish API
// (POST a publish body, see the README) on whatever route it is placed in,
// behind whatever auth the route puts before it. It does not call the next
// handler.
type Publish struct {
	hub *hub
}

// CaddyModule returns the Caddy module information.
func (Publish) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.duplex_publish",
		New: func() caddy.Module { return new(Publish) },
	}
}

// Provision attaches the handler to the session hub.
func (p *Publish) Provision(ctx caddy.Context) error {
	p.hub = globalHub
	if err := metrics.register(ctx); err != nil {
		return fmt.Errorf("duplex: registering metrics: %w", err)
	}
	return nil
}

// Interface guards
var (
	_ caddy.App                   = (*App)(nil)
	_ caddy.Provisioner           = (*App)(nil)
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddy.Provisioner           = (*Publish)(nil)
	_ caddyhttp.MiddlewareHandler = (*Publish)(nil)
)
