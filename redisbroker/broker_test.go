package redisbroker

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

var bg = context.Background()

// open registers session id on n with channels and holds it from seq 0.
func (n *node) open(t *testing.T, id, user string, maxLen int64, channels ...string) {
	t.Helper()
	if err := n.Register(bg, Session{ID: id, User: user, Token: "tok-" + id, MaxLen: maxLen, Channels: channels}); err != nil {
		t.Fatal(err)
	}
	n.Hold(bg, n.rec, id, 0)
}

func (n *node) publish(t *testing.T, p Publish) int {
	t.Helper()
	got, err := n.Publish(bg, p)
	if err != nil {
		t.Fatalf("publish %+v: %v", p, err)
	}
	return got
}

func TestKeySlot(t *testing.T) {
	// The Redis Cluster specification's example: CRC16 of "123456789".
	if s := keySlot("123456789"); s != 0x31C3 {
		t.Fatalf("keySlot(123456789) = %d, want %d", s, 0x31C3)
	}
}

// A publish on any node reaches every target on every node once, in
// order, with its own seq per session; delivered counts them all.
func TestPublishAcrossNodes(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s1", "alice", 100, "room")
	b.open(t, "s2", "bob", 100, "room")
	b.open(t, "s3", "alice", 100)

	if n := b.publish(t, Publish{Channel: "room", Payload: []byte("1")}); n != 2 {
		t.Fatalf("channel publish reached %d, want 2", n)
	}
	if n := a.publish(t, Publish{User: "alice", Payload: []byte("2")}); n != 2 {
		t.Fatalf("user publish reached %d, want 2", n)
	}
	if n := a.publish(t, Publish{Channel: "room", Except: "s1", Payload: []byte("3")}); n != 1 {
		t.Fatalf("publish with except reached %d, want 1", n)
	}
	if n := b.publish(t, Publish{Session: "s1", Payload: []byte("4")}); n != 1 {
		t.Fatalf("session publish reached %d, want 1", n)
	}
	a.rec.waitFor(t, "s1's pushes", func() bool { return a.rec.seqs("s1") == "1:1 2:2 3:4" })
	b.rec.waitFor(t, "s2's and s3's pushes", func() bool {
		return b.rec.seqs("s2") == "1:1 2:3" && b.rec.seqs("s3") == "1:2"
	})
	if _, err := a.Publish(bg, Publish{Session: "nope", Payload: []byte("x")}); !errors.Is(err, ErrUnknownSession) {
		t.Fatalf("publish to an unknown session: %v, want ErrUnknownSession", err)
	}
}

// A client resumes on another node: the pushes after its cursor come from
// the log, later ones live to the new node, and the old node is told.
func TestResumeOnAnotherNode(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s", "", 100, "room")
	for i := 1; i <= 3; i++ {
		a.publish(t, Publish{Channel: "room", Payload: []byte(strconv.Itoa(i))})
	}
	a.rec.waitFor(t, "three pushes on a", func() bool { return len(a.rec.pushes["s"]) == 3 })

	// The client had seq 2 when its connection to a dropped.
	seq, err := b.Attach(bg, "s", "websocket", "")
	if err != nil || seq != 3 {
		t.Fatalf("attach on b: seq %d, %v; want 3", seq, err)
	}
	missed, complete, err := b.Replay(bg, "s", 2)
	if err != nil || !complete || len(missed) != 1 || missed[0].Seq != 3 || string(missed[0].Payload) != "3" {
		t.Fatalf("replay after 2: %v complete=%v err=%v", missed, complete, err)
	}
	b.publish(t, Publish{Channel: "room", Payload: []byte("4")}) // before Hold: waits
	b.Hold(bg, b.rec, "s", seq)
	a.publish(t, Publish{Channel: "room", Payload: []byte("5")})
	b.rec.waitFor(t, "pushes 4 and 5 on b", func() bool { return b.rec.seqs("s") == "4:4 5:5" })
	a.rec.waitFor(t, "the takeover on a", func() bool { return len(a.rec.commands) == 1 && a.rec.commands[0] == "s takeover " })
	if got := a.rec.seqs("s"); got != "1:1 2:2 3:3" {
		t.Fatalf("a kept delivering after the takeover: %s", got)
	}
}

