package duplex_test

// Black-box integration harness: every test runs the real Caddy binary built
// from ./cmd/caddy (with -race, so server-side data races surface), a real
// upstream app in this process, and real WebSocket / HTTP clients.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/caddy-duplex/duplex/internal/caddytest"
	"go.uber.org/goleak"
)

// binDir holds the binaries built once for the whole test run, on first
// use: unit tests (frames, hub, limits, adapt) never wait for them.
var (
	binDir   string
	caddyBin string
)

// httpc is the client every test uses for plain HTTP (admin API, publish,
// non-session requests). It has its own transport so TestMain can drop its
// idle connections before checking for leaked goroutines.
var httpc = &http.Client{
	Timeout:   30 * time.Second,
	Transport: &http.Transport{Proxy: nil, DisableCompression: true},
}

var (
	caddyOnce sync.Once
	caddyErr  error
)

// caddyBinary builds Caddy with the plugin and the race detector, once per
// test run, the first time an integration test needs it.
func caddyBinary(t testing.TB) string {
	t.Helper()
	caddyOnce.Do(func() {
		start := time.Now()
		if caddyErr = caddytest.BuildRace(".", caddyBin); caddyErr != nil {
			return
		}
		fmt.Fprintf(os.Stderr, "built caddy (-race) in %s\n", time.Since(start).Round(time.Millisecond))
	})
	if caddyErr != nil {
		t.Fatal(caddyErr)
	}
	return caddyBin
}

