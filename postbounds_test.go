package duplex_test

// SSE POST bodies are bounded (README: "Security defaults", "Limits"): a
// Content-Length over the frame limits is refused with 413 before the body
// is read, at most 4 POSTs per session are read at once (429 beyond), and
// a body must arrive within 10 s. Stalled or trickled POSTs cannot pin the
// server's memory or hold a request open.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// sxRawPost is an SSE POST written by hand on its own connection: its
// headers, then its body as the test feeds it. status is its answer (0:
// the connection ended without one).
type sxRawPost struct {
	conn   net.Conn
	done   chan struct{} // closed once the answer (or the end) is read
	status int
	err    error
}

// sxStartPost sends the request head of a POST for token; head lines (e.g.
// "Content-Length: 5000000" or "Transfer-Encoding: chunked") are added.
func sxStartPost(t *testing.T, c *caddyProc, path, token, contentType string, head ...string) *sxRawPost {
	t.Helper()
	conn, err := sxSource(0)(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(c.HTTP))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	p := &sxRawPost{conn: conn, done: make(chan struct{})}
	t.Cleanup(func() { conn.Close(); <-p.done })
	req := "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1:" + strconv.Itoa(c.HTTP) +
		"\r\nContent-Type: " + contentType + "\r\nDuplex-Token: " + token + "\r\n" +
		strings.Join(head, "\r\n") + "\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		t.Fatalf("write request head: %v", err)
	}
	go func() {
		defer close(p.done)
		// The give-up limit: far beyond the server's 10 s body deadline.
		_ = conn.SetReadDeadline(time.Now().Add(90 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			p.err = err
			return
		}
		resp.Body.Close()
		p.status = resp.StatusCode
	}()
	return p
}

// write sends body bytes; errors (the server closed the connection after
// answering) are returned, not fatal.
func (p *sxRawPost) write(b []byte) error {
	_ = p.conn.SetWriteDeadline(time.Now().Add(sxWait))
	_, err := p.conn.Write(b)
	return err
}

func (p *sxRawPost) answered() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

const sxPostSite = `
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			transports sse
		}
		reverse_proxy {{.Upstream}}
	}
}
`

