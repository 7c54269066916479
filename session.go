package duplex

import (
	"container/list"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// session is one client's duplex session: its identity, its channels (kept
// by the hub), its push sequence and resume buffer, its inbox of client
// messages and the answers the client may not have seen yet. A session
// outlives its connections: when one drops, the session is detached and
// keeps buffering pushes (and serving the messages it accepted) for
// resume_window; a client that resumes with its cursor gets a new
// attachment on the same session.
//
// Frames for the client are only ever queued in the attachment's outbox;
// its writer (run on the write pool) drains the queue into the transport,
// so publishers never wait on a socket.
//
// Lock order: hub.mu or a connect stream's hookWriter.mu, then a session's
// mu, then one of the locks that take no other: the hub's detached-list
// lock (hub.dmu), the attachment's outbox lock, the rate gate's lock. The
// inbox, transport (wmu) and trims locks, and the hub's count of POSTs
// being read, are never held while another is taken; a handler's
// attachmentSet lock only before outbox locks (closeAll); the write pool's
// lock last (a woken writer is handed to the pool), never with an outbox's
// held, and it takes no other. No code holds two sessions' mu at once; end
// must be called with no lock held (it unregisters the session and runs
// the disconnect hook).
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
	// detached is the session's element in the hub's detached list while
	// it waits for a resume; guarded by hub.dmu.
	detached *list.Element

	// ctx ends when the session ends here: for good, or by moving to
	// another node of a cluster.
	ctx    context.Context
	cancel context.CancelFunc
	// serving ends once the inbox stops (see inbox): messages run under
	// it, so those a session accepted before it moved away are served.
	serving     context.Context
	stopServing context.CancelFunc
	// upstream is set while a connect hook stream relays pushes.
	upstream atomic.Bool
	// gate applies the rate limit to the client's messages.
	gate *rateGate
	// received counts the client's messages, for the session's log line.
	received atomic.Int64
	// claimed: made on this node to resume a session a clustered broker
	// knows (held elsewhere or by nobody); not in the hub until attached.
	claimed bool
	// trims carries the client's acks to the goroutine that trims the
	// session's log in Redis (broker redis only; see RedisBroker.acked).
	trims trimQueue

	mu    sync.Mutex // guards the fields below
	state sessionState
	cur   *attachment // the connection, while attached
	seq   uint64      // last push sequence number assigned
	// log is the resume buffer: the latest pushes, oldest first.
	log      []logEntry
	logBytes int64
	// held are the answers the client may not have seen: see send.
	held      []heldAnswer
	heldBytes int64
	// What the latest connection brought: the handler whose options
	// apply, what requests through the route are built from, and the
	// route itself.
	h         *Handler
	base      *requestBase
	next      caddyhttp.Handler
	transport string
	remote    string
	gen       uint64 // counts attachments; guards the expiry timer
	acked     uint64 // the highest push seq the client acked
	expiry    *time.Timer
	endReason string
	endKind   string // metric label
	// movedAway: the session ended here by moving to another node; the
	// answers to the messages it had accepted go there (broker.answer).
	movedAway bool
	// counters for the session's log lines
	pushed, resumes int64
}

// sessionState is where a session is in its life. A session is created
// new while its opening is decided, then is attached to one connection
// at a time, detached between connections, and ended once, by end.
type sessionState uint8

const (
	stateNew      sessionState = iota // being opened: not attached yet
	stateAttached                     // cur serves it
	stateDetached                     // waiting resume_window for a resume
	stateEnded                        // for good
)

func (st sessionState) String() string {
	switch st {
	case stateNew:
		return "new"
	case stateAttached:
		return "attached"
	case stateDetached:
		return "detached"
	default:
		return "ended"
	}
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

// newIDs returns a session's id (128 bits) and token (192 bits) from one
// read of crypto/rand, base64url-encoded.
func newIDs() (id, token string) {
	var b [16 + 24]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("duplex: crypto/rand: " + err.Error()) // never fails on supported platforms
	}
	// An id never starts with '-' (base64url's 62nd digit), so a command
	// line takes it as an argument, not a flag (caddy duplex sessions
	// delete <id>): the first 6 bits are drawn again until they are not 62.
	for b[0]>>2 == 62 {
		if _, err := rand.Read(b[:1]); err != nil {
			panic("duplex: crypto/rand: " + err.Error())
		}
	}
	return base64.RawURLEncoding.EncodeToString(b[:16]), base64.RawURLEncoding.EncodeToString(b[16:])
}

