package duplex

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// testSession is a session with an attachment that has no connection:
// what is queued for it can be inspected.
func testSession(h *hub, id, user string, sendQueue int64) *session {
	hd := &Handler{
		SendQueue:        sendQueue,
		ResumeBuffer:     defaultResumeBuffer,
		ResumeBufferSize: defaultResumeBufferSize,
		ResumeWindow:     caddy.Duration(time.Minute),
		MaxInflight:      1,
		Heartbeat:        caddy.Duration(time.Second),
		hub:              h,
		logger:           zap.NewNop(),
		live:             newAttachmentSet(),
		cleaned:          new(atomic.Bool),
	}
	s := newSession(hd, user)
	s.id = id
	// stopped: no writer starts, the queue stays for queued to read
	a := &attachment{s: s, h: hd, out: outbox{limit: sendQueue, stopped: true}, readerDone: make(chan struct{})}
	s.cur, s.state = a, stateAttached
	return s
}

// queued renders the frames queued for s as the client would see them.
func queued(s *session) []string {
	var out []string
	for _, f := range s.cur.out.frames {
		if f.push != nil {
			out = append(out, string(pushPrefix)+strconv.FormatUint(f.seq, 10)+string(f.push.suffix))
		} else {
			out = append(out, string(f.b))
		}
	}
	return out
}

func TestHubDeliverTargets(t *testing.T) {
	h := newHub()
	a := testSession(h, "a", "alice", 1<<20)
	b := testSession(h, "b", "bob", 1<<20)
	c := testSession(h, "c", "alice", 1<<20)
	h.add(a, []string{"room:1"}, nil)
	h.add(b, []string{"room:1", "room:2"}, nil)
	h.add(c, nil, nil)

	cases := []struct {
		msg  publishMsg
		want int
	}{
		{publishMsg{Channel: "room:1", Data: json.RawMessage(`{"n":1}`)}, 2},
		{publishMsg{User: "alice", Data: json.RawMessage(`"hi"`)}, 2},
		{publishMsg{Session: "b", Data: json.RawMessage(`3`)}, 1},
		{publishMsg{Channel: "room:1", Data: json.RawMessage(`4`), Except: "a"}, 1},
		{publishMsg{Channel: "nobody", Data: json.RawMessage(`5`)}, 0},
	}
	for i, tc := range cases {
		n, err := h.deliver(&tc.msg)
		if err != nil || n != tc.want {
			t.Errorf("case %d: delivered %d, %v; want %d", i, n, err, tc.want)
		}
	}
	wantA := []string{
		`{"type":"push","seq":1,"channel":"room:1","data":{"n":1}}`,
		`{"type":"push","seq":2,"data":"hi"}`,
	}
	wantB := []string{
		`{"type":"push","seq":1,"channel":"room:1","data":{"n":1}}`,
		`{"type":"push","seq":2,"data":3}`,
		`{"type":"push","seq":3,"channel":"room:1","data":4}`,
	}
	wantC := []string{`{"type":"push","seq":1,"data":"hi"}`}
	for _, tc := range []struct {
		s    *session
		want []string
	}{{a, wantA}, {b, wantB}, {c, wantC}} {
		if got := queued(tc.s); fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("session %s got\n%q\nwant\n%q", tc.s.id, got, tc.want)
		}
	}

	if _, err := h.deliver(&publishMsg{Session: "zzz", Data: json.RawMessage(`1`)}); !errors.Is(err, errUnknownSession) {
		t.Errorf("unknown session: err = %v", err)
	}
}

func TestHubSubscribeAndRemove(t *testing.T) {
	h := newHub()
	a := testSession(h, "a", "", 1<<20)
	h.add(a, []string{"x"}, nil)
	h.subscribe(context.Background(), a, []string{"y", "z"}, []string{"x"})
	if got := h.list("", "x"); len(got) != 0 {
		t.Errorf("still on x: %v", got)
	}
	info, ok := h.info("a")
	if !ok || fmt.Sprint(info.Channels) != "[y z]" {
		t.Errorf("channels = %v, %v", info.Channels, ok)
	}
	h.remove(a)
	if n, _ := h.deliver(&publishMsg{Channel: "y", Data: json.RawMessage(`1`)}); n != 0 {
		t.Errorf("removed session still reached: %d", n)
	}
	if len(h.channels) != 0 || len(h.sessions) != 0 {
		t.Errorf("hub keeps state of removed session: %v %v", h.channels, h.sessions)
	}
}

