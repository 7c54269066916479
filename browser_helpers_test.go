package duplex_test

// Helpers of the browser tests (browser_test.go): headless Chromium driven
// with chromedp, a page that loads the client from Caddy, a TCP proxy that
// cuts or stalls connections, and an upstream app whose answers the test
// holds back.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath finds the browser: $CHROMIUM, then chromium,
// chromium-browser, google-chrome on PATH. The browser tests do not skip
// without it: CI installs it (.ci/run).
func chromiumPath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatalf("the browser tests need Chromium: install it (Debian: apt-get install chromium) or set CHROMIUM to its path")
	return ""
}

// browser is one headless Chromium with one tab.
type browser struct {
	ctx context.Context
}

// newBrowser starts Chromium; it is stopped when the test ends.
func newBrowser(t *testing.T) *browser {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.NoSandbox, // tests may run as root
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("ignore-certificate-errors", true), // Caddy's `tls internal` certificates
		chromedp.Flag("disable-gpu", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
	})
	// The first action starts the browser, bound to the context it runs
	// with: ctx itself, not one with a timeout.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	return &browser{ctx: ctx}
}

// pageHarness is run in the page once it is loaded: it imports the client
// from Caddy and keeps what each session reports in window.T.
const pageHarness = `(async () => {
  const m = await import("/duplex.js");
  const T = { m, s: {} };
  T.open = (name, url, opts) => {
    const s = m.connect(url, opts);
    const r = { s, opens: [], pushes: [], closes: [], states: [], results: {}, readyErr: null };
    s.addEventListener("open", (e) => r.opens.push(e.detail));
    s.addEventListener("push", (e) => r.pushes.push(e.detail));
    s.addEventListener("close", (e) => r.closes.push(e.detail));
    s.addEventListener("statechange", () => r.states.push(s.state));
    s.ready.catch((e) => (r.readyErr = { name: e.name, code: e.code, status: e.status ?? null, message: e.message }));
    T.s[name] = r;
    return true;
  };
  T.call = (name, key, path, data, opts) => {
    const r = T.s[name];
    r.results[key] = { pending: true };
    r.s.call(path, data, opts).then(
      (v) => (r.results[key] = { value: v === undefined ? "(undefined)" : v }),
      (e) => (r.results[key] = { error: { name: e.name, code: e.code, status: e.status ?? null, message: e.message } }));
    return true;
  };
  T.view = (name) => {
    const r = T.s[name];
    return { state: r.s.state, id: r.s.id, transport: r.s.transport, opens: r.opens, pushes: r.pushes,
      closes: r.closes, states: r.states, results: r.results, readyErr: r.readyErr };
  };
  window.T = T;
  return true;
})()`

// open navigates to pageURL (a page of the site serving /duplex.js) and
// loads the harness.
func (b *browser) open(t *testing.T, pageURL string) {
	t.Helper()
	b.navigate(t, pageURL)
	var ok bool
	b.eval(t, pageHarness, &ok)
}

func (b *browser) navigate(t *testing.T, pageURL string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL)); err != nil {
		t.Fatalf("navigate to %s: %v", pageURL, err)
	}
}

// eval runs a JavaScript expression in the page, awaiting a promise, and
// decodes its value into out (nil: ignored).
func (b *browser) eval(t *testing.T, expr string, out any) {
	t.Helper()
	if err := b.tryEval(expr, out); err != nil {
		t.Fatalf("in the browser: %s: %v", expr, err)
	}
}

func (b *browser) tryEval(expr string, out any) error {
	ctx, cancel := context.WithTimeout(b.ctx, 60*time.Second)
	defer cancel()
	raw, err := chromedp.Run(ctx, chromedp.Evaluate[[]byte](expr, chromedp.EvalAwaitPromise))
	if err != nil {
		return err
	}
	if out != nil {
		return json.Unmarshal(raw, out)
	}
	return nil
}

