package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/caddy-duplex/duplex/client"
)

// Transports the harness drives, all over HTTP/1.1 on loopback.
const (
	transportWebSocket = client.WebSocket
	transportSSE       = client.SSE
	transportStream    = client.Stream
)

// openTimeout bounds one session opening (connect, handshake, open frame).
const openTimeout = 15 * time.Second

// frameFunc receives every server frame after the open frame, on the
// session's reader goroutine. It must not block for long.
type frameFunc func(frame []byte)

// clientSession is one client's session with a server, over one
// transport, held by the project's Go client (README, "Go client").
type clientSession struct {
	s    *client.Session
	once sync.Once
	done chan struct{} // closed once the session has ended
}

// openSession opens a session on srv joined to channel and waits for its
// open frame. Every later server frame goes to onFrame. The client does not
// acknowledge pushes (no ack frames in the measurements) and does not
// reconnect on its own within a run.
func openSession(transport string, srv *server, channel string, onFrame frameFunc) (*clientSession, error) {
	return openSessionDial(transport, srv, channel, nil, onFrame)
}

// openSessionDial is openSession with the client's DialContext (nil: a
// net.Dialer).
func openSessionDial(transport string, srv *server, channel string,
	dial func(ctx context.Context, network, addr string) (net.Conn, error), onFrame frameFunc) (*clientSession, error) {
	u := "http://" + srv.host + srv.livePath + "?channel=" + url.QueryEscape(channel)
	opened := false // set by Dial's goroutine before the reader starts
	s, err := client.Dial(context.Background(), u, client.Options{
		DialContext: dial,
		Transports:  []string{transport},
		HTTP:        client.HTTP1,
		DialTimeout: openTimeout,
		AckInterval: 24 * time.Hour,
		MinBackoff:  time.Hour,
		OnPush:      func(client.Push) {}, // the pushes are read in onFrame
		OnFrame: func(f json.RawMessage) {
			if !opened {
				opened = true // the open frame
				return
			}
			onFrame(f)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", transport, err)
	}
	return &clientSession{s: s, done: make(chan struct{})}, nil
}

// send sends one client frame.
func (cs *clientSession) send(frame []byte) error { return cs.s.SendFrame(frame) }

// close ends the session; done is closed once it has.
func (cs *clientSession) close() {
	cs.once.Do(func() {
		go func() {
			cs.s.Close()
			close(cs.done)
		}()
	})
}

// intField finds "key":<integer> in a JSON frame without decoding it.
func intField(frame []byte, key string) (int64, bool) {
	i := bytes.Index(frame, []byte(`"`+key+`":`))
	if i < 0 {
		return 0, false
	}
	rest := frame[i+len(key)+3:]
	j := 0
	for j < len(rest) && (rest[j] == '-' || (rest[j] >= '0' && rest[j] <= '9')) {
		j++
	}
	n, err := strconv.ParseInt(string(rest[:j]), 10, 64)
	return n, err == nil
}

// handle is an open client session of any server: the Go client's
// (clientSession) or Centrifugo's.
type handle interface {
	close()
	finished() <-chan struct{} // closed once its reader has returned
}

func (cs *clientSession) finished() <-chan struct{} { return cs.done }

// openMany opens n sessions, conc at a time; open(i) opens the i-th. On
// the first error it stops, closes what it opened and returns the error.
func openMany[H handle](n, conc int, open func(i int) (H, error)) ([]H, error) {
	out := make([]H, n)
	var (
		mu       sync.Mutex
		firstErr error
		next     int
		wg       sync.WaitGroup
	)
	for range min(conc, n) {
		wg.Go(func() {
			for {
				mu.Lock()
				i := next
				next++
				stop := firstErr != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				h, err := open(i)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("opening session %d of %d: %w", i+1, n, err)
					}
					mu.Unlock()
					return
				}
				out[i] = h
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		closeAll(out)
		return nil, firstErr
	}
	return out, nil
}

// closeAll closes every session (slots never opened are skipped) and
// waits (bounded) for their readers.
func closeAll[H handle](hs []H) {
	var none H
	open := make([]H, 0, len(hs))
	for _, h := range hs {
		if any(h) != any(none) {
			open = append(open, h)
		}
	}
	for _, h := range open {
		h.close()
	}
	deadline := time.After(10 * time.Second)
	for _, h := range open {
		select {
		case <-h.finished():
		case <-deadline:
			return
		}
	}
}

var errTimeout = errors.New("timed out")
