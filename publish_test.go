package duplex_test

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
)

// expectMarker publishes a marker to the lobby channel (every session in
// these tests is in it) and asserts that the next frame each client sees is
// that marker: nothing else reached them before it.
func expectMarker(t *testing.T, publish func(body any) (int, map[string]any), marker string, clients ...*dxSession) {
	t.Helper()
	st, m := publish(map[string]any{"channel": "lobby", "data": marker})
	if st != http.StatusOK {
		t.Fatalf("marker publish: %d %v", st, m)
	}
	if m["delivered"] != float64(len(clients)) {
		t.Fatalf("marker publish delivered %v, want %d", m["delivered"], len(clients))
	}
	for _, c := range clients {
		c.expectPush(t, "lobby", marker)
	}
}

func expectPublishError(t *testing.T, st int, m map[string]any, want int, what string) {
	t.Helper()
	if st != want {
		t.Errorf("%s: status %d (%v), want %d", what, st, m, want)
		return
	}
	if e, ok := m["error"].(string); !ok || e == "" {
		t.Errorf("%s: answer %v has no {\"error\": ...}", what, m)
	}
}

func TestPublishTargets(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	pub := func(body any) (int, map[string]any) { return c.publish(t, body) }

	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "2"))
	b := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "3"))
	cc := openClient(t, c.wsURL("/live"), hdrs("X-User", "bob", "X-Room", "2"))
	d := openClient(t, c.wsURL("/live"), hdrs("X-User", "carol", "X-Room", "9"))
	a.name, b.name, cc.name, d.name = "A(alice,room:2)", "B(alice,room:3)", "C(bob,room:2)", "D(carol,room:9)"
	all := []*dxSession{a, b, cc, d}
	ids := map[string]bool{}
	for _, x := range all {
		ids[x.Session] = true
	}
	if len(ids) != 4 {
		t.Fatalf("session ids are not unique: %v", ids)
	}

	// channel
	c.mustPublish(t, map[string]any{"channel": "room:2", "data": "r2"}, 2)
	a.expectPush(t, "room:2", "r2")
	cc.expectPush(t, "room:2", "r2")
	// user
	c.mustPublish(t, map[string]any{"user": "alice", "data": map[string]any{"u": "alice"}}, 2)
	a.expectPush(t, "", map[string]any{"u": "alice"})
	b.expectPush(t, "", map[string]any{"u": "alice"})
	// session
	c.mustPublish(t, map[string]any{"session": cc.Session, "data": []any{"just", "C"}}, 1)
	cc.expectPush(t, "", []any{"just", "C"})
	// except
	c.mustPublish(t, map[string]any{"channel": "lobby", "data": "not A", "except": a.Session}, 3)
	b.expectPush(t, "lobby", "not A")
	cc.expectPush(t, "lobby", "not A")
	d.expectPush(t, "lobby", "not A")
	// nobody
	c.mustPublish(t, map[string]any{"channel": "room:none", "data": 0}, 0)
	c.mustPublish(t, map[string]any{"user": "nobody", "data": 0}, 0)
	// nothing else reached anyone
	expectMarker(t, pub, "marker-1", all...)

	t.Run("seq counts per session from 1", func(t *testing.T) {
		// expectPush checks seq = previous + 1 from 0; here the totals.
		for _, x := range all {
			t.Logf("%s saw %v pushes", x.name, x.seq)
		}
		if a.seq != 3 || b.seq != 3 || cc.seq != 4 || d.seq != 2 {
			t.Errorf("seqs: A %v B %v C %v D %v, want 3 3 4 2", a.seq, b.seq, cc.seq, d.seq)
		}
	})

	t.Run("batch applied in order", func(t *testing.T) {
		st, m := c.publish(t, []any{
			map[string]any{"session": d.Session, "data": 1},
			map[string]any{"channel": "room:9", "data": 2},
			map[string]any{"user": "carol", "data": 3},
			map[string]any{"channel": "room:2", "data": "r2b"},
			map[string]any{"session": d.Session, "data": 4},
		})
		if st != http.StatusOK || m["delivered"] != float64(6) {
			t.Fatalf("batch: %d %v, want 200 delivered 6", st, m)
		}
		res, _ := m["results"].([]any)
		wantRes := []float64{1, 1, 1, 2, 1}
		if len(res) != len(wantRes) {
			t.Fatalf("batch results %v, want %d entries", m["results"], len(wantRes))
		}
		for i, w := range wantRes {
			r, _ := res[i].(map[string]any)
			if r["delivered"] != w {
				t.Errorf("batch result %d = %v, want delivered %v", i, res[i], w)
			}
		}
		d.expectPush(t, "", 1)
		d.expectPush(t, "room:9", 2)
		d.expectPush(t, "", 3)
		d.expectPush(t, "", 4)
		a.expectPush(t, "room:2", "r2b")
		cc.expectPush(t, "room:2", "r2b")

		// An unknown session inside a batch: reported in its result, the
		// others still applied in order.
		st, m = c.publish(t, []any{
			map[string]any{"session": d.Session, "data": 5},
			map[string]any{"session": "no-such-session", "data": 6},
			map[string]any{"session": d.Session, "data": 7},
		})
		if st != http.StatusOK || m["delivered"] != float64(2) {
			t.Fatalf("batch with unknown session: %d %v, want 200 delivered 2", st, m)
		}
		res, _ = m["results"].([]any)
		if len(res) != 3 {
			t.Fatalf("batch results %v, want 3", m["results"])
		}
		if r, _ := res[1].(map[string]any); r["status"] != float64(404) {
			t.Errorf("unknown session's batch result = %v, want status 404", res[1])
		}
		d.expectPush(t, "", 5)
		d.expectPush(t, "", 7)
		expectMarker(t, pub, "marker-2", all...)
	})

	t.Run("unknown session is 404", func(t *testing.T) {
		st, m := c.publish(t, map[string]any{"session": "no-such-session", "data": 1})
		expectPublishError(t, st, m, http.StatusNotFound, "unknown session")
		st, m = c.publish(t, map[string]any{"session": "no-such-session", "close": "x"})
		expectPublishError(t, st, m, http.StatusNotFound, "close unknown session")
	})

	t.Run("bad bodies are 400 and change nothing", func(t *testing.T) {
		big := `{"channel":"lobby","data":"` + strings.Repeat("x", 1<<20+16) + `"}`
		bad := map[string]string{
			"bad JSON":                 `{"channel":"lobby","data":`,
			"not an object":            `"lobby"`,
			"empty body":               ``,
			"no target":                `{"data":1}`,
			"channel and user":         `{"channel":"lobby","user":"alice","data":1}`,
			"user and session":         fmt.Sprintf(`{"user":"alice","session":%q,"data":1}`, a.Session),
			"no data nor close":        `{"channel":"lobby"}`,
			"oversize":                 big,
			"batch with a bad element": `[{"channel":"lobby","data":"batch-ok"},{"data":1}]`,
		}
		names := make([]string, 0, len(bad))
		for k := range bad {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, name := range names {
			st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/publish"), bad[name])
			if st != http.StatusBadRequest {
				t.Errorf("%s: status %d (%.200s), want 400", name, st, raw)
				continue
			}
			m, ok := decode(t, raw).(map[string]any)
			if !ok || m["error"] == nil || m["error"] == "" {
				t.Errorf("%s: answer %.200s is not {\"error\":...}", name, raw)
			}
		}
		expectMarker(t, pub, "marker-3", all...)
	})
}

