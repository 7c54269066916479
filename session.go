package duplex

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// closeGrace is how long a closing session waits for the client to
// acknowledge the close before the connection is dropped.
const closeGrace = 2 * time.Second

// session is one client's duplex session: its identity, its channels (kept
// by the hub), the frames queued for it and the messages it sends.
//
// Frames for the client are only ever queued (push, send, close); a single
// writer goroutine drains the queue into the transport, so publishers never
// wait on a socket.
type session struct {
	id, token string
	user      string
	transport string
	remote    string
	opened    time.Time

	h    *Handler
	hub  *hub
	next caddyhttp.Handler
	// opening is the request that opened the session; messages are served
	// as copies of it.
	opening *http.Request
	repl    *caddy.Replacer

	// channels is guarded by hub.mu.
	channels map[string]struct{}
	// sse is the transport of an SSE session, which takes posted frames.
	sse *sseConn

	mu       sync.Mutex
	seq      uint64     // last push sequence number assigned
	out      []outFrame // frames waiting for the writer
	outBytes int64
	closing  *closeInfo // set once the session must end
	wake     chan struct{}

	ctx    context.Context // ends when the session ends
	cancel context.CancelFunc
	// counters for the session's log line
	received, pushed int64
}

// outFrame is a frame waiting to be written: a push (shared payload plus
// this session's sequence number) or an already encoded frame.
type outFrame struct {
	push *push
	seq  uint64
	typ  string // of b
	b    []byte
}

func (f outFrame) size() int64 {
	if f.push != nil {
		return int64(f.push.frameSize(f.seq))
	}
	return int64(len(f.b))
}

// randomID returns n bytes from crypto/rand, base64url-encoded.
func randomID(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		// crypto/rand never fails on supported platforms.
		panic("duplex: crypto/rand: " + err.Error())
	}
	return base64.RawURLEncoding.EncodeToString(b)
}

func newSession(h *Handler, r *http.Request, next caddyhttp.Handler, transport, user string) *session {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	ctx, cancel := context.WithCancel(r.Context())
	return &session{
		id:        randomID(16), // 128 bits
		token:     randomID(24), // 192 bits
		user:      user,
		transport: transport,
		remote:    r.RemoteAddr,
		opened:    time.Now(),
		h:         h,
		hub:       h.hub,
		next:      next,
		opening:   r,
		repl:      repl,
		wake:      make(chan struct{}, 1),
		ctx:       ctx,
		cancel:    cancel,
	}
}

// enqueue queues f for the writer. A session whose queue would exceed
// send_queue is closed as a slow consumer instead.
func (s *session) enqueueLocked(f outFrame) bool {
	if s.closing != nil {
		return false
	}
	n := f.size()
	if s.outBytes+n > s.h.SendQueue {
		s.closeLocked(closeSlow)
		return false
	}
	s.out = append(s.out, f)
	s.outBytes += n
	s.wakeWriter()
	return true
}

func (s *session) wakeWriter() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// push queues a push with the session's next sequence number. It reports
// whether the session took it (false once the session is ending).
func (s *session) push(p *push) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing != nil {
		return false
	}
	s.seq++
	if s.enqueueLocked(outFrame{push: p, seq: s.seq}) {
		s.pushed++
		return true
	}
	return false
}

// ending reports whether the session is closing or closed.
func (s *session) ending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing != nil
}

// send queues an encoded frame of type typ (open, ack, reply, error).
func (s *session) send(typ string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.enqueueLocked(outFrame{typ: typ, b: b})
}

// close ends the session: frames already queued are written, then the
// close frame, then the connection is closed. The first reason wins.
// It reports whether this call closed it (false if it was ending already).
func (s *session) close(c closeInfo) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closeLocked(c)
}

func (s *session) closeLocked(c closeInfo) bool {
	if s.closing != nil {
		return false
	}
	c.Type = frameClose
	s.closing = &c
	s.wakeWriter()
	return true
}

// take hands the queued frames to the writer.
func (s *session) take(buf []outFrame) ([]outFrame, *closeInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	buf = append(buf[:0], s.out...)
	clear(s.out)
	s.out = s.out[:0]
	s.outBytes = 0
	return buf, s.closing
}

