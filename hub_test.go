package duplex

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

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
	a := &attachment{s: s, h: hd, readerDone: make(chan struct{})}
	s.cur = a
	return s
}

// queued renders the frames queued for s as the client would see them.
func queued(s *session) []string {
	var out []string
	for _, f := range s.cur.out {
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
	h.subscribe(a, []string{"y", "z"}, []string{"x"})
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
	n, err := h.deliver(&publishMsg{User: "u", Close: &reason, Except: "b"})
	if n != 1 || err != nil {
		t.Fatalf("delivered %d, %v", n, err)
	}
	if c := a.cur.closing; !a.ended || c == nil || c.Code != codeClosedByApp || c.Reason != "logout" || c.Reconnect {
		t.Errorf("a: ended=%v closing=%+v", a.ended, c)
	}
	if b.ended || b.cur.closing != nil {
		t.Errorf("excepted session closed: %+v", b.cur.closing)
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
	if c := slow.cur.closing; c == nil || c.Code != codeSlowConsumer || !c.Reconnect {
		t.Errorf("slow connection not closed as slow consumer: %+v", c)
	}
	if slow.cur.outBytes > 200 {
		t.Errorf("slow connection queued %d bytes over its 200-byte send queue", slow.cur.outBytes)
	}
	if slow.ended || slow.seq != 10 {
		t.Errorf("slow session should live on for a resume: ended=%v seq=%d", slow.ended, slow.seq)
	}
	if fast.cur.closing != nil || len(fast.cur.out) != 10 {
		t.Errorf("fast session affected: closing=%+v queued=%d", fast.cur.closing, len(fast.cur.out))
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
				s.cur.out, s.cur.outBytes = s.cur.out[:0], 0
				s.log, s.logBytes = s.log[:0], 0
			}
			b.StartTimer()
		}
		if _, err := h.deliver(msg); err != nil {
			b.Fatal(err)
		}
	}
}
