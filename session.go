package duplex

import (
	"container/list"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// closeGrace is how long a closing WebSocket waits for the client to
// answer the close before the connection is dropped.
const closeGrace = 2 * time.Second

// session is one client's duplex session: its identity, its channels (kept
// by the hub), its push sequence and resume buffer, its inbox of client
// messages and the answers the client may not have seen yet. A session
// outlives its connections: when one drops, the session is detached and
// keeps buffering pushes (and serving the messages it accepted) for
// resume_window; a client that resumes with its cursor gets a new
// attachment on the same session.
//
// Frames for the client are only ever queued; the attachment's writer
// goroutine drains the queue into the transport, so publishers never wait
// on a socket.
//
// Locks: hub.mu is taken before a session's mu, never after; s.mu before
// the hub's detached-list lock (hub.dmu) and the rate gate's lock, which
// take no other lock. No code holds two sessions' mu at once.
type session struct {
	id, token string
	user      string
	opened    time.Time
	hub       *hub
	// scope is the key of the handler that opened the session: only a
	// handler in the same place accepts its token (see Handler.key).
	scope string
	// ipKey counts the session against max_sessions_per_ip ("" if not).
	ipKey string
	// sem bounds the messages served at once (max_inflight), across
	// attachments, so a resumed session keeps its inbound ordering.
	sem chan struct{}
	in  *inbox
	// posts counts the SSE POSTs being read for this session.
	posts atomic.Int32
	// detached is the session's element in the hub's detached list while
	// it waits for a resume; guarded by hub.dmu.
	detached *list.Element

	// channels is guarded by hub.mu.
	channels map[string]struct{}

	// ctx ends when the session ends for good; messages run under it.
	ctx    context.Context
	cancel context.CancelFunc
	// upstream is set while a connect hook stream relays pushes.
	upstream atomic.Bool
	// gate applies the rate limit to the client's messages.
	gate *rateGate

	mu       sync.Mutex // guards the fields below and the attachments' queues
	seq      uint64     // last push sequence number assigned
	log      []logEntry // resume buffer: the latest pushes, oldest first
	logBytes int64
	// held are the answers the client may not have seen: see send.
	held      []heldAnswer
	heldBytes int64
	cur       *attachment // nil while detached
	// What the latest connection brought: the handler whose options
	// apply, what requests through the route are built from, and the
	// route itself.
	h         *Handler
	base      *requestBase
	next      caddyhttp.Handler
	transport string
	remote    string
	gen       uint64 // counts attachments; guards the expiry timer
	expiry    *time.Timer
	ended     bool
	endReason string
	endKind   string // metric label
	// counters for the session's log lines
	received, pushed, resumes int64
}

// heldAnswer is an answer (ack, reply or error of a message with an id)
// kept until the client has surely seen it. pos is the seq of the last
// push queued before it on its connection: a client whose cursor or ack
// is past pos has read the answer, since a connection delivers frames in
// order.
type heldAnswer struct {
	typ string
	b   []byte
	pos uint64
}

// maxHeldAnswers bounds the answers a session holds (also to send_queue
// bytes); past it the oldest, most likely seen, are forgotten.
const maxHeldAnswers = 2 * inboxSize

// logEntry is a push kept for resume.
type logEntry struct {
	seq  uint64
	push *push
}

// attachment is one connection serving a session.
type attachment struct {
	s         *session
	h         *Handler
	base      *requestBase      // handed to the session when attached
	next      caddyhttp.Handler // likewise
	t         transport
	transport string
	remote    string

	// guarded by s.mu
	out      []outFrame // frames waiting for the writer
	outBytes int64
	lastPush uint64     // seq of the last push queued (the cursor at first)
	closing  *closeInfo // set once the connection must end
	closed   bool       // the close frame was handed to the writer
	writing  bool       // a writer goroutine is draining out
	stopped  bool       // the connection is done: no writer starts

	writers    sync.WaitGroup
	readerDone chan struct{} // closed when the reader has returned
	pinger     *time.Timer

	ctx    context.Context // ends with the connection
	cancel context.CancelFunc
}

// outFrame is a frame waiting to be written: a push (shared payload plus
// this session's sequence number) or an already encoded frame.
type outFrame struct {
	push *push
	seq  uint64 // of a push; the cursor of an open frame
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

func newSession(h *Handler, user string) *session {
	ctx, cancel := context.WithCancel(context.Background())
	s := &session{
		id:     randomID(16), // 128 bits
		token:  randomID(24), // 192 bits
		user:   user,
		opened: time.Now(),
		hub:    h.hub,
		scope:  h.key,
		sem:    make(chan struct{}, h.MaxInflight),
		gate:   newRateGate(h.Rate, h.Burst),
		h:      h,
		ctx:    ctx,
		cancel: cancel,
	}
	s.in = newInbox(s)
	return s
}

// newAttachment prepares a connection for s, opened by r.
func newAttachment(s *session, h *Handler, r *http.Request, next caddyhttp.Handler, transport string, t transport) *attachment {
	base := r.Context()
	if _, hijacked := t.(*wsConn); hijacked && r.ProtoMajor == 1 {
		// The connection outlives the request (see start).
		base = context.Background()
	}
	ctx, cancel := context.WithCancel(base)
	return &attachment{
		s:          s,
		h:          h,
		base:       newRequestBase(r),
		next:       next,
		t:          t,
		transport:  transport,
		remote:     r.RemoteAddr,
		readerDone: make(chan struct{}),
		ctx:        ctx,
		cancel:     cancel,
	}
}

// route is what a request through the route is made of now.
func (s *session) route() (*Handler, *requestBase, caddyhttp.Handler, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.h, s.base, s.next, s.transport
}

// parseCursor splits a resume cursor <token>:<seq>.
func parseCursor(c string) (token string, seq uint64, ok bool) {
	i := strings.LastIndexByte(c, ':')
	if i <= 0 {
		return "", 0, false
	}
	seq, err := strconv.ParseUint(c[i+1:], 10, 64)
	if err != nil {
		return "", 0, false
	}
	return c[:i], seq, true
}

// attach makes a the session's connection and queues the open frame. For
// a resume (resumed true), the answers the client may have missed and the
// pushes after lastSeq follow it, then live frames: all under one lock, so
// there is no gap and no duplicate push. A connection still attached is
// closed in favour of the new one. It reports false if the session cannot
// take a (it ended, or lastSeq is not resumable).
func (s *session) attach(a *attachment, resumed bool, lastSeq uint64, data json.RawMessage) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return false
	}
	if resumed && !s.resumableLocked(lastSeq) {
		return false
	}
	if old := s.cur; old != nil {
		old.closeLocked(closeReplaced)
	}
	if s.expiry != nil {
		s.expiry.Stop()
		s.expiry = nil
	}
	s.hub.undetach(s)
	s.gen++
	s.cur = a
	s.h, s.base, s.next, s.transport, s.remote = a.h, a.base, a.next, a.transport, a.remote
	a.base, a.next = nil, nil
	if c, ok := a.t.(*sseConn); ok {
		c.setToken(s.token)
	}
	cursor := uint64(0) // a new session: pushes from a connect stream
	if resumed {
		cursor = lastSeq
		s.resumes++
		s.trimLocked(lastSeq) // the client has everything up to lastSeq
		s.confirmLocked(lastSeq)
	}
	a.lastPush = cursor
	a.queueLocked(outFrame{typ: frameOpen, seq: cursor, b: encodeOpen(openFrame{
		Session:   s.id,
		Token:     s.token,
		Resumed:   resumed,
		Heartbeat: int64(time.Duration(a.h.Heartbeat) / time.Second),
		Data:      data,
	})})
	for i := range s.held {
		s.held[i].pos = cursor
		a.queueLocked(outFrame{typ: s.held[i].typ, b: s.held[i].b})
	}
	for _, e := range s.log {
		if e.seq > cursor {
			a.queueLocked(outFrame{push: e.push, seq: e.seq})
		}
	}
	a.wakeWriter()
	return true
}

