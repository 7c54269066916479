package redisbroker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// channelWatch is a plain Redis client subscribed to a channel, keeping
// every message published on it.
type channelWatch struct {
	admin   *redis.Client
	channel string
	mu      sync.Mutex // guards msgs
	msgs    []string
	changed chan struct{}
}

// watchChannel subscribes to channel; it returns once the subscription is
// active.
func watchChannel(t *testing.T, r *redisServer, channel string) *channelWatch {
	t.Helper()
	w := &channelWatch{admin: r.client(t), channel: channel, changed: make(chan struct{}, 1)}
	ps := w.admin.Subscribe(bg, channel)
	t.Cleanup(func() { ps.Close() })
	if _, err := ps.Receive(bg); err != nil {
		t.Fatalf("subscribing to %s: %v", channel, err)
	}
	msgs := ps.Channel(redis.WithChannelSize(1024))
	go func() {
		for m := range msgs {
			w.mu.Lock()
			w.msgs = append(w.msgs, m.Payload)
			w.mu.Unlock()
			select {
			case w.changed <- struct{}{}:
			default:
			}
		}
	}()
	return w
}

// all returns the messages published on the channel so far: it publishes
// a marker and waits for it, so every earlier message has arrived too. The
// marker is not returned.
func (w *channelWatch) all(t *testing.T) []string {
	t.Helper()
	marker := "end " + randomID()
	if err := w.admin.Publish(bg, w.channel, marker).Err(); err != nil {
		t.Fatal(err)
	}
	var got []string
	w.await(t, func(msgs []string) bool {
		i := slices.Index(msgs, marker)
		if i >= 0 {
			got = append([]string(nil), msgs[:i]...)
		}
		return i >= 0
	}, "the marker published on "+w.channel+" did not arrive")
	return got
}

// waitFor waits for a message for which match holds.
func (w *channelWatch) waitFor(t *testing.T, match func(string) bool) {
	t.Helper()
	w.await(t, func(msgs []string) bool { return slices.ContainsFunc(msgs, match) },
		"the message waited for did not arrive on "+w.channel)
}

// await waits until cond holds on the messages so far (checked under the
// watch's lock); it fails the test with failure if it does not.
func (w *channelWatch) await(t *testing.T, cond func(msgs []string) bool, failure string) {
	t.Helper()
	await(t, w.changed, func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return cond(w.msgs)
	}, func() string { return failure })
}

// waitSubscribed waits until node n listens on its channel, on any server
// of its Redis (every master of a Redis Cluster).
func waitSubscribed(t *testing.T, n *node) {
	t.Helper()
	waitListening(t, n, true)
}

// waitListening waits until node n listens on its channel, or, with
// listening false, until no server of its Redis counts it there.
func waitListening(t *testing.T, n *node, listening bool) {
	t.Helper()
	channel := n.k.node(n.NodeID())
	var admins []*redis.Client
	for _, addr := range n.cfg.Addrs {
		c := redis.NewClient(&redis.Options{Addr: addr})
		t.Cleanup(func() { c.Close() })
		admins = append(admins, c)
	}
	var subs int64
	var err error // the last error of a server that did not answer
	await(t, nil, func() bool {
		subs, err = 0, nil
		for _, c := range admins {
			got, cerr := c.PubSubNumSub(bg, channel).Result()
			if cerr != nil {
				err = cerr
			}
			subs += got[channel]
		}
		// A server that did not answer may still count it.
		return (subs > 0) == listening && (listening || err == nil)
	}, func() string {
		return fmt.Sprintf("node %s: %d subscriptions to %s, want listening %v (%v)", n.NodeID(), subs, channel, listening, err)
	})
}

// holderAndSender starts node a, holding session s and listening on its
// channel, and node b (with senderOpts), to forward to it, on the Redis at
// addrs.
func holderAndSender(t *testing.T, addrs []string, senderOpts ...func(*Config)) (a, b *node) {
	t.Helper()
	a, b = startNodeAt(t, addrs, "a"), startNodeAt(t, addrs, "b", senderOpts...)
	a.open(t, "s", "", 10)
	waitSubscribed(t, a)
	return a, b
}

