package duplex_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
)

// A site with an access log serves sessions over HTTP/1.1 without a data
// race: WebSocket, SSE and stream sessions take their connection over and
// outlive the opening request, whose log line Caddy writes when the
// handler returns, so a session must not write through Caddy's
// byte-counting wrapper of the hijacked connection. The line is written
// while the session is still open (it was written only when an SSE or
// stream connection ended, when those stayed inside their request). The
// race Caddy fails the test (at cleanup) if one is reported.
func TestAccessLogWithTakenOverConnections(t *testing.T) {
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
	for _, transport := range []string{client.WebSocket, client.SSE, client.Stream} {
		t.Run(transport, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			path := "/live/" + transport
			s, err := client.Dial(ctx, c.url(path), client.Options{Transports: []string{transport}, HTTP: client.HTTP1})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// The opening's access log line is written once its handler
			// returned: the session keeps running after it.
			waitUntil(t, "the opening's access log line", frameWait, func() bool {
				return strings.Contains(c.logs(), `"uri":"`+path+`"`)
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
		})
	}
}
