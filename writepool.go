package duplex

import (
	"runtime"
	"sync"
	"time"
)

// writePool runs the connections' writers (attachment.writeBurst): size of
// them at once (more while peers stall, see below), the others waiting
// their turn in the order they
// were woken. A publish to a channel of 10,000 sessions thus wakes 10,000
// writers without starting 10,000 goroutines: a few workers take them one
// after the other, and each keeps its grown stack from one connection to
// the next. (A goroutine per writer had to grow a fresh stack for every
// connection of the burst; after a quiet spell that meant fresh memory,
// and the first publish to a large channel came out several times slower
// than the next ones.)
//
// Workers run only while writers are waiting: each ends when it finds the
// queue empty, so an idle server holds none.
//
// A writer may block on its connection (a peer that stops reading, until
// the write deadline ends it). So that blocked writers cannot hold up
// everyone else's frames, a watchdog looks every stall period while
// writers wait: a worker busy with one writer for that long no longer
// counts as one of the size, and others are started in its place. While
// every look finds more stuck workers (many peers stalled, the queue full
// of their writers), the watchdog lets twice as many run beyond size each
// time (surge), so that writers queued behind n stalled ones wait about
// log2(n/size) stall periods, not n/size. The surge never exceeds the
// stuck workers still alive, and a worker finding more than size+surge
// running ends instead of taking the next writer: workers not stuck are
// at most size while no peer stalls and at most size plus the stalled
// peers while some do, whatever the length of the queue.
type writePool struct {
	size  int           // workers that are not stuck, at most (0: four per CPU, read at first use)
	stall time.Duration // how long one writer may take before its worker counts as stuck

	mu       sync.Mutex // guards the fields below and the workers' fields
	queue    []writer   // woken writers waiting for a worker, from head on
	head     int
	running  int                      // workers not stuck
	workers  map[*poolWorker]struct{} // every worker, stuck ones too
	watching bool                     // the watchdog is armed
	surge    int                      // workers the watchdog lets run beyond size (see above); 0 once the queue drains
}

// poolWorker is one worker of a writePool.
type poolWorker struct {
	since time.Time // when it took its current writer
	stuck bool      // busy with one writer for a stall period: not counted in running
}

// writer is a connection's writer: it writes what its connection has
// queued and returns (attachment.writeBurst).
type writer interface{ writeBurst() }

// writeWorkers is the process's write pool. It holds no goroutine while no
// frame waits to be written, so it needs no start or stop across config
// reloads.
var writeWorkers = newWritePool(0, 5*time.Millisecond)

func newWritePool(size int, stall time.Duration) *writePool {
	return &writePool{size: size, stall: stall, workers: make(map[*poolWorker]struct{})}
}

// run has a's writer run by a worker: at once if fewer than size workers
// are busy (and not stuck), else after the writers woken before it.
func (p *writePool) run(a writer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.size == 0 {
		// After Caddy has set GOMAXPROCS.
		p.size = 4 * runtime.GOMAXPROCS(0)
	}
	if p.running < p.size {
		p.startLocked(a)
		return
	}
	p.queue = append(p.queue, a)
	if !p.watching {
		p.watching = true
		p.armLocked()
	}
}

// startLocked starts a worker with writer a.
func (p *writePool) startLocked(a writer) {
	w := &poolWorker{since: time.Now()}
	p.workers[w] = struct{}{}
	p.running++
	go p.work(w, a)
}

// work runs writers until none waits. A worker found stuck ends after
// its writer: others took its place. So does a worker beyond size+surge
// (the surge it was started for is over): the others take the queue.
func (p *writePool) work(w *poolWorker, a writer) {
	for a != nil {
		a.writeBurst()
		p.mu.Lock()
		a = nil
		if !w.stuck && p.running <= p.size+p.surge {
			a = p.nextLocked()
		}
		if a == nil {
			if !w.stuck {
				p.running--
			}
			delete(p.workers, w)
		} else {
			w.since = time.Now()
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
	switch {
	case p.head == len(p.queue):
		// Drained: start over, give back a large burst's queue, and end
		// the surge (no one waits behind stalled peers any more).
		p.head, p.surge = 0, 0
		if cap(p.queue) > 1024 {
			p.queue = nil
		} else {
			p.queue = p.queue[:0]
		}
	case p.head >= 1024 && 2*p.head >= len(p.queue):
		// Never drained under steady load: move the waiting writers to
		// the front, so the queue holds what waits, not what was taken.
		n := copy(p.queue, p.queue[p.head:])
		clear(p.queue[n:])
		p.queue = p.queue[:n]
		p.head = 0
	}
	return a
}

// armLocked has the watchdog look after a stall period.
func (p *writePool) armLocked() {
	time.AfterFunc(p.stall, p.watch)
}

// watch is the watchdog: while writers wait, workers busy with one writer
// for a stall period stop counting, and workers are started in their
// place, size of them and the surge beyond (at most as many as are
// stuck: a trickle of stalled peers under steady load must not double it
// look after look until every waiting writer has a goroutine).
func (p *writePool) watch() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.head == len(p.queue) {
		p.watching, p.surge = false, 0
		return
	}
	now := time.Now()
	stuck := 0
	for w := range p.workers {
		if !w.stuck && now.Sub(w.since) >= p.stall {
			w.stuck = true
			p.running--
			stuck++
		}
	}
	if stuck > 0 {
		// Capped at the stuck workers still alive (not counted in running).
		p.surge = min(max(p.size, 2*p.surge), len(p.workers)-p.running)
	} else {
		p.surge = 0
	}
	for p.running < p.size+p.surge {
		a := p.nextLocked()
		if a == nil {
			break
		}
		p.startLocked(a)
	}
	p.armLocked()
}
