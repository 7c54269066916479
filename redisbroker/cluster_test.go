package redisbroker

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// On a Redis Cluster of three masters, a forward to the node holding the
// session gets that node's answer, inline or stored, whichever master
// the sender's client would send a PUBLISH to: never ErrNodeNotListening
// for a node that listens (its frames applied while their sender answers
// 503). Each is applied once.
func TestForwardOnRedisCluster(t *testing.T) {
	addrs := redistest.StartCluster(t)
	a, b := holderAndSender(t, addrs)
	for _, addr := range addrs {
		redistest.CLI(t, addr, "CONFIG", "RESETSTAT")
	}

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
	if got := a.rec.commands; !slices.Equal(got, want) {
		t.Errorf("the holder applied %d forwards, want the %d sent, each once and in order", len(got), len(want))
	}
	a.rec.mu.Unlock()
	// And counted by its PUBLISH alone: no master was asked for the
	// channel's subscribers.
	for _, addr := range addrs {
		if redistest.Calls(t, addr, "pubsub|numsub") > 0 {
			t.Errorf("PUBSUB NUMSUB ran on %s: a forward's PUBLISH did not count the holder", addr)
		}
	}
}

// After the slot of the holder's channel moved to another master, the
// holder's subscription stays where it was (Redis does not move it, nor
// does go-redis while its connection lives), while the sender publishes
// to the new owner: forwards still get the holder's answer, and are
// applied once. A node nobody listens for is still told apart.
func TestForwardOnRedisClusterAfterSlotMoved(t *testing.T) {
	addrs := redistest.StartCluster(t)
	a, b := holderAndSender(t, addrs)

	channel := a.k.node("a")
	cc := b.rdb.(*redis.ClusterClient)
	owner := func() string {
		m, err := cc.MasterForKey(bg, channel)
		if err != nil {
			t.Fatal(err)
		}
		return m.Options().Addr
	}
	numsub := func(addr string) string { return redistest.CLI(t, addr, "PUBSUB", "NUMSUB", channel) }
	slot := redistest.CLI(t, addrs[0], "CLUSTER", "KEYSLOT", channel)
	src := owner()
	if numsub(src) != channel+"\n1" {
		t.Fatalf("the holder's subscription is not on the owner of its slot, %s: %q", src, numsub(src))
	}
	dst := addrs[0]
	if dst == src {
		dst = addrs[1]
	}
	if keys := redistest.CLI(t, src, "CLUSTER", "GETKEYSINSLOT", slot, "10"); keys != "" {
		t.Fatalf("slot %s holds keys (%q): the test moves it without them", slot, keys)
	}
	srcID, dstID := redistest.CLI(t, src, "CLUSTER", "MYID"), redistest.CLI(t, dst, "CLUSTER", "MYID")
	redistest.CLI(t, dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID)
	redistest.CLI(t, src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID)
	for _, addr := range addrs {
		redistest.CLI(t, addr, "CLUSTER", "SETSLOT", slot, "NODE", dstID)
	}
	cc.ReloadState(bg)
	deadline := time.Now().Add(30 * time.Second)
	for owner() != dst {
		if time.Now().After(deadline) {
			t.Fatalf("the sender does not see slot %s on %s", slot, dst)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if numsub(src) != channel+"\n1" || numsub(dst) != channel+"\n0" {
		t.Fatalf("the holder's subscription moved with the slot (test did not test): %q on %s, %q on %s", numsub(src), src, numsub(dst), dst)
	}

	var want []string
	for i, payload := range [][]byte{[]byte("small"), randomPayload(forwardInlineMax+1, 200), []byte("small again")} {
		want = append(want, "s forwarded "+string(payload))
		if status, err := b.ForwardTo(bg, "a", "s", payload); err != nil || status != 202 {
			t.Errorf("forward %d (%d bytes) after the slot moved: %d, %v; want 202", i, len(payload), status, err)
		}
	}
	a.rec.mu.Lock()
	if got := a.rec.commands; !slices.Equal(got, want) {
		t.Errorf("the holder applied %d forwards, want the %d sent, each once and in order", len(got), len(want))
	}
	a.rec.mu.Unlock()
	if _, err := b.ForwardTo(bg, "gone", "s", []byte("lost")); !errors.Is(err, ErrNodeNotListening) {
		t.Errorf("forward to a node nobody listens for: %v, want ErrNodeNotListening", err)
	}
}
