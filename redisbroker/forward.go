package redisbroker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/redis/go-redis/v9"
)

// ErrNodeUnreachable: the node holding a session did not answer a forward
// in time (it died, or Redis is slow): the caller answers 503. The payload
// may still reach it.
var ErrNodeUnreachable = errors.New("redisbroker: the node holding the session did not answer")

// ErrNodeNotListening is an ErrNodeUnreachable for which the payload
// surely went nowhere: nobody listens on the node's channel (it is gone).
var ErrNodeNotListening = fmt.Errorf("%w: nobody listens on its channel", ErrNodeUnreachable)

// ErrForwardLost: the payload of a forward stored in Redis (one larger
// than forwardInlineMax) was gone when the node holding the session came to
// read it (it expired, Redis lost it, or the read failed), and that node
// applied nothing. It is an ErrUnavailable: the caller answers 503.
var ErrForwardLost = fmt.Errorf("%w: the forwarded payload was gone when the holding node read it", ErrUnavailable)

// forwardInlineMax is the largest forward payload that travels in the
// node channel's message itself. A larger one (an SSE POST of several big
// frames: up to 64, of max_message_size each) is stored under its own key
// and only its request id is published: pub/sub messages queue in the
// holder's output buffer on the Redis server, and a few forwards of
// megabytes each would exceed its limit (client-output-buffer-limit
// pubsub, 32 MB by default), so Redis would drop the node's subscription.
// At 32 KiB it takes a thousand forwards waiting at once for that; below
// it, the two round trips more of a stored payload (the store, then the
// holder's read) cost more than the bytes they keep off the channel.
const forwardInlineMax = 32 << 10

// forwardLost is what the holder answers (in place of an HTTP status) to a
// forward whose stored payload it could not read.
const forwardLost = 0

// ForwardTo hands payload to node, the node holding session id
// (Handler.Forwarded there, from its record, e.g. ByToken's), and returns
// the status that node answered. It waits at most the configured timeout.
//
// A payload larger than forwardInlineMax is stored under P:f:{request},
// SET before the PUBLISH that names it (on Redis Cluster the two may go to
// different servers, so they are not pipelined: the reference could
// arrive first): the holder reads and deletes it in one command. If nobody
// listens, the key is deleted; if the holder does not answer in time, it
// is left to expire (the holder may still read it meanwhile, as it may
// still receive an inline payload late). It expires after the timeout: as
// long as the sender waits for the answer, a wait that started just before
// the store. So an unanswered forward leaves nothing behind for long, and a
// holder that gets the reference later than that finds the payload gone
// and applies nothing.
func (b *Broker) ForwardTo(ctx context.Context, node, id string, payload []byte) (int, error) {
	req := randomID()
	ch := make(chan int, 1)
	b.mu.Lock()
	b.waits[req] = ch
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.waits, req)
		b.mu.Unlock()
	}()
	cctx, cancel := b.call(ctx)
	defer cancel()
	from := req + "@" + b.cfg.NodeID
	stored := len(payload) > forwardInlineMax
	var msg string
	if stored {
		if err := b.rdb.Set(cctx, b.k.forward(req), payload, b.cfg.Timeout).Err(); err != nil {
			return 0, unavailable("storing a forward", err)
		}
		msg = "k " + id + " " + from
	} else {
		msg = "f " + id + " " + from + " " + string(payload)
	}
	n, err := b.publishCounted(cctx, b.k.node(node), msg)
	if err != nil {
		return 0, unavailable("forwarding", err)
	}
	if n == 0 {
		if stored {
			// Nobody will read it: the caller may forward it again,
			// elsewhere, under another key. Unless somebody did read it
			// (a listener the count missed), or the delete cannot tell:
			// then it may be applied.
			if gone, err := b.rdb.Del(cctx, b.k.forward(req)).Result(); err != nil || gone == 0 {
				return 0, ErrNodeUnreachable
			}
		}
		return 0, ErrNodeNotListening
	}
	select {
	case status := <-ch:
		if status == forwardLost {
			return 0, ErrForwardLost
		}
		return status, nil
	case <-cctx.Done():
		return 0, ErrNodeUnreachable
	}
}