// queueLocked adds f to the writer's queue, whatever its size.
func (a *attachment) queueLocked(f outFrame) {
	a.out = append(a.out, f)
	a.outBytes += f.size()
	if f.push != nil {
		a.lastPush = f.seq
	}
}

// resumableLocked reports whether a client that has every push up to
// lastSeq can continue: the pushes after it are all still buffered.
func (s *session) resumableLocked(lastSeq uint64) bool {
	if lastSeq > s.seq {
		return false
	}
	if lastSeq == s.seq {
		return true
	}
	return len(s.log) > 0 && s.log[0].seq <= lastSeq+1
}

// trimLocked forgets buffered pushes up to seq (the client has them).
func (s *session) trimLocked(seq uint64) {
	i := 0
	for i < len(s.log) && s.log[i].seq <= seq {
		s.logBytes -= int64(s.log[i].push.frameSize(s.log[i].seq))
		i++
	}
	if i > 0 {
		clear(s.log[:i])
		s.log = s.log[i:]
	}
}

// confirmLocked forgets the held answers queued before push seq: a client
// that has push seq has read them.
func (s *session) confirmLocked(seq uint64) {
	i := 0
	for i < len(s.held) && s.held[i].pos < seq {
		s.heldBytes -= int64(len(s.held[i].b))
		i++
	}
	s.dropHeldLocked(i)
}

