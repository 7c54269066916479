package redisbroker

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// Publish is one publish: exactly one target (Session, User or Channel),
// and a push payload or, with Close, a close frame for the targets.
type Publish struct {
	Session, User, Channel string
	// Except leaves one session out.
	Except string
	// Payload is the push (opaque here), or the close frame with Close.
	Payload []byte
	Close   bool
}

// publishApply is the part both publish scripts share: apply(meta, log,
// id) gives one session the push (ARGV[1]) with its next seq in its log,
// or the close (ARGV[2] "1"); notify sends each node holding some of the
// sessions one message on its channel (ARGV[3] is the channel prefix)
// naming them with their seqs. n counts the sessions reached; gone lists
// the ids of those that are gone.
const publishApply = `
local n, gone, byNode = 0, {}, {}
local function apply(meta, log, id)
  local m = redis.call('HMGET', meta, 'node', 'closed', 'maxlen')
  local node = m[1]
  if not node then
    gone[#gone+1] = id
  elseif not m[2] then
    local entry
    if ARGV[2] == '1' then
      redis.call('HSET', meta, 'closed', ARGV[1])
      entry = id
    else
      local seq = redis.call('HINCRBY', meta, 'seq', 1)
      redis.call('XADD', log, 'MAXLEN', m[3] or '1000', seq .. '-1', 'p', ARGV[1])
      entry = id .. ':' .. seq
    end
    local list = byNode[node]
    if not list then list = {}; byNode[node] = list end
    list[#list+1] = entry
    n = n + 1
  end
end
local function notify()
  local kind = 'm '
  if ARGV[2] == '1' then kind = 'x ' end
  for node, list in pairs(byNode) do
    redis.call('PUBLISH', ARGV[3] .. node, kind .. #ARGV[1] .. ' ' .. ARGV[1] .. ' ' .. table.concat(list, ' '))
  end
end
`

// publishScript applies one publish to the sessions whose keys are KEYS
// (meta and log of each, in turn; ids in ARGV[4..]). It returns how many
// it reached and the ids of those that are gone.
var publishScript = redis.NewScript(publishApply + `
for i = 1, #KEYS / 2 do
  apply(KEYS[2*i-1], KEYS[2*i], ARGV[3+i])
end
notify()
return {n, gone}
`)

// membersPublishScript applies one publish to the members of the set
// KEYS[1] (a channel's or user's sessions) but ARGV[5], when they are at
// most ARGV[6]: the members are read and the publish applied in one round
// trip. It returns as publishScript does, or, with more members, {-1,
// members} without applying anything: the caller applies the publish to
// them in batches, without reading them again. A session's keys are
// ARGV[4] .. id .. "}" and .. "}:log" (keys.sessionHead). It names keys it
// was not given, so it only runs where every key is on one server (not on
// Redis Cluster).
var membersPublishScript = redis.NewScript(publishApply + `
local ids = redis.call('SMEMBERS', KEYS[1])
if #ids > tonumber(ARGV[6]) then return {-1, ids} end
for _, id in ipairs(ids) do
  if id ~= ARGV[5] then
    apply(ARGV[4] .. id .. '}', ARGV[4] .. id .. '}:log', id)
  end
end
notify()
return {n, gone}
`)

// scriptBatch bounds the sessions one script call handles, so a fan-out
// to many sessions does not block Redis for long.
const scriptBatch = 256

// Publish applies p to every session it targets, on whichever node holds
// it, and returns how many sessions it reached (detached ones too). A
// session target that does not exist is ErrUnknownSession.
func (b *Broker) Publish(ctx context.Context, p Publish) (int, error) {
	var ids []string
	switch {
	case p.Session != "":
		ids = []string{p.Session}
	default:
		var err error
		if b.clustered() {
			ids, err = b.Members(ctx, p.User, p.Channel)
		} else {
			// All keys on one server: one round trip reads the members
			// and applies the publish, unless there are more than a batch
			// of them: then it returns them, for the batches below.
			var n int
			var gone []string
			n, gone, ids, err = b.publishMembers(ctx, p)
			if err == nil && ids == nil {
				if len(gone) > 0 {
					b.forget(ctx, p.User, p.Channel, gone)
				}
				return n, nil
			}
		}
		if err != nil {
			return 0, err
		}
	}
	if p.Except != "" {
		for i, id := range ids {
			if id == p.Except {
				ids = append(ids[:i:i], ids[i+1:]...)
				break
			}
		}
	}
	// One script call per batch; the batches of one publish go in one
	// pipeline (one round trip).
	type batch struct {
		keys []string
		argv []any
		res  *redis.Cmd
	}
	var batches []*batch
	for _, group := range b.groups(ids) {
		for len(group) > 0 {
			ids := group[:min(len(group), scriptBatch)]
			group = group[len(ids):]
			bt := &batch{keys: make([]string, 0, 2*len(ids)), argv: make([]any, 0, 3+len(ids))}
			bt.argv = append(bt.argv, p.Payload, boolArg(p.Close), b.k.node(""))
			for _, id := range ids {
				bt.keys = append(bt.keys, b.k.session(id), b.k.log(id))
				bt.argv = append(bt.argv, id)
			}
			batches = append(batches, bt)
		}
	}
	cctx, cancel := b.call(ctx)
	defer cancel()
	if len(batches) == 1 {
		batches[0].res = publishScript.Run(cctx, b.rdb, batches[0].keys, batches[0].argv...)
	} else if len(batches) > 1 {
		_, _ = b.rdb.Pipelined(cctx, func(pl redis.Pipeliner) error {
			for _, bt := range batches {
				bt.res = publishScript.EvalSha(cctx, pl, bt.keys, bt.argv...)
			}
			return nil
		})
		for _, bt := range batches {
			if redis.HasErrorPrefix(bt.res.Err(), "NOSCRIPT") {
				// Not applied: run it again, loading the script.
				bt.res = publishScript.Run(cctx, b.rdb, bt.keys, bt.argv...)
			}
		}
	}
	n, gone := 0, []string{}
	for _, bt := range batches {
		reached, ids, err := publishResult(bt.res)
		if err != nil {
			return n, err
		}
		n += int(reached)
		gone = append(gone, ids...)
	}
	if p.Session != "" && n == 0 && len(gone) > 0 {
		return 0, ErrUnknownSession
	}
	if len(gone) > 0 && p.Session == "" {
		b.forget(ctx, p.User, p.Channel, gone)
	}
	return n, nil
}

