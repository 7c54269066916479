package duplex_test

// Where a client message may go (README: "Security defaults", "Auth once,
// and only where the session may go"): only where the messages matchers
// allow, by default the opening path and below; never into duplex or
// duplex_publish, whatever the directive order. And frame methods are
// upper-cased, CONNECT, TRACE and PRI refused.

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"golang.org/x/crypto/bcrypt"
)

func sxBasic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

func sxHash(t *testing.T, pass string) string {
	t.Helper()
	h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return string(h)
}

// sxFlatSite is the flat site block of the attack: no route, so Caddy's
// directive order puts duplex_publish after duplex, and file_server after
// both. Two duplex handlers (/live and /chat) let a message aim at the
// second one (sorted after /live*). {{.Messages}} is the live handler's messages block, if any.
const sxFlatSite = `
http://127.0.0.1:{{.HTTP}} {
	@pub path /internal/publish
	basic_auth @pub {
		publisher {{.PubHash}}
	}
	duplex_publish @pub
	duplex /live* {
		channels news
		{{.Messages}}
	}
	duplex /talk*
	basic_auth /private/* {
		alice {{.AliceHash}}
	}
	root * {{.Root}}
	file_server /private/*
	reverse_proxy /live* {{.Upstream}}
}
`

// TestScopeFlatSiteBlock: an anonymous session's frames aimed at the
// publish endpoint (push and close), at a file behind basic_auth and at
// another duplex handler are refused with error 403; the subscriber of
// news sees none of it, and keeps its session.
func TestScopeFlatSiteBlock(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, messages string }{
		{"default scope", ""},
		// Scopes that let the frames through to the handlers: duplex and
		// duplex_publish must still refuse them.
		{"scope includes every path", "messages {\n\t\t\tpath *\n\t\t}"},
		{"scope lists the publish path", "messages {\n\t\t\tpath /live* /internal/* /talk*\n\t\t}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			sxFlatSiteAttack(t, tc.messages)
		})
	}
}

func sxFlatSiteAttack(t *testing.T, messages string) {
	app := newTestApp(t)
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "private"), 0o755); err != nil {
		t.Fatal(err)
	}
	const secret = "the-secret-file-content-7f3a"
	if err := os.WriteFile(filepath.Join(root, "private", "secret.txt"), []byte(secret), 0o644); err != nil {
		t.Fatal(err)
	}
	c := startCaddy(t, sub(globalOpts("")+sxFlatSite,
		"Upstream", app.Addr, "Root", root, "Messages", messages,
		"PubHash", sxHash(t, "pubpass"), "AliceHash", sxHash(t, "alicepass")))

	// The site works as configured: the file and the publish endpoint are
	// there, behind their credentials.
	if st, _ := doJSON(t, http.MethodGet, c.url("/private/secret.txt"), nil); st != http.StatusUnauthorized {
		t.Fatalf("GET /private/secret.txt without credentials: %d, want 401", st)
	}
	if st, b := doJSON(t, http.MethodGet, c.url("/private/secret.txt"), nil, "Authorization", sxBasic("alice", "alicepass")); st != http.StatusOK || string(b) != secret {
		t.Fatalf("GET /private/secret.txt as alice: %d %q", st, b)
	}
	if st, _ := doJSON(t, http.MethodPost, c.url("/internal/publish"), map[string]any{"channel": "news", "data": "x"}); st != http.StatusUnauthorized {
		t.Fatalf("POST /internal/publish without credentials: %d, want 401", st)
	}

	subscriber := sxClient(t, c.url("/live"), client.WebSocket, nil)
	attacker := sxOpenWS(t, c.wsURL("/live"), nil)

	type attack struct {
		id    string
		frame map[string]any
	}
	attacks := []attack{
		{"forge", map[string]any{"path": "/internal/publish", "data": map[string]any{"channel": "news", "data": "forged"}}},
		{"kick", map[string]any{"path": "/internal/publish", "data": map[string]any{"channel": "news", "close": "kicked"}}},
		{"batch", map[string]any{"path": "/internal/publish", "data": []any{map[string]any{"channel": "news", "data": "forged-batch"}}}},
		{"other-duplex", map[string]any{"path": "/talk"}},
	}
	if messages == "" {
		// A scope that lists /private/* would let this through, as
		// configured: only the default scope must refuse it.
		attacks = append(attacks, attack{"file", map[string]any{"method": "GET", "path": "/private/secret.txt"}})
	}
	for _, a := range attacks {
		a.frame["id"] = a.id
		attacker.send(t, a.frame)
		f := sxNextRef(t, attacker.next, a.id)
		if f.typ() != "error" || f.status() != http.StatusForbidden {
			t.Errorf("frame %v: answer %v, want error 403", a.frame, f)
		}
		if strings.Contains(f.str("error"), secret) {
			t.Errorf("frame %v: the answer carries the secret file: %v", a.frame, f)
		}
	}
	// Nothing of it reached the app either.
	if reqs := app.requests(); len(reqs) != 0 {
		t.Errorf("the app got requests from the attacker's frames: %s", app.describe())
	}

	// The subscriber got no forged push and was not kicked: the first push
	// it sees is the real one, published with the publisher's credentials
	// (to both sessions: the attacker's is subscribed to news too).
	st, b := doJSON(t, http.MethodPost, c.url("/internal/publish"), map[string]any{"channel": "news", "data": "real"},
		"Authorization", sxBasic("publisher", "pubpass"))
	if st != http.StatusOK || !strings.Contains(string(b), `"delivered":2`) {
		t.Fatalf("authorised publish: %d %s, want 200 delivered 2", st, b)
	}
	select {
	case p, ok := <-subscriber.Pushes():
		if !ok {
			t.Fatalf("the subscriber's session ended: %v", subscriber.Err())
		}
		if p.Seq != 1 || string(p.Data) != `"real"` {
			t.Fatalf("subscriber's first push: seq %d %s, want seq 1 \"real\" (a forged push got through)", p.Seq, p.Data)
		}
	case <-time.After(sxWait):
		t.Fatal("the subscriber got no push")
	}
	if subscriber.State() != client.StateOpen {
		t.Errorf("subscriber state %v, want open", subscriber.State())
	}
	// The attacker's session is still usable where it may send.
	attacker.send(t, map[string]any{"id": "ok", "path": "/live/x"})
	if f := sxNextRef(t, attacker.next, "ok"); f.typ() != "reply" || f["data"] != "app:/live/x" {
		t.Errorf("a frame inside the scope: %v, want the app's reply", f)
	}
}