// randomPayload is n bytes of every value (spaces and "@" among them),
// the same for the same seed.
func randomPayload(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// forwardKeys lists the stored forwards left in Redis.
func forwardKeys(t *testing.T, r *redisServer) []string {
	t.Helper()
	keys, err := r.client(t).Keys(bg, "t:f:*").Result()
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// A payload larger than forwardInlineMax reaches the holder whole and is
// answered, while the messages on the holder's channel stay small: the
// payload waits in Redis, which keeps nothing of it afterwards.
func TestForwardLargePayloadStored(t *testing.T) {
	r := startRedis(t)
	a, b := holderAndSender(t, []string{r.Addr})
	w := watchChannel(t, r, a.k.node("a"))

	payload := randomPayload(1<<20, 1)
	status, err := b.ForwardTo(bg, "a", "s", payload)
	if err != nil || status != 202 {
		t.Fatalf("forward of 1 MiB: %d, %v; want 202", status, err)
	}
	a.rec.mu.Lock()
	if len(a.rec.commands) != 1 || a.rec.commands[0] != "s forwarded "+string(payload) {
		t.Errorf("the holder got %d commands, not the 1 MiB forward whole", len(a.rec.commands))
	}
	a.rec.mu.Unlock()
	msgs := w.all(t)
	if len(msgs) != 1 || !strings.HasPrefix(msgs[0], "k s ") {
		t.Errorf("messages on the holder's channel: %d, want one forward by reference", len(msgs))
	}
	for _, m := range msgs {
		if len(m) >= forwardInlineMax {
			t.Errorf("a message of %d bytes on the holder's channel (%.20q…), want less than %d", len(m), m, forwardInlineMax)
		}
	}
	if left := forwardKeys(t, r); len(left) != 0 {
		t.Errorf("stored forwards left after the answer: %v", left)
	}
}

// Payloads up to forwardInlineMax travel in the message, larger ones by
// reference; both reach the holder as they were.
func TestForwardInlineUpToThreshold(t *testing.T) {
	r := startRedis(t)
	a, b := holderAndSender(t, []string{r.Addr})
	w := watchChannel(t, r, a.k.node("a"))

	small, large := randomPayload(forwardInlineMax, 2), randomPayload(forwardInlineMax+1, 3)
	for _, p := range [][]byte{small, large} {
		if status, err := b.ForwardTo(bg, "a", "s", p); err != nil || status != 202 {
			t.Fatalf("forward of %d bytes: %d, %v; want 202", len(p), status, err)
		}
	}
	msgs := w.all(t)
	if len(msgs) != 2 {
		t.Fatalf("%d messages on the holder's channel, want 2", len(msgs))
	}
	if !strings.HasPrefix(msgs[0], "f s ") || !strings.HasSuffix(msgs[0], " "+string(small)) {
		t.Errorf("a forward of %d bytes was not sent inline: %.30q…", len(small), msgs[0])
	}
	if !strings.HasPrefix(msgs[1], "k s ") || len(msgs[1]) >= forwardInlineMax {
		t.Errorf("a forward of %d bytes was sent inline (%d bytes)", len(large), len(msgs[1]))
	}
	a.rec.mu.Lock()
	defer a.rec.mu.Unlock()
	if len(a.rec.commands) != 2 || a.rec.commands[0] != "s forwarded "+string(small) || a.rec.commands[1] != "s forwarded "+string(large) {
		t.Errorf("the holder got %d commands, not the two forwards whole", len(a.rec.commands))
	}
}

// A stored payload gone before the holder reads it (as if it expired) is
// not applied, and the forward fails as Redis failing does: with
// ErrForwardLost, not as one whose payload may still arrive.
func TestForwardStoredPayloadGone(t *testing.T) {
	r := startRedis(t)
	a, b := holderAndSender(t, []string{r.Addr})

	// A relay between b and a deletes the payload, then passes the
	// reference on.
	relay := r.client(t)
	ps := relay.Subscribe(bg, b.k.node("relay"))
	t.Cleanup(func() { ps.Close() })
	if _, err := ps.Receive(bg); err != nil {
		t.Fatal(err)
	}
	deleted := make(chan int64, 1)
	go func() {
		for m := range ps.Channel() {
			fields := strings.Fields(m.Payload)
			if len(fields) != 3 || fields[0] != "k" {
				continue
			}
			req, _, _ := strings.Cut(fields[2], "@")
			n, _ := relay.Del(bg, b.k.forward(req)).Result()
			select {
			case deleted <- n:
			default:
			}
			_ = relay.Publish(bg, a.k.node("a"), m.Payload).Err()
		}
	}()

	status, err := b.ForwardTo(bg, "relay", "s", randomPayload(1<<20, 4))
	if !errors.Is(err, ErrForwardLost) || !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrNodeUnreachable) {
		t.Fatalf("forward whose payload was gone: %d, %v; want ErrForwardLost, an ErrUnavailable", status, err)
	}
	select {
	case n := <-deleted:
		if n != 1 {
			t.Fatalf("the relay found no stored payload to delete (test did not test)")
		}
	default:
		t.Fatal("the relay saw no forward by reference")
	}
	// The holder answers after Forwarded would have run.
	a.rec.mu.Lock()
	defer a.rec.mu.Unlock()
	if len(a.rec.commands) != 0 {
		t.Fatalf("the holder applied a forward whose payload was gone: %d commands", len(a.rec.commands))
	}
}

// afterCommand is a go-redis hook that calls after with the arguments of
// each command named name once Redis answered it, before its caller goes
// on.
type afterCommand struct {
	name  string
	after func(args []any)
}

func (h afterCommand) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h afterCommand) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (h afterCommand) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if cmd.Name() == h.name {
			h.after(cmd.Args())
		}
		return err
	}
}

// publishHook calls after with the channel and message of each PUBLISH.
func publishHook(after func(channel, msg string)) afterCommand {
	return afterCommand{"publish", func(args []any) {
		if len(args) == 3 {
			channel, _ := args[1].(string)
			msg, _ := args[2].(string)
			after(channel, msg)
		}
	}}
}

