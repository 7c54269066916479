package duplex

import (
	"container/list"
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/caddy-duplex/duplex/protocol"
)

// errUnknownSession is returned for a session id that is not (or no longer)
// open.
var errUnknownSession = errors.New("unknown session")

// publishMsg is one publish: exactly one target, and data to push or a
// close reason.
type publishMsg struct {
	Channel string `json:"channel,omitempty"`
	User    string `json:"user,omitempty"`
	Session string `json:"session,omitempty"`
	// ID makes the publish idempotent: a repeat within 2 minutes is not
	// applied again.
	ID     string          `json:"id,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
	Except string          `json:"except,omitempty"`
	Close  *string         `json:"close,omitempty"`
}

// hub is the registry of open sessions: by id, by user and by channel. One
// hub serves the whole process and outlives config reloads, so publishing
// keeps reaching sessions opened under any config.
type hub struct {
	mu       sync.RWMutex // guards the indexes below, reserved and perIP
	sessions map[string]*session
	tokens   map[[32]byte]*session // by tokenKey
	users    map[string]map[*session]struct{}
	channels map[string]map[*session]struct{}
	// subscriptions is the other side of channels: each session's
	// channels. The hub alone keeps channel membership.
	subscriptions map[*session]map[string]struct{}

	// reserved counts openings admitted but not added yet, and perIP the
	// sessions (and reservations) per handler and client IP: see admit.
	reserved int
	perIP    map[string]int

	// dmu guards detached and every session's detached element: the
	// sessions of each handler (by key) waiting for a resume, the one
	// detached longest first. It is taken after a session's mu and takes
	// no other lock.
	dmu      sync.Mutex
	detached map[string]*list.List

	// memory is the broker of a config without a duplex app or broker.
	memory *MemoryBroker
	// idem remembers publish ids (memory broker).
	idem *idempotency
	// handlers maps handler config keys to the handler of the running
	// config with that key.
	handlers map[string]*Handler
	// app is the duplex app of the running config, if it has one; it
	// holds the global options.
	app atomic.Pointer[App]
	// posts counts the SSE POSTs this node is reading, per session.
	posts postsInFlight
}

// globalHub is the process-wide hub.
var globalHub = newHub()

func newHub() *hub {
	h := &hub{
		sessions:      make(map[string]*session),
		tokens:        make(map[[32]byte]*session),
		users:         make(map[string]map[*session]struct{}),
		channels:      make(map[string]map[*session]struct{}),
		subscriptions: make(map[*session]map[string]struct{}),
		handlers:      make(map[string]*Handler),
		perIP:         make(map[string]int),
		detached:      make(map[string]*list.List),
		idem:          newIdempotency(),
		posts:         postsInFlight{n: make(map[string]int)},
	}
	h.memory = &MemoryBroker{hub: h}
	return h
}

// adminPublish reports whether the admin API serves /duplex/.
func (h *hub) adminPublish() bool {
	a := h.app.Load()
	return a == nil || a.AdminPublish == nil || *a.AdminPublish
}

// publish hands m to the broker, unless a publish with the same id was
// applied within the idempotency window: then it returns that one's count.
func (h *hub) publish(ctx context.Context, m *publishMsg) (int, error) {
	b := h.brokerOf()
	if m.ID == "" {
		return b.publish(ctx, m)
	}
	return b.once(ctx, m.ID, func() (int, error) { return b.publish(ctx, m) })
}

// Refusals of admit.
var (
	errMaxSessions = errors.New("max_sessions reached")
	errMaxPerIP    = errors.New("max_sessions_per_ip reached")
)

// admission is a place held for a session being opened: it counts against
// max_sessions and max_sessions_per_ip from admit on, so parallel openings
// cannot overshoot them. add takes it over; release gives it back.
type admission struct {
	ipKey string // "" if not counted per IP
	done  bool
}

// admit holds a place for a new session of handler hd from client ip, or
// says which limit refuses it.
func (h *hub) admit(hd *Handler, ip string) (*admission, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if hd.MaxSessions > 0 && len(h.sessions)+h.reserved >= hd.MaxSessions {
		return nil, errMaxSessions
	}
	ad := &admission{}
	if hd.MaxSessionsPerIP > 0 {
		ad.ipKey = hd.key + " " + ip
		if h.perIP[ad.ipKey] >= hd.MaxSessionsPerIP {
			return nil, errMaxPerIP
		}
		h.perIP[ad.ipKey]++
	}
	h.reserved++
	return ad, nil
}

// release gives back a place admit held for an opening that failed.
func (h *hub) release(ad *admission) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if ad.done {
		return
	}
	ad.done = true
	h.reserved--
	h.dropIPLocked(ad.ipKey)
}

func (h *hub) dropIPLocked(key string) {
	if key == "" {
		return
	}
	if h.perIP[key]--; h.perIP[key] <= 0 {
		delete(h.perIP, key)
	}
}

// add registers an opened session with its initial channels, in the place
// ad holds for it (nil: none was held).
func (h *hub) add(s *session, channels []string, ad *admission) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if ad != nil && !ad.done {
		ad.done = true
		h.reserved--
		s.ipKey = ad.ipKey
	}
	h.sessions[s.id] = s
	if s.token != "" {
		h.tokens[tokenKey(s.token)] = s
	}
	if s.user != "" {
		addMember(h.users, s.user, s)
	}
	for _, c := range channels {
		h.subscribeLocked(s, c)
	}
}

// remove unregisters an ended session.
func (h *hub) remove(s *session) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sessions[s.id] != s {
		return
	}
	delete(h.sessions, s.id)
	delete(h.tokens, tokenKey(s.token))
	h.dropIPLocked(s.ipKey)
	if s.user != "" {
		removeMember(h.users, s.user, s)
	}
	for c := range h.subscriptions[s] {
		removeMember(h.channels, c, s)
	}
	delete(h.subscriptions, s)
}

// detach lists s among its handler's detached sessions. If that makes more
// than max, it returns the one detached longest, for the caller to end.
func (h *hub) detach(s *session, max int) (evicted *session) {
	h.dmu.Lock()
	defer h.dmu.Unlock()
	l := h.detached[s.scope]
	if l == nil {
		l = list.New()
		h.detached[s.scope] = l
	}
	if s.detached == nil {
		s.detached = l.PushBack(s)
	}
	if l.Len() <= max {
		return nil
	}
	oldest := l.Front().Value.(*session)
	l.Remove(l.Front())
	oldest.detached = nil
	return oldest
}

// undetach takes s off the detached list (it resumed or ended).
func (h *hub) undetach(s *session) {
	h.dmu.Lock()
	defer h.dmu.Unlock()
	if s.detached == nil {
		return
	}
	if l := h.detached[s.scope]; l != nil {
		l.Remove(s.detached)
		if l.Len() == 0 {
			delete(h.detached, s.scope)
		}
	}
	s.detached = nil
}

// register makes h the handler for its config key; unregister undoes it
// if h still holds the key.
func (h *hub) register(hd *Handler) {
	h.mu.Lock()
	h.handlers[hd.key] = hd
	h.mu.Unlock()
}

func (h *hub) unregister(hd *Handler) {
	h.mu.Lock()
	if h.handlers[hd.key] == hd {
		delete(h.handlers, hd.key)
	}
	h.mu.Unlock()
}

// successor is the handler of the running config with the given key.
func (h *hub) successor(key string) *Handler {
	h.mu.RLock()
	defer h.mu.RUnlock()
	hd := h.handlers[key]
	if hd == nil || hd.cleaned.Load() {
		return nil
	}
	return hd
}

// endSessionsOf ends for good every session last served by handler hd.
func (h *hub) endSessionsOf(hd *Handler, c closeInfo) {
	h.mu.RLock()
	var mine []*session
	for _, s := range h.sessions {
		s.mu.Lock()
		if s.h == hd {
			mine = append(mine, s)
		}
		s.mu.Unlock()
	}
	h.mu.RUnlock()
	for _, s := range mine {
		s.end(c)
	}
}

// oldestOf returns the sessions of user beyond the newest keep, oldest
// first.
func (h *hub) oldestOf(user string, keep int) []*session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	set := h.users[user]
	if len(set) <= keep {
		return nil
	}
	all := make([]*session, 0, len(set))
	for s := range set {
		all = append(all, s)
	}
	slices.SortFunc(all, func(a, b *session) int { return a.opened.Compare(b.opened) })
	return all[:len(all)-keep]
}

// resumable finds the session a resume cursor <token>:<seq> names, if it
// was opened by handler hd's place (tokens are scoped to where they were
// issued): one this node holds, or, with a clustered broker, one held
// elsewhere or by nobody now. It returns the cursor's seq too.
func (h *hub) resumable(ctx context.Context, hd *Handler, cursor string) (*session, uint64, error) {
	if cursor == "" {
		return nil, 0, nil
	}
	c, ok := protocol.ParseCursor(cursor)
	if !ok {
		return nil, 0, nil
	}
	if s := h.byToken(c.Token, hd.key); s != nil {
		return s, c.Seq, nil
	}
	s, err := h.brokerOf().find(ctx, hd, c)
	if s == nil || err != nil {
		return nil, 0, err
	}
	return s, c.Seq, nil
}

// byToken finds an open session by its token, if it was opened by a
// handler in place scope (tokens are scoped to where they were issued).
// The token is compared in constant time.
func (h *hub) byToken(token, scope string) *session {
	h.mu.RLock()
	s := h.tokens[tokenKey(token)]
	h.mu.RUnlock()
	if s == nil || s.scope != scope || !s.tokenMatches(token) || s.ended() {
		return nil
	}
	return s
}

// get finds an open session by id; one that is ending is unknown.
func (h *hub) get(id string) *session {
	h.mu.RLock()
	defer h.mu.RUnlock()
	if s := h.sessions[id]; s != nil && !s.ended() {
		return s
	}
	return nil
}

// subscribe changes a session's channels, here and in the broker.
func (h *hub) subscribe(ctx context.Context, s *session, add, remove []string) error {
	if !h.subscribeLocal(s, add, remove) && !s.hasMovedAway() {
		return errUnknownSession
	}
	// A session that moved to another node is subscribed where the broker
	// keeps its channels (its answers follow it there: see session.end).
	return h.brokerOf().subscribe(ctx, s, add, remove)
}

// subscribeLocal changes the channels of a session this node holds; false
// if it holds no such session.
func (h *hub) subscribeLocal(s *session, add, remove []string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.sessions[s.id] != s {
		return false
	}
	for _, c := range add {
		h.subscribeLocked(s, c)
	}
	for _, c := range remove {
		if _, ok := h.subscriptions[s][c]; ok {
			removeMember(h.subscriptions, s, c)
			removeMember(h.channels, c, s)
		}
	}
	return true
}

func (h *hub) subscribeLocked(s *session, c string) {
	if c == "" {
		return
	}
	addMember(h.subscriptions, s, c)
	addMember(h.channels, c, s)
}

// deliver applies one publish to the sessions of this process. The frame is
// encoded once; each session only queues it, so no socket write happens
// here and a slow session never holds up the others.
func (h *hub) deliver(m *publishMsg) (int, error) {
	if m.Close != nil {
		// Ending a session takes hub.mu: end the targets after the read
		// lock is released.
		targets, err := h.targets(m)
		if err != nil {
			return 0, err
		}
		n := 0
		c := closedByApp(*m.Close)
		for _, s := range targets {
			if s.end(c) {
				n++
			}
		}
		return n, nil
	}
	p := newPush(m.Channel, m.Data)
	h.mu.RLock()
	defer h.mu.RUnlock()
	if m.Session != "" {
		s := h.sessions[m.Session]
		if s == nil || s.ended() {
			return 0, errUnknownSession
		}
		if s.id != m.Except && s.push(p) {
			return 1, nil
		}
		return 0, nil
	}
	set := h.channels[m.Channel]
	if m.User != "" {
		set = h.users[m.User]
	}
	n := 0
	for s := range set {
		if s.id != m.Except && s.push(p) {
			n++
		}
	}
	return n, nil
}

// targets returns the sessions publish m is for (its except left out).
func (h *hub) targets(m *publishMsg) ([]*session, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	var set map[*session]struct{}
	switch {
	case m.Session != "":
		s := h.sessions[m.Session]
		if s == nil || s.ended() {
			return nil, errUnknownSession
		}
		if s.id == m.Except {
			return nil, nil
		}
		return []*session{s}, nil
	case m.User != "":
		set = h.users[m.User]
	default:
		set = h.channels[m.Channel]
	}
	out := make([]*session, 0, len(set))
	for s := range set {
		if s.id != m.Except {
			out = append(out, s)
		}
	}
	return out, nil
}

// sessionInfo describes a session on the sessions API.
type sessionInfo struct {
	ID        string   `json:"id"`
	User      string   `json:"user"`
	Transport string   `json:"transport"`
	Channels  []string `json:"channels"`
	Remote    string   `json:"remote"`
	Opened    string   `json:"opened"`
	// Attached is false while the session waits for its client to resume.
	Attached bool `json:"attached"`
	// Node is the node holding it (broker redis only).
	Node string `json:"node,omitempty"`
}

// openedLayout is how the sessions API writes opening times.
const openedLayout = "2006-01-02T15:04:05.000Z07:00"

func (h *hub) infoLocked(s *session) sessionInfo {
	chans := make([]string, 0, len(h.subscriptions[s]))
	for c := range h.subscriptions[s] {
		chans = append(chans, c)
	}
	sort.Strings(chans)
	info := sessionInfo{
		ID:       s.id,
		User:     s.user,
		Channels: chans,
		Opened:   s.opened.UTC().Format(openedLayout),
	}
	s.mu.Lock()
	info.Transport, info.Remote = s.transport, s.remote
	info.Attached = s.state == stateAttached
	s.mu.Unlock()
	return info
}

// info describes one session.
func (h *hub) info(id string) (sessionInfo, bool) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	s := h.sessions[id]
	if s == nil || s.ended() {
		return sessionInfo{}, false
	}
	return h.infoLocked(s), true
}

// list describes the sessions of a user and/or on a channel (all when both
// are empty), ordered by opening time.
func (h *hub) list(user, channel string) []sessionInfo {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := []sessionInfo{}
	for _, s := range h.sessions {
		if s.ended() || (user != "" && s.user != user) {
			continue
		}
		if channel != "" {
			if _, ok := h.subscriptions[s][channel]; !ok {
				continue
			}
		}
		out = append(out, h.infoLocked(s))
	}
	slices.SortFunc(out, func(a, b sessionInfo) int {
		if a.Opened != b.Opened {
			if a.Opened < b.Opened {
				return -1
			}
			return 1
		}
		if a.ID < b.ID {
			return -1
		}
		return 1
	})
	return out
}

// addMember and removeMember keep an index of sets (sessions by user or
// channel, channels by session), dropping empty sets.
func addMember[K, V comparable](m map[K]map[V]struct{}, key K, v V) {
	set := m[key]
	if set == nil {
		set = make(map[V]struct{})
		m[key] = set
	}
	set[v] = struct{}{}
}

func removeMember[K, V comparable](m map[K]map[V]struct{}, key K, v V) {
	set := m[key]
	delete(set, v)
	if len(set) == 0 {
		delete(m, key)
	}
}
