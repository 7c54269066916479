package duplex

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-duplex/duplex/protocol"
)

// broker is the seam between this node and the set of sessions: where a
// publish goes, where sessions are registered, where a session's pushes
// are kept for a resume on any node, and how the node holding a session
// is reached. The memory broker (the default) is this process alone: the
// hub is the registry and each session keeps its own buffer. A clustered
// broker (broker redis) keeps all of it in Redis and carries pushes and
// commands between nodes; the hub then holds this node's share.
//
// The hub calls it; it calls back into the hub (pushes and commands for
// sessions this node holds). Its methods are called with no lock held.
type broker interface {
	// publish applies m to every session it targets, wherever held, and
	// returns how many it reached (detached ones too).
	publish(ctx context.Context, m *publishMsg) (int, error)
	// once applies a publish with id at most once within
	// idempotencyWindow, across nodes: a repeat gets the first one's
	// count without applying it.
	once(ctx context.Context, id string, fn func() (int, error)) (int, error)
	// register records new session s, held by this node, with its
	// initial channels and the path and host of its opening request. An
	// error refuses the opening (503).
	register(ctx context.Context, s *session, channels []string, path, host string) error
	// find returns the session a cursor's token names when this node does
	// not hold it, opened by a handler in place scope (nil if none). It is
	// not claimed yet: its user is checked first.
	find(ctx context.Context, hd *Handler, c protocol.Cursor) (*session, error)
	// claim makes this node the holder of s for a resume from lastSeq
	// over a connection on transport from remote: the pushes after
	// lastSeq are put in s's buffer and the node that held s closes its
	// connection (4009). It returns s's channels for a session this node
	// did not hold. errUnknownSession: s is gone.
	claim(ctx context.Context, s *session, lastSeq uint64, transport, remote string) (channels []string, err error)
	// hold starts delivering s's pushes to this node, after those in its
	// buffer (after register or claim, once s is attached).
	hold(s *session)
	// subscribe records channel changes of s.
	subscribe(ctx context.Context, s *session, add, remove []string) error
	// detached says s waits for a resume for window.
	detached(s *session, window time.Duration)
	// acked says the client has s's pushes up to seq.
	acked(s *session, seq uint64)
	// ended removes s from the set of sessions and reports whether this
	// node is the one to run its disconnect hook (it may have moved).
	ended(s *session) bool
	// locate finds where the session an SSE POST's token names is held
	// when this node does not hold it, if it was opened by a handler in
	// place scope (ok false if there is no such session). Unlike find, it
	// builds no session: a POST only needs to reach the session's node.
	locate(ctx context.Context, hd *Handler, token string) (rs remoteSession, ok bool, err error)
	// forward hands the frames of an SSE POST for session rs (from
	// locate) to the node holding it (again to the node holding it now,
	// if it moved meanwhile), and returns that node's answer: 202 once it
	// queued them, 401, 409 or 429 as servePost answers.
	forward(ctx context.Context, rs remoteSession, frames [][]byte) (int, error)
	// answer hands answers to messages of s, served on this node after s
	// moved to another one, to the node holding s now, which sends them
	// to the client and holds them as its own (see session.send), then,
	// if closeReason is set, closes s (the app's Duplex-Close). What
	// cannot be handed over is logged: its calls get no answer. If s has
	// ended meanwhile, s's inbox stops: nobody is left to answer.
	answer(s *session, answers []heldAnswer, closeReason string)
	// sessions lists the sessions of a user and/or on a channel (all when
	// both are empty), on every node, ordered by opening time.
	sessions(ctx context.Context, user, channel string) ([]sessionInfo, error)
	// info describes session id, wherever held (errUnknownSession if
	// none).
	info(ctx context.Context, id string) (sessionInfo, error)
	// cluster describes the nodes sharing the sessions.
	cluster(ctx context.Context) (clusterInfo, error)
	// node names this node in logs ("" for the memory broker).
	node() string
}