// publishMembers runs membersPublishScript for p's user or channel. It
// returns the count reached and the ids found gone, or, with more members
// than a script batch, the members (Except among them), non-nil: nothing
// was done.
func (b *Broker) publishMembers(ctx context.Context, p Publish) (n int, gone, members []string, err error) {
	key := b.k.members(p.User, p.Channel)
	cctx, cancel := b.call(ctx)
	defer cancel()
	reached, ids, err := publishResult(membersPublishScript.Run(cctx, b.rdb, []string{key},
		p.Payload, boolArg(p.Close), b.k.node(""), b.k.sessionHead(), p.Except, scriptBatch))
	switch {
	case err != nil:
		return 0, nil, nil, err
	case reached < 0:
		return 0, nil, ids, nil
	}
	return int(reached), ids, nil, nil
}

// publishResult reads a publish script's answer: how many sessions it
// reached and the ids of those that are gone, or, from
// membersPublishScript with too many members, -1 and the members. An ids
// list is non-nil.
func publishResult(res *redis.Cmd) (reached int64, ids []string, err error) {
	v, err := res.Slice()
	if err != nil {
		return 0, nil, unavailable("publishing", err)
	}
	reached, _ = v[0].(int64)
	list, _ := v[1].([]any)
	ids = make([]string, 0, len(list))
	for _, id := range list {
		ids = append(ids, id.(string))
	}
	return reached, ids, nil
}

// forget drops expired sessions from a user's or channel's set.
func (b *Broker) forget(ctx context.Context, user, channel string, ids []string) {
	key := b.k.members(user, channel)
	cctx, cancel := b.call(ctx)
	defer cancel()
	_ = b.rdb.SRem(cctx, key, anys(ids)...).Err()
}

// clustered reports Redis Cluster, where keys live on several servers.
func (b *Broker) clustered() bool {
	_, cluster := b.rdb.(*redis.ClusterClient)
	return cluster
}

// groups splits session ids by Redis Cluster slot (one group on other
// Redis), since one script may only touch keys of one slot.
func (b *Broker) groups(ids []string) [][]string {
	if !b.clustered() {
		return [][]string{ids}
	}
	by := make(map[uint16][]string)
	var order []uint16
	for _, id := range ids {
		slot := keySlot(id)
		if _, ok := by[slot]; !ok {
			order = append(order, slot)
		}
		by[slot] = append(by[slot], id)
	}
	out := make([][]string, 0, len(order))
	for _, s := range order {
		out = append(out, by[s])
	}
	return out
}

func boolArg(v bool) string {
	if v {
		return "1"
	}
	return "0"
}

// ErrPublishPending: a publish with the same id is being applied by
// another node or request and did not finish in time.
var ErrPublishPending = errors.New("redisbroker: a publish with this id is under way")

// Once applies publish fn once per id cluster-wide within window: the
// first caller runs it and records its count; a later one gets that count
// without running it (waiting for it if the first is still under way).
func (b *Broker) Once(ctx context.Context, id string, window time.Duration, fn func() (int, error)) (int, error) {
	key := b.k.publishID(id)
	cctx, cancel := b.call(ctx)
	won, err := b.rdb.SetNX(cctx, key, "", window).Result()
	cancel()
	if err != nil {
		return 0, unavailable("recording a publish id", err)
	}
	if won {
		n, err := fn()
		cctx, cancel := b.call(ctx)
		defer cancel()
		if err != nil {
			_ = b.rdb.Del(cctx, key).Err() // not applied: a retry may apply it
			return n, err
		}
		_ = b.rdb.SetArgs(cctx, key, strconv.Itoa(n), redis.SetArgs{KeepTTL: true, Mode: "XX"}).Err()
		return n, nil
	}
	deadline := time.Now().Add(b.cfg.Timeout)
	for {
		cctx, cancel := b.call(ctx)
		v, err := b.rdb.Get(cctx, key).Result()
		cancel()
		switch {
		case errors.Is(err, redis.Nil):
			// The first caller failed and gave the id back: apply it.
			return b.Once(ctx, id, window, fn)
		case err != nil:
			return 0, unavailable("reading a publish id", err)
		case v != "":
			n, _ := strconv.Atoi(v)
			return n, nil
		}
		if time.Now().After(deadline) {
			return 0, ErrPublishPending
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}