func (s *session) dropHeldLocked(n int) {
	if n > 0 {
		clear(s.held[:n])
		s.held = s.held[n:]
	}
}

// ack is the client's {"type":"ack","seq":N}.
func (s *session) ack(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.trimLocked(seq)
	s.confirmLocked(seq)
}

// push gives the session the next push: it is buffered for resume and, if a
// connection is attached, queued for it. It reports whether the session
// took it (false once the session has ended). A detached session takes it:
// it gets it when it resumes.
func (s *session) push(p *push) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return false
	}
	s.seq++
	s.pushed++
	e := logEntry{seq: s.seq, push: p}
	s.log = append(s.log, e)
	s.logBytes += int64(p.frameSize(s.seq))
	for len(s.log) > 1 && (len(s.log) > s.h.ResumeBuffer || s.logBytes > s.h.ResumeBufferSize) {
		s.trimLocked(s.log[0].seq)
	}
	switch a := s.cur; {
	case a == nil:
		metrics.pushBuffered.Inc()
	case a.enqueueLocked(outFrame{push: p, seq: e.seq}):
		metrics.pushDelivered.Inc()
	default:
		metrics.pushDropped.Inc()
	}
	return true
}

// send queues an encoded frame (ack, reply, error) for the connection
// attached now. The answer to a message with an id (ref) is also held
// until the client has surely read it (its cursor or an ack passes it),
// and sent again after the open frame of a resume: every accepted message
// gets its answer, even if the connection dropped before or after it was
// written. A client ignores a second answer to the same ref.
func (s *session) send(typ string, ref json.RawMessage, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return
	}
	a := s.cur
	if hasID(ref) {
		pos := s.seq // detached: after every push so far
		if a != nil {
			pos = a.lastPush
		}
		s.held = append(s.held, heldAnswer{typ: typ, b: b, pos: pos})
		s.heldBytes += int64(len(b))
		n := 0
		for len(s.held)-n > 1 && (len(s.held)-n > maxHeldAnswers || s.heldBytes > s.h.SendQueue) {
			s.heldBytes -= int64(len(s.held[n].b))
			n++
		}
		s.dropHeldLocked(n)
	}
	if a != nil {
		a.enqueueLocked(outFrame{typ: typ, b: b})
	}
}