// clusterInfo is the answer of GET /duplex/cluster.
type clusterInfo struct {
	Broker string `json:"broker"` // memory or redis
	// Node is this node's id, and Nodes the live nodes (this one
	// included), sorted.
	Node  string   `json:"node,omitempty"`
	Nodes []string `json:"nodes"`
}

// errForwardUnanswered: the node holding a session did not answer a
// forwarded POST in time. It may still take the frames (it does, if it is
// only slow), so they must not be sent again: the POST is answered 504,
// which the clients count as sent.
var errForwardUnanswered = errors.New("duplex: the node holding the session did not answer in time")

// errBrokerUnavailable refuses a publish or an opening while the broker
// cannot be reached: 503 with Retry-After.
type errBrokerUnavailable struct{ err error }

func (e errBrokerUnavailable) Error() string { return "duplex: broker unavailable: " + e.err.Error() }
func (e errBrokerUnavailable) Unwrap() error { return e.err }

// MemoryBroker keeps the sessions of this process only: the default
// broker (`broker memory`).
type MemoryBroker struct {
	hub *hub
}

// CaddyModule returns the Caddy module information.
func (MemoryBroker) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "duplex.brokers.memory",
		New: func() caddy.Module { return new(MemoryBroker) },
	}
}

// Provision attaches the broker to the process-wide hub.
func (b *MemoryBroker) Provision(caddy.Context) error {
	b.hub = globalHub
	return nil
}

func (b *MemoryBroker) publish(_ context.Context, m *publishMsg) (int, error) {
	return b.hub.deliver(m)
}

func (b *MemoryBroker) once(_ context.Context, id string, fn func() (int, error)) (int, error) {
	return b.hub.idem.do(id, time.Now(), fn)
}

func (*MemoryBroker) register(context.Context, *session, []string, string, string) error { return nil }

func (*MemoryBroker) find(context.Context, *Handler, protocol.Cursor) (*session, error) {
	return nil, nil // the hub knows every session there is
}

func (*MemoryBroker) claim(_ context.Context, s *session, _ uint64, _, _ string) ([]string, error) {
	if s.ended() {
		return nil, errUnknownSession
	}
	return nil, nil
}

func (*MemoryBroker) hold(*session) {}
func (b *MemoryBroker) subscribe(_ context.Context, s *session, _, _ []string) error {
	if b.hub.get(s.id) == nil {
		return errUnknownSession // the hub changed what it holds; nothing else does
	}
	return nil
}

func (b *MemoryBroker) sessions(_ context.Context, user, channel string) ([]sessionInfo, error) {
	return b.hub.list(user, channel), nil
}

func (b *MemoryBroker) info(_ context.Context, id string) (sessionInfo, error) {
	if info, ok := b.hub.info(id); ok {
		return info, nil
	}
	return sessionInfo{}, errUnknownSession
}
func (*MemoryBroker) detached(*session, time.Duration) {}
func (*MemoryBroker) acked(*session, uint64)           {}
func (*MemoryBroker) ended(*session) bool              { return true }

func (*MemoryBroker) cluster(context.Context) (clusterInfo, error) {
	return clusterInfo{Broker: "memory", Nodes: []string{}}, nil
}

func (*MemoryBroker) node() string { return "" }

func (*MemoryBroker) locate(context.Context, *Handler, string) (remoteSession, bool, error) {
	return remoteSession{}, false, nil // the hub knows every session there is
}

func (*MemoryBroker) forward(context.Context, remoteSession, [][]byte) (int, error) {
	return http.StatusUnauthorized, nil // locate found nothing to forward to
}

func (*MemoryBroker) answer(*session, []heldAnswer, string) {} // sessions never move away

// remoteSession is a session held by another node of a cluster, as an SSE
// POST for it needs to know it: its id and the node holding it.
type remoteSession struct {
	id, node string
}

// brokerOf is the broker of the running config: the duplex app's, or the
// memory broker without one.
func (h *hub) brokerOf() broker {
	if a := h.app.Load(); a != nil && a.broker != nil {
		return a.broker
	}
	return h.memory
}

// Interface guards
var (
	_ broker            = (*MemoryBroker)(nil)
	_ caddy.Provisioner = (*MemoryBroker)(nil)
)
