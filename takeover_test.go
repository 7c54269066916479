package duplex_test

import (
	"testing"
)

// SSE and stream sessions over HTTP/1.1 write their own response head on
// the connection they take over: it carries what handlers in front set
// (here a CORS header), the transport's content type, and Connection:
// close with a body that ends with the connection (neither chunked nor
// sized); frames then flow both ways as inside a request.
func TestTakenOverResponseHead(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	e := startDuplexEnv(t, sub(`
	route /live* {
		header Access-Control-Allow-Origin "https://app.example"
		duplex {
			messages {
				path *
			}
			user {http.request.header.X-User}
		}
		reverse_proxy {{.Upstream}}
	}
`, "Upstream", app.Addr), "")
	for _, v := range []struct{ transport, contentType string }{
		{"sse", "text/event-stream"},
		{"stream", "application/x-ndjson"},
	} {
		t.Run(v.transport, func(t *testing.T) {
			t.Parallel()
			user := "head-" + v.transport
			rc, status, err := dialConn(e.target("h1"), v.transport, "/live", hdrs("X-User", user), connOpts{})
			if err != nil {
				t.Fatalf("status %d, %v", status, err)
			}
			t.Cleanup(rc.end)
			var s *dxSession
			switch cc := rc.duplexConn.(type) {
			case *sseDuplex:
				s = &dxSession{name: v.transport, transport: v.transport, conn: cc, raw: rc}
				checkTakenOverHead(t, cc.resp.Header, cc.resp.Close, cc.resp.TransferEncoding, cc.resp.ContentLength, v.contentType)
			case *streamDuplex:
				s = &dxSession{name: v.transport, transport: v.transport, conn: cc, raw: rc}
				checkTakenOverHead(t, cc.resp.Header, cc.resp.Close, cc.resp.TransferEncoding, cc.resp.ContentLength, v.contentType)
			default:
				t.Fatalf("unexpected connection %T", rc.duplexConn)
			}
			s.expectOpen(t)
			e.c.mustPublish(t, map[string]any{"user": user, "data": map[string]any{"i": 1}}, 1)
			s.expectPush(t, "", map[string]any{"i": 1})
			id := user + "-1"
			expectFrame(t, s.call(t, id, "/reply", "z"), map[string]any{"type": "reply", "ref": id, "status": 200, "data": map[string]any{"echo": "z"}})
		})
	}
}

func checkTakenOverHead(t *testing.T, h map[string][]string, closes bool, te []string, length int64, contentType string) {
	t.Helper()
	if got := first(h["Content-Type"]); got != contentType {
		t.Errorf("Content-Type %q, want %q", got, contentType)
	}
	if got := first(h["Access-Control-Allow-Origin"]); got != "https://app.example" {
		t.Errorf("Access-Control-Allow-Origin %q: the header set in front is missing", got)
	}
	if !closes || len(te) != 0 || length != -1 {
		t.Errorf("the body should end with the connection: Close %v, Transfer-Encoding %v, Content-Length %d", closes, te, length)
	}
}

func first(v []string) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}
