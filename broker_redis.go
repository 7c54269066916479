package duplex

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/caddy-duplex/duplex/protocol"
	"github.com/caddy-duplex/duplex/redisbroker"
)

// RedisBroker keeps the sessions in Redis so that several Caddy nodes
// behind any load balancer share them (`broker redis`): a publish on any
// node reaches the sessions on every node, and a client resumes on any
// node. Standalone Redis, Sentinel (with master_name) and Redis Cluster
// (several addresses) work; see "Running a cluster" in the README.
type RedisBroker struct {
	// Addresses of Redis (host:port): one for standalone Redis, several
	// for Redis Cluster, or the Sentinels with MasterName. Placeholders
	// are expanded. Required.
	Addresses []string `json:"addresses,omitempty"`
	// MasterName is the Sentinel master's name (Sentinel only).
	MasterName string `json:"master_name,omitempty"`
	// Username for Redis ACLs. Placeholders are expanded.
	Username string `json:"username,omitempty"`
	// Password for Redis; use a placeholder such as {env.REDIS_PASSWORD}
	// rather than the password itself.
	Password string `json:"password,omitempty"`
	// DB is the database number (standalone and Sentinel). Default 0.
	DB int `json:"db,omitempty"`
	// TLS connects to Redis with TLS (the system's roots).
	TLS bool `json:"tls,omitempty"`
	// Prefix starts every key and channel, so one Redis can serve several
	// clusters. Default "duplex".
	Prefix string `json:"prefix,omitempty"`
	// NodeID names this node; it must be unique per Caddy process.
	// Placeholders are expanded (e.g. {system.hostname}). Default: random
	// per process.
	NodeID string `json:"node_id,omitempty"`
	// Timeout bounds every Redis call, and how long an SSE POST waits for
	// the node holding its session. Default 5s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	shared *redisNode
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (RedisBroker) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "duplex.brokers.redis",
		New: func() caddy.Module { return new(RedisBroker) },
	}
}

// redisNodes keeps one connection to Redis (and one subscriber) per
// configuration across config reloads, keyed by the broker's JSON.
var redisNodes = caddy.NewUsagePool()

// redisNode is a redisbroker.Broker with its subscriber loop, started
// once by the first config that runs with it (not by one that is only
// validated).
type redisNode struct {
	b       *redisbroker.Broker
	events  redisEvents
	startMu sync.Mutex // guards cancel and done
	cancel  context.CancelFunc
	done    chan struct{}
}

// start runs the subscriber loop unless it runs already.
func (n *redisNode) start() {
	n.startMu.Lock()
	defer n.startMu.Unlock()
	if n.done != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel, n.done = cancel, make(chan struct{})
	go func() {
		defer close(n.done)
		n.b.Run(ctx, n.events)
	}()
}

func (n *redisNode) Destruct() error {
	n.startMu.Lock()
	if n.done != nil {
		n.cancel()
		<-n.done
	}
	n.startMu.Unlock()
	return n.b.Close()
}

// Start runs the broker's subscriber (from the duplex app's Start).
func (r *RedisBroker) Start() { r.shared.start() }

// redisLog sends go-redis's own messages (reconnections, Sentinel
// lookups) to Caddy's logger instead of stderr.
type redisLog struct{ logger *zap.Logger }

func (l redisLog) Printf(_ context.Context, format string, v ...any) {
	l.logger.Warn(fmt.Sprintf(format, v...))
}

var setRedisLog sync.Once