// publishCounted publishes msg on channel and returns PUBLISH's count,
// which ForwardTo takes for whether the node listening on channel is
// there. On standalone Redis and Sentinel it is one PUBLISH as any other.
//
// On Redis Cluster, a PUBLISH reaches the subscribers of every server (the
// cluster bus carries it to all of them), but its count is only that of
// the server that received it. go-redis sends a command without a key,
// as PUBLISH, to any master, while it opens a subscription (the node's, in
// Run) on the master that owns the channel's slot, as if the channel were
// a key: so this PUBLISH goes to that master too, and counts the
// subscription where it lives. Sent elsewhere, it would count 0 for a node
// that listens, whose inline forward is then applied there while its
// sender answers 503 (or forwards it again, to another node, if the
// session moved meanwhile).
//
// Slots can move (resharding) under a node's subscription: Redis keeps it
// on the server it is on, and go-redis opens it elsewhere only once its
// connection breaks, on the owner its cluster state then names (a state
// it reloads once it is a minute old, or after a redirection: the
// holder's may still name the old owner). Until then a sender whose
// client knows the new owner counts 0 there. So a 0 from the slot's owner is
// checked with PUBSUB NUMSUB on every master (a round trip more, only
// then, mostly for a node that is gone): a subscription found anywhere got
// the message over the cluster bus, and the count is theirs. What remains
// is a subscription moving between the PUBLISH and the NUMSUB: one missed
// though it got the message makes ForwardTo answer ErrNodeNotListening for
// an inline forward that is applied (a stored one is safe: ForwardTo
// deletes it first, and finding it read answers ErrNodeUnreachable); one
// counted though the message missed it ends in ErrNodeUnreachable after
// the timeout. A master failing the check fails the forward as Redis
// failing does (ErrUnavailable).
func (b *Broker) publishCounted(ctx context.Context, channel, msg string) (int64, error) {
	cc, ok := b.rdb.(*redis.ClusterClient)
	if !ok {
		return b.rdb.Publish(ctx, channel, msg).Result()
	}
	master, err := cc.MasterForKey(ctx, channel)
	if err != nil {
		return 0, err
	}
	pub := redis.NewIntCmd(ctx, "publish", channel, msg)
	if err := b.onMaster(ctx, master, pub); err != nil || pub.Val() > 0 {
		return pub.Val(), err
	}
	var mu sync.Mutex // guards n: ForEachMaster runs fn on the masters at once
	var n int64
	err = cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
		numsub := redis.NewMapStringIntCmd(ctx, "pubsub", "numsub", channel)
		err := b.onMaster(ctx, m, numsub)
		mu.Lock()
		n += numsub.Val()[channel]
		mu.Unlock()
		return err
	})
	return n, err
}

// onMaster runs cmd on master m of a Redis Cluster. The masters' own
// clients run without the cluster client's hooks: Config.Observe is told
// of the round trip here.
func (b *Broker) onMaster(ctx context.Context, m *redis.Client, cmd redis.Cmder) error {
	if b.cfg.Observe == nil {
		return m.Process(ctx, cmd)
	}
	return observer{b.cfg.Observe}.process(ctx, cmd, m.Process)
}

// receiveStored answers a forward whose payload was stored (see
// ForwardTo): it reads and deletes it in one command, so that it is applied
// at most once, hands it to h and answers node's request req. A payload
// gone or unreadable is answered forwardLost, and h does not see it. It
// runs beside the pub/sub loop.
func (b *Broker) receiveStored(ctx context.Context, h Handler, id, req, node string) {
	cctx, cancel := b.call(ctx)
	payload, err := b.rdb.GetDel(cctx, b.k.forward(req)).Bytes()
	cancel()
	status := forwardLost
	if err == nil {
		status = h.Forwarded(id, payload)
	}
	b.answer(ctx, node, req, status)
}

// answer publishes the status of node's forward req to node.
func (b *Broker) answer(ctx context.Context, node, req string, status int) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	_ = b.rdb.Publish(cctx, b.k.node(node), "r "+req+" "+strconv.Itoa(status)).Err()
}
