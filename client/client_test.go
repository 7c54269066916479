package client_test

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
)

// tcase is one transport over one HTTP version.
type tcase struct {
	name      string
	transport string
	http      string
	tls       bool
	proto     string // the HTTP version Caddy sees
}

var cases = []tcase{
	{"websocket/h1", client.WebSocket, client.HTTP1, false, "HTTP/1.1"},
	{"websocket/h1-tls", client.WebSocket, client.HTTPAuto, true, "HTTP/1.1"},
	{"websocket/h2c-rfc8441", client.WebSocket, client.HTTP2, false, "HTTP/2.0"},
	{"websocket/h2-rfc8441", client.WebSocket, client.HTTP2, true, "HTTP/2.0"},
	{"stream/h1", client.Stream, client.HTTP1, false, "HTTP/1.1"},
	{"stream/h2c", client.Stream, client.HTTP2, false, "HTTP/2.0"},
	{"stream/h2", client.Stream, client.HTTPAuto, true, "HTTP/2.0"},
	{"sse/h1", client.SSE, client.HTTP1, false, "HTTP/1.1"},
	{"sse/h2", client.SSE, client.HTTPAuto, true, "HTTP/2.0"},
}

func (tc tcase) url(e *env, host string) string {
	if tc.tls {
		return "https://" + host + "/live"
	}
	return "http://" + host + "/live"
}

func (tc tcase) options(ev *events) client.Options {
	o := client.Options{
		Transports:  []string{tc.transport},
		HTTP:        tc.http,
		TLSConfig:   &tls.Config{InsecureSkipVerify: true},
		MinBackoff:  20 * time.Millisecond,
		MaxBackoff:  200 * time.Millisecond,
		AckInterval: 20 * time.Millisecond,
	}
	if ev != nil {
		o.OnOpen = func(op client.Open) {
			ev.opens <- struct {
				session string
				resumed bool
			}{op.Session, op.Resumed}
		}
	}
	return o
}

func (tc tcase) port(e *env) int {
	if tc.tls {
		return e.HTTPS
	}
	return e.HTTP
}

// expectPushes reads pushes from..to (data = seq) in order.
func expectPushes(t *testing.T, s *client.Session, from, to int) {
	t.Helper()
	for want := from; want <= to; want++ {
		select {
		case p, ok := <-s.Pushes():
			if !ok {
				t.Fatalf("pushes closed before push %d (session error %v)", want, s.Err())
			}
			if p.Seq != uint64(want) || string(p.Data) != fmt.Sprint(want) {
				t.Fatalf("push seq %d data %s, want seq %d data %d", p.Seq, p.Data, want, want)
			}
		case <-time.After(wait):
			t.Fatalf("no push %d", want)
		}
	}
}

// expectNoPush asserts no push is waiting now (a duplicate would have
// arrived with the pushes before it).
func expectNoPush(t *testing.T, s *client.Session) {
	t.Helper()
	select {
	case p := <-s.Pushes():
		t.Fatalf("unexpected push %d %s", p.Seq, p.Data)
	default:
	}
}

func TestTransports(t *testing.T) {
	e := startEnv(t, "")
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			hold, empty := fmt.Sprintf("/live/hold/%d", i), fmt.Sprintf("/live/empty/%d", i)
			p := newProxy(t, fmt.Sprintf("127.0.0.1:%d", tc.port(e)))
			ev := newEvents()
			ctx := withContext(t)
			s, err := client.Dial(ctx, tc.url(e, p.addr()), tc.options(ev))
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			first := ev.expectOpen(t, false)
			if s.ID() != first || s.Transport() != tc.transport {
				t.Fatalf("ID %q transport %q, want %q %q", s.ID(), s.Transport(), first, tc.transport)
			}

			// reply, ack, error
			reply, err := s.Call(ctx, "/live/echo", map[string]int{"n": 1})
			if err != nil {
				t.Fatal(err)
			}
			var got struct {
				Echo      map[string]int
				Method    string
				Transport string
				Proto     string
			}
			if err := json.Unmarshal(reply, &got); err != nil || got.Echo["n"] != 1 || got.Method != "POST" {
				t.Fatalf("reply %s (%v)", reply, err)
			}
			if got.Transport != tc.transport || got.Proto != tc.proto {
				t.Fatalf("the app saw transport %q over %q, want %q over %q", got.Transport, got.Proto, tc.transport, tc.proto)
			}
			reply, err = s.CallMethod(ctx, "PUT", "/live/echo", nil)
			if err != nil || !strings.Contains(string(reply), `"method":"PUT"`) {
				t.Fatalf("PUT: %s %v", reply, err)
			}
			if reply, err := s.Call(ctx, empty, nil); err != nil || reply != nil {
				t.Fatalf("ack: %s %v, want nil nil", reply, err)
			}
			_, err = s.Call(ctx, "/live/teapot", nil)
			var de *client.Error
			if !errors.As(err, &de) || de.Status != http.StatusTeapot || de.Message != "short and stout" {
				t.Fatalf("error frame: %v, want *client.Error 418", err)
			}

			// pushes in order
			for i := 1; i <= 5; i++ {
				e.publish(t, s.ID(), i)
			}
			expectPushes(t, s, 1, 5)

			// A call pending when the connection drops, and one made
			// while it is down.
			held := make(chan error, 1)
			go func() {
				r, err := s.Call(ctx, hold, nil)
				if err == nil && string(r) != `{"held":true}` {
					err = fmt.Errorf("hold reply %s", r)
				}
				held <- err
			}()
			e.app.waitFor(t, hold)
			p.refuseNew(true)
			p.cut()
			for i := 6; i <= 8; i++ {
				e.publish(t, first, i) // delivered: detached sessions count
			}
			queued := make(chan error, 1)
			go func() {
				_, err := s.Call(ctx, empty, nil)
				queued <- err
			}()
			p.refuseNew(false)
			ev.expectOpen(t, true)
			if s.ID() != first {
				t.Fatalf("resumed as %q, want %q", s.ID(), first)
			}
			e.app.release(hold)
			for i := 9; i <= 10; i++ {
				e.publish(t, first, i)
			}
			expectPushes(t, s, 6, 10)
			for name, ch := range map[string]chan error{"held": held, "queued": queued} {
				select {
				case err := <-ch:
					if err != nil {
						t.Fatalf("%s call: %v", name, err)
					}
				case <-time.After(wait):
					t.Fatalf("%s call not answered", name)
				}
			}
			if n := e.app.count(hold); n != 1 {
				t.Fatalf("the app got %s %d times, want 1", hold, n)
			}
			if n := e.app.count(empty); n != 2 {
				t.Fatalf("the app got %s %d times, want 2", empty, n)
			}
			expectNoPush(t, s)

			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if _, ok := <-s.Pushes(); ok {
				t.Fatal("pushes not closed after Close")
			}
			if !errors.Is(s.Err(), client.ErrClosed) {
				t.Fatalf("Err after Close: %v", s.Err())
			}
			if _, err := s.Call(ctx, "/live/echo", nil); !errors.Is(err, client.ErrClosed) {
				t.Fatalf("Call after Close: %v, want ErrClosed", err)
			}
			if tc.transport == client.WebSocket {
				// Its close frame ended the session on the server.
				deadline := time.Now().Add(wait)
				for {
					st, _ := e.admin(t, http.MethodGet, "/duplex/sessions/"+first, nil)
					if st == http.StatusNotFound {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("the session is still known after Close (status %d)", st)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
}
