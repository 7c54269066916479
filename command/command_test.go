package duplexcmd_test

// The tests run `caddy duplex …` from the Caddy binary built from
// ./cmd/caddy (with -race) against a running Caddy of the same binary.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"github.com/caddy-duplex/duplex/internal/caddytest"
	"go.uber.org/goleak"
)

var caddyBin string

const wait = 30 * time.Second

func TestMain(m *testing.M) {
	ignore := goleak.IgnoreCurrent()
	dir, err := os.MkdirTemp("", "duplex-cmd-")
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
		if err := goleak.Find(ignore); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines left behind:\n%v\n", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

type env struct {
	HTTP, Admin int
}

func (e *env) admin() string { return fmt.Sprintf("127.0.0.1:%d", e.Admin) }
func (e *env) url() string   { return fmt.Sprintf("http://127.0.0.1:%d/live", e.HTTP) }

// startEnv runs Caddy with duplex on /live* in front of an app that
// answers /live/echo with {"echo":<body>,"method":…} and anything else
// with 204.
func startEnv(t *testing.T) *env {
	t.Helper()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if strings.HasPrefix(r.URL.Path, "/live/echo") {
			var v any
			json.Unmarshal(body, &v)
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(map[string]any{"echo": v, "method": r.Method})
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(app.Close)
	ports := caddytest.FreePorts(t, 2)
	e := &env{HTTP: ports[0], Admin: ports[1]}
	dir := t.TempDir()
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	storage file_system %s
	servers {
		protocols h1 h2c
	}
}
http://127.0.0.1:%d {
	route /live* {
		duplex {
			heartbeat 2s
		}
		reverse_proxy %s
	}
}
`, e.Admin, filepath.Join(dir, "storage"), e.HTTP, strings.TrimPrefix(app.URL, "http://"))
	cfPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfPath, []byte(cf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(caddyBin, "run", "--config", cfPath, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir+"/data", "XDG_CONFIG_HOME="+dir+"/config")
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
		if logs := out.String(); strings.Contains(logs, "DATA RACE") || strings.Contains(logs, "panic:") || t.Failed() {
			t.Errorf("caddy output:\n%s", logs)
		}
	})
	deadline := time.Now().Add(wait)
	for {
		resp, err := adminClient.Get(fmt.Sprintf("http://%s/config/", e.admin()))
		if err == nil {
			resp.Body.Close()
			if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", e.HTTP)); err == nil {
				c.Close()
				return e
			}
		}
		select {
		case <-exited:
			t.Fatalf("caddy exited:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("caddy not ready:\n%s", out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var adminClient = &http.Client{Timeout: wait, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// run runs `caddy args…` with stdin and returns its standard output,
// standard error and exit error.
func run(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

func dial(t *testing.T, e *env) *client.Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	s, err := client.Dial(ctx, e.url(), client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func nextPush(t *testing.T, s *client.Session) client.Push {
	t.Helper()
	select {
	case p, ok := <-s.Pushes():
		if !ok {
			t.Fatalf("session ended: %v", s.Err())
		}
		return p
	case <-time.After(wait):
		t.Fatal("no push")
	}
	return client.Push{}
}

func TestPublish(t *testing.T) {
	e := startEnv(t)
	s := dial(t, e)

	out, errOut, err := run(t, "", "duplex", "publish", "--admin", e.admin(), "--session", s.ID(), `{"n":1}`)
	if err != nil || !strings.Contains(out, `"delivered": 1`) {
		t.Fatalf("publish --session: %v\n%s%s", err, out, errOut)
	}
	if p := nextPush(t, s); p.Seq != 1 || string(p.Data) != `{"n":1}` {
		t.Fatalf("push %d %s", p.Seq, p.Data)
	}

	body := fmt.Sprintf(`[{"session":%q,"data":2},{"session":%q,"data":3}]`, s.ID(), s.ID())
	out, errOut, err = run(t, body, "duplex", "publish", "--admin", e.admin())
	if err != nil || !strings.Contains(out, `"delivered": 2`) {
		t.Fatalf("publish from stdin: %v\n%s%s", err, out, errOut)
	}
	for want := uint64(2); want <= 3; want++ {
		if p := nextPush(t, s); p.Seq != want || string(p.Data) != fmt.Sprint(want) {
			t.Fatalf("push %d %s, want %d", p.Seq, p.Data, want)
		}
	}

	out, _, err = run(t, "", "duplex", "publish", "--admin", e.admin(), "--session", "nosuchsession", "1")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || !strings.Contains(out, "unknown session") {
		t.Fatalf("publish to an unknown session: %v, output %q; want a failure with the API's answer", err, out)
	}
	if _, _, err := run(t, "", "duplex", "publish", "--admin", e.admin(), "{not json"); err == nil {
		t.Fatal("publish of bad JSON succeeded")
	}
}

func TestSessions(t *testing.T) {
	e := startEnv(t)
	s := dial(t, e)
	out, errOut, err := run(t, "", "duplex", "sessions", "--admin", e.admin())
	if err != nil || !strings.Contains(out, s.ID()) {
		t.Fatalf("sessions: %v\n%s%s", err, out, errOut)
	}
	out, errOut, err = run(t, "", "duplex", "sessions", "show", "--admin", e.admin(), s.ID())
	if err != nil || !strings.Contains(out, `"transport": "websocket"`) {
		t.Fatalf("sessions show: %v\n%s%s", err, out, errOut)
	}
	if _, errOut, err = run(t, "", "duplex", "sessions", "delete", "--admin", e.admin(), s.ID()); err != nil {
		t.Fatalf("sessions delete: %v\n%s", err, errOut)
	}
	select {
	case _, ok := <-s.Pushes():
		if ok {
			t.Fatal("a push, want the session's end")
		}
	case <-time.After(wait):
		t.Fatal("the deleted session did not end")
	}
	var ce *client.CloseError
	if !errors.As(s.Err(), &ce) || ce.Code != 4000 {
		t.Fatalf("session ended with %v, want close 4000", s.Err())
	}
	if _, _, err := run(t, "", "duplex", "sessions", "show", "--admin", e.admin(), s.ID()); err == nil {
		t.Fatal("sessions show of a deleted session succeeded")
	}
}

// connect relays lines to frames and frames to lines, over every transport.
func TestConnect(t *testing.T) {
	e := startEnv(t)
	for _, transport := range []string{"websocket", "stream", "sse"} {
		t.Run(transport, func(t *testing.T) {
			args := []string{"duplex", "connect", "--transport", transport, e.url()}
			if transport == "stream" {
				args = append(args, "--http", "h2")
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			cmd := exec.CommandContext(ctx, caddyBin, args...)
			stdin, _ := cmd.StdinPipe()
			stdout, _ := cmd.StdoutPipe()
			var stderr caddytest.SyncBuffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			lines := bufio.NewScanner(stdout)
			next := func() map[string]any {
				t.Helper()
				if !lines.Scan() {
					t.Fatalf("connect ended: %v\nstderr:\n%s", lines.Err(), stderr.String())
				}
				var m map[string]any
				if err := json.Unmarshal(lines.Bytes(), &m); err != nil {
					t.Fatalf("output line is not JSON: %q", lines.Text())
				}
				return m
			}
			open := next()
			id, _ := open["session"].(string)
			if open["type"] != "open" || id == "" {
				t.Fatalf("first line %v, want the open frame", open)
			}
			fmt.Fprintln(stdin, `GET /live/echo {"a":1}`)
			if f := next(); f["type"] != "reply" || f["ref"] != "1" || !strings.Contains(fmt.Sprint(f["data"]), "method:GET") {
				t.Fatalf("answer %v, want the reply to message 1", f)
			}
			fmt.Fprintln(stdin, `{"id":"x","path":"/live/other"}`)
			if f := next(); f["type"] != "ack" || f["ref"] != "x" {
				t.Fatalf("answer %v, want the ack of x", f)
			}
			if out, errOut, err := run(t, "", "duplex", "publish", "--admin", e.admin(), "--session", id, `"hello"`); err != nil {
				t.Fatalf("publish: %v\n%s%s", err, out, errOut)
			}
			if f := next(); f["type"] != "push" || f["seq"] != float64(1) || f["data"] != "hello" {
				t.Fatalf("line %v, want push 1", f)
			}
			fmt.Fprintln(stdin, `/live/echo [2]`)
			stdin.Close() // connect waits for the answer, then ends
			if f := next(); f["type"] != "reply" || f["ref"] != "2" {
				t.Fatalf("answer %v, want the reply to message 2", f)
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("connect: %v\nstderr:\n%s", err, stderr.String())
			}
			if !strings.Contains(stderr.String(), "# open: session "+id+" over "+transport) {
				t.Fatalf("stderr does not report the open:\n%s", stderr.String())
			}
		})
	}
}

// connect ends when the server ends the session, after printing its close
// frame.
func TestConnectEndsWithTheSession(t *testing.T) {
	e := startEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "duplex", "connect", "--stay", e.url())
	stdin, _ := cmd.StdinPipe()
	defer stdin.Close()
	stdout, _ := cmd.StdoutPipe()
	var stderr caddytest.SyncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		t.Fatalf("no open frame; stderr:\n%s", stderr.String())
	}
	var open struct{ Session string }
	json.Unmarshal(lines.Bytes(), &open)
	if _, errOut, err := run(t, "", "duplex", "sessions", "delete", "--admin", e.admin(), open.Session); err != nil {
		t.Fatalf("sessions delete: %v\n%s", err, errOut)
	}
	if !lines.Scan() || !strings.Contains(lines.Text(), `"type":"close"`) || !strings.Contains(lines.Text(), `"code":4000`) {
		t.Fatalf("line %q, want the close frame", lines.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("connect: %v\nstderr:\n%s", err, stderr.String())
	}
}