// end ends the session for good with close frame c, if it has not ended
// yet; the caller then removes it from the hub. It reports whether this
// call ended it.
func (s *session) end(c closeInfo) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.endLocked(c)
}

func (s *session) endLocked(c closeInfo) bool {
	if s.ended {
		return false
	}
	s.ended = true
	s.endReason = c.Reason
	s.endKind = c.kind
	if s.expiry != nil {
		s.expiry.Stop()
		s.expiry = nil
	}
	s.hub.undetach(s)
	if a := s.cur; a != nil {
		a.closeLocked(c)
	}
	s.log, s.logBytes = nil, 0
	s.held, s.heldBytes = nil, 0
	s.cancel()
	return true
}

// ending reports whether the session has ended.
func (s *session) ending() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ended
}

// detach is called when a's connection is gone. Unless the session ended
// or a newer connection took over, it stays for resume_window, buffering
// pushes and serving the messages it accepted; with no window it ends
// now. It reports whether this call ended the session (the caller then
// calls finish), and a session detached longer that must end because this
// one made max_detached full (the caller terminates it).
func (s *session) detach(a *attachment, reason string) (endedNow bool, evicted *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended || s.cur != a {
		return false, nil
	}
	s.cur = nil
	window := time.Duration(a.h.ResumeWindow)
	if window <= 0 {
		return s.endLocked(closeInfo{Reason: reason, kind: "connection_lost"}), nil
	}
	gen := s.gen
	s.expiry = time.AfterFunc(window, func() { s.expire(gen) })
	return false, s.hub.detach(s, a.h.MaxDetached)
}

// expire ends a session still detached since attachment gen.
func (s *session) expire(gen uint64) {
	s.mu.Lock()
	ended := s.cur == nil && s.gen == gen && s.endLocked(closeInfo{Reason: "resume window expired", kind: "expired"})
	s.mu.Unlock()
	if ended {
		s.finish()
	}
}

// terminate ends the session for good with close frame c and unregisters
// it. It must not be called with hub.mu held.
func (s *session) terminate(c closeInfo) bool {
	if !s.end(c) {
		return false
	}
	s.finish()
	return true
}

// finish unregisters an ended session and logs its end. It must not be
// called with hub.mu held.
func (s *session) finish() {
	s.hub.remove(s)
	s.mu.Lock()
	kind, reason, h := s.endKind, s.endReason, s.h
	s.mu.Unlock()
	if h.Disconnect != "" {
		h.sendDisconnect(s, reason)
	}
	if kind == "" {
		kind = "other"
	}
	metrics.ended.WithLabelValues(kind).Inc()
	s.logEnd()
}

func (s *session) logEnd() {
	s.mu.Lock()
	h := s.h
	fields := []zap.Field{
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.Duration("duration", time.Since(s.opened)),
		zap.Int64("messages", s.received),
		zap.Int64("pushes", s.pushed),
		zap.Int64("resumes", s.resumes),
		zap.String("reason", s.endReason),
		zap.String("transport", s.transport),
		zap.String("remote", s.remote),
	}
	s.mu.Unlock()
	h.logger.Info("session closed", fields...)
}

// enqueueLocked queues f for the writer and reports whether it did. A
// connection whose queue would exceed send_queue is closed as a slow
// consumer instead; the session stays and can resume from its buffer.
func (a *attachment) enqueueLocked(f outFrame) bool {
	if a.closing != nil {
		return false
	}
	n := f.size()
	if a.outBytes+n > a.h.SendQueue {
		a.closeLocked(closeSlow)
		metrics.slowClosures.Inc()
		return false
	}
	a.queueLocked(f)
	a.wakeWriter()
	return true
}