func TestHubCloseTarget(t *testing.T) {
	h := newHub()
	a := testSession(h, "a", "u", 1<<20)
	b := testSession(h, "b", "u", 1<<20)
	h.add(a, nil, nil)
	h.add(b, nil, nil)
	reason := "logout"
	connA, connB := a.cur, b.cur
	n, err := h.deliver(&publishMsg{User: "u", Close: &reason, Except: "b"})
	if n != 1 || err != nil {
		t.Fatalf("delivered %d, %v", n, err)
	}
	if c := connA.out.closing; !a.ended() || c == nil || c.Code != protocol.CodeClosedByApp || c.Reason != "logout" || c.Reconnect {
		t.Errorf("a: ended=%v closing=%+v", a.ended(), c)
	}
	if b.ended() || connB.out.closing != nil {
		t.Errorf("excepted session closed: %+v", connB.out.closing)
	}
	if _, err := h.deliver(&publishMsg{Session: "a", Data: json.RawMessage(`1`)}); !errors.Is(err, errUnknownSession) {
		t.Errorf("closed session still known: %v", err)
	}
}

func TestSlowConsumerClosed(t *testing.T) {
	h := newHub()
	slow := testSession(h, "slow", "", 200)
	fast := testSession(h, "fast", "", 1<<20)
	h.add(slow, []string{"c"}, nil)
	h.add(fast, []string{"c"}, nil)
	for i := 0; i < 10; i++ {
		if _, err := h.deliver(&publishMsg{Channel: "c", Data: json.RawMessage(`"0123456789012345678901234567890123456789"`)}); err != nil {
			t.Fatal(err)
		}
	}
	if c := slow.cur.out.closing; c == nil || c.Code != protocol.CodeSlowConsumer || !c.Reconnect {
		t.Errorf("slow connection not closed as slow consumer: %+v", c)
	}
	if slow.cur.out.bytes > 200 {
		t.Errorf("slow connection queued %d bytes over its 200-byte send queue", slow.cur.out.bytes)
	}
	if slow.ended() || slow.seq != 10 {
		t.Errorf("slow session should live on for a resume: ended=%v seq=%d", slow.ended(), slow.seq)
	}
	if fast.cur.out.closing != nil || len(fast.cur.out.frames) != 10 {
		t.Errorf("fast session affected: closing=%+v queued=%d", fast.cur.out.closing, len(fast.cur.out.frames))
	}
}

// BenchmarkDeliverFanout measures one publish reaching 10,000 subscribers:
// the frame is encoded once, so allocations per operation stay flat in the
// number of subscribers.
func BenchmarkDeliverFanout(b *testing.B) {
	h := newHub()
	const n = 10000
	sessions := make([]*session, n)
	for i := range sessions {
		sessions[i] = testSession(h, strconv.Itoa(i), "", 1<<40)
		h.add(sessions[i], []string{"room"}, nil)
	}
	msg := &publishMsg{Channel: "room", Data: json.RawMessage(`{"text":"hello, everyone"}`)}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%64 == 0 {
			b.StopTimer()
			for _, s := range sessions {
				s.cur.out.frames, s.cur.out.bytes = s.cur.out.frames[:0], 0
				s.log, s.logBytes = s.log[:0], 0
			}
			b.StartTimer()
		}
		if _, err := h.deliver(msg); err != nil {
			b.Fatal(err)
		}
	}
}