// Pushes published while a node's pub/sub connection is gone are read
// from the log once it is back: nothing is missing, nothing is doubled.
func TestPubSubLossRepaired(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s", "", 1000, "room")
	a.publish(t, Publish{Channel: "room", Payload: []byte("1")})
	a.rec.waitFor(t, "the first push", func() bool { return len(a.rec.pushes["s"]) == 1 })

	admin := r.client(t)
	var want []string
	want = append(want, "1:1")
	for round := range 5 {
		if err := admin.Do(bg, "CLIENT", "KILL", "TYPE", "pubsub").Err(); err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			v := strconv.Itoa(2 + round*20 + i)
			b.publish(t, Publish{Channel: "room", Payload: []byte(v)})
			want = append(want, v+":"+v)
		}
	}
	wantText := strings.Join(want, " ")
	a.rec.waitFor(t, "every push once, in order", func() bool { return a.rec.seqs("s") == wantText })
	if a.GapRepairs() == 0 {
		t.Errorf("no gap was repaired: the kills did not cost a push (test did not test)")
	}
}

// A node that missed pushes no longer in the log reports the session
// lost rather than delivering a gap.
func TestGapBeyondLogIsLost(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s", "", 2, "room")
	a.stop() // a hears nothing now
	for i := 1; i <= 5; i++ {
		b.publish(t, Publish{Channel: "room", Payload: []byte(strconv.Itoa(i))})
	}
	a.run()
	a.rec.waitFor(t, "s lost", func() bool { return len(a.rec.lost) == 1 && a.rec.lost[0] == "s" })
	if got := a.rec.seqs("s"); got != "" {
		t.Fatalf("delivered across the gap: %s", got)
	}
	if _, complete, err := b.Replay(bg, "s", 0); err != nil || complete {
		t.Fatalf("replay from 0 with a log of 2: complete=%v err=%v; want incomplete", complete, err)
	}
}

// Redis restarted without its data: every session held is lost.
func TestEpochChangeLosesSessions(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a")
	a.open(t, "s", "", 10, "room")
	a.rec.waitFor(t, "the epoch to be seen", func() bool { return a.Epoch() != "" })
	if err := r.client(t).FlushAll(bg).Err(); err != nil {
		t.Fatal(err)
	}
	a.rec.waitFor(t, "s lost", func() bool { return len(a.rec.lost) == 1 })
}

// The same publish id sent to two nodes at once is applied once.
func TestPublishIDOnceAcrossNodes(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s", "", 100, "room")
	var runs atomic.Int32
	var wg sync.WaitGroup
	counts := make([]int, 8)
	for i := range counts {
		n := a
		if i%2 == 1 {
			n = b
		}
		wg.Go(func() {
			got, err := n.Once(bg, "pub-1", time.Minute, func() (int, error) {
				runs.Add(1)
				return n.Publish(bg, Publish{Channel: "room", Payload: []byte("once")})
			})
			if err != nil {
				t.Error(err)
			}
			counts[i] = got
		})
	}
	wg.Wait()
	if runs.Load() != 1 {
		t.Fatalf("publish applied %d times, want once", runs.Load())
	}
	for i, c := range counts {
		if c != 1 {
			t.Errorf("caller %d got delivered %d, want 1", i, c)
		}
	}
	a.rec.waitFor(t, "one push", func() bool { return a.rec.seqs("s") == "1:once" })
}

