package duplex_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
)

// publishListenSite is a /live site whose sessions join lobby, with the
// duplex app serving the API on publish_listen addrs.
func publishListenSite(upstream string, addrs ...string) string {
	opts := ""
	if len(addrs) > 0 {
		opts = "\tduplex {\n\t\tpublish_listen " + strings.Join(addrs, " ") + "\n\t}"
	}
	return sub(globalOpts(opts)+liveSite("channels lobby"), "Upstream", upstream)
}

// listenRequest sends method url (body marshalled to JSON) through c with
// Host host ("" keeps the URL's) and headers hdr; it returns the status
// and the raw answer.
func listenRequest(t *testing.T, c *http.Client, method, url, host string, body any, hdr ...string) (int, []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		r = strings.NewReader(string(b))
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, url, err)
	}
	return resp.StatusCode, raw
}

// unixClient is an HTTP client whose every connection goes to the unix
// socket sock.
func unixClient(t *testing.T, sock string) *http.Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// TestPublishListen: publish_listen serves the publish and sessions API on
// a TCP address and a unix socket, into the same sessions (seq goes on
// across them and the admin endpoint), and refuses what a browser could
// send it.
func TestPublishListen(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	port := freePorts(t, 1)[0]
	tcp := fmt.Sprintf("127.0.0.1:%d", port)
	sock := filepath.Join(t.TempDir(), "publish.sock")
	c := startCaddy(t, publishListenSite(app.Addr, tcp, "unix/"+sock))
	a := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice"))

	viaTCP := func(body any, host string, hdr ...string) (int, []byte) {
		return listenRequest(t, httpc, http.MethodPost, "http://"+tcp+"/duplex/publish", host, body, hdr...)
	}
	uc := unixClient(t, sock)
	mustDeliver := func(what string, st int, raw []byte) {
		t.Helper()
		if st != http.StatusOK || !strings.Contains(string(raw), `"delivered":1`) {
			t.Fatalf("%s: %d %s, want 200 delivered 1", what, st, raw)
		}
	}

	st, raw := viaTCP(map[string]any{"session": a.Session, "data": "over tcp"}, "")
	mustDeliver("publish on the TCP address", st, raw)
	if p := a.expectPush(t, "", "over tcp"); p["seq"] != float64(1) {
		t.Errorf("first push: seq %v, want 1", p["seq"])
	}
	c.mustPublish(t, map[string]any{"session": a.Session, "data": "over admin"}, 1)
	a.expectPush(t, "", "over admin")
	st, raw = listenRequest(t, uc, http.MethodPost, "http://duplex/duplex/publish", "", map[string]any{"user": "alice", "data": "over unix"})
	mustDeliver("publish on the unix socket (any Host)", st, raw)
	if p := a.expectPush(t, "", "over unix"); p["seq"] != float64(3) {
		t.Errorf("third push: seq %v, want 3", p["seq"])
	}
	st, raw = viaTCP(map[string]any{"channel": "lobby", "data": "for localhost"}, "localhost:1")
	mustDeliver("publish with Host localhost", st, raw)
	a.expectPush(t, "lobby", "for localhost")

	if strings.Contains(c.logs(), "has no authentication") {
		t.Errorf("a warning about a loopback or unix publish_listen address:\n%s", c.logs())
	}

	// The sessions API is there too.
	st, raw = listenRequest(t, httpc, http.MethodGet, "http://"+tcp+"/duplex/sessions/"+a.Session, "", nil)
	if st != http.StatusOK || !strings.Contains(string(raw), a.Session) {
		t.Errorf("GET /duplex/sessions/<id>: %d %s", st, raw)
	}
	// Outside /duplex/: 404.
	if st, raw = listenRequest(t, httpc, http.MethodGet, "http://"+tcp+"/config/", "", nil); st != http.StatusNotFound {
		t.Errorf("GET /config/ on publish_listen: %d %s, want 404", st, raw)
	}

	// What a browser could send is refused, and nothing of it arrives.
	must := map[string]any{"session": a.Session, "data": "must not arrive"}
	for _, tc := range []struct {
		name string
		host string
		hdr  []string
	}{
		{"an Origin header", "", []string{"Origin", "http://127.0.0.1:" + itoa(port)}},
		{"Sec-Fetch-Mode", "", []string{"Sec-Fetch-Mode", "no-cors"}},
		{"Sec-Fetch-Site", "", []string{"Sec-Fetch-Site", "cross-site"}},
		{"a foreign Host (DNS rebinding)", "rebind.example:" + itoa(port), nil},
	} {
		st, raw := viaTCP(must, tc.host, tc.hdr...)
		if st != http.StatusForbidden || !strings.Contains(string(raw), "refused on publish_listen") {
			t.Errorf("publish with %s: %d %s, want 403 refused", tc.name, st, raw)
		}
	}
	st, raw = listenRequest(t, uc, http.MethodPost, "http://duplex/duplex/publish", "", must, "Origin", "null")
	if st != http.StatusForbidden {
		t.Errorf("publish with an Origin header on the unix socket: %d %s, want 403", st, raw)
	}
	expectMarker(t, func(body any) (int, map[string]any) {
		st, raw := viaTCP(body, "")
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			t.Fatalf("publish answer is not JSON: %s", raw)
		}
		return st, m
	}, "after the refusals", a)
}

// TestPublishListenAcrossReloads: a reload keeps publish_listen's address
// served (the new config's server takes the listener over), a config
// without it stops serving there, and a config with it again listens
// again.
func TestPublishListenAcrossReloads(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	tcp := fmt.Sprintf("127.0.0.1:%d", freePorts(t, 1)[0])
	c := startCaddy(t, publishListenSite(app.Addr, tcp))
	url := "http://" + tcp + "/duplex/publish"

	// reaches publishes to a session opened under the current config
	// through publish_listen. (A reload closes the older sessions with
	// reconnect, so each step opens its own.)
	reaches := func(what string) {
		t.Helper()
		s := openClient(t, c.wsURL("/live"), hdrs("X-User", "alice"))
		st, m := publishTo(t, url, map[string]any{"session": s.Session, "data": what})
		if st != http.StatusOK || m["delivered"] != float64(1) {
			t.Fatalf("%s: publish on publish_listen: %d %v", what, st, m)
		}
		s.expectPush(t, "", what)
	}
	reaches("before")
	cf := renderedConfig(t, c)
	// Changed (Caddy skips an unchanged config), same publish_listen.
	c.reload(t, cf+"\nhttp://127.0.0.1:"+itoa(freePorts(t, 1)[0])+" {\n\trespond ok\n}\n")
	reaches("after a reload")

	// Without publish_listen: nothing listens there any more.
	without := strings.Replace(cf, "publish_listen "+tcp, "admin_publish on", 1)
	if without == cf {
		t.Fatalf("no publish_listen line in the rendered config:\n%s", cf)
	}
	c.reload(t, without)
	if conn, err := net.Dial("tcp", tcp); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after a config without publish_listen", tcp)
	}

	c.reload(t, cf)
	reaches("listening again")
}