// Provision connects the broker (or reuses the connection of the same
// configuration from before a reload).
func (r *RedisBroker) Provision(ctx caddy.Context) error {
	r.logger = ctx.Logger()
	setRedisLog.Do(func() { redis.SetLogger(redisLog{caddy.Log().Named("duplex.brokers.redis")}) })
	repl := caddy.NewReplacer()
	cfg := redisbroker.Config{
		MasterName: repl.ReplaceAll(r.MasterName, ""),
		Username:   repl.ReplaceAll(r.Username, ""),
		Password:   repl.ReplaceAll(r.Password, ""),
		DB:         r.DB,
		Prefix:     r.Prefix,
		NodeID:     repl.ReplaceAll(r.NodeID, ""),
		Timeout:    time.Duration(r.Timeout),
		Observe:    func(d time.Duration, _ error) { metrics.redisLatency.Observe(d.Seconds()) },
		Events: func(kind string, n int) {
			switch kind {
			case "gap_repair":
				metrics.gapRepairs.Add(float64(n))
			case "nodes":
				metrics.clusterNodes.Set(float64(n))
			}
		},
	}
	for _, a := range r.Addresses {
		cfg.Addrs = append(cfg.Addrs, repl.ReplaceAll(a, ""))
	}
	if r.TLS {
		cfg.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	key, err := json.Marshal(r)
	if err != nil {
		return err
	}
	val, _, err := redisNodes.LoadOrNew(string(key), func() (caddy.Destructor, error) {
		b, err := redisbroker.New(cfg)
		if err != nil {
			return nil, err
		}
		return &redisNode{b: b, events: redisEvents{hub: globalHub, rb: b, pushes: new(pushCache)}}, nil
	})
	if err != nil {
		return fmt.Errorf("duplex: broker redis: %w", err)
	}
	r.shared = val.(*redisNode)
	return nil
}

// Validate checks the configuration.
func (r *RedisBroker) Validate() error {
	if len(r.Addresses) == 0 {
		return errors.New("duplex: broker redis: no address")
	}
	if r.DB < 0 {
		return fmt.Errorf("duplex: broker redis: db %d must not be negative", r.DB)
	}
	if r.Timeout < 0 {
		return fmt.Errorf("duplex: broker redis: timeout %s must not be negative", time.Duration(r.Timeout))
	}
	return nil
}

// Cleanup lets the shared connection go once no config uses it.
func (r *RedisBroker) Cleanup() error {
	key, err := json.Marshal(r)
	if err != nil {
		return err
	}
	_, err = redisNodes.Delete(string(key))
	return err
}

// rb is the running broker.
func (r *RedisBroker) rb() *redisbroker.Broker { return r.shared.b }

// unavailable turns Redis failures into errBrokerUnavailable (and counts
// them).
func unavailable(err error) error {
	if errors.Is(err, redisbroker.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
		metrics.brokerErrors.Inc()
		return errBrokerUnavailable{err}
	}
	return err
}

func (r *RedisBroker) publish(ctx context.Context, m *publishMsg) (int, error) {
	p := redisbroker.Publish{Session: m.Session, User: m.User, Channel: m.Channel, Except: m.Except}
	if m.Close != nil {
		p.Close, p.Payload = true, []byte(*m.Close)
	} else {
		p.Payload = newPush(m.Channel, m.Data).suffix
	}
	n, err := r.rb().Publish(ctx, p)
	if errors.Is(err, redisbroker.ErrUnknownSession) {
		return 0, errUnknownSession
	}
	return n, unavailable(err)
}

func (r *RedisBroker) once(ctx context.Context, id string, fn func() (int, error)) (int, error) {
	n, err := r.rb().Once(ctx, id, idempotencyWindow, fn)
	return n, unavailable(err)
}

// tokenHash is how Redis knows a session's token: never the token itself.
func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

func (r *RedisBroker) register(ctx context.Context, s *session, channels []string, path, host string) error {
	return unavailable(r.rb().Register(ctx, redisbroker.Session{
		ID: s.id, User: s.user, Scope: s.scope, Token: tokenHash(s.token),
		MaxLen: int64(s.h.ResumeBuffer), Channels: channels,
		Window: time.Duration(s.h.ResumeWindow), Path: path, Host: host,
		Transport: s.transport, Remote: s.remote,
	}))
}

func (r *RedisBroker) find(ctx context.Context, hd *Handler, c protocol.Cursor) (*session, error) {
	rec, ok, err := r.byToken(ctx, hd, c.Token)
	if !ok || err != nil {
		return nil, err
	}
	s := newSession(hd, rec.User)
	s.id, s.token = rec.ID, c.Token
	s.claimed = true
	return s, nil
}

func (r *RedisBroker) locate(ctx context.Context, hd *Handler, token string) (remoteSession, bool, error) {
	rec, ok, err := r.byToken(ctx, hd, token)
	if !ok || err != nil {
		return remoteSession{}, false, err
	}
	return remoteSession{id: rec.ID, node: rec.Node}, true, nil
}

// byToken is the record of the open session token names, if a handler in
// hd's place opened it (ok false otherwise).
func (r *RedisBroker) byToken(ctx context.Context, hd *Handler, token string) (rec redisbroker.Session, ok bool, err error) {
	rec, err = r.rb().ByToken(ctx, tokenHash(token))
	switch {
	case errors.Is(err, redisbroker.ErrUnknownSession):
		return rec, false, nil
	case err != nil:
		return rec, false, unavailable(err)
	}
	return rec, rec.Scope == hd.key && rec.Closed == "", nil
}

func (r *RedisBroker) claim(ctx context.Context, s *session, lastSeq uint64, transport, remote string) ([]string, error) {
	seq, err := r.rb().Attach(ctx, s.id, transport, remote)
	if errors.Is(err, redisbroker.ErrUnknownSession) || errors.Is(err, redisbroker.ErrClosed) {
		return nil, errUnknownSession
	}
	if err != nil {
		return nil, unavailable(err)
	}
	// Read what this node lacks: for a session it did not hold, every push
	// after the cursor; for one it holds, what it may have missed.
	s.mu.Lock()
	from := s.seq
	if s.claimed {
		from = lastSeq
		s.seq = lastSeq
	}
	s.mu.Unlock()
	entries, complete, err := r.rb().Replay(ctx, s.id, from)
	if err != nil {
		return nil, unavailable(err)
	}
	if !complete && from < seq {
		return nil, errUnknownSession // the pushes after the cursor are gone
	}
	s.mu.Lock()
	for _, e := range entries {
		s.pushLocked(e.Seq, &push{suffix: e.Payload})
	}
	claimed := s.claimed
	s.mu.Unlock()
	if !claimed {
		return nil, nil
	}
	rec, err := r.rb().Lookup(ctx, s.id)
	if err != nil {
		return nil, unavailable(err)
	}
	return rec.Channels, nil
}

func (r *RedisBroker) hold(s *session) {
	s.mu.Lock()
	seq := s.seq
	s.mu.Unlock()
	r.rb().Hold(s.ctx, r.shared.events, s.id, seq)
}

func (r *RedisBroker) subscribe(ctx context.Context, s *session, add, remove []string) error {
	err := r.rb().Subscribe(ctx, s.id, add...)
	if err == nil {
		err = r.rb().Unsubscribe(ctx, s.id, remove...)
	}
	if errors.Is(err, redisbroker.ErrUnknownSession) {
		return errUnknownSession
	}
	return unavailable(err)
}

func (r *RedisBroker) sessions(ctx context.Context, user, channel string) ([]sessionInfo, error) {
	var ids []string
	var err error
	switch {
	case user != "":
		ids, err = r.rb().Members(ctx, user, "")
	case channel != "":
		ids, err = r.rb().Members(ctx, "", channel)
	default:
		ids, err = r.rb().All(ctx)
	}
	if err != nil {
		return nil, unavailable(err)
	}
	out := []sessionInfo{}
	for _, id := range ids {
		rec, err := r.rb().Lookup(ctx, id)
		if errors.Is(err, redisbroker.ErrUnknownSession) {
			continue // expired; the next publish drops it from its sets
		}
		if err != nil {
			return nil, unavailable(err)
		}
		info := redisInfo(rec)
		if (user != "" && info.User != user) || (channel != "" && !slices.Contains(info.Channels, channel)) || rec.Closed != "" {
			continue
		}
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b sessionInfo) int {
		if c := strings.Compare(a.Opened, b.Opened); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

func (r *RedisBroker) info(ctx context.Context, id string) (sessionInfo, error) {
	rec, err := r.rb().Lookup(ctx, id)
	if errors.Is(err, redisbroker.ErrUnknownSession) || (err == nil && rec.Closed != "") {
		return sessionInfo{}, errUnknownSession
	}
	if err != nil {
		return sessionInfo{}, unavailable(err)
	}
	return redisInfo(rec), nil
}

// redisInfo is a session's record in Redis as the sessions API shows it.
func redisInfo(rec redisbroker.Session) sessionInfo {
	chans := rec.Channels
	if chans == nil {
		chans = []string{}
	}
	return sessionInfo{
		ID: rec.ID, User: rec.User, Transport: rec.Transport, Channels: chans, Remote: rec.Remote,
		Opened:   rec.Opened.UTC().Format(openedLayout),
		Attached: rec.Detached.IsZero(),
		Node:     rec.Node,
	}
}

// call runs a broker call that no client waits for, bounded by a timeout.
func (r *RedisBroker) call(what string, s *session, fn func(ctx context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), r.rb().Timeout())
	defer cancel()
	if err := fn(ctx); err != nil && !errors.Is(err, redisbroker.ErrUnknownSession) {
		r.logger.Error("redis broker: "+what, zap.String("session", s.id), zap.Error(err))
	}
}

func (r *RedisBroker) detached(s *session, window time.Duration) {
	r.call("detaching", s, func(ctx context.Context) error { return r.rb().Detach(ctx, s.id, window) })
}

// acked trims s's log in Redis up to seq in the background: an ack is
// handled on the session's message path, which must not wait on Redis
// (a round trip each, up to the timeout while Redis is away).
func (r *RedisBroker) acked(s *session, seq uint64) {
	if s.trims.add(seq) {
		go r.trim(s)
	}
}

// trim trims s's log to the newest seq acked until it has caught up with
// the acks, one Redis call at a time, each bounded by the timeout. It
// stops once s has ended: its log goes with it, or it moved and the node
// holding it now trims on the next ack.
func (r *RedisBroker) trim(s *session) {
	var done uint64
	for {
		seq, ok := s.trims.next(done, s.ctx.Err() != nil)
		if !ok {
			return
		}
		r.call("trimming", s, func(ctx context.Context) error { return r.rb().Trim(ctx, s.id, seq) })
		done = seq
	}
}

// trimQueue hands the acks of one session to at most one trim goroutine
// at a time: acks that arrive while it waits on Redis only raise seq, and
// it trims to the newest one next, so a burst of acks costs a Redis call
// or two, not one each.
type trimQueue struct {
	mu      sync.Mutex // guards seq and running
	seq     uint64     // the highest seq acked
	running bool       // a goroutine trims, and reads seq before it stops
}

// add records an ack of seq and reports whether the caller must start
// the trim goroutine (none runs).
func (q *trimQueue) add(seq uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.seq = max(q.seq, seq)
	if q.running {
		return false
	}
	q.running = true
	return true
}

// next is the seq the trim goroutine trims to after having trimmed to
// done; ok false (then it must stop) once it has caught up, or if stop.
func (q *trimQueue) next(done uint64, stop bool) (seq uint64, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if stop || q.seq <= done {
		q.running = false
		return 0, false
	}
	return q.seq, true
}

// ended removes s unless another node holds it now (it moved there and
// that node owns its end).
func (r *RedisBroker) ended(s *session) bool {
	ctx, cancel := context.WithTimeout(context.Background(), r.rb().Timeout())
	defer cancel()
	held, err := r.rb().EndHeld(ctx, s.id)
	if err != nil {
		// Redis is away: run the hook here rather than never.
		r.logger.Error("redis broker: ending", zap.String("session", s.id), zap.Error(err))
	}
	return held
}

func (r *RedisBroker) forward(ctx context.Context, rs remoteSession, frames [][]byte) (int, error) {
	size := 2 + max(len(frames)-1, 0) // brackets and commas
	for _, f := range frames {
		size += len(f)
	}
	payload := make([]byte, 0, size) // up to a POST body's limit: allocated once
	payload = append(payload, '[')
	for i, f := range frames {
		if i > 0 {
			payload = append(payload, ',')
		}
		payload = append(payload, f...)
	}
	payload = append(payload, ']')
	status, err := r.rb().ForwardTo(ctx, rs.node, rs.id, payload)
	if (err == nil && status == http.StatusUnauthorized) || errors.Is(err, redisbroker.ErrNodeNotListening) {
		// The session may have moved while the POST's body was read (its
		// client resumed on another node): forward to where it is now.
		// Only when the frames surely went nowhere: a node that did not
		// answer in time may still take them, and a second forward would
		// serve them twice.
		if rec, lerr := r.rb().Lookup(ctx, rs.id); lerr == nil && rec.Node != rs.node && rec.Closed == "" {
			status, err = r.rb().ForwardTo(ctx, rec.Node, rs.id, payload)
		}
	}
	switch {
	case errors.Is(err, redisbroker.ErrUnknownSession):
		return http.StatusUnauthorized, nil
	case errors.Is(err, redisbroker.ErrNodeNotListening):
		return 0, errBrokerUnavailable{err} // the frames went nowhere
	case errors.Is(err, redisbroker.ErrNodeUnreachable):
		return 0, fmt.Errorf("%w: %w", errForwardUnanswered, err)
	}
	return status, unavailable(err)
}

// answers is how answers travel to the node holding their session now
// (RedisBroker.answer): a forward's payload, an object where client
// frames are an array.
type answers struct {
	Answers []forwardedAnswer `json:"answers"`
	Close   string            `json:"close,omitempty"` // the app's Duplex-Close, after them
}

type forwardedAnswer struct {
	Type  string          `json:"type"`
	Frame json.RawMessage `json:"frame"`
}

func (r *RedisBroker) answer(s *session, held []heldAnswer, closeReason string) {
	m := answers{Close: closeReason}
	for _, a := range held {
		m.Answers = append(m.Answers, forwardedAnswer{Type: a.typ, Frame: a.b})
	}
	payload, err := json.Marshal(m)
	if err != nil {
		r.logger.Error("redis broker: answers not handed over", zap.String("session", s.id), zap.Error(err))
		return
	}
	ctx := context.Background() // each call is bounded by the broker's timeout
	// The node named by the session's record may not have it yet (it
	// claims the session in Redis before it attaches it, and answers 401
	// meanwhile), Redis may fail a call, and the session may move again:
	// follow the record, a little later each time, for as long as a
	// forward may take, as long as nothing was handed over.
	deadline := time.Now().Add(r.rb().Timeout())
	for wait := 10 * time.Millisecond; ; wait = min(2*wait, 500*time.Millisecond) {
		rec, lerr := r.rb().Lookup(ctx, s.id)
		again := true // only while nothing can have been taken
		switch {
		case errors.Is(lerr, redisbroker.ErrUnknownSession) || (lerr == nil && rec.Closed != ""):
			// It has ended: serve nothing more for it.
			s.in.stop()
			return
		case lerr != nil:
			err = lerr
		default:
			var status int
			status, err = r.rb().ForwardTo(ctx, rec.Node, s.id, payload)
			if err == nil && status == http.StatusAccepted {
				return
			}
			if err == nil {
				err = fmt.Errorf("the holding node answered %d", status)
			}
			again = status == http.StatusUnauthorized || errors.Is(err, redisbroker.ErrNodeNotListening) ||
				errors.Is(err, redisbroker.ErrForwardLost)
		}
		if !again || time.Now().Add(wait).After(deadline) {
			break
		}
		time.Sleep(wait)
	}
	r.logger.Warn("redis broker: answers not handed over to the session's node: their calls get none",
		zap.String("session", s.id), zap.Int("answers", len(held)), zap.Bool("close", closeReason != ""), zap.Error(err))
}

func (r *RedisBroker) cluster(ctx context.Context) (clusterInfo, error) {
	nodes, err := r.rb().Nodes(ctx)
	if err != nil {
		return clusterInfo{}, unavailable(err)
	}
	slices.Sort(nodes)
	return clusterInfo{Broker: "redis", Node: r.rb().NodeID(), Nodes: nodes}, nil
}

func (r *RedisBroker) node() string { return r.rb().NodeID() }

// redisEvents hands what Redis sends this node to the hub's sessions.
type redisEvents struct {
	hub    *hub
	rb     *redisbroker.Broker
	pushes *pushCache
}

var _ redisbroker.Handler = redisEvents{}

func (e redisEvents) Deliver(id string, seq uint64, payload []byte) {
	if s := e.hub.get(id); s != nil {
		s.pushSeq(seq, e.pushes.of(payload))
	}
}

// pushCache makes one push for the sessions of one publish: the broker
// hands them the same payload slice, one after the other.
type pushCache struct {
	mu   sync.Mutex // guards the fields below
	key  *byte      // the payload's first byte
	n    int
	last *push
}

func (c *pushCache) of(payload []byte) *push {
	if len(payload) == 0 {
		return &push{suffix: payload}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.key != &payload[0] || c.n != len(payload) {
		c.key, c.n, c.last = &payload[0], len(payload), &push{suffix: payload}
	}
	return c.last
}

func (e redisEvents) Command(id, kind string, payload []byte) {
	s := e.hub.get(id)
	if s == nil {
		return
	}
	switch kind {
	case "close":
		s.end(closedByApp(string(payload)))
	case "takeover":
		s.end(closeMoved)
	}
}

func (e redisEvents) Forwarded(id string, payload []byte) int {
	s := e.hub.get(id)
	if s == nil {
		return http.StatusUnauthorized
	}
	if len(payload) > 0 && payload[0] == '{' {
		// Answers served by the node the session moved from.
		var m answers
		if err := json.Unmarshal(payload, &m); err != nil {
			return http.StatusBadRequest
		}
		held := make([]heldAnswer, len(m.Answers))
		for i, a := range m.Answers {
			held[i] = heldAnswer{typ: a.Type, b: a.Frame}
		}
		if !s.takeAnswers(held) {
			return http.StatusUnauthorized
		}
		if m.Close != "" {
			// After the answers it queued; not on this loop, since
			// ending a session calls Redis.
			go s.end(closedByApp(m.Close))
		}
		return http.StatusAccepted
	}
	var frames []json.RawMessage
	if err := json.Unmarshal(payload, &frames); err != nil {
		return http.StatusBadRequest
	}
	raw := make([][]byte, len(frames))
	for i, f := range frames {
		raw[i] = f
	}
	status, _ := s.takePost(raw)
	return status
}

// Adopted ends a dead node's session at the end of its resume window,
// unless a client resumed it meanwhile, and runs its disconnect hook
// through this node's handler in the same place. The opening request is
// gone with its node: the hook carries the session's identity headers,
// not the opening's.
func (e redisEvents) Adopted(rec redisbroker.Session) {
	wait := max(time.Until(rec.Detached.Add(rec.Window)), 0)
	time.AfterFunc(wait, func() {
		ctx, cancel := context.WithTimeout(context.Background(), e.rb.Timeout())
		defer cancel()
		ended, err := e.rb.ExpireDetached(ctx, rec)
		if err != nil || !ended {
			return
		}
		metrics.ended.WithLabelValues("expired").Inc()
		hd := e.hub.successor(rec.Scope)
		if hd == nil || hd.Disconnect == "" {
			return
		}
		next := hd.next.Load()
		if next == nil {
			hd.logger.Warn("disconnect hook not sent: its handler has served nothing yet", zap.String("session", rec.ID))
			return
		}
		s := newSession(hd, rec.User)
		s.cancel()
		s.id = rec.ID
		s.base = &requestBase{path: rec.Path, host: rec.Host, header: http.Header{}, srv: hd.srv}
		s.next = *next
		hd.logger.Info("session closed", zap.String("session", s.id), zap.String("user", s.user),
			zap.String("reason", "resume window expired"), zap.Bool("adopted", true))
		hd.sendDisconnect(s, "resume window expired")
	})
}

func (e redisEvents) Lost(id string) {
	if s := e.hub.get(id); s != nil {
		s.end(closeLost)
	}
}

// Interface guards
var (
	_ broker             = (*RedisBroker)(nil)
	_ caddy.Provisioner  = (*RedisBroker)(nil)
	_ caddy.Validator    = (*RedisBroker)(nil)
	_ caddy.CleanerUpper = (*RedisBroker)(nil)
)
