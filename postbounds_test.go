package duplex_test

// SSE POST bodies are bounded (README: "Security defaults", "Limits"): a
// Content-Length over the frame limits is refused with 413 before the body
// is read, at most 4 POSTs per session are read at once (429 beyond), and
// a body must arrive within 10 s. Stalled or trickled POSTs cannot pin the
// server's memory or hold a request open.

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

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
	big := make([]*rawPost, n)
	for i := range big {
		big[i] = startRawPost(t, c, "/live", s.token(), "application/json", false, "Content-Length: "+strconv.Itoa(declared))
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
	small := make([]*rawPost, n)
	for i := range small {
		small[i] = startRawPost(t, c, "/live", s.token(), "application/x-ndjson", false, "Transfer-Encoding: chunked")
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
	if f := sxNextRef(t, s.next, "after"); f.typ() != "reply" {
		t.Fatalf("answer after the flood: %v", f)
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
	p := startRawPost(t, c, "/live", s.token(), "application/json", false, "Content-Length: "+strconv.Itoa(len(body)))
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
