package duplex

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// closeGrace is how long a closing WebSocket waits for the client to
// answer the close before the connection is dropped.
const closeGrace = 2 * time.Second

// attachment is one connection serving a session. Its reader (run) reads
// the client's messages into the session's inbox; its outbox queues the
// frames for the client, which its writer writes (on the write pool) only
// while there are some; a timer sends heartbeats. When the connection ends, run
// detaches the session (see session.detach).
type attachment struct {
	s    *session
	h    *Handler
	base *requestBase      // handed to the session when attached
	next caddyhttp.Handler // likewise
	t    transport
	// remote is the client's address, for logs and the sessions API.
	remote string

	out        outbox
	readerDone chan struct{} // closed when the reader has returned
	pinger     *time.Timer   // set by start under out.mu
	// seqBuf is where the writer formats a push's seq: a field, not a
	// local, since a local passed to the transport's writeFrame would be
	// moved to the heap on every burst. Only the writer uses it (one at a
	// time, see outbox.writing).
	seqBuf [20]byte

	ctx    context.Context // ends with the connection
	cancel context.CancelFunc
}

// newAttachment prepares connection t for s, opened by r.
func newAttachment(s *session, h *Handler, r *http.Request, next caddyhttp.Handler, t transport) *attachment {
	base := r.Context()
	if t.outlivesRequest() {
		base = context.Background()
	}
	ctx, cancel := context.WithCancel(base)
	return &attachment{
		s:          s,
		h:          h,
		base:       newRequestBase(r),
		next:       next,
		t:          t,
		remote:     r.RemoteAddr,
		out:        outbox{limit: h.SendQueue},
		readerDone: make(chan struct{}),
		ctx:        ctx,
		cancel:     cancel,
	}
}

// queue adds frames to the outbox whatever their size.
func (a *attachment) queue(fs ...outFrame) {
	if a.out.queue(fs...) {
		writeWorkers.run(a)
	}
}

// offer queues f unless it would overflow send_queue; then the connection
// is closed as a slow consumer instead (the session stays and can resume
// from its buffer). It reports whether f was queued.
func (a *attachment) offer(f outFrame) bool {
	queued, slow, wake := a.out.offer(f)
	if slow {
		metrics.slowClosures.Inc()
	}
	if wake {
		writeWorkers.run(a)
	}
	return queued
}

// close ends the connection with close frame c after what is queued (the
// session stays unless it was ended).
func (a *attachment) close(c closeInfo) {
	if a.out.close(c) {
		writeWorkers.run(a)
	}
}

// drop releases the connection at once, after a write error or once the
// close is written.
func (a *attachment) drop() {
	_ = a.t.end()
	a.cancel()
}

// writeBurst writes queued frames until the queue is empty (or the close
// frame is written). It runs on the write pool (writeWorkers), counted in the
// outbox's writers.
func (a *attachment) writeBurst() {
	defer a.out.writers.Done()
	t := a.t
	var frameBuf [8]outFrame // most bursts fit: no allocation for them
	frames := frameBuf[:0]
	for {
		var closing *closeInfo
		var done bool
		frames, closing, done = a.out.take(frames)
		if done {
			return
		}
		for _, f := range frames {
			var err error
			if f.push != nil {
				err = t.writeFrame(protocol.TypePush, f.seq, pushPrefix, strconv.AppendUint(a.seqBuf[:0], f.seq, 10), f.push.suffix)
			} else {
				err = t.writeFrame(f.typ, f.seq, f.b, nil, nil)
			}
			if err != nil {
				if ce := a.h.logger.Check(zap.DebugLevel, "write failed"); ce != nil {
					ce.Write(zap.String("session", a.s.id), zap.Error(err))
				}
				a.drop()
				return
			}
		}
		clear(frames)
		if closing != nil {
			if !closing.quiet {
				_ = t.writeFrame(protocol.TypeClose, 0, encodeClose(*closing), nil, nil)
				_ = t.flush()
				_ = t.close(closing.Code, closing.Reason)
			}
			// Give the client a moment to answer the close, so the
			// connection is not reset under its last frames; waited for
			// on a goroutine of its own, not the write pool's worker.
			a.out.writers.Add(1)
			go a.awaitCloseAnswer()
			return
		}
		if err := t.flush(); err != nil {
			a.drop()
			return
		}
	}
}

