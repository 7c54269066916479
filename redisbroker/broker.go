package redisbroker

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Handler receives what Redis sends this node. Its methods must return
// soon: they run on the node's subscriber goroutine. Forwarded of a
// payload larger than forwardInlineMax is the exception: it runs on a
// goroutine of its own once the payload is read from Redis, concurrently
// with the other calls.
type Handler interface {
	// Deliver hands this node push seq of session id, which it holds.
	// For one session, calls come one at a time, in seq order, without
	// gaps. The sessions of one publish get the same payload slice: it
	// must not be modified.
	Deliver(id string, seq uint64, payload []byte)
	// Command hands this node a command for session id: "close" (the
	// app closed the session; payload is the close frame), "takeover"
	// (another node resumed it: close the connection here, 4009).
	Command(id, kind string, payload []byte)
	// Lost says this node can no longer deliver session id's pushes
	// without a gap (they left its log, or Redis lost its data): close
	// its connection with reconnect, its resume then starts over.
	Lost(id string)
	// Forwarded hands this node what another node forwarded for session
	// id (an SSE POST's frames) and returns the HTTP status to answer.
	Forwarded(id string, payload []byte) int
	// Adopted hands this node a session of a dead node, detached since
	// s.Detached: unless a client resumes it within s.Window of that,
	// this node ends it (ExpireDetached) and runs its disconnect hook.
	Adopted(s Session)
}

// Broker is one node's view of the sessions in Redis.
type Broker struct {
	cfg Config
	rdb redis.UniversalClient
	k   keys

	// mu guards held, epoch and waits. No other lock is taken while it is
	// held (a holding's mu may be held while it is taken).
	mu    sync.Mutex
	held  map[string]*holding // sessions this node holds, by id
	epoch string              // P:epoch as this node last saw it ("" before the first)
	// waits are the forwards of this node waiting for their answer, by
	// request id.
	waits map[string]chan int

	// gapRepairs counts the times pushes missed on pub/sub were read from
	// a log.
	gapRepairs atomic.Int64
}

// holding is a session this node delivers pushes to.
type holding struct {
	mu      sync.Mutex // serialises deliveries to the session; guards the fields below
	last    uint64     // seq of the last push delivered
	pending bool       // registered or attached, not held yet: pushes wait
	waiting []Entry    // pushes that arrived while pending
	lost    bool       // reported lost: nothing more is delivered
}

// ErrUnavailable wraps every error that comes from Redis being
// unreachable or failing: callers answer 503 with Retry-After.
var ErrUnavailable = errors.New("redisbroker: redis unavailable")

// New returns a broker for cfg. It does not contact Redis: a node starts
// while Redis is down, and its calls fail with ErrUnavailable until Redis
// is back.
func New(cfg Config) (*Broker, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	return &Broker{cfg: cfg, rdb: cfg.client(), k: keys{cfg.Prefix}, held: make(map[string]*holding), waits: make(map[string]chan int)}, nil
}

// GapRepairs counts the times this node read pushes it missed on pub/sub
// from a log.
func (b *Broker) GapRepairs() int64 { return b.gapRepairs.Load() }

// NodeID is this node's name.
func (b *Broker) NodeID() string { return b.cfg.NodeID }

// Timeout is the bound of one Redis call (Config.Timeout).
func (b *Broker) Timeout() time.Duration { return b.cfg.Timeout }

// Close releases the Redis connections.
func (b *Broker) Close() error { return b.rdb.Close() }

// unavailable wraps a Redis error as ErrUnavailable.
func unavailable(what string, err error) error {
	return fmt.Errorf("%w: %s: %w", ErrUnavailable, what, err)
}

// call bounds one Redis round trip by the configured timeout.
func (b *Broker) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, b.cfg.Timeout)
}

// Run serves this node until ctx ends: it heartbeats the node, listens on
// the node's channel and hands what arrives to h, repairing gaps from the
// logs. It returns when ctx is done.
func (b *Broker) Run(ctx context.Context, h Handler) {
	ps := b.rdb.Subscribe(ctx, b.k.node(b.cfg.NodeID))
	defer ps.Close()
	msgs := ps.ChannelWithSubscriptions(redis.WithChannelSize(1024))
	beat := time.NewTicker(b.cfg.NodeTTL / 3)
	defer beat.Stop()
	b.heartbeat(ctx, h)
	for {
		select {
		case <-ctx.Done():
			return
		case <-beat.C:
			b.heartbeat(ctx, h)
		case m, ok := <-msgs:
			if !ok {
				return
			}
			switch m := m.(type) {
			case *redis.Subscription:
				// (Re)subscribed: what was published meanwhile did not
				// reach this node. Catch up from the logs.
				if m.Kind == "subscribe" {
					b.resync(ctx, h)
				}
			case *redis.Message:
				b.receive(ctx, h, m.Payload)
			}
		}
	}
}

// heartbeat marks this node alive and checks that Redis kept its data.
func (b *Broker) heartbeat(ctx context.Context, h Handler) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	now := time.Now().UnixMilli()
	if err := b.rdb.ZAdd(cctx, b.k.nodes(), redis.Z{Score: float64(now), Member: b.cfg.NodeID}).Err(); err != nil {
		return
	}
	if b.cfg.Events != nil {
		min := time.Now().Add(-b.cfg.NodeTTL).UnixMilli()
		if n, err := b.rdb.ZCount(cctx, b.k.nodes(), strconv.FormatInt(min, 10), "+inf").Result(); err == nil {
			b.cfg.Events("nodes", int(n))
		}
	}
	b.checkEpoch(cctx, h)
	for _, s := range b.reap(ctx) {
		h.Adopted(s)
	}
}

// checkEpoch compares P:epoch with what this node saw last: a new epoch
// means Redis lost its data, and with it every log this node relies on.
func (b *Broker) checkEpoch(ctx context.Context, h Handler) {
	fresh := randomID()
	if err := b.rdb.SetNX(ctx, b.k.epoch(), fresh, 0).Err(); err != nil {
		return
	}
	cur, err := b.rdb.Get(ctx, b.k.epoch()).Result()
	if err != nil {
		return
	}
	b.mu.Lock()
	prev := b.epoch
	b.epoch = cur
	var lost []string
	if prev != "" && prev != cur {
		for id := range b.held {
			lost = append(lost, id)
		}
	}
	b.mu.Unlock()
	for _, id := range lost {
		b.lose(h, id)
	}
}

// Epoch is the Redis data set's epoch as this node last saw it.
func (b *Broker) Epoch() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.epoch
}

// Nodes lists the live nodes: those that heartbeated within NodeTTL.
func (b *Broker) Nodes(ctx context.Context) ([]string, error) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	min := time.Now().Add(-b.cfg.NodeTTL).UnixMilli()
	nodes, err := b.rdb.ZRangeByScore(cctx, b.k.nodes(), &redis.ZRangeBy{Min: strconv.FormatInt(min, 10), Max: "+inf"}).Result()
	if err != nil {
		return nil, unavailable("listing nodes", err)
	}
	return nodes, nil
}

func randomID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