// TestScopeReadmeRouteLayout: in the README's layout (a route /live* with
// basic_auth and the README's messages block, another route /admin/*
// behind other credentials), alice's DELETE /admin/users/42 frame gets
// error 403 and never reaches the app with her identity.
func TestScopeReadmeRouteLayout(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		basic_auth {
			alice {{.AliceHash}}
		}
		duplex {
			messages {
				path /live/* /rooms/*
			}
			user {http.auth.user.id}
		}
		reverse_proxy {{.Upstream}}
	}
	route /admin/* {
		basic_auth {
			root {{.RootHash}}
		}
		reverse_proxy {{.Upstream}}
	}
	reverse_proxy {{.Upstream}} {
		header_up -Duplex-*
	}
}
`, "Upstream", app.Addr, "AliceHash", sxHash(t, "alicepass"), "RootHash", sxHash(t, "rootpass")))

	// (Without credentials: Caddy checks an unknown user against a hash
	// of cost 14, which the race detector makes very slow.)
	if st, _ := doJSON(t, http.MethodDelete, c.url("/admin/users/42"), nil); st != http.StatusUnauthorized {
		t.Fatalf("DELETE /admin/users/42 directly: %d, want 401", st)
	}
	alice := sxClient(t, c.url("/live"), client.WebSocket, hdrs("Authorization", sxBasic("alice", "alicepass")))
	ctx, cancel := context.WithTimeout(context.Background(), sxWait)
	defer cancel()

	for _, p := range []string{"/admin/users/42", "/admin", "/live", "/livex/a", "/rooms"} {
		_, err := alice.CallMethod(ctx, http.MethodDelete, p, nil)
		var e *client.Error
		if !errors.As(err, &e) || e.Status != http.StatusForbidden {
			t.Errorf("DELETE %s from alice's session: %v, want error 403", p, err)
		}
	}
	for _, r := range app.requests() {
		t.Errorf("the app got %s %s (Duplex-User %q) from a frame outside the scope", r.Method, r.Path, r.Header.Get("Duplex-User"))
	}
	// Inside the scope, her messages reach the app as hers.
	if _, err := alice.CallMethod(ctx, http.MethodDelete, "/rooms/1", nil); err != nil {
		t.Fatalf("DELETE /rooms/1: %v", err)
	}
	rs := app.byPath("/rooms/1")
	if len(rs) != 1 || rs[0].Method != http.MethodDelete || rs[0].Header.Get("Duplex-User") != "alice" {
		t.Fatalf("the app's requests on /rooms/1: %s", app.describe())
	}
}

// TestScopeMethods: frame methods are upper-cased before the app sees
// them; CONNECT, TRACE and PRI (in any case) are refused with error 400
// and never reach the app.
func TestScopeMethods(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr))
	s := sxOpenWS(t, c.wsURL("/live"), nil)
	for i, m := range []string{"get", "Delete", "pAtCh", "options"} {
		id := "ok" + itoa(i)
		s.send(t, map[string]any{"id": id, "method": m, "path": "/live/m" + itoa(i)})
		if f := sxNextRef(t, s.next, id); f.typ() != "reply" {
			t.Errorf("method %q: %v, want the app's reply", m, f)
		}
		rs := app.byPath("/live/m" + itoa(i))
		if len(rs) != 1 || rs[0].Method != strings.ToUpper(m) {
			t.Errorf("method %q: the app got %s", m, app.describe())
		}
	}
	for i, m := range []string{"TRACE", "trace", "PRI", "pri", "CONNECT", "connect", "G ET", "GET\r\nX-Evil: 1"} {
		id := "bad" + itoa(i)
		s.send(t, map[string]any{"id": id, "method": m, "path": "/live/bad" + itoa(i)})
		if f := sxNextRef(t, s.next, id); f.typ() != "error" || f.status() != http.StatusBadRequest {
			t.Errorf("method %q: %v, want error 400", m, f)
		}
		if rs := app.byPath("/live/bad" + itoa(i)); len(rs) != 0 {
			t.Errorf("method %q reached the app as %s", m, rs[0].Method)
		}
	}
}
