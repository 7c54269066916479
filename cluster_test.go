package duplex_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
	"github.com/caddy-duplex/duplex/internal/redistest"
)

// startClusterRedis starts redis-server on a free port (never handed out
// to another test of this process) for a cluster
// test, without persistence, and stops it when the test ends.
func startClusterRedis(t *testing.T) *redistest.Server {
	t.Helper()
	return redistest.Start(t, 0)
}

// startCluster starts n Caddy nodes sharing r, each with the same site:
// sessions on /live (channel "room"), messages to the test app.
func startCluster(t *testing.T, r *redistest.Server, n int, app *testApp) []*caddyProc {
	t.Helper()
	return startClusterWith(t, "broker redis "+r.Addr, n, app)
}

// startClusterWith is startCluster with broker, the `broker redis …`
// option of the nodes' duplex global options.
func startClusterWith(t *testing.T, broker string, n int, app *testApp) []*caddyProc {
	t.Helper()
	cf := globalOpts("\tduplex {\n\t\t"+broker+"\n\t}") + sub(`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			channels room
			resume_window 30s
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr)
	nodes := make([]*caddyProc, n)
	for i := range nodes {
		nodes[i] = startCaddy(t, cf)
	}
	return nodes
}

// roundRobin dials the nodes in turn, whatever address the client asks
// for: a load balancer without sticky sessions. It counts the dials and
// can cut every connection it made.
type roundRobin struct {
	nodes []*caddyProc
	next  atomic.Int64
	mu    sync.Mutex
	conns []net.Conn
}

func (rr *roundRobin) dial(ctx context.Context, network, _ string) (net.Conn, error) {
	i := rr.next.Add(1) - 1
	node := rr.nodes[int(i)%len(rr.nodes)]
	var d net.Dialer
	c, err := d.DialContext(ctx, network, "127.0.0.1:"+strconv.Itoa(node.HTTP))
	if err == nil {
		rr.mu.Lock()
		rr.conns = append(rr.conns, c)
		rr.mu.Unlock()
	}
	return c, err
}

func (rr *roundRobin) cutAll() {
	rr.mu.Lock()
	defer rr.mu.Unlock()
	for _, c := range rr.conns {
		_ = c.Close()
	}
	rr.conns = nil
}

// SSE POSTs sent to a node that does not hold their session are bounded
// there as on the node holding it: at most 4 are read at once (429
// beyond), and once their bodies end they are forwarded and answered.
func TestClusterForwardedPostBounds(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	holder, other := nodes[0], nodes[1]
	s := sxOpenSSE(t, holder.url("/live"), nil)

	// Four POSTs to the other node, each read by it (100 Continue) and
	// stopping one byte short of its body.
	var reading []*readPost
	for i := range 4 {
		reading = append(reading, startReadPost(t, other, "/live", s.token(), fmt.Sprintf(`{"id":"p%d","path":"/live/ok"}`, i)))
	}
	if st, b := sxPost(t, other.url("/live"), s.token(), "application/json", []byte(`{"id":"fifth","path":"/live/ok"}`)); st != http.StatusTooManyRequests {
		t.Fatalf("a fifth POST on the forwarding node: %d %s, want 429", st, b)
	}
	for i, p := range reading {
		if st := p.finish(t); st != http.StatusAccepted {
			t.Fatalf("POST %d after its body ended: %d, want 202", i, st)
		}
	}
	// Done, they no longer count there.
	if st, b := sxPost(t, other.url("/live"), s.token(), "application/json", []byte(`{"id":"after","path":"/live/ok"}`)); st != http.StatusAccepted {
		t.Fatalf("a POST on the forwarding node after the four: %d %s, want 202", st, b)
	}
	// The node holding the session served them: each gets its reply.
	awaitReplies(t, s.next, "p0", "p1", "p2", "p3", "after")
}

// A POST read by a node while its session moves to another one (the
// client resumed its event stream there) is forwarded to where the
// session is now: answered 202, and its reply comes on the new stream.
func TestClusterForwardedPostFollowsTheSession(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 3, app)
	first := sxOpenSSE(t, nodes[0].url("/live"), nil)
	token := first.token()
	p := startReadPost(t, nodes[1], "/live", token, `{"id":"moved","path":"/live/ok"}`)
	// The stream resumes on the third node; the first one closes its
	// stream (4009).
	moved := sxOpenSSE(t, nodes[2].url("/live"), hdrs("Last-Event-ID", token+":0"))
	if moved.open["resumed"] != true {
		t.Fatalf("resume on another node: %v, want resumed:true", moved.open)
	}
	// The first node has let the session go before the POST's last byte:
	// its forward there is refused (401) and must follow the session.
	if f := awaitClose(t, first.next); f["code"] != float64(4009) {
		t.Fatalf("the first stream closed with %v, want 4009 (taken over)", f)
	}
	if st := p.finish(t); st != http.StatusAccepted {
		t.Fatalf("the POST read while its session moved: %d, want 202", st)
	}
	if f := sxNextRef(t, moved.next, "moved"); f.typ() != "reply" || f.status() != http.StatusOK {
		t.Fatalf("answer: %v, want a 200 reply", f)
	}
}

// A forward its holder does not answer within the broker's timeout is
// answered 504 (which the clients count as sent) and never sent again,
// not even to the node the session has moved to meanwhile: the holder may
// still take it once it runs again (it does here), and a second forward
// would serve the message twice.
func TestClusterForwardTimeoutNotResent(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startClusterWith(t, "broker redis {\n\t\t\taddress "+r.Addr+"\n\t\t\ttimeout 2s\n\t\t}", 3, app)
	holder, other, third := nodes[0], nodes[1], nodes[2]
	first := sxOpenSSE(t, holder.url("/live"), nil)
	token := first.token()

	// The holder stops (its subscription stays, so the forward counts as
	// received), and a POST lands on another node.
	if err := holder.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = holder.cmd.Process.Signal(syscall.SIGCONT) })
	published := redistest.Calls(t, r.Addr, "publish")
	answered := make(chan *http.Response, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, other.url("/live"), strings.NewReader(`{"id":"late","path":"/live/ok"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Duplex-Token", token)
		resp, err := httpc.Do(req)
		if err != nil {
			t.Errorf("SSE POST: %v", err)
		}
		answered <- resp
	}()
	// Once the forward is published, the session moves to the third node
	// while the forward waits for its answer.
	deadline := time.Now().Add(30 * time.Second)
	for redistest.Calls(t, r.Addr, "publish") == published {
		if time.Now().After(deadline) {
			t.Fatal("the POST was never forwarded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	moved := sxOpenSSE(t, third.url("/live"), hdrs("Last-Event-ID", token+":0"))
	if moved.open["resumed"] != true {
		t.Fatalf("resume on the third node: %v, want resumed:true", moved.open)
	}
	resp := <-answered
	if resp == nil {
		return
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("POST forwarded to a holder that never answered: %d, want 504 (the frames may still be taken: not to be sent again)", resp.StatusCode)
	}

	// The holder runs again and learns of the takeover.
	if err := holder.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if f := awaitClose(t, first.next); f["code"] != float64(4009) {
		t.Fatalf("the holder's stream closed with %v, want 4009 (taken over)", f)
	}
	// A POST now goes where the session is and is answered there. The
	// timed-out message was served once, by the holder (which had it when
	// it ran again), and its answer followed the session.
	if st, b := sxPost(t, other.url("/live"), token, "application/json", []byte(`{"id":"after","path":"/live/ok"}`)); st != http.StatusAccepted {
		t.Fatalf("POST after the holder came back: %d %s, want 202", st, b)
	}
	awaitReplies(t, moved.next, "after", "late")
	app.byMessageID(t, "late") // served once
}

// moveWhileServing starts two nodes on one Redis, opens a WebSocket
// session on the first and has it send three messages: "seen" (answered
// before the move, never confirmed by a push), "serving" (to gated, which
// the app holds until openGate) and "queued" (behind it). Once the app has
// "serving", the connection drops and the client resumes on the second
// node: the connection returned.
func moveWhileServing(t *testing.T, gated string) (*testApp, []*caddyProc, *sxWS) {
	t.Helper()
	app := newTestApp(t)
	nodes := startCluster(t, startClusterRedis(t), 2, app)
	c := sxOpenWS(t, nodes[0].wsURL("/live"), nil)
	token := c.open.str("token")
	c.send(t, map[string]any{"id": "seen", "path": "/live/ok"})
	if f := sxNextRef(t, c.next, "seen"); f.typ() != "reply" {
		t.Fatalf("answer to seen: %v, want a reply", f)
	}
	c.send(t, map[string]any{"id": "serving", "path": gated})
	c.send(t, map[string]any{"id": "queued", "path": "/live/ok"})
	deadline := time.Now().Add(30 * time.Second)
	for len(app.byPath("/live/gate")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the app never got the gated message")
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.drop()
	moved := sxOpenWS(t, nodes[1].wsURL("/live?resume="+url.QueryEscape(token+":0")), nil)
	if moved.open["resumed"] != true {
		t.Fatalf("resume on the other node: %v, want resumed:true", moved.open)
	}
	return app, nodes, moved
}

// awaitReplies reads frames from next until it has an answer to each of
// refs; every answer must be a 200 reply.
func awaitReplies(t *testing.T, next func() (sxFrame, bool), refs ...string) {
	t.Helper()
	sxAwaitAnswers(t, next, refs, func(f sxFrame) {
		if f.typ() != "reply" || f.status() != http.StatusOK {
			t.Fatalf("answer to %s: %v, want a 200 reply", f.ref(), f)
		}
	})
}

// awaitClose reads frames from next until the close frame, and returns it.
func awaitClose(t *testing.T, next func() (sxFrame, bool)) sxFrame {
	t.Helper()
	for {
		f, ok := next()
		if !ok {
			t.Fatal("the connection ended without a close frame")
		}
		if f.typ() == "close" {
			return f
		}
	}
}

// A session resumed on another node still gets the answers to the
// messages its old node accepted: the one the app was serving when the
// session moved, the one queued behind it, and the answer the client had
// not confirmed reading. The old node serves them, sends the answers to
// where the session is now, and applies the app's Duplex-Subscribe there.
func TestClusterAnswersFollowTheSession(t *testing.T) {
	t.Parallel()
	app, nodes, moved := moveWhileServing(t, "/live/gate?subscribe=late")
	app.openGate()
	awaitReplies(t, moved.next, "seen", "serving", "queued")
	if n := len(app.byPath("/live/gate")); n != 1 {
		t.Fatalf("the app got the gated message %d times, want once", n)
	}
	nodes[0].mustPublish(t, map[string]any{"channel": "late", "data": "joined"}, 1)
	for {
		f := moved.mustNext(t)
		if f.typ() == "push" {
			if f["data"] != "joined" {
				t.Fatalf("push %v, want the one to the channel the app subscribed it to", f)
			}
			break
		}
	}
}

// The app's Duplex-Close on the answer to a message served after its
// session moved closes the session where it is now, after that answer.
func TestClusterCloseFollowsTheSession(t *testing.T) {
	t.Parallel()
	app, _, moved := moveWhileServing(t, "/live/gate?close=bye")
	app.openGate()
	awaitReplies(t, moved.next, "serving") // "seen" was read: its copy may come after the close
	if f := awaitClose(t, moved.next); f["reason"] != "bye" {
		t.Fatalf("close %v, want the app's reason bye", f)
	}
}

// readPost is an SSE POST the server has started to read: sent with
// Expect: 100-continue, it got its 100 Continue (the server's handler reads
// the body) and all of its body but the last byte, which finish sends.
type readPost struct {
	*rawPost
	last []byte
}

func startReadPost(t *testing.T, c *caddyProc, path, token, body string) *readPost {
	t.Helper()
	p := startRawPost(t, c, path, token, "application/json", true, "Content-Length: "+strconv.Itoa(len(body)))
	if err := p.write([]byte(body[:len(body)-1])); err != nil {
		t.Fatalf("write body: %v", err)
	}
	return &readPost{rawPost: p, last: []byte(body[len(body)-1:])}
}

// finish sends the last byte and returns the answer's status.
func (p *readPost) finish(t *testing.T) int {
	t.Helper()
	return p.rawPost.finish(t, p.last)
}

// A publish on any node reaches the sessions on every node, once and in
// order, over every transport; delivered counts them all.
func TestClusterPublishReachesEveryNode(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var sessions []*client.Session
	for i, transport := range []string{client.WebSocket, client.SSE, client.Stream} {
		node := nodes[i%2]
		s, err := client.Dial(ctx, node.url("/live"), client.Options{Transports: []string{transport}})
		if err != nil {
			t.Fatalf("%s on node %d: %v", transport, i%2, err)
		}
		defer s.Close()
		sessions = append(sessions, s)
	}
	const pushes = 30
	for i := range pushes {
		body := map[string]any{"channel": "room", "data": i}
		nodes[i%2].mustPublish(t, body, len(sessions))
	}
	for si, s := range sessions {
		expectCountedPushes(ctx, t, s, pushes, fmt.Sprintf("session %d (%s)", si, s.Transport()))
	}
	// A session target and a user-less session's info on the other node.
	st, _ := doJSON(t, http.MethodPost, nodes[1].adminURL("/duplex/publish"),
		map[string]any{"session": sessions[0].ID(), "data": "only you"})
	if st != http.StatusOK {
		t.Fatalf("publish to a session held by the other node: %d", st)
	}
	if p := nextPush(ctx, t, sessions[0], "session push"); string(p.Data) != `"only you"` {
		t.Fatalf("session push: %s", p.Data)
	}
}

// Clients whose connections are cut resume on the next node (no sticky
// sessions) while both nodes publish: every push arrives exactly once, in
// order, and every resume says resumed:true.
func TestClusterResumeOnAnotherNode(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	type peer struct {
		s       *client.Session
		rr      *roundRobin
		opens   atomic.Int32
		resumed atomic.Int32
	}
	var peers []*peer
	for _, transport := range []string{client.WebSocket, client.SSE, client.Stream} {
		p := &peer{rr: &roundRobin{nodes: nodes}}
		s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
			Transports:  []string{transport},
			DialContext: p.rr.dial,
			MinBackoff:  10 * time.Millisecond,
			MaxBackoff:  200 * time.Millisecond,
			OnOpen: func(o client.Open) {
				p.opens.Add(1)
				if o.Resumed {
					p.resumed.Add(1)
				}
			},
		})
		if err != nil {
			t.Fatalf("%s: %v", transport, err)
		}
		defer s.Close()
		p.s = s
		peers = append(peers, p)
	}

	const pushes = 60
	for i := range pushes {
		if i%10 == 5 {
			for _, p := range peers {
				p.rr.cutAll()
			}
		}
		nodes[i%2].mustPublish(t, map[string]any{"channel": "room", "data": i}, len(peers))
	}
	for _, p := range peers {
		expectCountedPushes(ctx, t, p.s, pushes, p.s.Transport())
		if p.opens.Load() < 2 {
			t.Errorf("%s: %d openings: the cuts did not make it reconnect", p.s.Transport(), p.opens.Load())
		}
		if p.resumed.Load() != p.opens.Load()-1 {
			t.Errorf("%s: %d of %d reconnections resumed the session", p.s.Transport(), p.resumed.Load(), p.opens.Load()-1)
		}
		// A message still reaches the app from whichever node holds it now.
		if _, err := p.s.Call(ctx, "/live/echo", map[string]string{"from": p.s.Transport()}); err != nil {
			t.Errorf("%s: call after the resumes: %v", p.s.Transport(), err)
		}
	}
}

// With Redis stopped, publishes and new openings answer 503 with
// Retry-After, and open sessions still reach the app; when Redis
// continues, so does publishing.
func TestClusterRedisUnavailable(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 1, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{Transports: []string{client.WebSocket}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	if err := r.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodPost, nodes[0].adminURL("/duplex/publish"), strings.NewReader(`{"channel":"room","data":1}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("publish with Redis stopped: %d Retry-After %q; want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	req, _ = http.NewRequest(http.MethodGet, nodes[0].url("/live"), nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err = http.DefaultClient.Do(req)
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("SSE opening with Redis stopped: %v %v; want 503", err, resp)
	}
	if _, err := s.Call(ctx, "/live/echo", "still here"); err != nil {
		t.Fatalf("a message of an open session with Redis stopped: %v", err)
	}

	if err := r.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// A 503 says the push may not be stored; one sent to a stopped Redis
	// may still be applied when it continues. The id keeps the retries of
	// this one from applying twice.
	waitUntil(t, "publishing to work again", time.Minute, func() bool {
		st, _ := doJSON(t, http.MethodPost, nodes[0].adminURL("/duplex/publish"),
			map[string]any{"channel": "room", "data": 2, "id": "after-stop"})
		return st == http.StatusOK
	})
	for {
		p := nextPush(ctx, t, s, "the retried push")
		if string(p.Data) == "2" {
			break
		}
		if string(p.Data) != "1" { // 1: the publish answered 503, applied when Redis continued
			t.Fatalf("push after Redis continued: %s", p.Data)
		}
	}
	select {
	case p := <-s.Pushes():
		t.Fatalf("a push after the retried one: seq %d %s", p.Seq, p.Data)
	case <-time.After(500 * time.Millisecond):
	}
}

// An ack that advances trims the session's log in Redis without holding
// the session's next message: with Redis stopped (and a broker timeout far
// longer than the wait for the reply) the message after the ack is still
// answered, and the trim lands once Redis continues.
func TestClusterAckDoesNotWaitOnRedis(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	node := startClusterWith(t, "broker redis {\n\t\t\taddress "+r.Addr+"\n\t\t\ttimeout 10m\n\t\t}", 1, app)[0]
	// Before the nodes stop (cleanups run last first): a node stopping
	// while Redis is stopped would wait on it.
	t.Cleanup(func() { _ = r.Cmd.Process.Signal(syscall.SIGCONT) })

	c := sxOpenWS(t, node.wsURL("/live"), nil)
	id := c.open.str("session")
	const pushes = 21
	for i := 1; i <= pushes; i++ {
		node.mustPublish(t, map[string]any{"session": id, "data": i}, 1)
		if f := c.mustNext(t); f.typ() != "push" || f["seq"] != float64(i) {
			t.Fatalf("push %d: got %v", i, f)
		}
	}
	// The session's log, by redisbroker's key names (keys.go) with the
	// default prefix; its entries are <seq>-1.
	firstInLog := func() string {
		first, _, _ := strings.Cut(redistest.CLI(t, r.Addr, "XRANGE", "duplex:s:{"+id+"}:log", "-", "+", "COUNT", "1"), "\n")
		return first
	}
	if got := firstInLog(); got != "1-1" {
		t.Fatalf("log starts at %q before the acks; want 1-1", got)
	}
	trimsBefore := redistest.Calls(t, r.Addr, "xtrim")

	if err := r.Cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// Every ack but the last arrives while the first one's trim waits on
	// Redis: they make at most one more trim, to the newest.
	for seq := 1; seq < pushes; seq++ {
		c.send(t, map[string]any{"type": "ack", "seq": seq})
	}
	c.send(t, map[string]any{"type": "message", "id": "after-ack", "path": "/live/echo", "data": "hi"})
	if f := sxNextRef(t, c.next, "after-ack"); f.typ() != "reply" {
		t.Fatalf("answer to the message after the acks, Redis stopped: %v", f)
	}

	if err := r.Cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	want := strconv.Itoa(pushes) + "-1"
	waitUntil(t, "the log trimmed up to the last ack", time.Minute, func() bool { return firstInLog() == want })
	if n := redistest.Calls(t, r.Addr, "xtrim") - trimsBefore; n > 2 {
		t.Fatalf("%d acks made %d trims, want at most 2 (the first, then the newest)", pushes-1, n)
	}
}

// GET /duplex/cluster lists the live nodes on any node; the metrics count
// them and time Redis; session logs name the node.
func TestClusterOperable(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	var info struct {
		Broker string   `json:"broker"`
		Node   string   `json:"node"`
		Nodes  []string `json:"nodes"`
	}
	waitUntil(t, "both nodes in /duplex/cluster", frameWait, func() bool {
		st, body := doJSON(t, http.MethodGet, nodes[0].adminURL("/duplex/cluster"), nil)
		return st == http.StatusOK && json.Unmarshal(body, &info) == nil && len(info.Nodes) == 2
	})
	if info.Broker != "redis" || info.Node == "" || (info.Nodes[0] != info.Node && info.Nodes[1] != info.Node) {
		t.Fatalf("cluster info %+v: want broker redis and this node among the nodes", info)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{Transports: []string{client.WebSocket}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	waitUntil(t, "the session log line with the node", frameWait, func() bool {
		return strings.Contains(nodes[0].logs(), `"msg":"session opened"`) &&
			strings.Contains(nodes[0].logs(), `"node":"`+info.Node+`"`)
	})
	waitUntil(t, "cluster metrics", frameWait, func() bool {
		st, body := doJSON(t, http.MethodGet, nodes[0].adminURL("/metrics"), nil)
		m := string(body)
		return st == http.StatusOK && strings.Contains(m, "caddy_duplex_cluster_nodes 2") &&
			strings.Contains(m, "caddy_duplex_redis_latency_seconds_count")
	})
}

// A node killed with SIGKILL loses nothing: pushes published meanwhile on
// the surviving node wait in Redis, and the killed node's clients resume
// on the survivor with every one of them.
func TestClusterNodeKilled(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Every connection goes to node 0 first, then to node 1.
	var dials atomic.Int32
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		node := nodes[0]
		if dials.Add(1) > 1 {
			node = nodes[1]
		}
		var d net.Dialer
		return d.DialContext(ctx, network, "127.0.0.1:"+strconv.Itoa(node.HTTP))
	}
	var resumed atomic.Int32
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
		Transports:  []string{client.WebSocket},
		DialContext: dial,
		MinBackoff:  10 * time.Millisecond,
		MaxBackoff:  200 * time.Millisecond,
		OnOpen: func(o client.Open) {
			if o.Resumed {
				resumed.Add(1)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	nodes[1].mustPublish(t, map[string]any{"channel": "room", "data": 0}, 1)
	if err := nodes[0].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 10; i++ {
		nodes[1].mustPublish(t, map[string]any{"channel": "room", "data": i}, 1)
	}
	expectCountedPushes(ctx, t, s, 10, "the resumed session")
	if resumed.Load() != 1 {
		t.Fatalf("%d resumes on the survivor, want 1", resumed.Load())
	}
}

// A session of a node killed with SIGKILL that nobody resumes ends once,
// with one disconnect hook, run by a surviving node after its node was
// found dead (15 s without a heartbeat) and its resume window passed.
func TestClusterDeadNodeDisconnectHook(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	cf := globalOpts("\tduplex {\n\t\tbroker redis "+r.Addr+"\n\t}") + sub(`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			resume_window 1s
			disconnect /live/gone
			messages {
				path *
			}
		}
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr)
	nodes := []*caddyProc{startCaddy(t, cf), startCaddy(t, cf), startCaddy(t, cf)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The survivors must have served a request, so that their route is
	// known for the hook.
	for _, n := range nodes[1:] {
		if st, _ := doJSON(t, http.MethodGet, n.url("/live/ping"), nil); st != http.StatusOK {
			t.Fatalf("a request through a survivor: %d", st)
		}
	}
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{Transports: []string{client.WebSocket}, MaxBackoff: time.Hour, MinBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	id := s.ID()
	if err := nodes[0].cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the disconnect hook from a survivor", time.Minute, func() bool {
		return len(app.byPath("/live/gone")) > 0
	})
	time.Sleep(6 * time.Second) // another heartbeat round of both survivors
	hooks := app.byPath("/live/gone")
	if len(hooks) != 1 {
		t.Fatalf("%d disconnect hooks, want exactly one", len(hooks))
	}
	h := hooks[0]
	if h.Header.Get("Duplex-Session") != id || h.Header.Get("Duplex-Disconnect") == "" {
		t.Fatalf("hook headers %v: want Duplex-Session %s and Duplex-Disconnect", h.Header, id)
	}
}

// The sessions API on any node covers the sessions of every node: list,
// show, change channels, delete.
func TestClusterSessionsAPI(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	closed := make(chan client.CloseInfo, 1)
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
		Transports: []string{client.SSE},
		OnClose:    func(c client.CloseInfo) { closed <- c },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	other := nodes[1]

	st, body := doJSON(t, http.MethodGet, other.adminURL("/duplex/sessions?channel=room"), nil)
	var list []map[string]any
	if st != http.StatusOK || json.Unmarshal(body, &list) != nil || len(list) != 1 || list[0]["id"] != s.ID() {
		t.Fatalf("list on the other node: %d %s", st, body)
	}
	if list[0]["transport"] != "sse" || list[0]["attached"] != true || list[0]["node"] == "" {
		t.Fatalf("session info: %s", body)
	}
	st, body = doJSON(t, http.MethodPost, other.adminURL("/duplex/sessions/"+s.ID()+"/channels"),
		map[string]any{"add": []string{"news"}, "remove": []string{"room"}})
	if st != http.StatusOK || !strings.Contains(string(body), `"channels":["news"]`) {
		t.Fatalf("channels on the other node: %d %s", st, body)
	}
	other.mustPublish(t, map[string]any{"channel": "room", "data": "old"}, 0)
	other.mustPublish(t, map[string]any{"channel": "news", "data": "new"}, 1)
	if p := nextPush(ctx, t, s, "push after the change"); string(p.Data) != `"new"` || p.Channel != "news" {
		t.Fatalf("push after the change: %s on %q", p.Data, p.Channel)
	}
	if st, _ := doJSON(t, http.MethodDelete, other.adminURL("/duplex/sessions/"+s.ID()), nil); st != http.StatusNoContent {
		t.Fatalf("delete on the other node: %d", st)
	}
	select {
	case c := <-closed:
		if c.Code != 4000 || c.Reason != "deleted" || c.Reconnect {
			t.Fatalf("close after the delete: %+v", c)
		}
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	waitUntil(t, "the session to be gone on both nodes", frameWait, func() bool {
		a, _ := doJSON(t, http.MethodGet, nodes[0].adminURL("/duplex/sessions/"+s.ID()), nil)
		b, _ := doJSON(t, http.MethodGet, other.adminURL("/duplex/sessions/"+s.ID()), nil)
		return a == http.StatusNotFound && b == http.StatusNotFound
	})
}

// Redis restarted without its data: sessions are closed with
// reconnect:true and their resumes open resumed:false — never a silent
// gap. Killing the nodes' pub/sub connections loses nothing. The same
// publish id sent to both nodes at once is applied once.
func TestClusterRedisFailures(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	opens := make(chan client.Open, 8)
	closes := make(chan client.CloseInfo, 8)
	s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
		Transports: []string{client.WebSocket},
		MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		OnOpen:  func(o client.Open) { opens <- o },
		OnClose: func(c client.CloseInfo) { closes <- c },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	<-opens
	next := func(want string) {
		t.Helper()
		if p := nextPush(ctx, t, s, "push "+want); string(p.Data) != want {
			t.Fatalf("push %s, want %s", p.Data, want)
		}
	}

	// Pub/sub connections killed between publishes: nothing is lost.
	for i := range 20 {
		if i%5 == 0 {
			redistest.CLI(t, r.Addr, "CLIENT", "KILL", "TYPE", "pubsub")
		}
		nodes[i%2].mustPublish(t, map[string]any{"channel": "room", "data": i}, 1)
	}
	for i := range 20 {
		next(strconv.Itoa(i))
	}

	// One publish id, both nodes, at once: applied once.
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Go(func() {
			st, body, err := tryJSON(http.MethodPost, n.adminURL("/duplex/publish"), map[string]any{"channel": "room", "data": "once", "id": "same"})
			if err != nil || st != http.StatusOK || !strings.Contains(string(body), `"delivered":1`) {
				t.Errorf("publish with the shared id: %d %s %v", st, body, err)
			}
		})
	}
	wg.Wait()
	next(`"once"`)

	// Redis comes back empty: the session is closed to reconnect, and its
	// resume starts a new one.
	r.Restart(t)
	select {
	case c := <-closes:
		if !c.Reconnect {
			t.Fatalf("close after Redis lost its data: %+v, want reconnect", c)
		}
	case <-ctx.Done():
		t.Fatal("no close after Redis lost its data")
	}
	select {
	case o := <-opens:
		if o.Resumed {
			t.Fatal("resumed:true after Redis lost the session")
		}
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	// No push without a publish: the next one is the marker.
	nodes[1].mustPublish(t, map[string]any{"channel": "room", "data": "after"}, 1)
	next(`"after"`)
}

// Chaos across three nodes: sessions on every transport are cut again and
// again and resume on another node while four publishers publish through
// all nodes at once. Every session gets every push exactly once, with seq
// gap-free, and each publisher's pushes in its order.
func TestClusterChaos(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 3, app)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	type peer struct {
		s  *client.Session
		rr *roundRobin
	}
	var peers []*peer
	for _, transport := range []string{client.WebSocket, client.SSE, client.Stream, client.WebSocket, client.SSE, client.Stream} {
		p := &peer{rr: &roundRobin{nodes: nodes}}
		p.rr.next.Store(int64(len(peers)))
		s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
			Transports: []string{transport}, DialContext: p.rr.dial,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		})
		if err != nil {
			t.Fatalf("%s: %v", transport, err)
		}
		defer s.Close()
		p.s = s
		peers = append(peers, p)
	}
	const publishers, each = 4, 40
	stop := make(chan struct{})
	var cutter sync.WaitGroup
	cutter.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(150 * time.Millisecond):
			}
			peers[i%len(peers)].rr.cutAll()
		}
	})
	var pubs sync.WaitGroup
	for p := range publishers {
		pubs.Go(func() {
			for n := range each {
				node := nodes[(p+n)%len(nodes)]
				body := map[string]any{"channel": "room", "data": map[string]int{"p": p, "n": n}, "id": fmt.Sprintf("%d-%d", p, n)}
				var st int
				var err error
				for attempt := 0; attempt < 20; attempt++ {
					st, _, err = tryJSON(http.MethodPost, node.adminURL("/duplex/publish"), body)
					if err == nil && st == http.StatusOK {
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
				if err != nil || st != http.StatusOK {
					t.Errorf("publisher %d push %d: %d %v", p, n, st, err)
					return
				}
			}
		})
	}
	pubs.Wait()
	close(stop)
	cutter.Wait()
	for _, pr := range peers {
		last := make([]int, publishers)
		for i := range last {
			last[i] = -1
		}
		for i := range publishers * each {
			select {
			case got := <-pr.s.Pushes():
				var d struct{ P, N int }
				if err := json.Unmarshal(got.Data, &d); err != nil {
					t.Fatalf("%s: push %d: %s", pr.s.Transport(), i, got.Data)
				}
				if got.Seq != uint64(i+1) {
					t.Fatalf("%s: push %d has seq %d", pr.s.Transport(), i, got.Seq)
				}
				if d.N != last[d.P]+1 {
					t.Fatalf("%s: publisher %d's push %d after its %d", pr.s.Transport(), d.P, d.N, last[d.P])
				}
				last[d.P] = d.N
			case <-ctx.Done():
				t.Fatalf("%s: push %d of %d: %v", pr.s.Transport(), i, publishers*each, ctx.Err())
			}
		}
	}
}

// On a three-master Redis Cluster: fan-out reaches the sessions of every
// node (their keys spread over the masters' slots) and a session resumes
// on another node.
func TestClusterOnRedisCluster(t *testing.T) {
	t.Parallel()
	addrs := redistest.StartCluster(t)
	app := newTestApp(t)
	nodes := startClusterWith(t, "broker redis "+strings.Join(addrs, " "), 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var peers []*client.Session
	var rrs []*roundRobin
	for i := range 12 {
		rr := &roundRobin{nodes: nodes}
		rr.next.Store(int64(i))
		transport := []string{client.WebSocket, client.SSE, client.Stream}[i%3]
		s, err := client.Dial(ctx, nodes[0].url("/live"), client.Options{
			Transports: []string{transport}, DialContext: rr.dial,
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
		})
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		defer s.Close()
		peers = append(peers, s)
		rrs = append(rrs, rr)
	}
	const pushes = 20
	for i := range pushes {
		if i == pushes/2 {
			for _, rr := range rrs {
				rr.cutAll() // every session resumes on the other node
			}
		}
		nodes[i%2].mustPublish(t, map[string]any{"channel": "room", "data": i}, len(peers))
	}
	for si, s := range peers {
		expectCountedPushes(ctx, t, s, pushes, fmt.Sprintf("session %d", si))
	}
	st, body := doJSON(t, http.MethodGet, nodes[1].adminURL("/duplex/sessions"), nil)
	var list []map[string]any
	if st != http.StatusOK || json.Unmarshal(body, &list) != nil || len(list) != len(peers) {
		t.Fatalf("sessions across the Redis Cluster's masters: %d, %d listed", st, len(list))
	}
}

// `caddy reload` on one node behaves as on a single node (its sessions get
// 4012 and resume, with every push), and the other node's sessions do not
// notice it.
func TestClusterReloadOneNode(t *testing.T) {
	t.Parallel()
	r := startClusterRedis(t)
	app := newTestApp(t)
	nodes := startCluster(t, r, 2, app)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type peer struct {
		s       *client.Session
		closes  atomic.Int32
		opens   atomic.Int32
		resumed atomic.Int32
	}
	var peers []*peer
	for _, n := range nodes {
		p := &peer{}
		s, err := client.Dial(ctx, n.url("/live"), client.Options{
			Transports: []string{client.WebSocket},
			MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond,
			OnClose: func(client.CloseInfo) { p.closes.Add(1) },
			OnOpen: func(o client.Open) {
				if o.Resumed {
					p.resumed.Add(1)
				}
				p.opens.Add(1)
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		p.s = s
		peers = append(peers, p)
	}
	nodes[1].mustPublish(t, map[string]any{"channel": "room", "data": 0}, 2)
	// A changed config (Caddy skips an unchanged one) with the same
	// servers: a new server could take the duplex server's name (srv0…),
	// and with it its place (see "Running a cluster" in the README).
	changed := strings.Replace(renderedConfig(t, nodes[0]), "\troute /live* {", "\trespond /extra ok\n\troute /live* {", 1)
	nodes[0].reload(t, changed)
	waitUntil(t, "node 0's session to resume", frameWait, func() bool { return peers[0].opens.Load() == 2 })
	if peers[0].resumed.Load() != 1 {
		t.Fatal("node 0's session was not resumed after the reload")
	}
	for i := 1; i <= 5; i++ {
		nodes[i%2].mustPublish(t, map[string]any{"channel": "room", "data": i}, 2)
	}
	for pi, p := range peers {
		expectCountedPushes(ctx, t, p.s, 6, fmt.Sprintf("session %d", pi))
	}
	if peers[0].closes.Load() != 1 {
		t.Errorf("node 0's session got %d closes, want the reload's one", peers[0].closes.Load())
	}
	if peers[1].closes.Load() != 0 || peers[1].opens.Load() != 1 {
		t.Errorf("node 1's session noticed the reload: %d closes, %d opens", peers[1].closes.Load(), peers[1].opens.Load())
	}
}