// wakeWriter makes sure a writer goroutine drains the queue. Writers run
// only while there is something to write, so an idle connection holds none.
// Called with s.mu held.
func (a *attachment) wakeWriter() {
	if a.writing || a.stopped || a.t == nil {
		return
	}
	a.writing = true
	a.writers.Go(a.writeBurst)
}

// close ends the connection with close frame c (the session stays unless
// it was ended).
func (a *attachment) close(c closeInfo) {
	a.s.mu.Lock()
	defer a.s.mu.Unlock()
	a.closeLocked(c)
}

func (a *attachment) closeLocked(c closeInfo) {
	if a.closing != nil {
		return
	}
	a.closing = &c
	a.wakeWriter()
}

// take hands the queued frames to the writer. With nothing to write it
// reports done, and the writer ends.
func (a *attachment) take(buf []outFrame) (frames []outFrame, closing *closeInfo, done bool) {
	a.s.mu.Lock()
	defer a.s.mu.Unlock()
	if len(a.out) == 0 && (a.closing == nil || a.closed) {
		a.writing = false
		a.out = nil
		return buf, nil, true
	}
	buf = append(buf[:0], a.out...)
	clear(a.out)
	a.out = a.out[:0]
	a.outBytes = 0
	if a.closing != nil {
		a.closed = true // the close frame is written once, after these
	}
	return buf, a.closing, false
}

// closeReason is why the connection is closing, "" if it is not.
func (a *attachment) closeReason() string {
	a.s.mu.Lock()
	defer a.s.mu.Unlock()
	if a.closing != nil {
		return a.closing.Reason
	}
	return ""
}

// fail ends the connection after a write error.
func (a *attachment) fail() {
	_ = a.t.end()
	a.cancel()
}

// writeBurst writes queued frames until the queue is empty (or the close
// frame is written).
func (a *attachment) writeBurst() {
	t := a.t
	var frames []outFrame
	var seqBuf [20]byte
	for {
		var closing *closeInfo
		var done bool
		frames, closing, done = a.take(frames)
		if done {
			return
		}
		for _, f := range frames {
			var err error
			if f.push != nil {
				err = t.writeFrame(framePush, f.seq, pushPrefix, strconv.AppendUint(seqBuf[:0], f.seq, 10), f.push.suffix)
			} else {
				err = t.writeFrame(f.typ, f.seq, f.b, nil, nil)
			}
			if err != nil {
				a.h.logger.Debug("write failed", zap.String("session", a.s.id), zap.Error(err))
				a.fail()
				return
			}
		}
		clear(frames)
		if closing != nil {
			if !closing.quiet {
				_ = t.writeFrame(frameClose, 0, encodeClose(*closing), nil, nil)
				_ = t.flush()
				_ = t.close(closing.Code, closing.Reason)
			}
			// Give the client a moment to answer the close, so the
			// connection is not reset under its last frames.
			timer := time.NewTimer(closeGrace)
			select {
			case <-a.readerDone:
			case <-timer.C:
			}
			timer.Stop()
			a.fail()
			return
		}
		if err := t.flush(); err != nil {
			a.fail()
			return
		}
	}
}

// heartbeat pings the peer every heartbeat, from a timer (no goroutine
// waits for it in between); a failed ping ends the connection.
func (a *attachment) heartbeat() {
	if a.ctx.Err() != nil {
		return
	}
	if err := a.t.ping(); err != nil {
		a.fail()
		return
	}
	a.s.mu.Lock()
	a.pinger.Reset(time.Duration(a.h.Heartbeat))
	a.s.mu.Unlock()
}