func newSession(h *Handler, user string) *session {
	ctx, cancel := context.WithCancel(context.Background())
	serving, stopServing := context.WithCancel(context.Background())
	id, token := newIDs()
	s := &session{
		id:     id,
		token:  token,
		user:   user,
		opened: time.Now(),
		hub:    h.hub,
		scope:  h.key,
		sem:    make(chan struct{}, h.MaxInflight),
		gate:   newRateGate(h.Rate, h.Burst),
		h:      h,
		ctx:    ctx,
		cancel: cancel,

		serving:     serving,
		stopServing: stopServing,
	}
	s.in = newInbox(s)
	return s
}

// route is what a request through the route is made of now.
func (s *session) route() (*Handler, *requestBase, caddyhttp.Handler, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.h, s.base, s.next, s.transport
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
	if s.state == stateEnded {
		return false
	}
	if resumed && !s.resumableLocked(lastSeq) {
		return false
	}
	if old := s.cur; old != nil {
		old.close(closeReplaced)
	}
	if s.expiry != nil {
		s.expiry.Stop()
		s.expiry = nil
	}
	s.hub.undetach(s)
	s.state = stateAttached
	s.gen++
	s.cur = a
	s.h, s.base, s.next, s.transport, s.remote = a.h, a.base, a.next, a.t.name(), a.remote
	a.base, a.next = nil, nil
	a.t.attached(s.token)
	cursor := uint64(0) // a new session: pushes from a connect stream
	if resumed {
		cursor = lastSeq
		s.resumes++
		s.trimLocked(lastSeq) // the client has everything up to lastSeq
		s.confirmLocked(lastSeq)
	}
	a.out.setCursor(cursor)
	frames := make([]outFrame, 0, 1+len(s.held)+len(s.log))
	frames = append(frames, outFrame{typ: protocol.TypeOpen, seq: cursor, b: encodeOpen(protocol.Open{
		Session:   s.id,
		Token:     s.token,
		Resumed:   resumed,
		Heartbeat: int64(time.Duration(a.h.Heartbeat) / time.Second),
		Data:      data,
	})})
	for i := range s.held {
		s.held[i].pos = cursor
		frames = append(frames, outFrame{typ: s.held[i].typ, b: s.held[i].b})
	}
	for _, e := range s.log {
		if e.seq > cursor {
			frames = append(frames, outFrame{push: e.push, seq: e.seq})
		}
	}
	a.queue(frames...)
	return true
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
	seq = min(seq, s.seq) // a client cannot ack pushes it has not had
	advanced := seq > s.acked
	if advanced {
		s.acked = seq
	}
	s.trimLocked(seq)
	s.confirmLocked(seq)
	s.mu.Unlock()
	if advanced {
		s.hub.brokerOf().acked(s, seq)
	}
}

// push gives the session the next push: it is buffered for resume and, if a
// connection is attached, queued for it. It reports whether the session
// took it (false once the session has ended). A detached session takes it:
// it gets it when it resumes.
func (s *session) push(p *push) bool { return s.pushSeq(0, p) }

// pushSeq is push with the sequence number a clustered broker assigned (0:
// the next one here). A push the session has already is dropped.
func (s *session) pushSeq(seq uint64, p *push) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pushLocked(seq, p)
}

func (s *session) pushLocked(seq uint64, p *push) bool {
	if s.state == stateEnded {
		return false
	}
	switch {
	case seq == 0:
		seq = s.seq + 1
	case seq <= s.seq:
		return true // had it
	}
	s.seq = seq
	s.pushed++
	e := logEntry{seq: seq, push: p}
	s.log = append(s.log, e)
	s.logBytes += int64(p.frameSize(seq))
	for len(s.log) > 1 && (len(s.log) > s.h.ResumeBuffer || s.logBytes > s.h.ResumeBufferSize) {
		s.trimLocked(s.log[0].seq)
	}
	switch a := s.cur; {
	case a == nil:
		metrics.pushBuffered.Inc()
	case a.offer(outFrame{push: p, seq: seq}):
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
	if s.state == stateEnded {
		moved := s.movedAway
		s.mu.Unlock()
		if moved && hasID(ref) {
			s.hub.brokerOf().answer(s, []heldAnswer{{typ: typ, b: b}}, "")
		}
		return
	}
	defer s.mu.Unlock()
	s.queueAnswerLocked(typ, hasID(ref), b)
}

// queueAnswerLocked queues answer b for the connection attached now, and
// holds it (see send) if it answers a message with an id.
func (s *session) queueAnswerLocked(typ string, held bool, b []byte) {
	a := s.cur
	if held {
		pos := s.seq // detached: after every push so far
		if a != nil {
			pos = a.out.cursor()
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
		a.offer(outFrame{typ: typ, b: b})
	}
}

// takeAnswers queues and holds answers another node served for this
// session (it moved here meanwhile); false if it has ended.
func (s *session) takeAnswers(answers []heldAnswer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == stateEnded {
		return false
	}
	for _, a := range answers {
		s.queueAnswerLocked(a.typ, true, a.b)
	}
	return true
}

// ended reports whether the session has ended.
func (s *session) ended() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state == stateEnded
}

// hasMovedAway reports whether the session ended here by moving to another
// node.
func (s *session) hasMovedAway() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.movedAway
}

