package client

import (
	"context"
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
	cur       conn   // the open connection, nil between connections
	closing   bool   // Close was called
	lastSeq   uint64 // the last push handed to the app
	ackedSeq  uint64 // the last seq acknowledged to the server
	ackDue    bool   // an ack should go out with the next write
	ackTimer  *time.Timer
	calls     callTable
	outbox    []*outgoing // frames not written yet, in order
	err       error       // why the session ended, once it has
}

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

func (s *Session) setState(st State) {
	s.mu.Lock()
	changed := s.state != st
	s.state = st
	s.mu.Unlock()
	if changed && s.opts.OnState != nil {
		s.opts.OnState(st)
	}
}