// Close reaches the holding node; the session then takes no pushes and
// cannot be attached.
func TestCloseAcrossNodes(t *testing.T) {
	r := startRedis(t)
	a, b := startNode(t, r, "a"), startNode(t, r, "b")
	a.open(t, "s", "u", 10)
	if n := b.publish(t, Publish{User: "u", Close: true, Payload: []byte(`{"reason":"bye"}`)}); n != 1 {
		t.Fatalf("close reached %d, want 1", n)
	}
	a.rec.waitFor(t, "the close", func() bool { return len(a.rec.commands) == 1 && a.rec.commands[0] == `s close {"reason":"bye"}` })
	if n := b.publish(t, Publish{User: "u", Payload: []byte("late")}); n != 0 {
		t.Fatalf("a closed session took a push")
	}
	if _, err := b.Attach(bg, "s", "websocket", ""); !errors.Is(err, ErrClosed) {
		t.Fatalf("attach of a closed session: %v, want ErrClosed", err)
	}
}

// Detached sessions expire with their window; ended ones leave no keys
// and no index entries.
func TestDetachExpiresAndEndCleansUp(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a")
	a.open(t, "gone", "u", 10, "room")
	a.open(t, "ended", "u", 10, "room")
	if err := a.Detach(bg, "gone", 200*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := a.End(bg, "ended"); err != nil {
		t.Fatal(err)
	}
	a.rec.waitFor(t, "the detached session to expire", func() bool {
		_, err := a.Lookup(bg, "gone")
		return errors.Is(err, ErrUnknownSession)
	})
	// An expired session leaves the channel and user sets lazily: the
	// next publish to them drops it.
	if n := a.publish(t, Publish{Channel: "room", Payload: []byte("x")}); n != 0 {
		t.Fatalf("publish reached %d ended or expired sessions", n)
	}
	if n := a.publish(t, Publish{User: "u", Payload: []byte("x")}); n != 0 {
		t.Fatalf("publish reached %d ended or expired sessions", n)
	}
	left, err := r.client(t).Keys(bg, "t:s:*").Result()
	if err != nil || len(left) != 0 {
		t.Fatalf("session keys left: %v %v", left, err)
	}
	if ids, _ := a.Members(bg, "", "room"); len(ids) != 0 {
		t.Fatalf("channel members left: %v", ids)
	}
	if ids, _ := a.Members(bg, "u", ""); len(ids) != 0 {
		t.Fatalf("user members left: %v", ids)
	}
}

// Redis stopped: calls fail with ErrUnavailable within the timeout; when
// it continues, so do they.
func TestRedisUnavailable(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a", func(c *Config) { c.Timeout = 300 * time.Millisecond })
	a.open(t, "s", "", 10, "room")
	if err := r.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	_, err := a.Publish(bg, Publish{Channel: "room", Payload: []byte("x")})
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("publish with Redis stopped: %v, want ErrUnavailable", err)
	}
	if err := r.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := a.Publish(bg, Publish{Channel: "room", Payload: []byte("y")})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("publish after Redis continued: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	nodes, err := a.Nodes(bg)
	if err != nil || len(nodes) != 1 || nodes[0] != "a" {
		t.Fatalf("nodes: %v %v", nodes, err)
	}
}

// A forward reaches the node holding the session and brings back its
// answer; one to a node that is gone fails as unreachable.
func TestForward(t *testing.T) {
	r := startRedis(t)
	a, b := holderAndSender(t, []string{r.Addr})
	status, err := b.ForwardTo(bg, "a", "s", []byte(`[{"id":1}]`))
	if err != nil {
		t.Fatalf("forward: %v", err)
	}
	if status != 202 {
		t.Fatalf("forward answered %d, want 202", status)
	}
	a.rec.waitFor(t, "the forward on a", func() bool { return len(a.rec.commands) == 1 && a.rec.commands[0] == `s forwarded [{"id":1}]` })
	a.stop()
	// Redis drops a's subscription once it reads a's connection closed: a
	// PUBLISH before that counts it.
	waitListening(t, a, false)
	if _, err := b.ForwardTo(bg, "a", "s", []byte(`[]`)); !errors.Is(err, ErrNodeNotListening) || !errors.Is(err, ErrNodeUnreachable) {
		t.Fatalf("forward to a stopped node: %v, want ErrNodeNotListening, an ErrNodeUnreachable", err)
	}
	a.run() // for the cleanup's stop
}

// The sessions of a node that stops heartbeating are adopted by exactly
// one live node, detached from then on; one a client resumed meanwhile is
// not ended by the adopter.
func TestDeadNodeSessionsAdoptedOnce(t *testing.T) {
	r := startRedis(t)
	a, b, c := startNode(t, r, "a"), startNode(t, r, "b"), startNode(t, r, "c")
	for _, id := range []string{"s1", "s2"} {
		if err := a.Register(bg, Session{ID: id, Token: "tok-" + id, MaxLen: 10, Window: time.Minute, Path: "/live", Host: "example.com"}); err != nil {
			t.Fatal(err)
		}
		a.Hold(bg, a.rec, id, 0)
	}
	a.stop() // a dies: no more heartbeats
	adopted := func() []Session {
		b.rec.mu.Lock()
		defer b.rec.mu.Unlock()
		c.rec.mu.Lock()
		defer c.rec.mu.Unlock()
		return append(append([]Session(nil), b.rec.adopted...), c.rec.adopted...)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(adopted()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("adopted %v after 30s, want both sessions", adopted())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(3 * b.cfg.NodeTTL) // more heartbeats: nobody adopts them again
	got := adopted()
	if len(got) != 2 || got[0].ID == got[1].ID {
		t.Fatalf("adopted %+v, want s1 and s2 once each", got)
	}
	for _, s := range got {
		if s.Detached.IsZero() || s.Window != time.Minute || s.Path != "/live" || s.Host != "example.com" {
			t.Fatalf("adopted %+v: want detached, with its window, path and host", s)
		}
	}
	// s1 is resumed on c; s2 nobody resumes.
	var s1, s2 Session
	for _, s := range got {
		if s.ID == "s1" {
			s1 = s
		} else {
			s2 = s
		}
	}
	if _, err := c.Attach(bg, "s1", "sse", ""); err != nil {
		t.Fatal(err)
	}
	if ended, err := b.ExpireDetached(bg, s1); err != nil || ended {
		t.Fatalf("expire of a resumed session: ended=%v err=%v", ended, err)
	}
	if ended, err := b.ExpireDetached(bg, s2); err != nil || !ended {
		t.Fatalf("expire of a session nobody resumed: ended=%v err=%v", ended, err)
	}
	if _, err := b.Lookup(bg, "s2"); !errors.Is(err, ErrUnknownSession) {
		t.Fatalf("s2 after it expired: %v", err)
	}
	if ended, _ := c.ExpireDetached(bg, s2); ended {
		t.Fatal("s2 ended twice")
	}
	a.run() // for the cleanup's stop
}

// On one Redis server a channel publish reads the channel's members in its
// script, in one round trip; with more members than a script batch, the
// script returns them instead, and the batches are applied in a second
// round trip. Either way every member but the except gets the push once,
// with its own seq.
func TestPublishToChannelSizes(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a")
	b := startNode(t, r, "b")
	// The Redis round trips of a's publishes: only the calls made under
	// their context count, not a's background calls (heartbeats, reaping),
	// which on a loaded machine may land within every publish.
	var calls atomic.Int64
	a.rdb.AddHook(roundTrips{&calls})
	counted := context.WithValue(bg, roundTrips{}, true)
	for _, size := range []int{3, scriptBatch, scriptBatch + 1, scriptBatch + 44} {
		channel := "room" + strconv.Itoa(size)
		for i := range size {
			n := a
			if i%2 == 1 {
				n = b
			}
			n.open(t, channel+"-"+strconv.Itoa(i), "", 100, channel)
		}
		except := channel + "-0"
		// The fewest round trips a publish took (a retry of go-redis on a
		// loaded machine can only add to one).
		fewest := int64(1 << 62)
		for k := 1; k <= 5; k++ {
			before := calls.Load()
			if got, err := a.Publish(counted, Publish{Channel: channel, Except: except, Payload: []byte(strconv.Itoa(k))}); err != nil || got != size-1 {
				t.Fatalf("publish %d to %d members but one reached %d (%v)", k, size, got, err)
			}
			if k > 1 { // the first loads the scripts
				fewest = min(fewest, calls.Load()-before)
			}
		}
		if size <= scriptBatch && fewest != 1 {
			t.Errorf("a publish to %d members took %d round trips, want 1", size, fewest)
		}
		if size > scriptBatch && fewest != 2 {
			t.Errorf("a publish to %d members took %d round trips, want 2 (the script returning the members, then the batches)", size, fewest)
		}
		for i := range size {
			id, n := channel+"-"+strconv.Itoa(i), a
			if i%2 == 1 {
				n = b
			}
			want := "1:1 2:2 3:3 4:4 5:5"
			if id == except {
				want = ""
			}
			n.rec.waitFor(t, id+"'s pushes", func() bool { return n.rec.seqs(id) == want })
		}
	}
}

// A member whose session is gone from Redis (its keys expired) is not
// counted and is dropped from the channel's set, on the one-round-trip
// path as on the batched one.
func TestPublishForgetsGoneMembers(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a")
	admin := r.client(t)
	for _, size := range []int{2, scriptBatch + 1} {
		channel := "gone" + strconv.Itoa(size)
		for i := range size {
			a.open(t, channel+"-"+strconv.Itoa(i), "", 100, channel)
		}
		gone := channel + "-1"
		if err := admin.Del(bg, a.k.session(gone)).Err(); err != nil {
			t.Fatal(err)
		}
		if got := a.publish(t, Publish{Channel: channel, Payload: []byte("x")}); got != size-1 {
			t.Fatalf("publish to %d members, one gone, reached %d", size, got)
		}
		if member, err := admin.SIsMember(bg, a.k.channel(channel), gone).Result(); err != nil || member {
			t.Fatalf("the gone session is still a member of %s (%v)", channel, err)
		}
	}
}

// A subscribe racing its session's end leaves nothing behind: a session
// that ended between the check that it exists and the adds is taken out
// of the channels again, and the subscribe fails with ErrUnknownSession.
func TestSubscribeRacingTheEnd(t *testing.T) {
	r := startRedis(t)
	a := startNode(t, r, "a")
	a.open(t, "s", "", 100, "room")
	var once sync.Once
	a.rdb.AddHook(afterCommand{"exists", func([]any) {
		once.Do(func() { // right after the check: the session ends
			if _, err := a.EndHeld(bg, "s"); err != nil {
				t.Errorf("end: %v", err)
			}
		})
	}})
	if err := a.Subscribe(bg, "s", "late"); !errors.Is(err, ErrUnknownSession) {
		t.Fatalf("subscribe of a session that ended meanwhile: %v, want ErrUnknownSession", err)
	}
	rdb := r.client(t)
	if m, err := rdb.SIsMember(bg, a.k.channel("late"), "s").Result(); err != nil || m {
		t.Fatalf("the ended session is still a member of the channel (%v)", err)
	}
	if n, err := rdb.Exists(bg, a.k.channels("s")).Result(); err != nil || n != 0 {
		t.Fatalf("the ended session's channel set is still there (%v)", err)
	}
	once.Do(func() { t.Fatal("the subscribe never checked the session (test did not test)") })
}

// roundTrips is a go-redis hook that counts the round trips (a command, or
// a pipeline) made under a context carrying roundTrips{} as a key.
type roundTrips struct{ n *atomic.Int64 }

func (h roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if ctx.Value(roundTrips{}) != nil {
			h.n.Add(1)
		}
		return next(ctx, cmd)
	}
}

func (h roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if ctx.Value(roundTrips{}) != nil {
			h.n.Add(1)
		}
		return next(ctx, cmds)
	}
}