// A stored payload that nobody was counted for, but that is gone when its
// sender comes to delete it (a holder the count missed took it meanwhile),
// may have been applied: the forward fails with ErrNodeUnreachable, not
// ErrNodeNotListening, after which its caller would forward it again.
func TestForwardStoredTakenThoughNobodyCounted(t *testing.T) {
	r := startRedis(t)
	b := startNode(t, r, "b")
	b.stop() // nothing but the forward uses b's client from here on
	holder := r.client(t)
	took := make(chan []byte, 1)
	b.rdb.AddHook(publishHook(func(channel, msg string) {
		// Between the PUBLISH that counted nobody and the sender's
		// delete, the holder reads the payload as receiveStored does.
		fields := strings.Fields(msg)
		if channel != b.k.node("missed") || len(fields) != 3 || fields[0] != "k" {
			return
		}
		req, _, _ := strings.Cut(fields[2], "@")
		p, _ := holder.GetDel(bg, b.k.forward(req)).Bytes()
		took <- p
	}))

	payload := randomPayload(1<<20, 7)
	status, err := b.ForwardTo(bg, "missed", "s", payload)
	if !errors.Is(err, ErrNodeUnreachable) || errors.Is(err, ErrNodeNotListening) {
		t.Fatalf("forward whose stored payload was taken though nobody was counted: %d, %v; want ErrNodeUnreachable, not ErrNodeNotListening", status, err)
	}
	select {
	case p := <-took:
		if string(p) != string(payload) {
			t.Fatalf("the holder took %d bytes, not the stored payload (test did not test)", len(p))
		}
	default:
		t.Fatal("no forward by reference was published (test did not test)")
	}
	if left := forwardKeys(t, r); len(left) != 0 {
		t.Fatalf("stored forwards left: %v", left)
	}
}

// A stored payload nobody reads leaves nothing behind: deleted at once if
// nobody listens on the holder's channel, expired with the timeout if the
// holder does not answer.
func TestForwardStoredPayloadCleanedUp(t *testing.T) {
	r := startRedis(t)
	b := startNode(t, r, "b")
	payload := randomPayload(1<<20, 5)

	if _, err := b.ForwardTo(bg, "gone", "s", payload); !errors.Is(err, ErrNodeNotListening) {
		t.Fatalf("forward to a node nobody listens for: %v, want ErrNodeNotListening", err)
	}
	if left := forwardKeys(t, r); len(left) != 0 {
		t.Fatalf("stored forwards left after nobody listened: %v", left)
	}

	// Something listens on the channel but never answers: the payload
	// waits for it while b waits for the answer, no longer.
	w := watchChannel(t, r, b.k.node("mute"))
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := b.ForwardTo(bg, "mute", "s", payload)
		errc <- err
	}()
	w.waitFor(t, func(m string) bool { return strings.HasPrefix(m, "k s ") })
	left := forwardKeys(t, r)
	if len(left) != 1 {
		t.Fatalf("stored forwards while the forward waits: %v, want one", left)
	}
	ttl, err := r.client(t).PTTL(bg, left[0]).Result()
	if err != nil || ttl <= 0 || ttl > b.Timeout() {
		t.Fatalf("TTL of the stored forward: %v, %v; want at most the timeout, %v", ttl, err, b.Timeout())
	}
	if err := <-errc; !errors.Is(err, ErrNodeUnreachable) || errors.Is(err, ErrNodeNotListening) {
		t.Fatalf("forward to a node that does not answer: %v, want ErrNodeUnreachable", err)
	}
	for len(forwardKeys(t, r)) != 0 {
		if time.Since(start) > b.Timeout()+time.Second {
			t.Fatalf("the stored forward did not expire with the timeout")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A stored forward is read and handed to the holder beside its pub/sub
// loop: pushes to the holder go on meanwhile.
func TestForwardStoredBesideTheLoop(t *testing.T) {
	r := startRedis(t)
	// b waits long for the answer, however slow this machine.
	a, b := holderAndSender(t, []string{r.Addr}, func(c *Config) { c.Timeout = 20 * time.Second })
	gate := make(chan struct{})
	a.rec.mu.Lock()
	a.rec.gate = gate
	a.rec.mu.Unlock()
	var once sync.Once
	release := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(release)

	type result struct {
		status int
		err    error
	}
	done := make(chan result, 1)
	go func() {
		status, err := b.ForwardTo(bg, "a", "s", randomPayload(1<<20, 6))
		done <- result{status, err}
	}()
	a.rec.waitFor(t, "the forward on a", func() bool { return len(a.rec.commands) == 1 })
	b.publish(t, Publish{Session: "s", Payload: []byte("meanwhile")})
	a.rec.waitFor(t, "the push while Forwarded runs", func() bool { return a.rec.seqs("s") == "1:meanwhile" })
	release()
	if res := <-done; res.err != nil || res.status != 202 {
		t.Fatalf("forward: %d, %v; want 202", res.status, res.err)
	}
}
