package duplex_test

import (
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// A client that closes its WebSocket gets the close echoed and nothing
// after it: RFC 6455 allows no data frame after a close.
func TestClientCloseGetsNoFrameAfterEcho(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, globalOpts("")+sub(`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	cl := openSession(t, c.wsURL("/live"), nil)
	if err := cl.writeFrame(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, "bye"))); err != nil {
		t.Fatal(err)
	}
	e := cl.next(t)
	if e.wsClose == 0 || e.end != nil {
		t.Fatalf("after the client's close: %v, want the close echoed", e)
	}
	if e = cl.next(t); e.end == nil {
		t.Fatalf("after the close echo: %v, want the connection to end", e)
	}
	waitUntil(t, "the session to end", frameWait, func() bool {
		st, _ := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+cl.Session), nil)
		return st == http.StatusNotFound
	})
}

// Two sites with identical duplex blocks are two places: a session keeps
// its own site's route across a reload, also for its disconnect hook.
func TestIdenticalHandlersKeepTheirPlaces(t *testing.T) {
	t.Parallel()
	appA, appB := newTestApp(t), newTestApp(t)
	port2 := freePorts(t, 1)[0]
	site := func(port, upstream string) string {
		return `
http://127.0.0.1:` + port + ` {
	route /live* {
		duplex {
			resume_window 3s
			disconnect /live/gone
		}
		reverse_proxy ` + upstream + `
	}
}
`
	}
	cf := globalOpts("") + site("{{.HTTP}}", appA.Addr) + site(itoa(port2), appB.Addr)
	c := startCaddy(t, cf)

	cl := openSession(t, c.wsURL("/live"), nil)
	sid := cl.Session
	cl.Close() // dropped, not closed: the session waits for a resume
	waitUntil(t, "the session to be detached", frameWait, func() bool {
		_, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+sid), nil)
		return strings.Contains(string(raw), `"attached":false`)
	})
	// Reload a changed config (Caddy skips an unchanged one).
	changed := renderedConfig(t, c) + "\nhttp://127.0.0.1:" + itoa(freePorts(t, 1)[0]) + " {\n\trespond ok\n}\n"
	c.reload(t, changed)
	// The new config's handler learns its route from its first request.
	if st, _ := doJSON(t, http.MethodGet, c.url("/live/hello"), nil); st != http.StatusOK {
		t.Fatalf("GET /live/hello on site A: %d", st)
	}
	waitUntil(t, "the disconnect hook", 30*time.Second, func() bool {
		return len(appA.byPath("/live/gone"))+len(appB.byPath("/live/gone")) > 0
	})
	time.Sleep(500 * time.Millisecond) // a second, wrong hook would come now
	if got := appA.byPath("/live/gone"); len(got) != 1 || got[0].Header.Get("Duplex-Session") != sid {
		t.Errorf("site A's app got %d disconnect hooks, want 1 for %s", len(got), sid)
	}
	if got := appB.byPath("/live/gone"); len(got) != 0 {
		t.Errorf("site B's app got %d disconnect hooks for a session of site A", len(got))
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