func TestMain(m *testing.M) {
	ignore := goleak.IgnoreCurrent()

	dir, err := os.MkdirTemp("", "duplex-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkdtemp:", err)
		os.Exit(2)
	}
	binDir = dir
	caddyBin = filepath.Join(dir, "caddy")

	code := m.Run()

	if code == 0 {
		httpc.CloseIdleConnections()
		if err := goleak.Find(ignore); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left behind by the tests:\n%v\n", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// Caddy process

type caddyProc struct {
	HTTP  int
	Admin int
	Dir   string

	cmd    *exec.Cmd
	out    *caddytest.SyncBuffer
	done   chan struct{}
	waitEr error
}

// globalOpts is the global options block every test Caddyfile starts with.
// extra is inserted inside the block (e.g. "servers { protocols h1 h2 h2c }").
func globalOpts(extra string) string {
	if extra != "" {
		extra += "\n"
	}
	return "{\n\tadmin 127.0.0.1:{{.Admin}}\n\tauto_https off\n\tskip_install_trust\n\tstorage file_system {{.Storage}}\n" +
		extra + "}\n"
}

// sub replaces {{.Key}} placeholders that are not known to startCaddy
// (Upstream, Dead, ...) before the Caddyfile is rendered.
func sub(cf string, kv ...string) string {
	for i := 0; i+1 < len(kv); i += 2 {
		cf = strings.ReplaceAll(cf, "{{."+kv[i]+"}}", kv[i+1])
	}
	return cf
}

// freePorts returns n distinct free TCP ports on 127.0.0.1, none handed
// out before in this test process (caddytest.FreePorts).
func freePorts(t testing.TB, n int) []int { return caddytest.FreePorts(t, n) }

// deadAddr returns 127.0.0.1:<port> where nothing listens.
func deadAddr(t testing.TB) string {
	return "127.0.0.1:" + strconv.Itoa(freePorts(t, 1)[0])
}

// startCaddy renders the Caddyfile template ({{.HTTP}}, {{.Admin}},
// {{.Storage}}), writes it to a temp dir and runs `caddy run` on it. env
// entries (KEY=VALUE) are added to the process environment.
func startCaddy(t *testing.T, caddyfile string, env ...string) *caddyProc {
	t.Helper()
	return startCaddyBinary(t, caddyBinary, caddyfile, env...)
}

// startCaddyBinary is startCaddy with the Caddy binary that binary builds
// (e.g. one without -race, for memory measurements).
func startCaddyBinary(t *testing.T, binary func(testing.TB) string, caddyfile string, env ...string) *caddyProc {
	t.Helper()
	return startCaddyAttempt(t, 1, binary, caddyfile, env...)
}

// startCaddyAttempt is startCaddy's attempt n: one whose ports another
// process took meanwhile (this machine is shared) is tried again, on new
// ports, up to 3 times.
func startCaddyAttempt(t *testing.T, n int, binary func(testing.TB) string, caddyfile string, env ...string) *caddyProc {
	t.Helper()
	dir := t.TempDir()
	ports := freePorts(t, 2)
	c := &caddyProc{HTTP: ports[0], Admin: ports[1], Dir: dir, out: &caddytest.SyncBuffer{}, done: make(chan struct{})}

	tpl, err := template.New("Caddyfile").Option("missingkey=error").Parse(caddyfile)
	if err != nil {
		t.Fatalf("Caddyfile template: %v", err)
	}
	var rendered bytes.Buffer
	data := map[string]any{
		"HTTP":    c.HTTP,
		"Admin":   c.Admin,
		"Storage": filepath.Join(dir, "storage"),
	}
	if err := tpl.Execute(&rendered, data); err != nil {
		t.Fatalf("render Caddyfile: %v", err)
	}
	cfPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfPath, rendered.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(binary(t), "run", "--config", cfPath, "--adapter", "caddyfile")
	cmd.Dir = dir
	// If the test process is killed (a timeout), Caddy goes with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(os.Environ(),
		"HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
	)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout = c.out
	cmd.Stderr = c.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start caddy: %v", err)
	}
	c.cmd = cmd
	go func() {
		c.waitEr = cmd.Wait()
		close(c.done)
	}()

	t.Cleanup(func() {
		c.stop(t)
		logs := c.out.String()
		if strings.Contains(logs, "DATA RACE") {
			t.Errorf("caddy output contains a DATA RACE report")
		}
		if strings.Contains(logs, "panic:") {
			t.Errorf("caddy output contains a panic")
		}
		if t.Failed() {
			t.Logf("Caddyfile:\n%s", rendered.String())
			t.Logf("caddy output (exit: %v):\n%s", c.waitEr, logs)
		}
	})

	// Wait for the admin endpoint, then for the site's listener.
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-c.done:
			if n < 3 && strings.Contains(c.out.String(), "address already in use") {
				t.Logf("caddy could not listen (attempt %d), trying other ports", n)
				return startCaddyAttempt(t, n+1, binary, caddyfile, env...)
			}
			t.Fatalf("caddy exited during startup: %v\nCaddyfile:\n%s\noutput:\n%s", c.waitEr, rendered.String(), c.out.String())
		default:
		}
		resp, err := httpc.Get(c.adminURL("/config/"))
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy admin endpoint not ready within 30s (last error: %v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", c.HTTP), time.Second)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy HTTP listener not ready within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

// stop sends SIGTERM, then SIGKILL after a bounded wait, and waits for exit.
func (c *caddyProc) stop(t *testing.T) {
	select {
	case <-c.done:
		return
	default:
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(20 * time.Second):
		t.Errorf("caddy did not exit within 20s of SIGTERM; killing it")
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

func (c *caddyProc) logs() string { return c.out.String() }

// logEntries decodes Caddy's output so far, one JSON log entry per line,
// into T; lines that are not JSON (or not a T) are left out.
func logEntries[T any](c *caddyProc) []T {
	var es []T
	for _, line := range strings.Split(c.logs(), "\n") {
		var e T
		if json.Unmarshal([]byte(line), &e) == nil {
			es = append(es, e)
		}
	}
	return es
}

// linesWith returns the lines of logs that contain any of subs, for a
// failure's message (the check itself looks at logs).
func linesWith(logs string, subs ...string) []string {
	var out []string
	for _, l := range strings.Split(logs, "\n") {
		for _, s := range subs {
			if strings.Contains(l, s) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

func (c *caddyProc) url(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", c.HTTP, path)
}

func (c *caddyProc) wsURL(path string) string {
	return fmt.Sprintf("ws://127.0.0.1:%d%s", c.HTTP, path)
}

// reload loads caddyfile (rendered, see renderedConfig) through the admin
// endpoint's /load; Caddy skips a config equal to the running one.
func (c *caddyProc) reload(t *testing.T, caddyfile string) {
	t.Helper()
	resp, err := httpc.Post(c.adminURL("/load"), "text/caddyfile", strings.NewReader(caddyfile))
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %d %s", resp.StatusCode, body)
	}
}

func (c *caddyProc) adminURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", c.Admin, path)
}

// ---------------------------------------------------------------------------
// Plain HTTP helpers

// doJSON sends body (nil, string, []byte, or a value marshalled to JSON) and
// returns the status and the raw response body.
func doJSON(t *testing.T, method, url string, body any, hdr ...string) (int, []byte) {
	t.Helper()
	st, raw, err := tryJSON(method, url, body, hdr...)
	if err != nil {
		t.Fatal(err)
	}
	return st, raw
}

// tryJSON is doJSON for goroutines other than the test's (t.Fatal may
// only stop the test's own): it returns the error instead.
func tryJSON(method, url string, body any, hdr ...string) (int, []byte, error) {
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	case []byte:
		r = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return 0, nil, fmt.Errorf("marshal: %w", err)
		}
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, url, r)
	if err != nil {
		return 0, nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := httpc.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: %w", method, url, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("%s %s: read body: %w", method, url, err)
	}
	return resp.StatusCode, raw, nil
}

// decode unmarshals raw JSON, failing the test if it is not JSON.
func decode(t *testing.T, raw []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("response is not JSON (%v): %q", err, raw)
	}
	return v
}

// publish POSTs to the admin publish endpoint; returns status and JSON body.
func (c *caddyProc) publish(t *testing.T, body any) (int, map[string]any) {
	t.Helper()
	return publishTo(t, c.adminURL("/duplex/publish"), body)
}

func publishTo(t *testing.T, url string, body any) (int, map[string]any) {
	t.Helper()
	st, raw := doJSON(t, http.MethodPost, url, body)
	m, ok := decode(t, raw).(map[string]any)
	if !ok {
		t.Fatalf("publish answer is not a JSON object: %s", raw)
	}
	return st, m
}

// mustPublish publishes and asserts 200 with the given delivered count.
func (c *caddyProc) mustPublish(t *testing.T, body any, delivered int) map[string]any {
	t.Helper()
	st, m := c.publish(t, body)
	if st != http.StatusOK {
		t.Fatalf("publish %v: status %d, body %v", body, st, m)
	}
	if got, ok := m["delivered"].(float64); !ok || int(got) != delivered {
		t.Fatalf("publish %v: delivered = %v, want %d (body %v)", body, m["delivered"], delivered, m)
	}
	return m
}

// ---------------------------------------------------------------------------
// Metrics

var metricSample = regexp.MustCompile(`^(caddy_duplex_[^ ]+) ([0-9.e+-]+)$`)

// duplexMetrics reads the admin endpoint's /metrics and returns the value
// of each caddy_duplex_* sample, keyed by its name and labels as printed
// (caddy_duplex_resumes_total{result="resumed"}). It never calls t.Fatal,
// so workers may use it.
func duplexMetrics(c *caddyProc) (map[string]float64, error) {
	resp, err := httpc.Get(c.adminURL("/metrics"))
	if err != nil {
		return nil, fmt.Errorf("GET /metrics: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %d %.200s %v", resp.StatusCode, body, err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if m := metricSample.FindStringSubmatch(line); m != nil {
			v, err := strconv.ParseFloat(m[2], 64)
			if err != nil {
				return nil, fmt.Errorf("metric %q: %w", line, err)
			}
			out[m[1]] = v
		}
	}
	return out, nil
}

// scrape is duplexMetrics for the test's own goroutine.
func scrape(t *testing.T, c *caddyProc) map[string]float64 {
	t.Helper()
	m, err := duplexMetrics(c)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// duplexMetric is one sample of duplexMetrics, 0 if absent.
func duplexMetric(c *caddyProc, sample string) (float64, error) {
	m, err := duplexMetrics(c)
	return m[sample], err
}

// ---------------------------------------------------------------------------
// Upstream app

type recordedReq struct {
	Method string
	Path   string
	Query  string
	Header http.Header
	Body   []byte
}

type testApp struct {
	srv  *httptest.Server
	Addr string // 127.0.0.1:port

	mu   sync.Mutex
	reqs []recordedReq
	seq  []int // counters from /seq bodies, in arrival order

	gate     chan struct{} // /gate answers once it is closed (openGate)
	gateOnce sync.Once
}

// newTestApp starts the upstream app. Per path:
//
//	/reply        200 application/json {"echo":<body>}
//	/text         200 text/plain "hello text"
//	/binary       200 application/octet-stream 00 01 02 ff
//	/empty        204
//	/notfound     404 "nope"
//	/boom         500 "boom"
//	/slow         blocks until the request context ends
//	/gate, /live/gate 200 "opened" once openGate is called (503 if the request ends first),
//	              with Duplex-Subscribe: ?subscribe= and Duplex-Close: ?close= if given
//	/subscribe    204 Duplex-Subscribe: room:2
//	/subscribe-reply 200 JSON + Duplex-Subscribe: room:7 + Duplex-Other: x
//	/unsubscribe  204 Duplex-Unsubscribe: room:2
//	/close        200 JSON {"closing":true} + Duplex-Close: bye
//	/echo-headers 200 JSON of the received headers
//	/seq          records body.n; even n → 200 JSON {"n":n}, odd → 204
//	anything else 200 text "app:<path>"
func newTestApp(t *testing.T) *testApp {
	t.Helper()
	a := &testApp{gate: make(chan struct{})}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	a.Addr = strings.TrimPrefix(a.srv.URL, "http://")
	t.Cleanup(a.srv.Close)
	t.Cleanup(a.openGate) // before Close, which waits for the requests

	return a
}

func (a *testApp) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.reqs = append(a.reqs, recordedReq{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header.Clone(), Body: body})
	a.mu.Unlock()

	writeJSON := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		json.NewEncoder(w).Encode(v)
	}
	switch r.URL.Path {
	case "/reply":
		var v any
		if len(body) > 0 {
			if err := json.Unmarshal(body, &v); err != nil {
				v = "not json: " + string(body)
			}
		}
		writeJSON(200, map[string]any{"echo": v})
	case "/text":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, "hello text")
	case "/binary":
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write([]byte{0x00, 0x01, 0x02, 0xff})
	case "/empty":
		w.WriteHeader(http.StatusNoContent)
	case "/notfound":
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "nope")
	case "/boom":
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusInternalServerError)
		io.WriteString(w, "boom")
	case "/slow":
		select {
		case <-r.Context().Done():
		case <-time.After(30 * time.Second):
		}
		io.WriteString(w, "too late")
	case "/gate", "/live/gate":
		select {
		case <-a.gate:
			if c := r.URL.Query().Get("subscribe"); c != "" {
				w.Header().Set("Duplex-Subscribe", c)
			}
			if reason := r.URL.Query().Get("close"); reason != "" {
				w.Header().Set("Duplex-Close", reason)
			}
			io.WriteString(w, "opened")
		case <-r.Context().Done():
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	case "/subscribe":
		w.Header().Set("Duplex-Subscribe", "room:2")
		w.WriteHeader(http.StatusNoContent)
	case "/subscribe-reply":
		w.Header().Set("Duplex-Subscribe", "room:7")
		w.Header().Set("Duplex-Other", "x")
		writeJSON(200, map[string]any{"ok": true})
	case "/unsubscribe":
		w.Header().Set("Duplex-Unsubscribe", "room:2")
		w.WriteHeader(http.StatusNoContent)
	case "/close":
		w.Header().Set("Duplex-Close", "bye")
		writeJSON(200, map[string]any{"closing": true})
	case "/echo-headers":
		writeJSON(200, r.Header)
	case "/seq":
		var m struct{ N int }
		json.Unmarshal(body, &m)
		a.mu.Lock()
		a.seq = append(a.seq, m.N)
		a.mu.Unlock()
		if m.N%2 == 0 {
			writeJSON(200, map[string]any{"n": m.N})
		} else {
			w.WriteHeader(http.StatusNoContent)
		}
	default:
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "app:"+r.URL.Path)
	}
}