// awaitCloseAnswer drops the connection once the client answered the close
// frame, or after closeGrace. It runs counted in the outbox's writers.
func (a *attachment) awaitCloseAnswer() {
	defer a.out.writers.Done()
	timer := time.NewTimer(closeGrace)
	select {
	case <-a.readerDone:
	case <-timer.C:
	}
	timer.Stop()
	a.drop()
}

// heartbeat pings the peer every heartbeat, from a timer (no goroutine
// waits for it in between); a failed ping ends the connection. A ping
// counts as a writer: run waits for it before the connection (and, for
// HTTP/2 and SSE, the request's response) is given up.
func (a *attachment) heartbeat() {
	if !a.out.enter() {
		return
	}
	defer a.out.writers.Done()
	if a.ctx.Err() != nil {
		return
	}
	if err := a.t.ping(); err != nil {
		a.drop()
		return
	}
	// run stops the timer only after the writers are done.
	a.pinger.Reset(time.Duration(a.h.Heartbeat))
}

// run serves the attachment until its connection ends, then detaches the
// session from it.
func (a *attachment) run() {
	s := a.s
	a.h.live.add(a)
	if age := time.Duration(a.h.MaxAge); age > 0 {
		timer := time.AfterFunc(age, func() { a.close(closeMaxAge) })
		defer timer.Stop()
	}
	name := a.t.name()
	gauge := metrics.connections.WithLabelValues(name)
	gauge.Inc()
	defer gauge.Dec()

	a.readLoop()
	close(a.readerDone)
	if a.out.closeReason() == "" {
		// The client went away: nothing more can be written.
		a.drop()
	}
	a.out.stop() // no writer or ping starts any more; waits for those running
	a.pinger.Stop()
	a.cancel()
	_ = a.t.close(1001, "going away")
	_ = a.t.end()
	a.h.live.remove(a)

	reason := a.out.closeReason()
	if reason == "" {
		reason = "connection lost"
	}
	if s.detach(a, reason) {
		a.h.logger.Info("session detached",
			zap.String("session", s.id),
			zap.String("transport", name),
			zap.String("remote", a.remote),
			zap.String("reason", reason))
	}
}

// start runs the attachment. A connection that outlives its request (any
// transport on an HTTP/1.1 connection taken over) runs in a goroutine of
// its own and the request's handler returns, so an idle session does not
// keep Caddy's whole handler stack (and the server's connection goroutine)
// alive. Sessions over HTTP/2 and HTTP/3 streams stay inside their
// request.
func (a *attachment) start() {
	a.out.mu.Lock() // heartbeat reads pinger after taking it (enter)
	a.pinger = time.AfterFunc(time.Duration(a.h.Heartbeat), a.heartbeat)
	a.out.mu.Unlock()
	if a.t.outlivesRequest() {
		go a.run()
		return
	}
	a.run()
}

// readLoop reads client messages into the session's inbox until the
// connection fails or closes.
func (a *attachment) readLoop() {
	for {
		msg, binary, err := a.t.readMessage()
		if errors.Is(err, errTooBig) {
			metrics.messages.WithLabelValues("too_large").Inc()
			a.s.send(protocol.TypeError, nil, encodeError(nil, http.StatusRequestEntityTooLarge,
				"message larger than max_message_size ("+strconv.FormatInt(a.h.MaxMessageSize, 10)+" bytes)"))
			continue
		}
		if err != nil {
			if errors.Is(err, errClientClosed) && a.out.closeReason() == "" {
				// A WebSocket close started by the client ends the
				// session; one answering our close only ends the
				// connection (the session may be resumable).
				// The close frame was echoed: nothing follows it.
				a.s.end(closeInfo{Reason: "closed by the client", kind: "client", quiet: true})
			}
			return
		}
		a.s.received.Add(1)
		if !a.s.in.put(inMsg{msg, binary}, a.ctx.Done()) {
			return
		}
	}
}

// attachmentSet is the set of connections a handler instance serves.
type attachmentSet struct {
	mu sync.Mutex // guards m
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
