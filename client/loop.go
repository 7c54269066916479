package client

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddy-duplex/duplex/protocol"
)

// maxBatch is the most frames written at once (one SSE POST carries at most
// 64 frames).
const maxBatch = 64

// signal wakes the writer.
func (s *Session) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run serves the session's connections until it ends.
func (s *Session) run(c conn) {
	defer close(s.done)
	var err error
	for {
		err = s.serve(c)
		s.mu.Lock()
		s.cur = nil
		closing := s.closing
		s.mu.Unlock()
		if closing || s.ctx.Err() != nil {
			err = ErrClosed
			break
		}
		if err != nil {
			break
		}
		s.setState(StateReconnecting)
		if c, err = s.reconnect(); err != nil {
			break
		}
	}
	s.finish(err)
}

// serve reads connection c until it ends. It returns nil when the session
// should resume on a new connection, or why it ended.
func (s *Session) serve(c conn) error {
	life, stop := context.WithCancel(s.ctx)
	unwatch := context.AfterFunc(life, c.close)
	var wg sync.WaitGroup
	wg.Go(func() { s.writeLoop(life, c) })
	s.signal()

	// Two missed heartbeats and the connection counts as dead.
	s.mu.Lock()
	dead := 2 * s.heartbeat
	s.mu.Unlock()
	var watchdog *time.Timer
	if dead > 0 {
		watchdog = time.AfterFunc(dead, c.close)
	}
	var ended, readErr error
	for {
		raw, err := c.read()
		if err != nil {
			readErr = err
			break
		}
		if watchdog != nil {
			watchdog.Stop() // delivering a push may take a while
		}
		end, why := s.handle(raw)
		if end {
			ended = why
			// Nothing more is written after the server's close: what is
			// still queued goes on the next connection, not into one the
			// server no longer reads.
			unwatch()
			stop()
			wg.Wait()
			readErr = s.drain(c)
			break
		}
		if watchdog != nil {
			watchdog.Reset(dead)
		}
	}
	if watchdog != nil {
		watchdog.Stop()
	}
	stop()
	c.close()
	wg.Wait()
	unwatch()
	var wsc *WebSocketClose
	if s.ctx.Err() != nil && !errors.As(readErr, &wsc) {
		readErr = ErrClosed
	}
	if s.opts.OnDisconnect != nil {
		s.opts.OnDisconnect(readErr)
	}
	return ended
}

// drain reads what follows a close frame until the server ends the
// connection (over WebSocket, its close frame, which read answers), for
// closeWait at most, and returns the error that ended it.
func (s *Session) drain(c conn) error {
	t := time.AfterFunc(closeWait, c.close)
	defer t.Stop()
	for {
		if _, err := c.read(); err != nil {
			return err
		}
	}
}

// handle dispatches one server frame; end reports the connection's last
// frame (a close frame), why the session's end.
func (s *Session) handle(raw []byte) (end bool, why error) {
	if raw == nil {
		return false, nil // a heartbeat
	}
	var f serverFrame
	if json.Unmarshal(raw, &f) != nil {
		return false, nil
	}
	if f.Type == protocol.TypePing {
		return false, nil
	}
	if s.opts.OnFrame != nil {
		s.opts.OnFrame(raw)
	}
	switch f.Type {
	case protocol.TypePush:
		s.deliver(f)
	case protocol.TypeAck:
		s.settle(f.Ref, nil, nil)
	case protocol.TypeReply:
		data := f.Data
		if data == nil {
			data = json.RawMessage("null")
		}
		s.settle(f.Ref, data, nil)
	case protocol.TypeError:
		s.settle(f.Ref, nil, &Error{Status: f.Status, Message: f.Error})
	case protocol.TypeClose:
		if s.opts.OnClose != nil {
			s.opts.OnClose(CloseInfo{Code: f.Code, Reason: f.Reason, Reconnect: f.Reconnect})
		}
		if f.Reconnect {
			return true, nil
		}
		return true, &CloseError{Code: f.Code, Reason: f.Reason}
	}
	return false, nil
}

// deliver hands a push to the app, once, and schedules its ack.
func (s *Session) deliver(f serverFrame) {
	s.mu.Lock()
	seen := f.Seq <= s.lastSeq
	s.mu.Unlock()
	if seen {
		return
	}
	p := Push{Seq: f.Seq, Channel: f.Channel, Data: f.Data}
	if s.opts.OnPush != nil {
		s.opts.OnPush(p)
	} else {
		select {
		case s.pushes <- p:
		case <-s.ctx.Done():
			return
		}
	}
	s.mu.Lock()
	s.lastSeq = f.Seq
	if s.ackTimer == nil && s.err == nil {
		s.ackTimer = time.AfterFunc(s.opts.AckInterval, s.ackSoon)
	}
	s.mu.Unlock()
}

func (s *Session) ackSoon() {
	s.mu.Lock()
	s.ackTimer = nil
	s.ackDue = true
	s.mu.Unlock()
	s.signal()
}

// take removes the next frames to write from the outbox, with an ack of
// the pushes received if one is due.
func (s *Session) take() []*outgoing {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := min(len(s.outbox), maxBatch)
	batch := slices.Clone(s.outbox[:n])
	s.outbox = slices.Clone(s.outbox[n:])
	if s.ackDue && s.lastSeq > s.ackedSeq && len(batch) < maxBatch {
		batch = append(batch, &outgoing{frame: []byte(`{"type":"ack","seq":` + strconv.FormatUint(s.lastSeq, 10) + `}`), ack: true})
		s.ackedSeq = s.lastSeq
	}
	s.ackDue = false
	return batch
}

// requeue puts frames that were not written back at the head of the
// outbox, but for acks and calls given up meanwhile.
func (s *Session) requeue(rest []*outgoing) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var keep []*outgoing
	for _, o := range rest {
		if o.ack || (o.call != nil && !s.calls.has(o.call)) {
			continue
		}
		keep = append(keep, o)
	}
	s.outbox = append(keep, s.outbox...)
}

// writeLoop writes queued frames to c until ctx ends or a write fails.
func (s *Session) writeLoop(ctx context.Context, c conn) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		}
		for ctx.Err() == nil {
			batch := s.take()
			if len(batch) == 0 {
				break
			}
			frames := make([][]byte, len(batch))
			for i, o := range batch {
				frames[i] = o.frame
			}
			n, err := c.write(ctx, frames)
			if err == nil {
				continue
			}
			var refused *frameRefused
			var later *retryAfter
			switch {
			case errors.As(err, &refused):
				if o := batch[refused.i]; o.call != nil {
					s.mu.Lock()
					s.calls.settle(o.call.id, nil, refused.err)
					s.mu.Unlock()
				}
				s.requeue(batch[refused.i+1:])
			case errors.As(err, &later):
				s.requeue(batch[n:])
				t := time.NewTimer(later.d)
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C:
				}
			default:
				// The connection failed: the rest waits for the next one.
				s.requeue(batch[n:])
				c.close()
				return
			}
		}
	}
}

// finish ends the session with err.
func (s *Session) finish(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.calls.failAll(s.err)
	s.outbox = nil
	if s.ackTimer != nil {
		s.ackTimer.Stop()
		s.ackTimer = nil
	}
	s.mu.Unlock()
	s.cancel()
	// Closed before the channel closes: a reader that sees Pushes end
	// sees the state closed too.
	s.setState(StateClosed)
	close(s.pushes)
}