func TestPublishClose(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice"))
	b := openClient(t, c.wsURL("/live"), hdrs("X-User", "bob"))

	c.mustPublish(t, map[string]any{"session": a.Session, "data": "before"}, 1)
	a.expectPush(t, "", "before")
	c.mustPublish(t, map[string]any{"session": a.Session, "close": "logout"}, 1)
	a.expectClosed(t, 4000, "logout")

	st, m := c.publish(t, map[string]any{"session": a.Session, "data": "after"})
	expectPublishError(t, st, m, http.StatusNotFound, "publish to a closed session")
	if st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+a.Session), nil); st != http.StatusNotFound {
		t.Errorf("GET closed session: %d %s, want 404", st, raw)
	}
	c.mustPublish(t, map[string]any{"user": "alice", "data": "alice?"}, 0)
	expectMarker(t, func(body any) (int, map[string]any) { return c.publish(t, body) }, "still", b)
	b.call(t, "b1", "/empty", nil)
}

// sessionIDs lists sessions (with an optional query) and returns the ids.
func sessionIDs(t *testing.T, c *caddyProc, query string) map[string]map[string]any {
	t.Helper()
	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions"+query), nil)
	if st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions%s: %d %s", query, st, raw)
	}
	l, ok := decode(t, raw).([]any)
	if !ok {
		t.Fatalf("GET /duplex/sessions%s: not an array: %s", query, raw)
	}
	out := map[string]map[string]any{}
	for _, x := range l {
		m, _ := x.(map[string]any)
		id, _ := m["id"].(string)
		if id == "" {
			t.Fatalf("session entry without id: %v", x)
		}
		out[id] = m
	}
	return out
}

