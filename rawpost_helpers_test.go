package duplex_test

// SSE POSTs written by hand on their own connection, for the tests that
// control when each byte of the body reaches the server: stalled, trickled
// or held back one byte short of its end.

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rawPost is an SSE POST written by hand on its own connection: its
// headers, then its body as the test feeds it. status is its answer (0:
// the connection ended without one).
type rawPost struct {
	conn   net.Conn
	done   chan struct{} // closed once the answer (or the end) is read
	status int
	err    error
}

// startRawPost sends the request head of a POST for token; head lines (e.g.
// "Content-Length: 5000000" or "Transfer-Encoding: chunked") are added.
// With waitContinue the head also says Expect: 100-continue, and
// startRawPost returns once the server answered 100 Continue (its handler
// reads the body), failing the test on any other answer.
func startRawPost(t *testing.T, c *caddyProc, path, token, contentType string, waitContinue bool, head ...string) *rawPost {
	t.Helper()
	conn, err := sxSource(0)(context.Background(), "tcp", "127.0.0.1:"+strconv.Itoa(c.HTTP))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	p := &rawPost{conn: conn, done: make(chan struct{})}
	if waitContinue {
		head = append(head, "Expect: 100-continue")
	}
	req := "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1:" + strconv.Itoa(c.HTTP) +
		"\r\nContent-Type: " + contentType + "\r\nDuplex-Token: " + token + "\r\n" +
		strings.Join(head, "\r\n") + "\r\n\r\n"
	_ = conn.SetWriteDeadline(time.Now().Add(sxWait))
	if _, err := conn.Write([]byte(req)); err != nil {
		conn.Close()
		t.Fatalf("write request head: %v", err)
	}
	br := bufio.NewReader(conn)
	if waitContinue {
		_ = conn.SetReadDeadline(time.Now().Add(sxWait))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			conn.Close()
			t.Fatalf("POST %s: %v", path, err)
		}
		if resp.StatusCode != http.StatusContinue {
			b, _ := io.ReadAll(resp.Body)
			conn.Close()
			t.Fatalf("POST %s: %d %s, want 100 Continue", path, resp.StatusCode, b)
		}
	}
	t.Cleanup(func() { conn.Close(); <-p.done })
	// The give-up limit: far beyond the server's 10 s body deadline. Set
	// before the reader starts, so that finish's shorter one is not undone.
	_ = conn.SetReadDeadline(time.Now().Add(90 * time.Second))
	go func() {
		defer close(p.done)
		resp, err := http.ReadResponse(br, nil)
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
func (p *rawPost) write(b []byte) error {
	_ = p.conn.SetWriteDeadline(time.Now().Add(sxWait))
	_, err := p.conn.Write(b)
	return err
}

// answered reports whether the answer (or the end of the connection) has
// been read.
func (p *rawPost) answered() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// finish sends the rest of the body and returns the answer's status,
// failing the test if none comes within sxWait.
func (p *rawPost) finish(t *testing.T, rest []byte) int {
	t.Helper()
	_ = p.conn.SetReadDeadline(time.Now().Add(sxWait))
	if err := p.write(rest); err != nil {
		t.Fatalf("write body: %v", err)
	}
	<-p.done
	if p.err != nil {
		t.Fatalf("reading the answer: %v", p.err)
	}
	return p.status
}
