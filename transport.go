package duplex

import (
	"bufio"
	"errors"
	"io"
	"net/http"
	"sync"
	"time"
)

// Transport names, as used in the `transports` option and the
// Duplex-Transport header.
const (
	transportWebSocket = "websocket"
	transportStream    = "stream"
	transportSSE       = "sse"
)

// errTooBig is returned by readMessage for a client message larger than
// max_message_size; the message was discarded and the connection is still
// usable.
var errTooBig = errors.New("duplex: message too big")

// errClientClosed is returned by readMessage when the client closed the
// session on purpose (a WebSocket close frame), rather than losing its
// connection: the session ends instead of waiting for a resume.
var errClientClosed = errors.New("duplex: closed by the client")

// transport moves frames over one client connection. A session reads from
// it in one goroutine and writes to it from another; implementations make
// control writes (pongs, pings, close) safe to call alongside writeFrame.
type transport interface {
	// name is the transport's name (transportWebSocket, …).
	name() string
	// attached tells the transport the token of the session it now
	// serves (SSE event ids carry cursors).
	attached(token string)
	// outlivesRequest reports whether the connection no longer needs its
	// request (a hijacked HTTP/1.1 connection): see attachment.start.
	outlivesRequest() bool
	// readMessage returns the next client message, and whether it was
	// binary. It returns errTooBig for an oversize message and any other
	// error once the connection is gone.
	readMessage() (msg []byte, binary bool, err error)
	// writeFrame buffers one server frame of type typ, the concatenation
	// of a, b and c (split so a push can be written without being copied).
	// seq is the push's sequence number, or for an open frame the cursor
	// the client is at (SSE sends both as event ids).
	writeFrame(typ string, seq uint64, a, b, c []byte) error
	// flush sends what writeFrame buffered.
	flush() error
	// ping sends a heartbeat.
	ping() error
	// close sends the transport's own close signal, if it has one (the
	// close frame was written before). Calls after the first do nothing.
	close(code int, reason string) error
	// end releases the connection: a blocked readMessage or write returns.
	end() error
}

// frameWriter is the writing side every transport shares: frames go to
// the connection taken over, or to the response inside the request (rc
// set), in bursts, under one lock with the session's write deadline.
type frameWriter struct {
	wmu sync.Mutex // guards the burst writer and the write deadline
	wd  writeDeadline
	burstWriter
}

func (o *frameWriter) flush() error {
	o.wmu.Lock()
	defer o.wmu.Unlock()
	return o.flushBurst()
}

// writeNow writes b, whole frames outside any burst (a ping), and
// flushes it.
func (o *frameWriter) writeNow(b []byte) error {
	return o.writeNowWith(func(w io.Writer) error {
		_, err := w.Write(b)
		return err
	})
}

// writeNowWith is writeNow for frames write encodes (a WebSocket control
// frame), straight into the burst buffer: nothing is allocated for them.
func (o *frameWriter) writeNowWith(write func(io.Writer) error) error {
	o.wmu.Lock()
	defer o.wmu.Unlock()
	o.wd.refresh()
	if err := write(o.buffer()); err != nil {
		return err
	}
	return o.flushBurst()
}

// burstWriter buffers the frames of one burst of writes in a pooled buffer
// and hands them to the connection in one write, so an idle connection
// holds no buffer and a burst costs one write (and one deadline update in
// Caddy's response wrappers) instead of one per piece.
type burstWriter struct {
	out io.Writer // the connection or response
	// rc is the response's controller while the session runs inside its
	// request: each burst written to the response is flushed through it.
	// It is nil on a connection the session writes to directly, where the
	// burst's write is all.
	rc *http.ResponseController
	bw *bufio.Writer // from writerPool while a burst is being written
}

var writerPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4096) }}

// buffer returns the write buffer of the current burst.
func (b *burstWriter) buffer() *bufio.Writer {
	if b.bw == nil {
		b.bw = writerPool.Get().(*bufio.Writer)
		b.bw.Reset(b.out)
	}
	return b.bw
}

// flushBurst writes the burst out, gives its buffer back and flushes the
// response, if there is one.
func (b *burstWriter) flushBurst() error {
	if b.bw != nil {
		err := b.bw.Flush()
		b.bw.Reset(nil)
		writerPool.Put(b.bw)
		b.bw = nil
		if err != nil {
			return err
		}
	}
	if b.rc == nil {
		return nil
	}
	return b.rc.Flush()
}

// writeDeadline keeps a write deadline of about idle ahead on a session's
// connection, or on its response inside a request: a peer that stops
// reading blocks a write for at most that long, whatever Caddy's own
// write idle timeout is (a server may turn it off). It is pushed forward
// only once a quarter of it has passed, not for every frame. That must
// keep it ahead of the next heartbeat (one every idle/2) with room to
// spare: over HTTP/2 a write deadline that passes resets the stream even
// when no write is pending, so one refreshed only at half-time could
// expire between two pings that are a little late. Its owner's write lock
// guards it.
type writeDeadline struct {
	set  func(time.Time) error
	idle time.Duration
	at   time.Time
}

func (d *writeDeadline) refresh() {
	now := time.Now()
	if d.at.Sub(now) > d.idle*3/4 {
		return
	}
	d.at = now.Add(d.idle)
	_ = d.set(d.at)
}
