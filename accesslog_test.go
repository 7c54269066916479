package duplex_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
)

// A site with an access log serves WebSocket sessions over HTTP/1.1
// without a data race: the session outlives the opening request, whose
// log line Caddy writes when the handler returns, so the session must not
// write through Caddy's byte-counting wrapper of the hijacked connection.
// The race Caddy fails the test (at cleanup) if one is reported.
func TestAccessLogWithHijackedWebSocket(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, globalOpts("")+sub(`
http://127.0.0.1:{{.HTTP}} {
	log
	route /live* {
		duplex {
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := client.Dial(ctx, c.wsURL("/live"), client.Options{Transports: []string{client.WebSocket}, HTTP: client.HTTP1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The opening's access log line is written once its handler returned:
	// the session keeps running after it.
	waitUntil(t, "the opening's access log line", frameWait, func() bool {
		return strings.Contains(c.logs(), `"uri":"/live"`)
	})
	for i := range 20 {
		if _, err := s.Call(ctx, "/live/echo", map[string]int{"n": i}); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		c.mustPublish(t, map[string]any{"session": s.ID(), "data": i}, 1)
	}
	for i := range 20 {
		select {
		case p := <-s.Pushes():
			var n int
			if err := json.Unmarshal(p.Data, &n); err != nil || n != i {
				t.Fatalf("push %d: %s (%v)", i, p.Data, err)
			}
		case <-ctx.Done():
			t.Fatalf("push %d: %v", i, ctx.Err())
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
}
