package client_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"go.uber.org/goleak"
)

// caseNamed returns the test case of that name.
func caseNamed(t *testing.T, name string) tcase {
	for _, tc := range cases {
		if tc.name == name {
			return tc
		}
	}
	t.Fatalf("no case %s", name)
	return tcase{}
}

// A session deleted while its client is away: the resume opens a new
// session (resumed:false), pending calls fail with ErrSessionLost, and the
// new session numbers its pushes from 1.
func TestSessionLost(t *testing.T) {
	e := startEnv(t, "")
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", tc.port(e)))
			ev := newEvents()
			ctx := withContext(t)
			s, err := client.Dial(ctx, tc.url(e, p.addr()), tc.options(ev))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			first := ev.expectOpen(t, false)
			e.publish(t, first, 1)
			expectPushes(t, s, 1, 1)

			hold := fmt.Sprintf("/live/hold/lost/%d", i)
			pending := make(chan error, 1)
			go func() {
				_, err := s.Call(ctx, hold, nil)
				pending <- err
			}()
			e.app.waitFor(t, hold)
			p.refuseNew(true)
			p.cut()
			if st, raw := e.admin(t, http.MethodDelete, "/duplex/sessions/"+first, nil); st != http.StatusNoContent {
				t.Fatalf("DELETE session: %d %s", st, raw)
			}
			p.refuseNew(false)
			second := ev.expectOpen(t, false)
			if second == first || s.ID() != second {
				t.Fatalf("new session %q (ID %q), old %q", second, s.ID(), first)
			}
			select {
			case err := <-pending:
				if !errors.Is(err, client.ErrSessionLost) {
					t.Fatalf("pending call: %v, want ErrSessionLost", err)
				}
			case <-time.After(wait):
				t.Fatal("the pending call did not fail")
			}
			e.publish(t, second, 1)
			expectPushes(t, s, 1, 1)
			if _, err := s.Call(ctx, "/live/empty", nil); err != nil {
				t.Fatalf("call on the new session: %v", err)
			}
		})
	}
}

// A session the server closes for good ends the client's session.
func TestClosedByServer(t *testing.T) {
	e := startEnv(t, "")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			closes := make(chan client.CloseInfo, 4)
			drops := make(chan error, 4)
			o := tc.options(nil)
			o.OnClose = func(c client.CloseInfo) { closes <- c }
			o.OnDisconnect = func(err error) { drops <- err }
			s, err := client.Dial(withContext(t), tc.url(e, fmt.Sprintf("127.0.0.1:%d", tc.port(e))), o)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			if st, raw := e.admin(t, http.MethodDelete, "/duplex/sessions/"+s.ID(), nil); st != http.StatusNoContent {
				t.Fatalf("DELETE session: %d %s", st, raw)
			}
			select {
			case c := <-closes:
				if c.Code != 4000 || c.Reconnect {
					t.Fatalf("close %+v, want 4000 without reconnect", c)
				}
			case <-time.After(wait):
				t.Fatal("no close frame")
			}
			select {
			case _, ok := <-s.Pushes():
				if ok {
					t.Fatal("a push after the close")
				}
			case <-time.After(wait):
				t.Fatal("pushes not closed when the session ended")
			}
			var ce *client.CloseError
			if !errors.As(s.Err(), &ce) || ce.Code != 4000 || !errors.Is(s.Err(), client.ErrClosed) {
				t.Fatalf("Err = %v, want a CloseError 4000", s.Err())
			}
			// The connection ended after the close frame: over WebSocket
			// with a WebSocket close frame of the same code and reason.
			select {
			case err := <-drops:
				var wsc *client.WebSocketClose
				isWS := errors.As(err, &wsc)
				if tc.transport == client.WebSocket && (!isWS || wsc.Code != ce.Code || wsc.Reason != ce.Reason) {
					t.Fatalf("disconnect: %v, want a WebSocket close %d %q", err, ce.Code, ce.Reason)
				}
				if tc.transport != client.WebSocket && (isWS || err == nil || errors.Is(err, client.ErrClosed)) {
					t.Fatalf("disconnect: %v, want the end of the response", err)
				}
			case <-time.After(wait):
				t.Fatal("no disconnect")
			}
			if s.State() != client.StateClosed {
				t.Fatalf("state %v", s.State())
			}
		})
	}
}

// A connection that goes silent (no close, no data) is dead after two
// missed heartbeats: the client resumes on a new one.
func TestDeadConnection(t *testing.T) {
	e := startEnv(t, "")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", tc.port(e)))
			ev := newEvents()
			s, err := client.Dial(withContext(t), tc.url(e, p.addr()), tc.options(ev))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			id := ev.expectOpen(t, false)
			p.freeze()
			e.publish(t, id, 1)
			ev.expectOpen(t, true)
			expectPushes(t, s, 1, 1)
		})
	}
}