// The resume buffer keeps at most resume_buffer pushes and at most
// resume_buffer_size bytes, whatever send_queue is.
func TestResumeBufferBounds(t *testing.T) {
	h := newHub()
	s := testSession(h, "s", "", 1<<30)
	s.h.ResumeBufferSize = 1000
	s.cur, s.state = nil, stateDetached // everything goes to the buffer only
	data := json.RawMessage(`"` + strings.Repeat("x", 200) + `"`)
	for range 20 {
		s.push(newPush("", data))
	}
	if n := len(s.log); n == 0 || n > 4 || s.logBytes > 1000 {
		t.Fatalf("buffer holds %d pushes, %d bytes; want at most 1000 bytes (4 pushes of ~230)", n, s.logBytes)
	}
	if s.log[len(s.log)-1].seq != 20 {
		t.Fatalf("the newest push is %d, want 20", s.log[len(s.log)-1].seq)
	}
	s.h.ResumeBufferSize, s.h.ResumeBuffer = 1<<30, 3
	for range 5 {
		s.push(newPush("", data))
	}
	if n := len(s.log); n != 3 {
		t.Fatalf("buffer holds %d pushes, want resume_buffer 3", n)
	}
}

// Answers the client may have missed are held, and forgotten once a push
// queued after them is acked.
func TestHeldAnswersConfirmedByAck(t *testing.T) {
	h := newHub()
	s := testSession(h, "s", "", 1<<20)
	ref := json.RawMessage(`"m1"`)
	s.send(protocol.TypeAck, ref, encodeAck(ref))
	s.send(protocol.TypeError, nil, encodeError(nil, 400, "no id: not held"))
	if len(s.held) != 1 {
		t.Fatalf("%d answers held, want 1 (the one with an id)", len(s.held))
	}
	s.ack(0) // nothing after it yet
	if len(s.held) != 1 {
		t.Fatalf("ack 0 forgot an answer no push came after")
	}
	s.push(newPush("", json.RawMessage(`1`)))
	s.ack(1)
	if len(s.held) != 0 {
		t.Fatalf("ack of a push queued after the answer left %d held", len(s.held))
	}
}

// Session ids never start with '-', so command lines take them as
// arguments (caddy duplex sessions delete <id>); ids and tokens stay
// distinct, unguessable and URL-safe.
func TestNewIDs(t *testing.T) {
	seen := make(map[string]bool)
	for range 20000 {
		id, token := newIDs()
		if strings.HasPrefix(id, "-") {
			t.Fatalf("session id %q starts with '-'", id)
		}
		if len(id) != 22 || len(token) != 32 || seen[id] || seen[token] {
			t.Fatalf("id %q, token %q: want 22 and 32 characters, never seen before", id, token)
		}
		if strings.ContainsAny(id+token, "+/=") {
			t.Fatalf("id %q, token %q: not base64url", id, token)
		}
		seen[id], seen[token] = true, true
	}
}

// A publish to a channel allocates what its push needs, once, whatever the
// number of subscribers: queueing it on each session and its writer
// taking it from the queue allocate nothing per subscriber, also after
// the queue drained.
func TestDeliverAllocatesNothingPerSubscriber(t *testing.T) {
	h := newHub()
	var sessions []*session
	for i := range 100 {
		s := testSession(h, strconv.Itoa(i), "", 1<<40)
		h.add(s, []string{"room"}, nil)
		sessions = append(sessions, s)
	}
	msg := &publishMsg{Channel: "room", Data: json.RawMessage(`{"text":"hello"}`)}
	var buf []outFrame
	publish := func() {
		if _, err := h.deliver(msg); err != nil {
			t.Fatal(err)
		}
		for _, s := range sessions { // each writer's burst, until it finds the queue empty
			buf, _, _ = s.cur.out.take(buf)
			buf, _, _ = s.cur.out.take(buf)
		}
	}
	for range 2 * defaultResumeBuffer { // resume buffers full: trimming from now on
		publish()
	}
	if n := testing.AllocsPerRun(100, publish); n > 10 {
		t.Fatalf("a publish to 100 sessions made %.0f allocations, want a few for the push alone", n)
	}
}
