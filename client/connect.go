package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-duplex/duplex/protocol"
)

// cursor is where a resume starts: <token>:<last seq>, or "" before the
// first open.
func (s *Session) cursor() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.token == "" {
		return ""
	}
	return protocol.Cursor{Token: s.token, Seq: s.lastSeq}.String()
}

// opening is a connection whose open frame has arrived.
type opening struct {
	c   conn
	f   serverFrame
	raw []byte
}

// connect opens a connection over the first transport that opens,
// resuming the session if it has one. refused reports that every
// transport refused the opening with 401 or 403.
func (s *Session) connect(ctx context.Context) (op opening, refused bool, err error) {
	cursor := s.cursor()
	var errs []error
	refused = true
	for _, name := range s.opts.Transports {
		if ctx.Err() != nil {
			break
		}
		c, err := s.d.dial(ctx, name, cursor)
		if err == nil {
			op, err = readOpen(ctx, c)
			if err == nil {
				return op, false, nil
			}
			c.close()
		}
		var se *statusError
		if !errors.As(err, &se) || (se.status != http.StatusUnauthorized && se.status != http.StatusForbidden) {
			refused = false
		}
		errs = append(errs, err)
	}
	if ctx.Err() != nil {
		refused = false
		errs = append(errs, ctx.Err())
	}
	return op, refused, fmt.Errorf("duplex client: connecting to %s: %w", s.d.u.Redacted(), errors.Join(errs...))
}

// readOpen reads the open frame that starts every connection.
func readOpen(ctx context.Context, c conn) (opening, error) {
	stop := context.AfterFunc(ctx, c.close)
	defer stop()
	for {
		raw, err := c.read()
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return opening{}, fmt.Errorf("duplex client: %s: waiting for the open frame: %w", c.transport(), err)
		}
		if raw == nil {
			continue
		}
		var f serverFrame
		if err := json.Unmarshal(raw, &f); err != nil {
			return opening{}, fmt.Errorf("duplex client: %s: %w: %w", c.transport(), errNotOpen, err)
		}
		if f.Type == protocol.TypePing {
			continue
		}
		if f.Type != protocol.TypeOpen || f.Session == "" || f.Token == "" {
			return opening{}, fmt.Errorf("duplex client: %s: %w: %s", c.transport(), errNotOpen, raw)
		}
		return opening{c: c, f: f, raw: raw}, nil
	}
}

// opened takes a new connection into use.
func (s *Session) opened(op opening) {
	c, f := op.c, op.f
	if st, ok := c.(interface{ setToken(string) }); ok {
		st.setToken(f.Token)
	}
	s.mu.Lock()
	if s.token != "" && !f.Resumed {
		// A new session instead of ours: what was pending is lost.
		s.calls.failAll(fmt.Errorf("session %s: %w", s.id, ErrSessionLost))
		s.outbox = nil
		s.lastSeq = 0
	}
	s.id, s.token, s.transport, s.cur = f.Session, f.Token, c.transport(), c
	s.heartbeat = time.Duration(f.Heartbeat * float64(time.Second))
	s.ackedSeq, s.ackDue = s.lastSeq, false // the cursor acknowledged them
	s.mu.Unlock()
	s.setState(StateOpen)
	if s.opts.OnFrame != nil {
		s.opts.OnFrame(op.raw)
	}
	if s.opts.OnOpen != nil {
		s.opts.OnOpen(Open{Session: f.Session, Resumed: f.Resumed, Transport: c.transport(),
			Heartbeat: time.Duration(f.Heartbeat * float64(time.Second)), Data: f.Data})
	}
}

// reconnect opens a new connection, resuming the session, with backoff.
func (s *Session) reconnect() (conn, error) {
	for attempt := 0; ; attempt++ {
		t := time.NewTimer(backoff(attempt, s.opts.MinBackoff, s.opts.MaxBackoff))
		select {
		case <-s.ctx.Done():
			t.Stop()
			return nil, ErrClosed
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, s.opts.DialTimeout)
		op, refused, err := s.connect(ctx)
		cancel()
		if err == nil {
			s.opened(op)
			return op.c, nil
		}
		if s.ctx.Err() != nil {
			return nil, ErrClosed
		}
		if refused {
			return nil, err // the credentials are no longer good
		}
	}
}
