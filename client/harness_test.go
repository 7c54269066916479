package client_test

// The tests run the real Caddy binary built from ./cmd/caddy (with -race),
// an upstream app in this process, and a TCP proxy in front of Caddy that
// can cut, freeze and refuse connections.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/caddytest"
	"go.uber.org/goleak"
)

var caddyBin string

// httpc talks to the admin API; TestMain drops its idle connections before
// looking for leaked goroutines.
var httpc = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{Proxy: nil}}

// wait is how long a test waits for anything to happen: generous, since
// the machines are noisy; no test asserts on durations.
const wait = 30 * time.Second

func TestMain(m *testing.M) {
	ignore := goleak.IgnoreCurrent()
	dir, err := os.MkdirTemp("", "duplex-client-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	caddyBin = filepath.Join(dir, "caddy")
	if err := caddytest.BuildRace("..", caddyBin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(2)
	}
	code := m.Run()
	if code == 0 {
		httpc.CloseIdleConnections()
		if err := goleak.Find(ignore); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left behind:\n%v\n", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// Caddy

type env struct {
	HTTP, HTTPS, Admin int
	app                *app
}

// startEnv starts the upstream app and Caddy serving route /live* with
// duplex (heartbeat 1s plus duplexOpts) on a plain HTTP site (HTTP/1.1 and
// h2c) and a `tls internal` HTTPS site; RFC 8441 is on.
func startEnv(t *testing.T, duplexOpts string) *env {
	t.Helper()
	return startEnvAttempt(t, 1, duplexOpts)
}

// startEnvAttempt is startEnv's attempt n: one whose ports another process
// took meanwhile (the machine may be shared) is tried again, on new ports,
// up to 3 times.
func startEnvAttempt(t *testing.T, n int, duplexOpts string) *env {
	t.Helper()
	a := newApp(t)
	ports := caddytest.FreePorts(t, 3)
	e := &env{HTTP: ports[0], HTTPS: ports[1], Admin: ports[2], app: a}
	dir := t.TempDir()
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https disable_redirects
	skip_install_trust
	storage file_system %s
	servers {
		protocols h1 h2 h2c
	}
}
(routes) {
	route /live* {
		vars proto {http.request.proto}
		duplex {
			heartbeat 1s
			%s
		}
		reverse_proxy %s {
			header_up X-Proto {vars.proto}
		}
	}
}
http://127.0.0.1:%d {
	import routes
}
https://127.0.0.1:%d {
	tls internal
	import routes
}
`, e.Admin, filepath.Join(dir, "storage"), duplexOpts, a.addr, e.HTTP, e.HTTPS)
	cfPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfPath, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBin, "run", "--config", cfPath, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir+"/data", "XDG_CONFIG_HOME="+dir+"/config",
		"GODEBUG=http2xconnect=1")
	out := &caddytest.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		logs := out.String()
		if strings.Contains(logs, "DATA RACE") || strings.Contains(logs, "panic:") {
			t.Errorf("caddy output has a data race or a panic")
		}
		if t.Failed() {
			t.Logf("Caddyfile:\n%s\ncaddy output:\n%s", cf, logs)
		}
	})
	deadline := time.Now().Add(wait)
	ready := func() bool {
		resp, err := httpc.Get(e.adminURL("/config/"))
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return false
		}
		c, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", e.HTTPS), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			return false
		}
		c.Close()
		return true
	}
	for !ready() {
		select {
		case <-exited:
			if n < 3 && strings.Contains(out.String(), "address already in use") {
				t.Logf("caddy could not listen (attempt %d), trying other ports", n)
				return startEnvAttempt(t, n+1, duplexOpts)
			}
			t.Fatalf("caddy exited:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy not ready:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return e
}

func (e *env) adminURL(path string) string {
	return fmt.Sprintf("http://127.0.0.1:%d%s", e.Admin, path)
}

// admin sends a request to the admin API and returns status and body.
func (e *env) admin(t *testing.T, method, path string, body any) (int, []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, e.adminURL(path), r)
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpc.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, raw
}

// publish pushes data to one session and wants it delivered.
func (e *env) publish(t *testing.T, session string, data any) {
	t.Helper()
	st, raw := e.admin(t, http.MethodPost, "/duplex/publish", map[string]any{"session": session, "data": data})
	if st != http.StatusOK || !strings.Contains(string(raw), `"delivered":1`) {
		t.Fatalf("publish to %s: %d %s", session, st, raw)
	}
}

// ---------------------------------------------------------------------------
// The upstream app

// app answers messages under /live:
//
//	/live/echo…    200 {"echo":<body>,"method":…,"transport":…,"proto":…}
//	/live/empty…   204
//	/live/teapot…  418 "short and stout"
//	/live/hold…    waits for release(path), then 200 {"held":true}
//
// and counts requests per path.
type app struct {
	addr string

	mu    sync.Mutex
	holds map[string]chan struct{}
	hits  map[string]int
	got   chan string // paths, as requests arrive
}

func newApp(t *testing.T) *app {
	a := &app{holds: map[string]chan struct{}{}, hits: map[string]int{}, got: make(chan string, 1024)}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	a.addr = strings.TrimPrefix(srv.URL, "http://")
	t.Cleanup(func() {
		a.mu.Lock()
		for p := range a.holds {
			a.releaseLocked(p)
		}
		a.mu.Unlock()
		srv.Close()
	})
	return a
}

func (a *app) holdLocked(path string) chan struct{} {
	h, ok := a.holds[path]
	if !ok {
		h = make(chan struct{})
		a.holds[path] = h
	}
	return h
}

func (a *app) releaseLocked(path string) {
	h := a.holdLocked(path)
	select {
	case <-h:
	default:
		close(h)
	}
}

// release lets the requests held on path answer.
func (a *app) release(path string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.releaseLocked(path)
}

func (a *app) count(path string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hits[path]
}

// waitFor waits until the app got a request for path.
func (a *app) waitFor(t *testing.T, path string) {
	t.Helper()
	deadline := time.After(wait)
	for a.count(path) == 0 {
		select {
		case <-a.got:
		case <-deadline:
			t.Fatalf("the app got no request for %s", path)
		}
	}
}

func (a *app) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	a.mu.Lock()
	a.hits[r.URL.Path]++
	hold := a.holdLocked(r.URL.Path)
	a.mu.Unlock()
	select {
	case a.got <- r.URL.Path:
	default:
	}
	writeJSON := func(v any) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(v)
	}
	switch p := r.URL.Path; {
	case strings.HasPrefix(p, "/live/echo"):
		var v any
		json.Unmarshal(body, &v)
		writeJSON(map[string]any{"echo": v, "method": r.Method,
			"transport": r.Header.Get("Duplex-Transport"), "proto": r.Header.Get("X-Proto")})
	case strings.HasPrefix(p, "/live/empty"):
		w.WriteHeader(http.StatusNoContent)
	case strings.HasPrefix(p, "/live/teapot"):
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusTeapot)
		io.WriteString(w, "short and stout")
	case strings.HasPrefix(p, "/live/hold"):
		select {
		case <-hold:
		case <-r.Context().Done():
			return
		}
		writeJSON(map[string]any{"held": true})
	default:
		w.WriteHeader(http.StatusNotFound)
	}
}

// ---------------------------------------------------------------------------
// A TCP proxy in front of Caddy

type proxy struct {
	l      net.Listener
	target string
	wg     sync.WaitGroup

	mu     sync.Mutex // guards the fields below
	conns  map[*pconn]bool
	refuse bool // close new connections at once
	// refuseIf closes new connections whose first bytes contain it.
	refuseIf string
	upBytes  bytes.Buffer // every byte sent from clients to Caddy
}

type pconn struct {
	client, server net.Conn
	frozen         bool // forwards nothing more (guarded by proxy.mu)
}

func newProxy(t *testing.T, target string) *proxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, target: target, conns: map[*pconn]bool{}}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		l.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *proxy) addr() string { return p.l.Addr().String() }

func (p *proxy) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		refuse := p.refuse
		p.mu.Unlock()
		if refuse {
			c.Close()
			continue
		}
		p.mu.Lock()
		refuseIf := p.refuseIf
		p.mu.Unlock()
		var first []byte
		if refuseIf != "" {
			buf := make([]byte, 4096)
			c.SetReadDeadline(time.Now().Add(wait))
			n, _ := c.Read(buf)
			c.SetReadDeadline(time.Time{})
			if first = buf[:n]; bytes.Contains(first, []byte(refuseIf)) {
				c.Close()
				continue
			}
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		if _, err := s.Write(first); err != nil {
			c.Close()
			s.Close()
			continue
		}
		pc := &pconn{client: c, server: s}
		p.mu.Lock()
		p.conns[pc] = true
		p.mu.Unlock()
		p.wg.Go(func() { p.pipe(pc, c, s, true) })
		p.wg.Go(func() { p.pipe(pc, s, c, false) })
	}
}

func (p *proxy) pipe(pc *pconn, from, to net.Conn, up bool) {
	defer func() {
		from.Close()
		to.Close()
		p.mu.Lock()
		delete(p.conns, pc)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			p.mu.Lock()
			frozen := pc.frozen
			if up && !frozen {
				p.upBytes.Write(buf[:n])
			}
			p.mu.Unlock()
			if !frozen {
				if _, werr := to.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// cut closes every connection through the proxy.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.client.Close()
		pc.server.Close()
	}
}

// freeze makes the current connections forward nothing more, without
// closing them: only missed heartbeats tell they are dead.
func (p *proxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pc := range p.conns {
		pc.frozen = true
	}
}

// refuseNew closes new connections at once (or accepts them again).
func (p *proxy) refuseNew(on bool) {
	p.mu.Lock()
	p.refuse = on
	p.mu.Unlock()
}

// refuseContaining closes new connections whose first bytes contain b.
func (p *proxy) refuseContaining(b string) {
	p.mu.Lock()
	p.refuseIf = b
	p.mu.Unlock()
}

func (p *proxy) sentUp() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.upBytes.String()
}

// ---------------------------------------------------------------------------
// Session events

// events records what a session reports through its callbacks.
type events struct {
	opens chan struct {
		session string
		resumed bool
	}
}

func newEvents() *events {
	return &events{opens: make(chan struct {
		session string
		resumed bool
	}, 64)}
}

func (ev *events) expectOpen(t *testing.T, resumed bool) string {
	t.Helper()
	select {
	case o := <-ev.opens:
		if o.resumed != resumed {
			t.Fatalf("open: resumed = %v, want %v", o.resumed, resumed)
		}
		return o.session
	case <-time.After(wait):
		t.Fatalf("no open (resumed:%v)", resumed)
	}
	return ""
}

func withContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}