// run serves the attachment until its connection ends: client messages are
// read here, queued frames written by a writer goroutine, messages served
// by a dispatcher goroutine.
func (a *attachment) run() {
	s := a.s
	a.h.live.add(a)
	if age := time.Duration(a.h.MaxAge); age > 0 {
		timer := time.AfterFunc(age, func() { a.close(closeMaxAge) })
		defer timer.Stop()
	}
	gauge := metrics.connections.WithLabelValues(a.transport)
	gauge.Inc()
	defer gauge.Dec()
	a.s.mu.Lock()
	a.pinger = time.AfterFunc(time.Duration(a.h.Heartbeat), a.heartbeat)
	a.s.mu.Unlock()

	a.readLoop()
	close(a.readerDone)
	if a.closeReason() == "" {
		// The client went away: nothing more can be written.
		_ = a.t.end()
		a.cancel()
	}
	a.s.mu.Lock()
	a.stopped = true // no writer starts any more
	a.s.mu.Unlock()
	a.writers.Wait()
	a.pinger.Stop()
	a.cancel()
	_ = a.t.close(1001, "going away")
	_ = a.t.end()
	a.h.live.remove(a)

	reason := a.closeReason()
	if reason == "" {
		reason = "connection lost"
	}
	endedNow, evicted := s.detach(a, reason)
	if evicted != nil {
		evicted.terminate(closeEvicted)
	}
	if endedNow {
		s.finish()
		return
	}
	if !s.ending() {
		a.h.logger.Info("session detached",
			zap.String("session", s.id),
			zap.String("transport", a.transport),
			zap.String("remote", a.remote),
			zap.String("reason", reason))
	}
}

// start runs the attachment. A WebSocket on a hijacked HTTP/1.1
// connection no longer needs the request: it runs in a goroutine of its own
// and the request's handler returns, so an idle session does not keep
// Caddy's whole handler stack (and the server's connection goroutine)
// alive. Streams over HTTP/2, stream and SSE must stay inside their
// request.
func (a *attachment) start() {
	if c, ok := a.t.(*wsConn); ok && c.hijacked {
		go a.run()
		return
	}
	a.run()
}

// readLoop reads client messages until the connection fails or closes.
func (a *attachment) readLoop() {
	for {
		msg, binary, err := a.t.readMessage()
		if errors.Is(err, errTooBig) {
			metrics.messages.WithLabelValues("too_large").Inc()
			a.s.send(frameErr, nil, encodeError(nil, http.StatusRequestEntityTooLarge,
				"message larger than max_message_size ("+strconv.FormatInt(a.h.MaxMessageSize, 10)+" bytes)"))
			continue
		}
		if err != nil {
			if errors.Is(err, errClientClosed) && a.closeReason() == "" {
				// A WebSocket close started by the client ends the
				// session; one answering our close only ends the
				// connection (the session may be resumable).
				// The close frame was echoed: nothing follows it.
				a.s.terminate(closeInfo{Reason: "closed by the client", kind: "client", quiet: true})
			}
			return
		}
		a.s.mu.Lock()
		a.s.received++
		a.s.mu.Unlock()
		if !a.s.in.put(inMsg{msg, binary}, a.ctx.Done()) {
			return
		}
	}
}

// tokenMatches compares a presented token with the session's in constant
// time.
func (s *session) tokenMatches(token string) bool {
	return subtle.ConstantTimeCompare([]byte(s.token), []byte(token)) == 1
}

// attachmentSet is the set of connections a handler instance serves.
type attachmentSet struct {
	mu sync.Mutex
	m  map[*attachment]struct{}
}

func newAttachmentSet() *attachmentSet {
	return &attachmentSet{m: make(map[*attachment]struct{})}
}

func (as *attachmentSet) add(a *attachment) {
	as.mu.Lock()
	as.m[a] = struct{}{}
	as.mu.Unlock()
}

func (as *attachmentSet) remove(a *attachment) {
	as.mu.Lock()
	delete(as.m, a)
	as.mu.Unlock()
}

// closeAll asks every connection to close; it does not wait for them.
func (as *attachmentSet) closeAll(c closeInfo) {
	as.mu.Lock()
	defer as.mu.Unlock()
	for a := range as.m {
		a.close(c)
	}
}