// js quotes v as a JavaScript literal.
func js(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// connect opens a session named name in the page.
func (b *browser) connect(t *testing.T, name, url string, opts map[string]any) {
	t.Helper()
	if opts == nil {
		opts = map[string]any{}
	}
	b.eval(t, "T.open("+js(name)+", "+js(url)+", "+js(opts)+")", nil)
}

// call starts a call; its result appears under key in the session's view.
func (b *browser) call(t *testing.T, name, key, path string, data any, opts map[string]any) {
	t.Helper()
	if opts == nil {
		opts = map[string]any{}
	}
	b.eval(t, "T.call("+js(name)+", "+js(key)+", "+js(path)+", "+js(data)+", "+js(opts)+")", nil)
}

type jsError struct {
	Name    string `json:"name"`
	Code    string `json:"code"`
	Status  *int   `json:"status"`
	Message string `json:"message"`
}

type jsResult struct {
	Pending bool            `json:"pending"`
	Value   json.RawMessage `json:"value"`
	Error   *jsError        `json:"error"`
}

type jsPush struct {
	Seq     int             `json:"seq"`
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data"`
}

type jsOpen struct {
	Session   string `json:"session"`
	Resumed   bool   `json:"resumed"`
	Transport string `json:"transport"`
}

type jsClose struct {
	Code      int    `json:"code"`
	Reason    string `json:"reason"`
	Reconnect bool   `json:"reconnect"`
}

// sessionView is what the page saw of one session.
type sessionView struct {
	State     string              `json:"state"`
	ID        string              `json:"id"`
	Transport string              `json:"transport"`
	Opens     []jsOpen            `json:"opens"`
	Pushes    []jsPush            `json:"pushes"`
	Closes    []jsClose           `json:"closes"`
	States    []string            `json:"states"`
	Results   map[string]jsResult `json:"results"`
	ReadyErr  *jsError            `json:"readyErr"`
}

func (b *browser) view(t *testing.T, name string) sessionView {
	t.Helper()
	var v sessionView
	b.eval(t, "T.view("+js(name)+")", &v)
	return v
}

// waitView polls the session's view until cond holds (60 s at most).
func (b *browser) waitView(t *testing.T, name, what string, cond func(v sessionView) bool) sessionView {
	t.Helper()
	var v sessionView
	waitUntil(t, name+": "+what, 60*time.Second, func() bool {
		v = b.view(t, name)
		return cond(v)
	})
	return v
}

// waitOpen waits for the session's n-th open event.
func (b *browser) waitOpen(t *testing.T, name string, n int) sessionView {
	t.Helper()
	return b.waitView(t, name, "open #"+strconv.Itoa(n), func(v sessionView) bool {
		if v.ReadyErr != nil {
			t.Fatalf("%s: the session ended before it opened: %+v", name, *v.ReadyErr)
		}
		return len(v.Opens) >= n && v.State == "open"
	})
}

// result waits for the call's result.
func (b *browser) result(t *testing.T, name, key string) jsResult {
	t.Helper()
	v := b.waitView(t, name, "the result of "+key, func(v sessionView) bool {
		r, ok := v.Results[key]
		return ok && !r.Pending
	})
	return v.Results[key]
}

// seqs lists the pushes' seq numbers.
func (v sessionView) seqs() []int {
	out := make([]int, len(v.Pushes))
	for i, p := range v.Pushes {
		out[i] = p.Seq
	}
	return out
}

// ---------------------------------------------------------------------------
// A TCP proxy between the browser and Caddy.

type proxyLink struct {
	a, b   net.Conn
	mu     sync.Mutex
	cond   *sync.Cond
	paused bool
	closed bool
}

func (l *proxyLink) close() {
	l.mu.Lock()
	l.closed = true
	l.cond.Broadcast()
	l.mu.Unlock()
	l.a.Close()
	l.b.Close()
}

// pipe copies src to dst, holding the bytes (and the end of src) while the
// link is paused.
func (l *proxyLink) pipe(dst, src net.Conn) {
	defer l.close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		l.mu.Lock()
		for l.paused && !l.closed {
			l.cond.Wait()
		}
		closed := l.closed
		l.mu.Unlock()
		if closed {
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// cutProxy forwards TCP connections to target. cut closes the current
// ones, stall holds their bytes (both ways) until release; connections
// made later pass.
type cutProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	links  map[*proxyLink]bool
	wg     sync.WaitGroup
	opened int
	refuse bool // close new connections at once
}

func startProxy(t *testing.T, target string) *cutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: target, links: map[*proxyLink]bool{}}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *cutProxy) addr() string { return p.ln.Addr().String() }

func (p *cutProxy) accept() {
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refuse := p.refuse
		p.mu.Unlock()
		if refuse {
			a.Close()
			continue
		}
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			a.Close()
			continue
		}
		l := &proxyLink{a: a, b: b}
		l.cond = sync.NewCond(&l.mu)
		p.mu.Lock()
		p.links[l] = true
		p.opened++
		p.mu.Unlock()
		p.wg.Go(func() { l.pipe(b, a) })
		p.wg.Go(func() {
			l.pipe(a, b)
			p.mu.Lock()
			delete(p.links, l)
			p.mu.Unlock()
		})
	}
}

