package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// Centrifugo v6 beside the cluster (scenario (e)): its Redis engine on the
// same redis-server under its own key prefix, clients in insecure mode
// (anonymous, no JWT) speaking its JSON protocol over WebSocket, publishes
// through its HTTP server API. Channels keep a history as long as
// caddy-duplex's resume log (1000 pushes, the resume window) with
// force_recovery, so both sides store every push for a resume.

// centrifugoAPIKey is the server API key of the bench's Centrifugo nodes.
const centrifugoAPIKey = "bench-api-key"

// findCentrifugo returns the Centrifugo binary: flag, else
// $(go env GOPATH)/bin/centrifugo.
func findCentrifugo(flagPath string) (string, error) {
	path := flagPath
	if path == "" {
		out, err := exec.Command("go", "env", "GOPATH").Output()
		if err != nil {
			return "", fmt.Errorf("go env GOPATH: %w", err)
		}
		gopath := strings.TrimSpace(string(out))
		if i := strings.IndexByte(gopath, os.PathListSeparator); i >= 0 {
			gopath = gopath[:i]
		}
		path = filepath.Join(gopath, "bin", "centrifugo")
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("no Centrifugo binary at %s (go install github.com/centrifugal/centrifugo/v6@v6.9.1, or -centrifugo <path>): %w", path, err)
	}
	out, err := exec.Command(path, "version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s version: %w: %s", path, err, bytes.TrimSpace(out))
	}
	logf("cluster: %s", bytes.TrimSpace(out))
	return path, nil
}

// startCentrifugo starts n Centrifugo nodes on rs.
func (e *env) startCentrifugo(bin string, n int, rs *redisServer) (*system, error) {
	var (
		procs []*proc
		hosts []string
	)
	stop := func() {
		for _, p := range procs {
			p.stop(3 * time.Second)
		}
	}
	for i := range n {
		ports, err := freePorts(1)
		if err != nil {
			stop()
			return nil, err
		}
		dir, err := os.MkdirTemp(e.bins.workDir, "centrifugo-")
		if err != nil {
			stop()
			return nil, fmt.Errorf("centrifugo dir: %w", err)
		}
		cfg := map[string]any{
			"log":         map[string]any{"level": "error"},
			"http_server": map[string]any{"address": "127.0.0.1", "port": ports[0]},
			"client":      map[string]any{"insecure": true, "allowed_origins": []string{"*"}},
			"http_api":    map[string]any{"key": centrifugoAPIKey},
			"engine": map[string]any{"type": "redis", "redis": map[string]any{
				"address": []string{"redis://" + rs.addr}, "prefix": "centrifugo"}},
			"channel": map[string]any{"without_namespace": map[string]any{
				"allow_subscribe_for_client":    true,
				"allow_subscribe_for_anonymous": true,
				"history_size":                  1000,
				"history_ttl":                   clusterResumeWindow.String(),
				"force_recovery":                true,
			}},
		}
		b, _ := json.MarshalIndent(cfg, "", "  ")
		cf := filepath.Join(dir, "config.json")
		if err := os.WriteFile(cf, b, 0o644); err != nil {
			stop()
			return nil, fmt.Errorf("writing Centrifugo config: %w", err)
		}
		p, err := startProc(fmt.Sprintf("centrifugo-%d", i), dir, bin, []string{"-c", cf})
		if err != nil {
			stop()
			return nil, err
		}
		procs = append(procs, p)
		host := "127.0.0.1:" + strconv.Itoa(ports[0])
		if err := waitHTTP(p, "http://"+host+"/connection/websocket", 30*time.Second); err != nil {
			stop()
			return nil, err
		}
		hosts = append(hosts, host)
	}
	apiURL := "http://" + hosts[0] + "/api/publish"
	return &system{
		name:  sysCentrifugo,
		procs: procs,
		stop:  stop,
		open: func(i int, channel string, onPush frameFunc) (handle, error) {
			return openCentrifugo(hosts[i%len(hosts)], channel, onPush)
		},
		publish: func(channel string, data []byte) error {
			return e.publishCentrifugo(apiURL, channel, data)
		},
	}, nil
}