// writeLoop drains the queue into the transport until the session closes
// or its context ends. It pings every heartbeat.
func (s *session) writeLoop(t transport, readerDone <-chan struct{}) {
	hb := time.Duration(s.h.Heartbeat)
	ticker := time.NewTicker(hb)
	defer ticker.Stop()
	var frames []outFrame
	var seqBuf [20]byte
	fail := func() {
		_ = t.end()
		s.cancel()
	}
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-ticker.C:
			if err := t.ping(); err != nil {
				fail()
				return
			}
			continue
		case <-s.wake:
		}
		var closing *closeInfo
		frames, closing = s.take(frames)
		for _, f := range frames {
			var err error
			if f.push != nil {
				err = t.writeFrame(framePush, f.seq, pushPrefix, strconv.AppendUint(seqBuf[:0], f.seq, 10), f.push.suffix)
			} else {
				err = t.writeFrame(f.typ, 0, f.b, nil, nil)
			}
			if err != nil {
				s.logger().Debug("write failed", zap.String("session", s.id), zap.Error(err))
				fail()
				return
			}
		}
		clear(frames)
		if closing != nil {
			// From now on the session is unknown to publishers and the
			// sessions API, before the client sees it end.
			s.hub.remove(s)
			_ = t.writeFrame(frameClose, 0, encodeClose(*closing), nil, nil)
			_ = t.flush()
			_ = t.close(closing.Code, closing.Reason)
			// Give the client a moment to answer the close, so the
			// connection is not reset under its last frames.
			timer := time.NewTimer(closeGrace)
			select {
			case <-readerDone:
			case <-timer.C:
			}
			timer.Stop()
			_ = t.end()
			s.cancel()
			return
		}
		if err := t.flush(); err != nil {
			fail()
			return
		}
	}
}

// closeReason is the reason logged for the session's end.
func (s *session) closeReason() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing != nil {
		return s.closing.Reason
	}
	return ""
}

func (s *session) logger() *zap.Logger { return s.h.logger }

// run serves the session on t until it ends: the open frame, then the
// client's messages (read here) and the queued frames (written by a
// writer goroutine).
func (s *session) run(t transport, channels []string) {
	defer s.cancel()
	s.hub.add(s, channels)
	s.h.live.add(s)
	s.logger().Info("session opened",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", s.transport),
		zap.String("remote", s.remote))

	s.send(frameOpen, encodeOpen(openFrame{
		Session:   s.id,
		Token:     s.token,
		Heartbeat: int64(time.Duration(s.h.Heartbeat) / time.Second),
	}))

	readerDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { s.writeLoop(t, readerDone) })

	in := newInbox(s)
	wg.Go(in.dispatch)

	s.readLoop(t, in)
	s.hub.remove(s)
	close(readerDone)
	in.stop()
	if s.closeReason() == "" {
		// The client went away: nothing more can be written.
		_ = t.end()
		s.cancel()
	}
	wg.Wait()
	s.cancel()
	_ = t.close(1001, "going away")
	_ = t.end()
	s.h.live.remove(s)
	s.close(closeInfo{Reason: "client went away"}) // drops later pushes

	s.mu.Lock()
	pushed := s.pushed
	s.mu.Unlock()
	s.logger().Info("session closed",
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.String("transport", s.transport),
		zap.String("remote", s.remote),
		zap.Duration("duration", time.Since(s.opened)),
		zap.Int64("messages", s.received),
		zap.Int64("pushes", pushed),
		zap.String("reason", s.closeReason()))
}

// readLoop reads client messages until the connection fails or the session
// ends.
func (s *session) readLoop(t transport, in *inbox) {
	for {
		msg, binary, err := t.readMessage()
		if errors.Is(err, errTooBig) {
			s.send(frameErr, encodeError(nil, http.StatusRequestEntityTooLarge,
				"message larger than max_message_size ("+strconv.FormatInt(s.h.MaxMessageSize, 10)+" bytes)"))
			continue
		}
		if err != nil {
			return
		}
		s.received++
		if !in.put(msg, binary) {
			return
		}
	}
}

// sessionSet is the set of sessions a handler instance serves.
type sessionSet struct {
	mu sync.Mutex
	m  map[*session]struct{}
}

func newSessionSet() *sessionSet { return &sessionSet{m: make(map[*session]struct{})} }

func (ss *sessionSet) add(s *session) {
	ss.mu.Lock()
	ss.m[s] = struct{}{}
	ss.mu.Unlock()
}

func (ss *sessionSet) remove(s *session) {
	ss.mu.Lock()
	delete(ss.m, s)
	ss.mu.Unlock()
}

// closeAll asks every session to close; it does not wait for them.
func (ss *sessionSet) closeAll(c closeInfo) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for s := range ss.m {
		s.close(c)
	}
}