func sameIDs(got map[string]map[string]any, want ...*dxSession) bool {
	if len(got) != len(want) {
		return false
	}
	for _, w := range want {
		if _, ok := got[w.Session]; !ok {
			return false
		}
	}
	return true
}

func TestSessionsAPI(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+siteLive, "Upstream", app.Addr))
	pub := func(body any) (int, map[string]any) { return c.publish(t, body) }
	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "2"))
	b := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "3"))
	cc := openClient(t, c.wsURL("/live"), hdrs("X-User", "bob", "X-Room", "2"))

	list := sessionIDs(t, c, "")
	if !sameIDs(list, a, b, cc) {
		t.Fatalf("session list %v, want A B C", list)
	}
	for id, s := range list {
		for _, k := range []string{"user", "transport", "channels", "remote", "opened"} {
			if _, ok := s[k]; !ok {
				t.Errorf("session %s lacks %q: %v", id, k, s)
			}
		}
		if s["transport"] != "websocket" {
			t.Errorf("session %s transport %v, want websocket", id, s["transport"])
		}
	}
	if l := sessionIDs(t, c, "?user=alice"); !sameIDs(l, a, b) {
		t.Errorf("?user=alice: %v, want A B", l)
	}
	if l := sessionIDs(t, c, "?user=bob"); !sameIDs(l, cc) {
		t.Errorf("?user=bob: %v, want C", l)
	}
	if l := sessionIDs(t, c, "?user=nobody"); len(l) != 0 {
		t.Errorf("?user=nobody: %v, want none", l)
	}
	if l := sessionIDs(t, c, "?channel=room:2"); !sameIDs(l, a, cc) {
		t.Errorf("?channel=room:2: %v, want A C", l)
	}
	if l := sessionIDs(t, c, "?channel=lobby"); !sameIDs(l, a, b, cc) {
		t.Errorf("?channel=lobby: %v, want A B C", l)
	}

	st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+a.Session), nil)
	if st != http.StatusOK {
		t.Fatalf("GET session: %d %s", st, raw)
	}
	one, _ := decode(t, raw).(map[string]any)
	if one["id"] != a.Session || one["user"] != "alice" || one["transport"] != "websocket" {
		t.Errorf("GET session A: %v", one)
	}
	if ch := stringSet(one["channels"]); len(ch) != 2 || !ch["lobby"] || !ch["room:2"] {
		t.Errorf("session A channels %v, want [lobby room:2]", sortedKeys(ch))
	}
	if st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/no-such-session"), nil); st != http.StatusNotFound {
		t.Errorf("GET unknown session: %d %s, want 404", st, raw)
	}

	t.Run("channels add/remove", func(t *testing.T) {
		st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/sessions/"+a.Session+"/channels"),
			map[string]any{"add": []string{"news", "sports"}, "remove": []string{"lobby"}})
		if st != http.StatusOK {
			t.Fatalf("POST channels: %d %s", st, raw)
		}
		s, _ := decode(t, raw).(map[string]any)
		if ch := stringSet(s["channels"]); len(ch) != 3 || !ch["news"] || !ch["sports"] || !ch["room:2"] {
			t.Errorf("channels after add/remove: %v, want [news room:2 sports]", sortedKeys(ch))
		}
		c.mustPublish(t, map[string]any{"channel": "news", "data": "extra"}, 1)
		a.expectPush(t, "news", "extra")
		c.mustPublish(t, map[string]any{"channel": "lobby", "data": "no A"}, 2)
		b.expectPush(t, "lobby", "no A")
		cc.expectPush(t, "lobby", "no A")
		// A left the lobby: its next frame is the news marker, not "no A".
		c.mustPublish(t, map[string]any{"channel": "news", "data": "marker"}, 1)
		a.expectPush(t, "news", "marker")

		if st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/sessions/no-such-session/channels"), map[string]any{"add": []string{"x"}}); st != http.StatusNotFound {
			t.Errorf("POST channels of unknown session: %d %s, want 404", st, raw)
		}
		if st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/sessions/"+a.Session+"/channels"), `{"add":`); st != http.StatusBadRequest {
			t.Errorf("POST channels with bad JSON: %d %s, want 400", st, raw)
		}
		// put A back into the lobby for the markers below
		if st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/sessions/"+a.Session+"/channels"), map[string]any{"add": []string{"lobby"}}); st != http.StatusOK {
			t.Fatalf("POST channels add lobby: %d %s", st, raw)
		}
	})

	t.Run("delete", func(t *testing.T) {
		st, raw := doJSON(t, http.MethodDelete, c.adminURL("/duplex/sessions/"+b.Session), nil)
		if st != http.StatusNoContent {
			t.Fatalf("DELETE session: %d %s, want 204", st, raw)
		}
		b.expectClosed(t, 4000, "deleted")
		if st, raw := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+b.Session), nil); st != http.StatusNotFound {
			t.Errorf("GET deleted session: %d %s, want 404", st, raw)
		}
		if st, raw := doJSON(t, http.MethodDelete, c.adminURL("/duplex/sessions/"+b.Session), nil); st != http.StatusNotFound {
			t.Errorf("DELETE deleted session: %d %s, want 404", st, raw)
		}
		if l := sessionIDs(t, c, ""); !sameIDs(l, a, cc) {
			t.Errorf("list after delete: %v, want A C", l)
		}
		if l := sessionIDs(t, c, "?user=alice"); !sameIDs(l, a) {
			t.Errorf("?user=alice after delete: %v, want A", l)
		}
		expectMarker(t, pub, "after-delete", a, cc)
	})
}

