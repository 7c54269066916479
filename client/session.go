package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// Session is a client session. Its methods are safe for concurrent use.
//
// One goroutine (run) holds the session's connection: it reads frames and
// delivers them in order, and reconnects when the connection drops; while
// a connection is open a second goroutine writes the queued frames.
type Session struct {
	d      *dialer
	opts   Options
	pushes chan Push
	ctx    context.Context // ends when the session does
	cancel context.CancelFunc
	done   chan struct{} // closed when run returns
	wake   chan struct{} // (buffered 1) tells the writer to look at the outbox

	closeOnce sync.Once

	mu        sync.Mutex // guards the fields below
	id, token string
	transport string
	heartbeat time.Duration
	state     State
	cur       conn // the open connection, nil between connections
	closing   bool // Close was called
	lastSeq   uint64
	ackedSeq  uint64 // the last seq acknowledged to the server
	ackDue    bool   // an ack should go out with the next write
	ackTimer  *time.Timer
	calls     callTable
	outbox    []*outgoing // frames not written yet, in order
	err       error       // why the session ended, once it has
}

// maxBatch is the most frames written at once (one SSE POST carries at most
// 64 frames).
const maxBatch = 64

// closeWait bounds how long Close waits for the server to answer a
// WebSocket close frame.
const closeWait = 2 * time.Second

// Dial opens a session at url (http, https, ws or wss), trying
// opts.Transports in order, and returns once the server's open frame has
// arrived. ctx bounds the opening only.
func Dial(ctx context.Context, url string, opts Options) (*Session, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	u, err := parseURL(url)
	if err != nil {
		return nil, err
	}
	s := &Session{
		opts:   o,
		pushes: make(chan Push, 64),
		done:   make(chan struct{}),
		wake:   make(chan struct{}, 1),
		state:  StateConnecting,
	}
	s.d = &dialer{u: u, opts: &s.opts}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if o.OnState != nil {
		o.OnState(StateConnecting)
	}
	dctx, cancel := context.WithTimeout(ctx, o.DialTimeout)
	op, _, err := s.connect(dctx)
	cancel()
	if err != nil {
		s.cancel()
		return nil, err
	}
	s.opened(op)
	go s.run(op.c)
	return s, nil
}

// ID is the session's id (it changes when the session is lost and a new
// one opens).
func (s *Session) ID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id
}

// Transport is the transport of the current (or last) connection.
func (s *Session) Transport() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.transport
}

// State is the session's state.
func (s *Session) State() State {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// Err is why the session ended (ErrClosed after Close, a *CloseError when
// the server closed it), or nil while it lives.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Pushes delivers the pushes, in order, exactly once, across reconnections,
// unless Options.OnPush is set. It is closed when the session ends. The
// session reads nothing more while a push waits here: keep reading it.
func (s *Session) Pushes() <-chan Push { return s.pushes }

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
// Options.OnFrame. Like every frame, it is written once.
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

// Close ends the session: over WebSocket it tells the server so (the
// session ends there at once); over stream and SSE the server keeps it
// until its resume window passes. Pending calls fail with ErrClosed, the
// Pushes channel is closed, and no goroutine of the session is left.
func (s *Session) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closing = true
		cur := s.cur
		s.mu.Unlock()
		if cur != nil {
			said := make(chan bool, 1)
			go func() { said <- cur.bye() }()
			t := time.NewTimer(closeWait)
			select {
			case ok := <-said:
				said = nil
				if ok { // wait for the server to end the connection
					select {
					case <-s.done:
					case <-t.C:
					}
				}
			case <-t.C:
			}
			t.Stop()
			s.cancel()
			<-s.done
			if said != nil {
				cur.close() // a close frame still being written gives up
				<-said
			}
		}
		s.cancel()
		<-s.done
	})
	return nil
}

func (s *Session) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Session) setState(st State) {
	s.mu.Lock()
	changed := s.state != st
	s.state = st
	s.mu.Unlock()
	if changed && s.opts.OnState != nil {
		s.opts.OnState(st)
	}
}

// cursor is where a resume starts: <token>:<last seq>, or "" before the
// first open.
func (s *Session) cursor() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.token == "" {
		return ""
	}
	return s.token + ":" + strconv.FormatUint(s.lastSeq, 10)
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
		if f.Type == "ping" {
			continue
		}
		if f.Type != "open" || f.Session == "" || f.Token == "" {
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
	var ended error
	for {
		raw, err := c.read()
		if err != nil {
			break
		}
		if watchdog != nil {
			watchdog.Stop() // delivering a push may take a while
		}
		end, why := s.handle(raw)
		if end {
			ended = why
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
	return ended
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
	if f.Type == "ping" {
		return false, nil
	}
	if s.opts.OnFrame != nil {
		s.opts.OnFrame(raw)
	}
	switch f.Type {
	case "push":
		s.deliver(f)
	case "ack":
		s.settle(f.Ref, nil, nil)
	case "reply":
		data := f.Data
		if data == nil {
			data = json.RawMessage("null")
		}
		s.settle(f.Ref, data, nil)
	case "error":
		s.settle(f.Ref, nil, &Error{Status: f.Status, Message: f.Error})
	case "close":
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

func (s *Session) settle(ref json.RawMessage, data json.RawMessage, err error) {
	if len(ref) == 0 {
		return
	}
	s.mu.Lock()
	s.calls.settle(refString(ref), data, err)
	s.mu.Unlock()
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
	close(s.pushes)
	s.setState(StateClosed)
}