// TestPostBoundsStalledFlood: 200 parallel POSTs with one token, each
// declaring 5 MB and stalling after most of it, are refused with 413
// without being read; 200 parallel chunked POSTs of valid frames that
// stall are read at most a few at a time (most get 429), and the ones
// read are cut by the server. Meanwhile Caddy's memory stays bounded (a
// Caddy built without the race detector, whose own bookkeeping would
// blur the measure).
func TestPostBoundsStalledFlood(t *testing.T) {
	t.Parallel()
	n := sxEnvInt(t, "DUPLEX_POST_FLOOD", 200)
	app := newTestApp(t)
	c := startCaddyBinary(t, sxPlainCaddy, sub(globalOpts("")+sxPostSite, "Upstream", app.Addr), sxMemLimit)
	s := sxOpenSSE(t, c.url("/live"), nil)
	pid := c.cmd.Process.Pid
	before := sxRSS(t, pid)

	// Declared 5 MB each: answered 413 at once. The body is written (up
	// to 4.9 MB) as far as the server takes it, then the client stalls.
	const declared = 5 << 20
	chunk := []byte(`{"data":"` + strings.Repeat("x", 64<<10) + `"}`)
	var wg sync.WaitGroup
	big := make([]*sxRawPost, n)
	for i := range big {
		big[i] = sxStartPost(t, c, "/live", s.token(), "application/json", "Content-Length: "+strconv.Itoa(declared))
	}
	for _, p := range big {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sent := 0; sent+len(chunk) < declared-100<<10 && !p.answered(); sent += len(chunk) {
				if p.write(chunk) != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	for i, p := range big {
		<-p.done
		if p.status != http.StatusRequestEntityTooLarge {
			t.Fatalf("POST %d declaring 5 MB: status %d (%v), want 413", i, p.status, p.err)
		}
	}

	t.Logf("Caddy RSS after the 413 phase: %d MiB", sxRSS(t, pid)>>20)

	// Chunked ndjson of valid frames (60 of 60 KiB: within the per-POST
	// limits), then a stall.
	frame := `{"data":"` + strings.Repeat("y", 60<<10) + `"}` + "\n"
	body := fmt.Sprintf("%x\r\n%s\r\n", len(frame), frame)
	small := make([]*sxRawPost, n)
	for i := range small {
		small[i] = sxStartPost(t, c, "/live", s.token(), "application/x-ndjson", "Transfer-Encoding: chunked")
	}
	for _, p := range small {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 60 {
				if p.answered() || p.write([]byte(body)) != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	// Every POST has sent what it will send, or has its answer: this is
	// the most memory the flood can make the server hold.
	peak := sxRSS(t, pid)
	// The flood sends about 1.7 GB (n × 4.9 MB, then n × 3.6 MB): a server
	// that buffered what it was sent would grow by most of that. A server
	// that reads 4 bodies at a time holds a few tens of MiB.
	const bound = 100 << 20
	t.Logf("Caddy RSS: %d MiB before, %d MiB with %d stalled POSTs in flight", before>>20, peak>>20, n)
	if peak-before > bound {
		t.Errorf("Caddy's RSS grew by %d MiB under %d stalled POSTs, want at most %d MiB", (peak-before)>>20, n, bound>>20)
	}

	refused, cut := 0, 0
	for _, p := range small {
		<-p.done // the give-up limit is the reader's deadline
		switch {
		case p.status == http.StatusTooManyRequests:
			refused++
		case p.status == http.StatusAccepted:
			t.Errorf("a stalled POST was accepted (202): its body never ended")
		default:
			cut++ // answered with an error, or its connection closed
		}
	}
	t.Logf("stalled chunked POSTs: %d answered 429, %d read and then cut by the server", refused, cut)
	if refused < n-10 {
		t.Errorf("%d of %d parallel POSTs of one session answered 429, want all but a few", refused, n)
	}
	if cut == 0 {
		t.Errorf("no stalled POST was read at all: the flood proves nothing")
	}
	// The session is unharmed: a proper POST is still taken.
	if st, b := sxPost(t, c.url("/live"), s.token(), "application/json", []byte(`{"id":"after","path":"/live/ok"}`)); st != http.StatusAccepted {
		t.Fatalf("POST after the flood: %d %s", st, b)
	}
	for {
		f := s.mustNext(t)
		if f.ref() == "after" {
			if f.typ() != "reply" {
				t.Fatalf("answer after the flood: %v", f)
			}
			break
		}
	}
}

// TestPostBoundsTrickle: a POST whose body trickles in one byte every few
// seconds is cut by the server (an error answer or a closed connection)
// long before its body would be complete.
func TestPostBoundsTrickle(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	c := startCaddy(t, sub(globalOpts("")+sxPostSite, "Upstream", app.Addr))
	s := sxOpenSSE(t, c.url("/live"), nil)
	body := []byte(`{"id":"slow","path":"/live/x","data":"` + strings.Repeat("z", 40) + `"}`)
	p := sxStartPost(t, c, "/live", s.token(), "application/json", "Content-Length: "+strconv.Itoa(len(body)))
	// One byte every 3 s: the whole body would take over 3 minutes.
	sent := 0
	tick := time.NewTicker(3 * time.Second)
	defer tick.Stop()
	giveUp := time.After(90 * time.Second)
	for sent < len(body) && !p.answered() {
		if p.write(body[sent:sent+1]) != nil {
			break // the server closed the connection
		}
		sent++
		select {
		case <-tick.C:
		case <-p.done:
		case <-giveUp:
			t.Fatalf("the trickling POST was still open after 90 s (%d of %d bytes sent)", sent, len(body))
		}
	}
	select {
	case <-p.done:
	case <-giveUp:
		t.Fatalf("no answer to the trickling POST within 90 s")
	}
	if sent >= len(body) {
		t.Fatalf("the whole body trickled in before the server cut it")
	}
	if p.status == http.StatusAccepted {
		t.Fatalf("the trickled POST was accepted")
	}
	t.Logf("trickling POST ended after %d of %d bytes: status %d (%v)", sent, len(body), p.status, p.err)
	// Its frame never reached the app.
	if rs := app.byPath("/live/x"); len(rs) != 0 {
		t.Fatalf("the trickled frame reached the app")
	}
}