// attachedNow reports whether a connection serves the session.
func (s *session) attachedNow() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state == stateAttached
}

// end ends the session for good with close frame c, if it has not ended
// yet, and reports whether this call ended it. It is the one way a
// session ends: the connection (if any) gets c, the buffers go, the
// messages in flight are cancelled, then the session leaves the hub, the
// disconnect hook runs and the end is logged. A session that moved to
// another node (c.moved) ends here the same way, but the messages it
// accepted are still served and their answers, with those the client may
// not have seen, go to that node. It must be called with no lock held.
func (s *session) end(c closeInfo) bool {
	return s.endIf(nil, c)
}

// endIf is end when cond, checked under s.mu (nil: always), holds.
func (s *session) endIf(cond func() bool, c closeInfo) bool {
	s.mu.Lock()
	if s.state == stateEnded || (cond != nil && !cond()) {
		s.mu.Unlock()
		return false
	}
	opened := s.state != stateNew
	s.state = stateEnded
	s.endReason = c.Reason
	s.endKind = c.kind
	if s.expiry != nil {
		s.expiry.Stop()
		s.expiry = nil
	}
	s.hub.undetach(s)
	if a := s.cur; a != nil {
		a.close(c)
		s.cur = nil
	}
	s.log, s.logBytes = nil, 0
	held := s.held
	s.held, s.heldBytes = nil, 0
	s.movedAway = c.moved
	s.cancel()
	// Under mu, with the state: a message offered from now on is refused
	// (401 to a POST), or, for a moved session, still served.
	if c.moved {
		s.in.leave()
	} else {
		s.in.stop()
	}
	h, kind := s.h, c.kind
	s.mu.Unlock()

	if c.moved && len(held) > 0 {
		go s.hub.brokerOf().answer(s, held, "")
	}
	s.hub.remove(s)
	if !opened {
		return true // an opening that did not get to serve the session
	}
	if c.moved {
		h.logger.Info("session moved", zap.String("session", s.id), zap.String("reason", c.Reason))
		return true // another node holds it now, and owns its end
	}
	if !s.hub.brokerOf().ended(s) {
		return true // it moved to another node meanwhile
	}
	if h.Disconnect != "" {
		h.sendDisconnect(s, c.Reason)
	}
	if kind == "" {
		kind = "other"
	}
	metrics.ended.WithLabelValues(kind).Inc()
	s.logEnd()
	return true
}

// detach is called when a's connection is gone. Unless the session ended
// or a newer connection took over, it stays for resume_window, buffering
// pushes and serving the messages it accepted; with no window it ends
// now. It reports whether the session is now detached. A session detached
// longer that this one pushes out of max_detached is ended.
func (s *session) detach(a *attachment, reason string) bool {
	s.mu.Lock()
	if s.state != stateAttached || s.cur != a {
		s.mu.Unlock()
		return false
	}
	window := time.Duration(a.h.ResumeWindow)
	if window <= 0 {
		s.mu.Unlock()
		s.endIf(func() bool { return s.cur == a }, closeInfo{Reason: reason, kind: "connection_lost"})
		return false
	}
	s.state = stateDetached
	s.cur = nil
	gen := s.gen
	s.expiry = time.AfterFunc(window, func() {
		s.endIf(func() bool { return s.state == stateDetached && s.gen == gen },
			closeInfo{Reason: "resume window expired", kind: "expired"})
	})
	evicted := s.hub.detach(s, a.h.MaxDetached)
	s.mu.Unlock()
	s.hub.brokerOf().detached(s, window)
	if evicted != nil {
		// Unless it resumed meanwhile.
		evicted.endIf(func() bool { return evicted.state == stateDetached }, closeEvicted)
	}
	return true
}

func (s *session) logEnd() {
	s.mu.Lock()
	h := s.h
	fields := []zap.Field{
		zap.String("session", s.id),
		zap.String("user", s.user),
		zap.Duration("duration", time.Since(s.opened)),
		zap.Int64("messages", s.received.Load()),
		zap.Int64("pushes", s.pushed),
		zap.Int64("resumes", s.resumes),
		zap.String("reason", s.endReason),
		zap.String("transport", s.transport),
		zap.String("remote", s.remote),
	}
	s.mu.Unlock()
	h.logger.Info("session closed", fields...)
}

// tokenMatches compares a presented token with the session's in constant
// time.
func (s *session) tokenMatches(token string) bool {
	return subtle.ConstantTimeCompare([]byte(s.token), []byte(token)) == 1
}
