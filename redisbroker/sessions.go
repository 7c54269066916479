package redisbroker

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Session is a session's record in Redis.
type Session struct {
	ID    string
	User  string
	Scope string // the place of the handler that opened it
	// Token is the session token's SHA-256 (hex), never the token.
	Token string
	Node  string // the node holding it
	// MaxLen caps its resume log (resume_buffer).
	MaxLen int64
	// Seq is the last push's sequence number.
	Seq uint64
	// Detached is when it was detached; zero while attached.
	Detached time.Time
	// Closed is the close frame of a session the app closed ("" if not).
	Closed   string
	Channels []string
	// Window is its resume window, and Path and Host the opening's: a
	// node that adopts it from a dead node needs them to end it.
	Window     time.Duration
	Path, Host string
	// Transport and Remote are its latest connection's; Opened is when
	// it was opened.
	Transport, Remote string
	Opened            time.Time
}

// ErrUnknownSession: no such session (never opened, ended or expired).
var ErrUnknownSession = errors.New("redisbroker: unknown session")

// Register records new session s, held by this node, with its channels.
// This node holds it from seq 0 on once the caller calls Hold; pushes that
// arrive meanwhile wait.
func (b *Broker) Register(ctx context.Context, s Session) error {
	b.pend(s.ID)
	cctx, cancel := b.call(ctx)
	defer cancel()
	_, err := b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		p.HSet(cctx, b.k.session(s.ID), "node", b.cfg.NodeID, "user", s.User, "scope", s.Scope,
			"token", s.Token, "seq", 0, "maxlen", max(s.MaxLen, 1),
			"window", s.Window.Milliseconds(), "path", s.Path, "host", s.Host,
			"transport", s.Transport, "remote", s.Remote, "opened", time.Now().UnixMilli())
		p.SAdd(cctx, b.k.nodeSessions(b.cfg.NodeID), s.ID)
		// A node that holds sessions is known to be alive, even before its
		// first heartbeat: if it dies then, its sessions are reaped.
		p.ZAdd(cctx, b.k.nodes(), redis.Z{Score: float64(time.Now().UnixMilli()), Member: b.cfg.NodeID})
		if len(s.Channels) > 0 {
			p.SAdd(cctx, b.k.channels(s.ID), anys(s.Channels)...)
			for _, c := range s.Channels {
				p.SAdd(cctx, b.k.channel(c), s.ID)
			}
		}
		if s.User != "" {
			p.SAdd(cctx, b.k.user(s.User), s.ID)
		}
		p.Set(cctx, b.k.token(s.Token), s.ID, 0)
		return nil
	})
	if err != nil {
		b.Release(s.ID)
		return unavailable("registering a session", err)
	}
	return nil
}

