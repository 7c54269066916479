package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
)

// call is a message waiting for its answer (ack, reply or error frame).
type call struct {
	id   string
	done chan struct{} // closed once data and err are set
	data json.RawMessage
	err  error
}

// outgoing is a frame waiting to be written: a message (with its call if
// it has an id) or an ack of the pushes received.
type outgoing struct {
	frame []byte
	call  *call // nil for fire-and-forget messages
	ack   bool  // an ack of pushes (not sent again after a failed write)
}

// callTable is the bookkeeping of pending calls; the session's mutex
// guards it.
type callTable struct {
	next    uint64
	pending map[string]*call
}

func (t *callTable) add() *call {
	if t.pending == nil {
		t.pending = map[string]*call{}
	}
	t.next++
	c := &call{id: "c" + strconv.FormatUint(t.next, 10), done: make(chan struct{})}
	t.pending[c.id] = c
	return c
}

// settle gives call id its result, once; a second answer to the same id
// (possible across a resume) is ignored.
func (t *callTable) settle(id string, data json.RawMessage, err error) {
	c, ok := t.pending[id]
	if !ok {
		return
	}
	delete(t.pending, id)
	c.data, c.err = data, err
	close(c.done)
}

// has reports whether call c still waits for its answer.
func (t *callTable) has(c *call) bool { return t.pending[c.id] == c }

// forget drops c without an answer (its caller gave up).
func (t *callTable) forget(c *call) {
	if t.pending[c.id] == c {
		delete(t.pending, c.id)
	}
}

// failAll settles every pending call with err.
func (t *callTable) failAll(err error) {
	for id := range t.pending {
		t.settle(id, nil, err)
	}
}

// Call sends a POST message to path with data (nil for none, any other
// value as JSON) and waits for its answer: the reply's data, nil for an
// ack, or an *Error for an error frame. A call pending when the connection
// drops stays pending across the resume and is never sent twice; it fails
// only when ctx or Options.CallTimeout ends, or the session is lost
// (ErrSessionLost) or ends (ErrClosed).
func (s *Session) Call(ctx context.Context, path string, data any) (json.RawMessage, error) {
	return s.CallMethod(ctx, "", path, data)
}

// CallMethod is Call with another method than POST.
func (s *Session) CallMethod(ctx context.Context, method, path string, data any) (json.RawMessage, error) {
	raw, err := encodeData(data)
	if err != nil {
		return nil, err
	}
	if s.opts.CallTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.opts.CallTimeout)
		defer cancel()
	}
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return nil, fmt.Errorf("duplex client: call %s: %w", path, err)
	}
	c := s.calls.add()
	frame, err := json.Marshal(messageFrame{ID: c.id, Method: method, Path: path, Data: raw})
	if err != nil {
		s.calls.forget(c)
		s.mu.Unlock()
		return nil, fmt.Errorf("duplex client: call %s: %w", path, err)
	}
	o := &outgoing{frame: frame, call: c}
	s.outbox = append(s.outbox, o)
	s.mu.Unlock()
	s.signal()

	select {
	case <-c.done:
	case <-ctx.Done():
		s.mu.Lock()
		s.calls.forget(c)
		s.outbox = slices.DeleteFunc(s.outbox, func(x *outgoing) bool { return x == o })
		s.mu.Unlock()
		select {
		case <-c.done: // answered just before
		default:
			return nil, fmt.Errorf("duplex client: call %s: %w", path, ctx.Err())
		}
	}
	var de *Error
	if errors.As(c.err, &de) {
		return nil, de
	}
	if c.err != nil {
		return nil, fmt.Errorf("duplex client: call %s: %w", path, c.err)
	}
	return c.data, nil
}

// Send sends a POST message to path with data, without an id: the server
// answers nothing but errors (see Options.OnFrame). It is queued and
// written once a connection is open.
func (s *Session) Send(path string, data any) error {
	raw, err := encodeData(data)
	if err != nil {
		return err
	}
	frame, err := json.Marshal(messageFrame{Path: path, Data: raw})
	if err != nil {
		return fmt.Errorf("duplex client: send %s: %w", path, err)
	}
	return s.queue(frame)
}

// SendFrame sends one client frame as it is (a JSON object, e.g.
// {"id":"x","path":"/live/a"}); the answers to it come only to
// Options.OnFrame. Like every frame, it is written once. Ids of the form
// c<number> are the ones Call uses: give others.
func (s *Session) SendFrame(frame json.RawMessage) error {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(frame, &probe); err != nil {
		return fmt.Errorf("duplex client: frame is not a JSON object: %w", err)
	}
	return s.queue(append(json.RawMessage(nil), frame...))
}

func (s *Session) queue(frame []byte) error {
	s.mu.Lock()
	if s.err != nil {
		err := s.err
		s.mu.Unlock()
		return fmt.Errorf("duplex client: send: %w", err)
	}
	s.outbox = append(s.outbox, &outgoing{frame: frame})
	s.mu.Unlock()
	s.signal()
	return nil
}

func (s *Session) settle(ref json.RawMessage, data json.RawMessage, err error) {
	if len(ref) == 0 {
		return
	}
	s.mu.Lock()
	s.calls.settle(refString(ref), data, err)
	s.mu.Unlock()
}