var sitePublishRoute = siteOf(liveRoute("channels lobby room:{http.request.header.X-Room}") + `
	handle /internal/publish {
		duplex_publish
	}
`)

func TestDuplexPublishHandler(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+sitePublishRoute, "Upstream", app.Addr))
	route := c.url("/internal/publish")
	pub := func(body any) (int, map[string]any) { return publishTo(t, route, body) }

	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "1"))
	b := openClient(t, c.wsURL("/live"), hdrs("X-User", "bob", "X-Room", "2"))

	mustRoute := func(body any, delivered int) {
		t.Helper()
		st, m := pub(body)
		if st != http.StatusOK || m["delivered"] != float64(delivered) {
			t.Fatalf("route publish %v: %d %v, want 200 delivered %d", body, st, m, delivered)
		}
	}
	mustRoute(map[string]any{"channel": "room:1", "data": "one"}, 1)
	a.expectPush(t, "room:1", "one")
	mustRoute(map[string]any{"user": "bob", "data": "bob"}, 1)
	b.expectPush(t, "", "bob")
	mustRoute(map[string]any{"session": a.Session, "data": "only a"}, 1)
	a.expectPush(t, "", "only a")
	mustRoute(map[string]any{"channel": "lobby", "data": "x", "except": b.Session}, 1)
	a.expectPush(t, "lobby", "x")
	mustRoute([]any{map[string]any{"session": b.Session, "data": 1}, map[string]any{"session": b.Session, "data": 2}}, 2)
	b.expectPush(t, "", 1)
	b.expectPush(t, "", 2)

	// Same hub as the admin endpoint: seq continues across both.
	c.mustPublish(t, map[string]any{"session": a.Session, "data": "via admin"}, 1)
	a.expectPush(t, "", "via admin")

	st, m := pub(map[string]any{"session": "no-such-session", "data": 1})
	expectPublishError(t, st, m, http.StatusNotFound, "route: unknown session")
	st, raw := doJSON(t, http.MethodPost, route, `{"channel":`)
	if st != http.StatusBadRequest {
		t.Errorf("route: bad JSON: %d %s, want 400", st, raw)
	}
	st, m = pub(map[string]any{"data": 1})
	expectPublishError(t, st, m, http.StatusBadRequest, "route: no target")

	// close through the route
	mustRoute(map[string]any{"session": b.Session, "close": "route-bye"}, 1)
	b.expectClosed(t, 4000, "route-bye")
	expectMarker(t, pub, "end", a)
}

func TestAdminPublishOff(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("\tduplex {\n\t\tadmin_publish off\n\t}")+sitePublishRoute, "Upstream", app.Addr))
	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice", "X-Room", "1"))

	for _, body := range []any{
		map[string]any{"session": a.Session, "data": "must not arrive"},
		map[string]any{"channel": "lobby", "data": "must not arrive"},
		map[string]any{"user": "alice", "data": "must not arrive"},
	} {
		st, raw := doJSON(t, http.MethodPost, c.adminURL("/duplex/publish"), body)
		if st == http.StatusOK {
			t.Errorf("admin publish with admin_publish off: 200 %s, want it refused", raw)
		}
		t.Logf("admin publish with admin_publish off answered %d", st)
	}
	// The route still publishes, and its push is the first (seq 1) the
	// session sees: nothing came through the admin endpoint.
	expectMarker(t, func(body any) (int, map[string]any) { return publishTo(t, c.url("/internal/publish"), body) }, "first", a)
}
