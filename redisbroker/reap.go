package redisbroker

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// adoptScript makes ARGV[1] the node of a session whose node ARGV[2] died
// (KEYS: meta, log, channels, and the token unless on Redis Cluster),
// detached since ARGV[3] (unix ms) unless it was detached already; its
// keys expire ARGV[4] ms after its window. It returns the session's
// detached time, or false if the session is gone or another node holds
// it now. Run again after a lost answer, it finds itself the node and
// returns the same.
var adoptScript = redis.NewScript(`
local node = redis.call('HGET', KEYS[1], 'node')
if node == ARGV[1] then return redis.call('HGET', KEYS[1], 'detached') or false end
if node ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
local detached = redis.call('HGET', KEYS[1], 'detached')
if not detached then
  detached = ARGV[3]
  redis.call('HSET', KEYS[1], 'detached', detached)
end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'window') or '0') + tonumber(ARGV[4])
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
return detached
`)

// reap adopts the sessions of nodes without a heartbeat for NodeTTL: one
// live node (the one that takes the dead node's lock) makes itself their
// node, so that exactly one node ends each of them (with its disconnect
// hook) if nobody resumes it within its window, counted from the node's
// death. It returns the adopted sessions. A session is taken off the dead
// node's set only once adopted, and the node forgotten only once its set
// is empty: a round cut short by a slow or failing Redis leaves the rest
// for the next one.
func (b *Broker) reap(ctx context.Context) []Session {
	stale := strconv.FormatInt(time.Now().Add(-b.cfg.NodeTTL).UnixMilli(), 10)
	cctx, cancel := b.call(ctx)
	dead, err := b.rdb.ZRangeByScore(cctx, b.k.nodes(), &redis.ZRangeBy{Min: "-inf", Max: "(" + stale}).Result()
	cancel()
	if err != nil {
		return nil
	}
	var adopted []Session
	for _, node := range dead {
		if node == b.cfg.NodeID {
			continue // this node was slow to heartbeat, not dead
		}
		adopted = append(adopted, b.reapNode(ctx, node)...)
	}
	return adopted
}

// reapNode adopts what it can of dead node's sessions, under its lock.
func (b *Broker) reapNode(ctx context.Context, node string) []Session {
	cctx, cancel := b.call(ctx)
	won, err := b.rdb.SetNX(cctx, b.k.reaping(node), b.cfg.NodeID, b.cfg.NodeTTL).Result()
	var ids []string
	if err == nil && won {
		ids, err = b.rdb.SMembers(cctx, b.k.nodeSessions(node)).Result()
	}
	cancel()
	if err != nil || !won {
		return nil
	}
	_, cluster := b.rdb.(*redis.ClusterClient)
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	var adopted []Session
	left := len(ids)
	for _, id := range ids {
		if b.adopt(ctx, node, id, now, cluster, &adopted) {
			left--
		}
	}
	if left == 0 {
		cctx, cancel := b.call(ctx)
		_ = b.rdb.ZRem(cctx, b.k.nodes(), node).Err()
		cancel()
	}
	return adopted
}

// adopt makes this node the holder of dead node's session id and appends
// it to adopted; it reports whether id is settled (adopted, gone, or held
// by another node) and off the dead node's set.
func (b *Broker) adopt(ctx context.Context, node, id, now string, cluster bool, adopted *[]Session) bool {
	cctx, cancel := b.call(ctx)
	defer cancel()
	tok, err := b.rdb.HGet(cctx, b.k.session(id), "token").Result()
	switch {
	case errors.Is(err, redis.Nil):
		// Gone: nothing to adopt.
	case err != nil:
		return false
	default:
		keys := []string{b.k.session(id), b.k.log(id), b.k.channels(id), b.k.token(tok)}
		if cluster {
			keys = keys[:3] // the token key lives in another slot
			_ = b.rdb.PExpire(cctx, b.k.token(tok), time.Hour).Err()
		}
		_, err = adoptScript.Run(cctx, b.rdb, keys, b.cfg.NodeID, node, now, (2 * b.cfg.NodeTTL).Milliseconds()).Result()
		switch {
		case errors.Is(err, redis.Nil):
			// Resumed on another node meanwhile.
		case err != nil:
			return false
		default:
			if err := b.rdb.SAdd(cctx, b.k.nodeSessions(b.cfg.NodeID), id).Err(); err != nil {
				return false
			}
			s, err := b.Lookup(ctx, id)
			if err != nil {
				return false
			}
			*adopted = append(*adopted, s)
		}
	}
	return b.rdb.SRem(cctx, b.k.nodeSessions(node), id).Err() == nil
}

// expireScript ends a session (KEYS: meta, log, channels) if it is still
// detached since ARGV[1] (not resumed since) and returns 1; else 0.
var expireScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'detached') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
`)

// ExpireDetached ends session s, adopted from a dead node, if nobody
// resumed it since it was detached (s.Detached), and reports whether it
// did: then the caller runs its disconnect hook.
func (b *Broker) ExpireDetached(ctx context.Context, s Session) (bool, error) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	n, err := expireScript.Run(cctx, b.rdb, []string{b.k.session(s.ID), b.k.log(s.ID), b.k.channels(s.ID)},
		strconv.FormatInt(s.Detached.UnixMilli(), 10)).Int()
	if errors.Is(err, redis.Nil) {
		return false, nil
	}
	if err != nil {
		return false, unavailable("expiring a session", err)
	}
	if n == 0 {
		return false, nil
	}
	_, err = b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		for _, c := range s.Channels {
			p.SRem(cctx, b.k.channel(c), s.ID)
		}
		if s.User != "" {
			p.SRem(cctx, b.k.user(s.User), s.ID)
		}
		p.Del(cctx, b.k.token(s.Token))
		p.SRem(cctx, b.k.nodeSessions(b.cfg.NodeID), s.ID)
		return nil
	})
	if err != nil {
		return true, unavailable("expiring a session", err)
	}
	return true, nil
}
