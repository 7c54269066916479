package duplex

import (
	"container/list"
	"sync"
	"time"

	"github.com/caddy-duplex/duplex/protocol"

	"golang.org/x/time/rate"
)

// Abuse limits: a token bucket of client messages per session, caps on
// sessions per user and in the process, a maximum connection age, and the
// idempotency window of publish ids.

// Defaults of the limits.
const (
	defaultRate  = 100 // client messages per second per session
	defaultBurst = 200
	// idempotencyWindow is how long a publish id is remembered.
	idempotencyWindow = 2 * time.Minute
)

var (
	closeRateAbuse = closeInfo{Code: protocol.CodePolicy, Reason: "message rate limit exceeded", kind: "rate_limit"}
	closeTooMany   = closeInfo{Code: protocol.CodeTooMany, Reason: "too many sessions for this user", kind: "too_many_sessions"}
	closeMaxAge    = closeInfo{Code: protocol.CodeMaxAge, Reason: "max_age reached: reconnect to authenticate again", Reconnect: true}
	// closeEvicted ends the session detached longest when max_detached is
	// reached; its client can only start over (resumed:false).
	closeEvicted = closeInfo{Code: protocol.CodeClosedByApp, Reason: "max_detached reached", kind: "evicted"}
)

// rateGate applies the rate option to one session's messages.
type rateGate struct {
	mu       sync.Mutex // guards lim and rejected (messages are checked from several goroutines)
	lim      *rate.Limiter
	rejected int // consecutive messages refused
	burst    int
}

func newRateGate(perSecond float64, burst int) *rateGate {
	if perSecond <= 0 {
		return nil
	}
	return &rateGate{lim: rate.NewLimiter(rate.Limit(perSecond), burst), burst: burst}
}

// abuseFactor: a client refused more than abuseFactor × burst messages in
// a row is closed (1008); before that each refused message gets its 429.
const abuseFactor = 10

// allow reports whether a message may be served now, and whether the
// client has kept sending over its rate for so long (more than
// abuseFactor × burst refusals in a row) that the session should be
// closed.
func (g *rateGate) allow() (ok, abuse bool) {
	if g == nil {
		return true, false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.lim.Allow() {
		g.rejected = 0
		return true, false
	}
	g.rejected++
	return false, g.rejected > abuseFactor*g.burst
}

// idempotency remembers publish ids for idempotencyWindow. A timer
// forgets them when their window is over, also when no other id comes.
type idempotency struct {
	mu    sync.Mutex // guards the fields below
	seen  map[string]*list.Element
	order *list.List  // of seenID, oldest first
	prune *time.Timer // set while ids are remembered
}

type seenID struct {
	id        string
	at        time.Time
	delivered int
}

func newIdempotency() *idempotency {
	return &idempotency{seen: make(map[string]*list.Element), order: list.New()}
}

// do runs publish unless a publish with id succeeded within the window, in
// which case it returns that one's count. Publishes with ids are applied
// one at a time, so two copies racing are still applied once.
func (c *idempotency) do(id string, now time.Time, publish func() (int, error)) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pruneLocked(now)
	if e, ok := c.seen[id]; ok {
		return e.Value.(*seenID).delivered, nil
	}
	n, err := publish()
	if err == nil {
		c.seen[id] = c.order.PushBack(&seenID{id: id, at: now, delivered: n})
		if c.prune == nil {
			c.prune = time.AfterFunc(idempotencyWindow, c.expire)
		}
	}
	return n, err
}

// expire forgets the ids whose window is over, and runs again when the
// next one's is.
func (c *idempotency) expire() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pruneLocked(time.Now())
	c.prune = nil
	if e := c.order.Front(); e != nil {
		c.prune = time.AfterFunc(time.Until(e.Value.(*seenID).at.Add(idempotencyWindow)), c.expire)
	}
}

func (c *idempotency) pruneLocked(now time.Time) {
	for e := c.order.Front(); e != nil; e = c.order.Front() {
		s := e.Value.(*seenID)
		if now.Sub(s.at) < idempotencyWindow {
			return
		}
		delete(c.seen, s.id)
		c.order.Remove(e)
	}
}
