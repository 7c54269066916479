package duplex

import (
	"runtime"
	"sync"
	"time"
)

// writePool runs the connections' writers (attachment.writeBurst): at most
// size of them at once, the others waiting their turn in the order they
// were woken. A publish to a channel of 10,000 sessions thus wakes 10,000
// writers without starting 10,000 goroutines: a few workers take them one
// after the other, and each keeps its grown stack from one connection to
// the next. (A goroutine per writer had to grow a fresh stack for every
// connection of the burst; after a quiet spell that meant fresh memory,
// and the first publish to a large channel came out several times slower
// than the next ones.)
//
// Workers run only while writers are waiting: the last one to find the
// queue empty ends, so an idle server holds none.
//
// A writer may block on its connection (a peer that stops reading, until
// the write deadline ends it). So that a few blocked writers cannot hold up
// everyone else's frames, a watchdog runs while writers wait: if no writer
// finished during a whole stall period, it starts one more worker.
type writePool struct {
	size  int           // workers started without waiting for the watchdog
	stall time.Duration // the watchdog's period

	mu       sync.Mutex // guards the fields below
	queue    []writer   // woken writers waiting for a worker, from head on
	head     int
	running  int    // workers running
	finished uint64 // writers finished, so the watchdog can tell progress
	watching bool   // the watchdog is armed
}

// writer is a connection's writer: it writes what its connection has
// queued and returns (attachment.writeBurst).
type writer interface{ writeBurst() }

// writers is the process's write pool. It holds no goroutine while no
// frame waits to be written, so it needs no start or stop across config
// reloads.
var writers = &writePool{
	size:  4 * runtime.GOMAXPROCS(0),
	stall: 5 * time.Millisecond,
}

// run has a's writer run by a worker: at once if fewer than size are
// running, else after the writers woken before it.
func (p *writePool) run(a writer) {
	p.mu.Lock()
	if p.running < p.size {
		p.running++
		p.mu.Unlock()
		go p.work(a)
		return
	}
	p.queue = append(p.queue, a)
	if !p.watching {
		p.watching = true
		p.armLocked()
	}
	p.mu.Unlock()
}

// work runs writers until none waits.
func (p *writePool) work(a writer) {
	for a != nil {
		a.writeBurst()
		p.mu.Lock()
		p.finished++
		a = p.nextLocked()
		if a == nil {
			p.running--
		}
		p.mu.Unlock()
	}
}

// nextLocked takes the first waiting writer, nil if none waits.
func (p *writePool) nextLocked() writer {
	if p.head == len(p.queue) {
		return nil
	}
	a := p.queue[p.head]
	p.queue[p.head] = nil
	p.head++
	if p.head == len(p.queue) {
		// Drained: start over, and give back a large burst's queue.
		p.head = 0
		if cap(p.queue) > 1024 {
			p.queue = nil
		} else {
			p.queue = p.queue[:0]
		}
	}
	return a
}

// armLocked has the watchdog look again after a stall period.
func (p *writePool) armLocked() {
	mark := p.finished
	time.AfterFunc(p.stall, func() { p.watch(mark) })
}

// watch is the watchdog: while writers wait, a stall period in which none
// finished (since mark) starts one more worker.
func (p *writePool) watch(mark uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.head == len(p.queue) {
		p.watching = false
		return
	}
	if p.finished == mark {
		p.running++
		go p.work(p.nextLocked())
	}
	p.armLocked()
}