// attachScript makes ARGV[1] the node holding the session whose keys are
// KEYS (meta, log, channels), cancels their expiry, and returns the node
// that held it and the session's seq; nil if the session is gone, and
// {"closed", frame} if the app closed it.
var attachScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local closed = redis.call('HGET', KEYS[1], 'closed')
if closed then return {'closed', closed} end
local prev = redis.call('HGET', KEYS[1], 'node')
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'transport', ARGV[2], 'remote', ARGV[3])
redis.call('HDEL', KEYS[1], 'detached')
for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
return {prev, redis.call('HGET', KEYS[1], 'seq')}
`)

// ErrClosed: the app closed the session while no node held it.
var ErrClosed = errors.New("redisbroker: session closed")

// Attach makes this node the holder of session id (a resume) and returns
// its seq: the pushes up to it are in its log (Replay), the later ones come
// to this node once the caller calls Hold. The node that held it before is
// told to close its connection (Handler.Command "takeover").
func (b *Broker) Attach(ctx context.Context, id, transport, remote string) (seq uint64, err error) {
	b.pend(id)
	defer func() {
		if err != nil {
			b.Release(id)
		}
	}()
	cctx, cancel := b.call(ctx)
	defer cancel()
	res, err := attachScript.Run(cctx, b.rdb, []string{b.k.session(id), b.k.log(id), b.k.channels(id)}, b.cfg.NodeID, transport, remote).Slice()
	if errors.Is(err, redis.Nil) {
		return 0, ErrUnknownSession
	}
	if err != nil {
		return 0, unavailable("attaching a session", err)
	}
	prev, _ := res[0].(string)
	if prev == "closed" {
		return 0, ErrClosed
	}
	seq, _ = strconv.ParseUint(res[1].(string), 10, 64)
	if prev != "" && prev != b.cfg.NodeID {
		_, err := b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
			p.SRem(cctx, b.k.nodeSessions(prev), id)
			p.SAdd(cctx, b.k.nodeSessions(b.cfg.NodeID), id)
			p.ZAdd(cctx, b.k.nodes(), redis.Z{Score: float64(time.Now().UnixMilli()), Member: b.cfg.NodeID})
			p.Publish(cctx, b.k.node(prev), "c "+id+" takeover ")
			return nil
		})
		if err != nil {
			return 0, unavailable("telling the previous node", err)
		}
	}
	return seq, nil
}

// Detach says session id waits for a resume: its keys expire after window
// unless a node attaches it. This node stops delivering its pushes (they
// stay in its log).
func (b *Broker) Detach(ctx context.Context, id string, window time.Duration) error {
	b.Release(id)
	cctx, cancel := b.call(ctx)
	defer cancel()
	tok, err := b.rdb.HGet(cctx, b.k.session(id), "token").Result()
	if errors.Is(err, redis.Nil) {
		return ErrUnknownSession
	}
	if err != nil {
		return unavailable("detaching a session", err)
	}
	_, err = b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		p.HSet(cctx, b.k.session(id), "detached", time.Now().UnixMilli())
		b.expireLater(cctx, p, id, tok, window)
		return nil
	})
	if err != nil {
		return unavailable("detaching a session", err)
	}
	return nil
}

// expireLater makes session id's keys expire a while after window: the node
// that ends it then still finds it (see ExpireDetached); if no node does,
// Redis drops it.
func (b *Broker) expireLater(ctx context.Context, p redis.Pipeliner, id, token string, window time.Duration) {
	ttl := window + 2*b.cfg.NodeTTL
	for _, k := range []string{b.k.session(id), b.k.log(id), b.k.channels(id), b.k.token(token)} {
		p.PExpire(ctx, k, ttl)
	}
}

// End removes session id for good: its keys and its places in the channel,
// user, token and node indexes (unless another node holds it now).
func (b *Broker) End(ctx context.Context, id string) error {
	_, err := b.EndHeld(ctx, id)
	return err
}

// EndHeld is End for the node that held session id: if another node holds
// it now (it resumed there), nothing is removed and held is false.
func (b *Broker) EndHeld(ctx context.Context, id string) (held bool, err error) {
	b.Release(id)
	s, err := b.Lookup(ctx, id)
	if errors.Is(err, ErrUnknownSession) {
		return true, nil
	}
	if err != nil {
		return true, err
	}
	if s.Node != b.cfg.NodeID {
		return false, nil
	}
	cctx, cancel := b.call(ctx)
	defer cancel()
	_, err = b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		for _, c := range s.Channels {
			p.SRem(cctx, b.k.channel(c), id)
		}
		if s.User != "" {
			p.SRem(cctx, b.k.user(s.User), id)
		}
		p.Del(cctx, b.k.token(s.Token))
		p.Del(cctx, b.k.session(id), b.k.log(id), b.k.channels(id))
		p.SRem(cctx, b.k.nodeSessions(s.Node), id)
		return nil
	})
	if err != nil {
		return true, unavailable("ending a session", err)
	}
	return true, nil
}

// Subscribe adds session id to channels.
func (b *Broker) Subscribe(ctx context.Context, id string, channels ...string) error {
	return b.membership(ctx, id, channels, true)
}

// Unsubscribe removes session id from channels.
func (b *Broker) Unsubscribe(ctx context.Context, id string, channels ...string) error {
	return b.membership(ctx, id, channels, false)
}

func (b *Broker) membership(ctx context.Context, id string, channels []string, add bool) error {
	if len(channels) == 0 {
		return nil
	}
	cctx, cancel := b.call(ctx)
	defer cancel()
	n, err := b.rdb.Exists(cctx, b.k.session(id)).Result()
	if err != nil {
		return unavailable("changing channels", err)
	}
	if n == 0 {
		return ErrUnknownSession
	}
	_, err = b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		for _, c := range channels {
			if add {
				p.SAdd(cctx, b.k.channel(c), id)
				p.SAdd(cctx, b.k.channels(id), c)
			} else {
				p.SRem(cctx, b.k.channel(c), id)
				p.SRem(cctx, b.k.channels(id), c)
			}
		}
		return nil
	})
	if err != nil {
		return unavailable("changing channels", err)
	}
	if !add {
		return nil
	}
	// The session may have ended between the check and the adds (its end
	// removes it from the channels its set names, then the set): then the
	// adds are undone, or the channels would keep a member, and its set a
	// key, that nothing removes. One script cannot do both: the keys are
	// in different slots on Redis Cluster.
	if n, err = b.rdb.Exists(cctx, b.k.session(id)).Result(); err != nil {
		return unavailable("changing channels", err)
	}
	if n > 0 {
		return nil
	}
	_, err = b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		for _, c := range channels {
			p.SRem(cctx, b.k.channel(c), id)
		}
		p.Del(cctx, b.k.channels(id))
		return nil
	})
	if err != nil {
		return unavailable("changing channels", err)
	}
	return ErrUnknownSession
}

// Lookup reads session id's record.
func (b *Broker) Lookup(ctx context.Context, id string) (Session, error) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	var meta *redis.MapStringStringCmd
	var chans *redis.StringSliceCmd
	_, err := b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		meta = p.HGetAll(cctx, b.k.session(id))
		chans = p.SMembers(cctx, b.k.channels(id))
		return nil
	})
	if err != nil {
		return Session{}, unavailable("reading a session", err)
	}
	m := meta.Val()
	if len(m) == 0 || m["node"] == "" {
		return Session{}, ErrUnknownSession
	}
	s := Session{ID: id, User: m["user"], Scope: m["scope"], Token: m["token"], Node: m["node"], Closed: m["closed"],
		Path: m["path"], Host: m["host"], Transport: m["transport"], Remote: m["remote"]}
	if ms, err := strconv.ParseInt(m["opened"], 10, 64); err == nil {
		s.Opened = time.UnixMilli(ms)
	}
	if ms, err := strconv.ParseInt(m["window"], 10, 64); err == nil {
		s.Window = time.Duration(ms) * time.Millisecond
	}
	s.Seq, _ = strconv.ParseUint(m["seq"], 10, 64)
	s.MaxLen, _ = strconv.ParseInt(m["maxlen"], 10, 64)
	if ms, err := strconv.ParseInt(m["detached"], 10, 64); err == nil {
		s.Detached = time.UnixMilli(ms)
	}
	s.Channels = chans.Val()
	slices.Sort(s.Channels)
	return s, nil
}

// ByToken finds the session whose token has SHA-256 (hex) token.
func (b *Broker) ByToken(ctx context.Context, token string) (Session, error) {
	cctx, cancel := b.call(ctx)
	id, err := b.rdb.Get(cctx, b.k.token(token)).Result()
	cancel()
	if errors.Is(err, redis.Nil) {
		return Session{}, ErrUnknownSession
	}
	if err != nil {
		return Session{}, unavailable("finding a token", err)
	}
	s, err := b.Lookup(ctx, id)
	if err == nil && s.Token != token {
		return Session{}, ErrUnknownSession
	}
	return s, err
}

// All lists every session id (a SCAN over the session keys: for the
// sessions API, not for hot paths).
func (b *Broker) All(ctx context.Context) ([]string, error) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	var ids []string
	prefix := b.k.session("")
	prefix = prefix[:len(prefix)-1] // "P:s:{"
	scan := func(ctx context.Context, c redis.Cmdable) error {
		iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		for iter.Next(ctx) {
			k := iter.Val()
			if strings.HasSuffix(k, "}") {
				ids = append(ids, k[len(prefix):len(k)-1])
			}
		}
		return iter.Err()
	}
	var err error
	if cc, ok := b.rdb.(*redis.ClusterClient); ok {
		var mu sync.Mutex
		err = cc.ForEachMaster(cctx, func(ctx context.Context, c *redis.Client) error {
			mu.Lock() // ids is shared by the masters' goroutines
			defer mu.Unlock()
			return scan(ctx, c)
		})
	} else {
		err = scan(cctx, b.rdb)
	}
	if err != nil {
		return nil, unavailable("listing sessions", err)
	}
	slices.Sort(ids)
	return ids, nil
}

// Members lists the sessions of a user or on a channel (one of them).
func (b *Broker) Members(ctx context.Context, user, channel string) ([]string, error) {
	key := b.k.members(user, channel)
	cctx, cancel := b.call(ctx)
	defer cancel()
	ids, err := b.rdb.SMembers(cctx, key).Result()
	if err != nil {
		return nil, unavailable("listing sessions", err)
	}
	slices.Sort(ids)
	return ids, nil
}

func anys(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}
