package duplex_test

import (
	"compress/gzip"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/caddytest"
)

var (
	demoOnce sync.Once
	demoBin  string
	demoErr  error
	demoOut  []byte
)

// buildDemo builds ./testdata/demo/app (with -race) once per test run.
func buildDemo(t *testing.T) string {
	t.Helper()
	demoOnce.Do(func() {
		demoBin = filepath.Join(binDir, "demo-app")
		start := time.Now()
		demoOut, demoErr = exec.Command("go", "build", "-race", "-o", demoBin, "./testdata/demo/app").CombinedOutput()
		t.Logf("built demo app in %s", time.Since(start).Round(time.Millisecond))
	})
	if demoErr != nil {
		t.Fatalf("go build ./testdata/demo/app: %v\n%s", demoErr, demoOut)
	}
	return demoBin
}

// startDemoApp runs the demo app on addr, publishing to publishURL.
func startDemoApp(t *testing.T, addr, publishURL string) {
	t.Helper()
	bin := buildDemo(t)
	out := &caddytest.SyncBuffer{}
	cmd := exec.Command(bin, "-listen", addr, "-publish", publishURL)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), "DEMO_APP_LISTEN=", "DEMO_PUBLISH_URL=")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start demo app: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		select {
		case <-done:
		default:
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-done
			}
		}
		logs := out.String()
		if strings.Contains(logs, "DATA RACE") || strings.Contains(logs, "panic:") {
			t.Errorf("demo app output contains a data race or panic")
		}
		if t.Failed() {
			t.Logf("demo app output:\n%s", logs)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-done:
			t.Fatalf("demo app exited at startup:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo app not listening within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// demoCaddyfile is testdata/demo/Caddyfile on free ports, in front of the
// demo app at appAddr.
func demoCaddyfile(t *testing.T, appAddr string) string {
	t.Helper()
	raw, err := os.ReadFile("testdata/demo/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	_, site, ok := strings.Cut(string(raw), "\n:8080 {")
	if !ok {
		t.Fatal("testdata/demo/Caddyfile: no :8080 site")
	}
	site = strings.ReplaceAll(site, "127.0.0.1:3000", appAddr)
	return globalOpts("") + "http://127.0.0.1:{{.HTTP}} {" + site
}

func TestDemoChat(t *testing.T) {
	t.Parallel()
	appAddr := "127.0.0.1:" + strconv.Itoa(freePorts(t, 1)[0])
	c := startCaddy(t, demoCaddyfile(t, appAddr))
	startDemoApp(t, appAddr, c.adminURL("/duplex/publish"))

	st, body := doJSON(t, http.MethodGet, c.url("/"), nil)
	if st != http.StatusOK || !strings.Contains(strings.ToLower(string(body)), "<html") {
		t.Fatalf("GET / through Caddy: %d %.200q, want the demo page", st, body)
	}
	if !strings.Contains(string(body), "from '/duplex.js'") {
		t.Fatalf("the demo page does not import the client from /duplex.js")
	}
	if st, body := doJSON(t, http.MethodGet, c.url("/healthz"), nil); st != http.StatusOK || string(body) != "ok" {
		t.Fatalf("GET /healthz through Caddy: %d %q", st, body)
	}
	checkClientServed(t, c.url("/duplex.js"))

	ann := openClient(t, c.wsURL("/live"), nil)
	bob := openClient(t, c.wsURL("/live"), nil)
	ann.name, bob.name = "ann", "bob"

	for i, cl := range []*dxSession{ann, bob} {
		id := "j" + strconv.Itoa(i)
		f := cl.call(t, id, "/rooms/lobby/join", nil)
		data, _ := f["data"].(map[string]any)
		if f["type"] != "reply" || f["status"] != float64(200) || data == nil {
			t.Fatalf("%s: join answer %v, want reply 200 with history", cl.name, f)
		}
		if h, ok := data["history"].([]any); !ok || len(h) != 0 {
			t.Fatalf("%s: join history %v, want an empty list", cl.name, data["history"])
		}
	}

	// ann says hi: her reply and the push may come in either order.
	ann.send(t, map[string]any{"id": "m1", "path": "/rooms/lobby", "data": map[string]any{"name": "ann", "text": "hi all"}})
	checkPush := func(cl *dxSession, f map[string]any) {
		t.Helper()
		if f["type"] != "push" || f["channel"] != "room:lobby" || f["seq"] != float64(1) {
			t.Fatalf("%s: want push seq 1 on room:lobby, got %v", cl.name, f)
		}
		d, _ := f["data"].(map[string]any)
		if d["name"] != "ann" || d["text"] != "hi all" {
			t.Fatalf("%s: push data %v, want ann: hi all", cl.name, d)
		}
		if at, _ := d["at"].(string); at == "" {
			t.Fatalf("%s: push data without time: %v", cl.name, d)
		}
	}
	gotReply, gotPush := false, false
	for !(gotReply && gotPush) {
		f := ann.readFrame(t)
		switch {
		case f["type"] == "reply" && f["ref"] == "m1" && !gotReply:
			expectFrame(t, f, map[string]any{"type": "reply", "ref": "m1", "status": 200, "data": map[string]any{"ok": true}})
			gotReply = true
		case f["type"] == "push" && !gotPush:
			checkPush(ann, f)
			gotPush = true
		default:
			t.Fatalf("ann: unexpected frame %v", f)
		}
	}
	checkPush(bob, bob.readFrame(t))

	// Bad input comes back as an error frame; nobody gets a push.
	f := bob.call(t, "m2", "/rooms/lobby", map[string]any{"name": "bob", "text": "  "})
	expectError(t, f, "m2", 400, "empty")

	// A third client joining sees the history.
	cara := openClient(t, c.wsURL("/live"), nil)
	f = cara.call(t, "j3", "/rooms/lobby/join", nil)
	data, _ := f["data"].(map[string]any)
	h, _ := data["history"].([]any)
	if len(h) != 1 {
		t.Fatalf("history for a late joiner: %v, want the one message", data)
	}

	// bob answers; all three get it as their next frame.
	bob.send(t, map[string]any{"path": "/rooms/lobby", "data": map[string]any{"name": "bob", "text": "hey ann"}})
	for _, cl := range []*dxSession{ann, bob, cara} {
		f := cl.readFrame(t)
		d, _ := f["data"].(map[string]any)
		if f["type"] != "push" || d["text"] != "hey ann" {
			t.Fatalf("%s: want bob's push, got %v", cl.name, f)
		}
	}
}

// checkClientServed checks /duplex.js as Caddy serves it behind encode:
// JavaScript, gzipped on request, with an ETag that revalidates (304).
func checkClientServed(t *testing.T, url string) {
	t.Helper()
	get := func(hdr ...string) *http.Response {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := httpc.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	resp := get("Accept-Encoding", "gzip")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/javascript; charset=utf-8" ||
		resp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("GET %s (gzip): %d, Content-Type %q, Content-Encoding %q", url, resp.StatusCode,
			resp.Header.Get("Content-Type"), resp.Header.Get("Content-Encoding"))
	}
	zr, err := gzip.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	js, err := io.ReadAll(zr)
	if err != nil || !strings.Contains(string(js), "export function connect(") {
		t.Fatalf("GET %s: not the client (%v)", url, err)
	}
	etag := resp.Header.Get("ETag")
	if !strings.HasPrefix(etag, `"`) {
		t.Fatalf("GET %s: ETag %q, want a strong one", url, etag)
	}
	if resp := get("Accept-Encoding", "gzip", "If-None-Match", etag); resp.StatusCode != http.StatusNotModified {
		t.Fatalf("GET %s with If-None-Match %s: %d, want 304", url, etag, resp.StatusCode)
	}
	plain := get()
	if plain.StatusCode != http.StatusOK || plain.Header.Get("Content-Encoding") != "" {
		t.Fatalf("GET %s (identity): %d, Content-Encoding %q", url, plain.StatusCode, plain.Header.Get("Content-Encoding"))
	}
	if resp := get("If-None-Match", plain.Header.Get("ETag")); resp.StatusCode != http.StatusNotModified {
		t.Fatalf("GET %s with If-None-Match %s: %d, want 304", url, plain.Header.Get("ETag"), resp.StatusCode)
	}
}