// publishCentrifugo publishes through Centrifugo's HTTP server API.
func (e *env) publishCentrifugo(apiURL, channel string, data []byte) error {
	body := make([]byte, 0, len(channel)+len(data)+24)
	body = append(body, `{"channel":"`...)
	body = append(body, channel...)
	body = append(body, `","data":`...)
	body = append(body, data...)
	body = append(body, '}')
	req, err := http.NewRequest(http.MethodPost, apiURL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("centrifugo publish: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-API-Key", centrifugoAPIKey)
	resp, err := e.hc.Do(req)
	if err != nil {
		return fmt.Errorf("centrifugo publish: %w", err)
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || bytes.Contains(b, []byte(`"error"`)) {
		return fmt.Errorf("centrifugo publish: status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	return nil
}

// cfSession is one Centrifugo client: a WebSocket connection, connected
// and subscribed to one channel.
type cfSession struct {
	conn net.Conn
	rw   io.ReadWriter
	once sync.Once
	done chan struct{}
}

func (s *cfSession) close()                    { s.once.Do(func() { s.conn.Close() }) }
func (s *cfSession) finished() <-chan struct{} { return s.done }

// openCentrifugo connects to host, subscribes to channel and reads its
// pushes (each push frame goes to onPush) until closed. It answers the
// server's pings ({}) with pongs.
func openCentrifugo(host, channel string, onPush frameFunc) (*cfSession, error) {
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	conn, br, _, err := ws.Dial(ctx, "ws://"+host+"/connection/websocket")
	if err != nil {
		return nil, fmt.Errorf("centrifugo: dial: %w", err)
	}
	var r io.Reader = conn
	if br != nil {
		r = io.MultiReader(br, conn)
	}
	s := &cfSession{conn: conn, rw: struct {
		io.Reader
		io.Writer
	}{r, conn}, done: make(chan struct{})}
	_ = conn.SetDeadline(time.Now().Add(openTimeout))
	cmds := `{"id":1,"connect":{}}` + "\n" + `{"id":2,"subscribe":{"channel":"` + channel + `"}}`
	if err := wsutil.WriteClientText(s.rw, []byte(cmds)); err != nil {
		conn.Close()
		return nil, fmt.Errorf("centrifugo: connect: %w", err)
	}
	subscribed := false
	for !subscribed {
		msg, err := wsutil.ReadServerText(s.rw)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("centrifugo: reading the connect and subscribe replies: %w", err)
		}
		for line := range bytes.SplitSeq(msg, []byte("\n")) {
			if bytes.Contains(line, []byte(`"error"`)) {
				conn.Close()
				return nil, fmt.Errorf("centrifugo: %s", line)
			}
			if bytes.HasPrefix(line, []byte(`{"id":2,`)) {
				subscribed = true
			}
		}
	}
	_ = conn.SetDeadline(time.Time{})
	go s.read(onPush)
	return s, nil
}

func (s *cfSession) read(onPush frameFunc) {
	defer close(s.done)
	defer s.conn.Close()
	rd := wsutil.NewReader(s.rw, ws.StateClientSide)
	rd.OnIntermediate = wsutil.ControlFrameHandler(s.rw, ws.StateClientSide)
	for {
		h, err := rd.NextFrame()
		if err != nil {
			return
		}
		if h.OpCode.IsControl() {
			if err := rd.OnIntermediate(h, rd); err != nil {
				return
			}
			continue
		}
		msg, err := io.ReadAll(rd)
		if err != nil {
			return
		}
		sc := bufio.NewScanner(bytes.NewReader(msg))
		sc.Buffer(make([]byte, 0, 4096), 1<<20)
		for sc.Scan() {
			line := sc.Bytes()
			switch {
			case bytes.Equal(line, []byte("{}")): // ping
				if err := wsutil.WriteClientText(s.rw, []byte("{}")); err != nil {
					return
				}
			case bytes.HasPrefix(line, []byte(`{"push":`)):
				onPush(line)
			}
		}
	}
}