func (a *testApp) requests() []recordedReq {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]recordedReq(nil), a.reqs...)
}

func (a *testApp) seqs() []int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]int(nil), a.seq...)
}

// openGate lets the requests waiting on /gate, and any after them, be
// answered.
func (a *testApp) openGate() { a.gateOnce.Do(func() { close(a.gate) }) }

// byMessageID returns the request the app got for the message with that id.
func (a *testApp) byMessageID(t *testing.T, id string) recordedReq {
	t.Helper()
	var found []recordedReq
	for _, r := range a.requests() {
		if r.Header.Get("Duplex-Message-Id") == id {
			found = append(found, r)
		}
	}
	if len(found) != 1 {
		t.Fatalf("app got %d requests with Duplex-Message-Id %q, want 1 (all: %s)", len(found), id, a.describe())
	}
	return found[0]
}

// byPath returns the requests the app got on that path.
func (a *testApp) byPath(path string) []recordedReq {
	var out []recordedReq
	for _, r := range a.requests() {
		if r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

func (a *testApp) describe() string {
	var sb strings.Builder
	for _, r := range a.requests() {
		fmt.Fprintf(&sb, "\n  %s %s?%s %v body=%q", r.Method, r.Path, r.Query, r.Header, r.Body)
	}
	return sb.String()
}

// ---------------------------------------------------------------------------
// misc

func waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---------------------------------------------------------------------------
// WebSocket sessions over HTTP/1.1 with the raw client of clients_test.go
// (a *dxSession), for the tests that look at the wire.

// frameWait bounds every wait for a frame from the server.
const frameWait = 15 * time.Second

// wsTarget splits ws://host:port/path into an HTTP/1.1 target and the path.
func wsTarget(t *testing.T, url string) (target, string) {
	t.Helper()
	rest, ok := strings.CutPrefix(url, "ws://")
	if !ok {
		t.Fatalf("want a ws:// URL, got %q", url)
	}
	host, path, _ := strings.Cut(rest, "/")
	return target{proto: "h1", base: "http://" + host}, "/" + path
}

// wsClient is the WebSocket session openSession and dialWS return.
type wsClient = dxSession

// dialWS opens a WebSocket over HTTP/1.1 and fails the test unless it is
// upgraded; it reads nothing.
func dialWS(t *testing.T, url string, hdr http.Header) *dxSession {
	t.Helper()
	tg, path := wsTarget(t, url)
	return dialDX(t, "websocket", tg, path, hdr)
}

// rejectedStatus dials expecting a rejected handshake and returns its status.
func rejectedStatus(t *testing.T, url string, hdr http.Header) int {
	t.Helper()
	tg, path := wsTarget(t, url)
	rc, status, err := dialConn(tg, "websocket", path, hdr, connOpts{})
	if err == nil {
		rc.cut()
		t.Fatalf("dial %s with %v: upgraded, want the handshake rejected", url, hdr)
	}
	if status == 0 {
		t.Fatalf("dial %s: %v (want an HTTP error status)", url, err)
	}
	return status
}

// openSession dials and reads the open frame.
func openSession(t *testing.T, url string, hdr http.Header) *dxSession {
	t.Helper()
	c := dialWS(t, url, hdr)
	c.expectOpen(t)
	return c
}

func jsonEqual(a, b any) bool {
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	if err1 != nil || err2 != nil {
		return false
	}
	var va, vb any
	json.Unmarshal(ja, &va)
	json.Unmarshal(jb, &vb)
	ja, _ = json.Marshal(va)
	jb, _ = json.Marshal(vb)
	return bytes.Equal(ja, jb)
}

func hdrs(kv ...string) http.Header {
	h := http.Header{}
	for i := 0; i+1 < len(kv); i += 2 {
		h.Add(kv[i], kv[i+1])
	}
	return h
}
