package redisbroker

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// waitSubscribedOnCluster waits until node n listens on its channel, on
// any master of the Redis Cluster at addrs.
func waitSubscribedOnCluster(t *testing.T, addrs []string, n *node) {
	t.Helper()
	channel := n.k.node(n.NodeID())
	deadline := time.Now().Add(30 * time.Second)
	for {
		var subs int64
		for _, a := range addrs {
			c := redis.NewClient(&redis.Options{Addr: a})
			got, err := c.PubSubNumSub(bg, channel).Result()
			c.Close()
			if err == nil {
				subs += got[channel]
			}
		}
		if subs > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %s does not listen on %s on any master", n.NodeID(), channel)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// On a Redis Cluster of three masters, a forward to the node holding the
// session gets that node's answer, inline or stored, whichever master
// the sender's client would send a PUBLISH to: never ErrNodeNotListening
// for a node that listens (its frames applied while their sender answers
// 503). Each is applied once.
func TestForwardOnRedisCluster(t *testing.T) {
	addrs := redistest.StartCluster(t)
	a, b := startNodeAt(t, addrs, "a"), startNodeAt(t, addrs, "b")
	a.open(t, "s", "", 10)
	waitSubscribedOnCluster(t, addrs, a)

	var want, failed []string
	forward := func(payload []byte) {
		t.Helper()
		want = append(want, "s forwarded "+string(payload))
		if status, err := b.ForwardTo(bg, "a", "s", payload); err != nil || status != 202 {
			failed = append(failed, fmt.Sprintf("forward %d (%d bytes): %d, %v", len(want), len(payload), status, err))
		}
	}
	for i := range 30 {
		forward(fmt.Appendf(nil, "small %d", i))
	}
	for i := range 5 {
		forward(randomPayload(forwardInlineMax+1+i, uint64(100+i)))
	}
	if len(failed) > 0 {
		t.Errorf("%d of %d forwards to the node holding the session did not get its answer (202); the first: %s", len(failed), len(want), failed[0])
	}
	// Each answered forward was applied before its answer; none twice.
	a.rec.mu.Lock()
	defer a.rec.mu.Unlock()
	if got := a.rec.commands; !slices.Equal(got, want) {
		t.Errorf("the holder applied %d forwards, want the %d sent, each once and in order", len(got), len(want))
	}
}
