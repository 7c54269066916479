package duplex

import "sync"

// outbox is one connection's queue of frames for the client: the frames
// waiting for the writer, their size, the cursor of the last push queued,
// and whether the connection is closing. Publishers and message answers
// only queue; the attachment's writer (run by the write pool) takes what
// is queued and writes it, so nobody waits on a socket but the writer.
//
// An outbox has its own lock, taken after the session's mu (a session
// queues under its mu, so that the order of pushes and answers is the
// order of the session's decisions) and alone by the writer, which thus
// never waits for the session.
type outbox struct {
	limit int64 // send_queue: a queue that would grow past it is closed as slow

	mu       sync.Mutex // guards the fields below
	frames   []outFrame // waiting for the writer
	bytes    int64      // the size of frames
	lastPush uint64     // seq of the last push queued (the cursor at first)
	closing  *closeInfo // set once the connection must end
	closed   bool       // the close frame was handed to the writer
	writing  bool       // a writer is draining the queue
	stopped  bool       // the connection is done: no writer starts any more

	// writers counts what may still write to or drop the connection (the
	// writer, a heartbeat in flight, the wait for the client's answer to
	// a close); each is added under mu while not stopped (or by a writer
	// still counted), so once stop returns, writers.Wait waits for them
	// all.
	writers sync.WaitGroup
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

// queue adds frames whatever their size (a resume's backlog, the open
// frame), unless the connection is closing. It reports whether a writer
// must be started.
func (o *outbox) queue(fs ...outFrame) (wake bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closing != nil {
		return false
	}
	for _, f := range fs {
		o.addLocked(f)
	}
	return o.wakeLocked()
}

func (o *outbox) addLocked(f outFrame) {
	o.frames = append(o.frames, f)
	o.bytes += f.size()
	if f.push != nil {
		o.lastPush = f.seq
	}
}

// offer queues f if it fits under the limit. A frame that does not fit
// closes the connection as a slow consumer instead (the session keeps the
// push in its resume buffer). It reports whether f was queued, whether
// this call closed the connection as slow, and whether a writer must be
// started.
func (o *outbox) offer(f outFrame) (queued, slow, wake bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closing != nil {
		return false, false, false
	}
	if o.bytes+f.size() > o.limit {
		c := closeSlow
		o.closing = &c
		return false, true, o.wakeLocked()
	}
	o.addLocked(f)
	return true, false, o.wakeLocked()
}

// cursor is the seq of the last push queued.
func (o *outbox) cursor() uint64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.lastPush
}

// setCursor starts the queue at cursor: the pushes up to it are the
// client's already.
func (o *outbox) setCursor(cursor uint64) {
	o.mu.Lock()
	o.lastPush = cursor
	o.mu.Unlock()
}

// close makes c the connection's last frame, after what is queued; only
// the first call counts. It reports whether a writer must be started.
func (o *outbox) close(c closeInfo) (wake bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closing != nil {
		return false
	}
	o.closing = &c
	return o.wakeLocked()
}

// closeReason is why the connection is closing, "" if it is not.
func (o *outbox) closeReason() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closing != nil {
		return o.closing.Reason
	}
	return ""
}

// wakeLocked marks a writer as needed and reports whether one must be
// started (it is counted in writers already; it calls writers.Done when it
// returns): writers run only while there is something to write, so an
// idle connection holds none.
func (o *outbox) wakeLocked() bool {
	if o.writing || o.stopped {
		return false
	}
	o.writing = true
	o.writers.Add(1)
	return true
}

// keptFrames is the queue capacity an outbox keeps once drained: enough
// for the push or two of steady traffic, so that queueing it allocates
// nothing per subscriber, and little for an idle session to hold.
const keptFrames = 2

// take hands the queued frames (in buf) to the writer, with the close
// frame to write after them, if the connection is closing. With nothing to
// write it reports done, and the writer ends.
func (o *outbox) take(buf []outFrame) (frames []outFrame, closing *closeInfo, done bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.frames) == 0 && (o.closing == nil || o.closed) {
		o.writing = false
		if cap(o.frames) > keptFrames {
			o.frames = nil // a burst's queue is given back
		}
		return buf, nil, true
	}
	buf = append(buf[:0], o.frames...)
	clear(o.frames)
	o.frames = o.frames[:0]
	o.bytes = 0
	if o.closing != nil {
		o.closed = true // the close frame is written once, after these
	}
	return buf, o.closing, false
}

// enter counts another writer (a heartbeat) unless the connection is
// done; it then calls writers.Done when it returns.
func (o *outbox) enter() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.stopped {
		return false
	}
	o.writers.Add(1)
	return true
}

// stop marks the connection done and waits for its writers: none starts
// any more.
func (o *outbox) stop() {
	o.mu.Lock()
	o.stopped = true
	o.mu.Unlock()
	o.writers.Wait()
}