// The client acknowledges the pushes it received.
func TestAcks(t *testing.T) {
	e := startEnv(t, "")
	tc := caseNamed(t, "stream/h1") // frames travel as plain lines
	p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", e.HTTP))
	s, err := client.Dial(withContext(t), tc.url(e, p.addr()), tc.options(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 1; i <= 3; i++ {
		e.publish(t, s.ID(), i)
	}
	expectPushes(t, s, 1, 3)
	deadline := time.Now().Add(wait)
	for !strings.Contains(p.sentUp(), `{"type":"ack","seq":3}`) {
		if time.Now().After(deadline) {
			t.Fatalf("no ack of seq 3 sent; the client sent:\n%s", p.sentUp())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The client falls back to the next transport when one is not enabled,
// and a message sent with Send reaches the app.
func TestFallbackAndSend(t *testing.T) {
	e := startEnv(t, "transports sse")
	s, err := client.Dial(withContext(t), fmt.Sprintf("http://127.0.0.1:%d/live", e.HTTP), client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Transport() != client.SSE {
		t.Fatalf("transport %q, want sse", s.Transport())
	}
	if err := s.Send("/live/empty/sent", map[string]int{"n": 1}); err != nil {
		t.Fatal(err)
	}
	e.app.waitFor(t, "/live/empty/sent")
}

// A call given up before it was written is never sent.
func TestCanceledCallNotSent(t *testing.T) {
	e := startEnv(t, "")
	tc := caseNamed(t, "websocket/h1")
	p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", e.HTTP))
	ev := newEvents()
	s, err := client.Dial(withContext(t), tc.url(e, p.addr()), tc.options(ev))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ev.expectOpen(t, false)
	p.refuseNew(true)
	p.cut()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := s.Call(ctx, "/live/empty/canceled", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call: %v, want its deadline", err)
	}
	p.refuseNew(false)
	ev.expectOpen(t, true)
	if _, err := s.Call(withContext(t), "/live/empty/after", nil); err != nil {
		t.Fatal(err)
	}
	if n := e.app.count("/live/empty/canceled"); n != 0 {
		t.Fatalf("the canceled call reached the app %d times", n)
	}
}

// Close leaves no goroutine behind, whatever the transport.
func TestCloseLeavesNoGoroutine(t *testing.T) {
	e := startEnv(t, "")
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			httpc.CloseIdleConnections()
			before := goleak.IgnoreCurrent()
			s, err := client.Dial(withContext(t), tc.url(e, fmt.Sprintf("127.0.0.1:%d", tc.port(e))), tc.options(nil))
			if err != nil {
				t.Fatal(err)
			}
			e.publish(t, s.ID(), 1)
			expectPushes(t, s, 1, 1)
			if _, err := s.Call(withContext(t), "/live/echo", nil); err != nil {
				t.Fatal(err)
			}
			s.Close()
			httpc.CloseIdleConnections()
			// The app's server keeps Caddy's upstream connections.
			goleak.VerifyNone(t, before, goleak.IgnoreAnyFunction("net/http.(*conn).serve"))
		})
	}
}

// Importing the client does not pull in Caddy.
func TestNoCaddyDependency(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/caddy-duplex/duplex/client").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "github.com/gobwas/ws") {
		t.Fatalf("go list -deps looks wrong (no gobwas/ws):\n%s", out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "github.com/caddyserver/") {
			t.Errorf("the client depends on %s", dep)
		}
	}
}

// A message the server accepted before the connection dropped is answered
// while the session is detached; the answer comes after the resume, once.
func TestAnswerWhileDetached(t *testing.T) {
	e := startEnv(t, "")
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", tc.port(e)))
			ev := newEvents()
			ctx := withContext(t)
			s, err := client.Dial(ctx, tc.url(e, p.addr()), tc.options(ev))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			ev.expectOpen(t, false)
			hold := fmt.Sprintf("/live/hold/detached/%d", i)
			held := make(chan error, 1)
			go func() {
				r, err := s.Call(ctx, hold, nil)
				if err == nil && string(r) != `{"held":true}` {
					err = fmt.Errorf("reply %s", r)
				}
				held <- err
			}()
			e.app.waitFor(t, hold)
			p.refuseNew(true)
			p.cut()
			// The session is detached once the server sees the drop: wait
			// for the admin API to say so, then let the app answer.
			deadline := time.Now().Add(wait)
			for {
				_, raw := e.admin(t, http.MethodGet, "/duplex/sessions/"+s.ID(), nil)
				if strings.Contains(string(raw), `"attached":false`) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the session is not detached: %s", raw)
				}
				time.Sleep(20 * time.Millisecond)
			}
			e.app.release(hold)
			p.refuseNew(false)
			ev.expectOpen(t, true)
			select {
			case err := <-held:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(wait):
				t.Fatal("the call was not answered after the resume")
			}
			if n := e.app.count(hold); n != 1 {
				t.Fatalf("the app got %s %d times", hold, n)
			}
		})
	}
}

// Messages outside the session's scope (by default the opening path and
// below) are refused with 403.
func TestOutsideScope(t *testing.T) {
	e := startEnv(t, "")
	s, err := client.Dial(withContext(t), fmt.Sprintf("http://127.0.0.1:%d/live", e.HTTP), client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, err = s.Call(withContext(t), "/elsewhere", nil)
	var de *client.Error
	if !errors.As(err, &de) || de.Status != http.StatusForbidden {
		t.Fatalf("call outside /live: %v, want a *client.Error 403", err)
	}
}

// A session resumes over another transport when its own no longer opens.
func TestResumeOverAnotherTransport(t *testing.T) {
	e := startEnv(t, "")
	p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", e.HTTP))
	ev := newEvents()
	o := caseNamed(t, "websocket/h1").options(ev)
	o.Transports = []string{client.WebSocket, client.Stream, client.SSE}
	s, err := client.Dial(withContext(t), "http://"+p.addr()+"/live", o)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := ev.expectOpen(t, false)
	if s.Transport() != client.WebSocket {
		t.Fatalf("transport %q, want websocket", s.Transport())
	}
	e.publish(t, id, 1)
	expectPushes(t, s, 1, 1)
	p.refuseContaining("Upgrade: websocket")
	p.cut()
	e.publish(t, id, 2)
	ev.expectOpen(t, true)
	if s.ID() != id || s.Transport() != client.Stream {
		t.Fatalf("resumed %q over %q, want %q over stream", s.ID(), s.Transport(), id)
	}
	e.publish(t, id, 3)
	expectPushes(t, s, 2, 3)
}