// refusing makes the proxy close new connections at once (on), or pass
// them again (off).
func (p *cutProxy) refusing(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// cut closes every current connection and reports how many there were.
func (p *cutProxy) cut() int {
	p.mu.Lock()
	links := make([]*proxyLink, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.close()
	}
	return len(links)
}

// stall holds the bytes of every current connection until release.
func (p *cutProxy) stall() []*proxyLink {
	p.mu.Lock()
	defer p.mu.Unlock()
	var links []*proxyLink
	for l := range p.links {
		l.mu.Lock()
		l.paused = true
		l.mu.Unlock()
		links = append(links, l)
	}
	return links
}

func release(links []*proxyLink) {
	for _, l := range links {
		l.mu.Lock()
		l.paused = false
		l.cond.Broadcast()
		l.mu.Unlock()
	}
}

func (p *cutProxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.opened
}

// ---------------------------------------------------------------------------
// The upstream app of the browser tests. By the last element of the path
// (/live/echo, /sse/echo, …):
//
//	echo   200 {"echo":<body>}
//	gate   held until the test opens the gate, then 200 {"gated":<body>}
//	slow   held until the request ends (message_timeout: 504)
//	boom   500 "boom"
//	empty  204
//	else   200 text "app:<path>"
type browserApp struct {
	srv  *httptest.Server
	Addr string

	mu    sync.Mutex
	ids   map[string]int // "<Duplex-Session> <Duplex-Message-Id>" → requests with it
	held  int            // requests waiting at /live/gate
	gate  chan struct{}
	paths []string
}

func newBrowserApp(t *testing.T) *browserApp {
	t.Helper()
	a := &browserApp{ids: map[string]int{}, gate: make(chan struct{})}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	a.Addr = strings.TrimPrefix(a.srv.URL, "http://")
	t.Cleanup(func() {
		a.open()
		a.srv.Close()
	})
	return a
}

func (a *browserApp) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	if id := r.Header.Get("Duplex-Message-Id"); id != "" {
		a.ids[r.Header.Get("Duplex-Session")+" "+id]++
	}
	a.paths = append(a.paths, r.URL.Path)
	gate := a.gate
	a.mu.Unlock()
	reply := func(v any) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(v)
	}
	var data any
	_ = json.Unmarshal(body, &data)
	switch path.Base(r.URL.Path) {
	case "echo":
		reply(map[string]any{"echo": data})
	case "gate":
		a.mu.Lock()
		a.held++
		a.mu.Unlock()
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		reply(map[string]any{"gated": data})
	case "slow":
		<-r.Context().Done()
	case "boom":
		http.Error(w, "boom", http.StatusInternalServerError)
	case "empty":
		w.WriteHeader(http.StatusNoContent)
	default:
		io.WriteString(w, "app:"+r.URL.Path)
	}
}

// open lets every request held at /live/gate answer.
func (a *browserApp) open() {
	a.mu.Lock()
	defer a.mu.Unlock()
	select {
	case <-a.gate:
	default:
		close(a.gate)
	}
}

func (a *browserApp) heldCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.held
}

// messageIDs returns how many requests carried each message id.
func (a *browserApp) messageIDs() map[string]int {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]int, len(a.ids))
	for k, v := range a.ids {
		out[k] = v
	}
	return out
}

// checkOnce fails the test if the app got any message twice.
func (a *browserApp) checkOnce(t *testing.T) {
	t.Helper()
	for id, n := range a.messageIDs() {
		if n != 1 {
			t.Errorf("the app got message %s (session, id) %d times, want once", id, n)
		}
	}
}

// browserSite is the site the browser tests load the client from: the
// client at /duplex.js (behind encode), an empty page at /t, and a duplex
// route at /live* whose options are duplexOpts.
func browserSite(address, duplexOpts, upstream string) string {
	return address + ` {
	encode
	handle /duplex.js {
		duplex_client
	}
	handle /t {
		header Content-Type "text/html; charset=utf-8"
		respond "<!doctype html><title>duplex browser test</title>"
	}
	route /live* {
		duplex {
			messages {
				path /live/*
			}
` + duplexOpts + `
		}
		reverse_proxy ` + upstream + `
	}
}
`
}

var errNoSession = errors.New("no such session")

// sessionInfo reads the session from Caddy's sessions API.
func sessionInfo(t *testing.T, c *caddyProc, id string) (map[string]any, error) {
	t.Helper()
	st, body := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+id), nil)
	if st == http.StatusNotFound {
		return nil, errNoSession
	}
	var m map[string]any
	if err := json.Unmarshal(body, &m); err != nil || st != http.StatusOK {
		t.Fatalf("GET /duplex/sessions/%s: %d %s", id, st, body)
	}
	return m, nil
}
