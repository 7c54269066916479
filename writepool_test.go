package duplex

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// task is a writer for the pool's tests: it waits for release (if set),
// then reports that it ran.
type task struct {
	release chan struct{}
	ran     chan struct{}
	order   *[]int
	mu      *sync.Mutex
	n       int
}

func (t *task) writeBurst() {
	if t.release != nil {
		<-t.release
	}
	if t.order != nil {
		t.mu.Lock()
		*t.order = append(*t.order, t.n)
		t.mu.Unlock()
	}
	close(t.ran)
}

func waitRan(t *testing.T, k *task, what string) {
	t.Helper()
	select {
	case <-k.ran:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s never ran", what)
	}
}

// waitIdle waits until the pool's workers have all ended.
func waitIdle(t *testing.T, p *writePool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		p.mu.Lock()
		running, workers, waiting := p.running, len(p.workers), len(p.queue)-p.head
		p.mu.Unlock()
		if running == 0 && workers == 0 && waiting == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool still has %d workers (%d counted) and %d waiting writers", workers, running, waiting)
		}
		time.Sleep(time.Millisecond)
	}
}

// Every writer runs, in the order woken once the workers are busy, and the
// workers end when none is left.
func TestWritePoolRunsAllInOrder(t *testing.T) {
	p := newWritePool(1, time.Hour)
	var mu sync.Mutex
	var order []int
	first := &task{release: make(chan struct{}), ran: make(chan struct{}), order: &order, mu: &mu, n: 0}
	p.run(first)
	tasks := []*task{first}
	for i := 1; i <= 100; i++ {
		k := &task{ran: make(chan struct{}), order: &order, mu: &mu, n: i}
		tasks = append(tasks, k)
		p.run(k)
	}
	p.mu.Lock()
	waiting := len(p.queue) - p.head
	p.mu.Unlock()
	if waiting != 100 {
		t.Fatalf("%d writers wait behind the busy worker, want 100 (no more workers than size)", waiting)
	}
	close(first.release)
	for i, k := range tasks {
		waitRan(t, k, fmt.Sprintf("writer %d", i))
	}
	for i, n := range order {
		if n != i {
			t.Fatalf("writers ran in the order %v, want the order they were woken", order)
		}
	}
	waitIdle(t, p)
}

// Writers blocked on their connections do not hold up the others: the
// watchdog counts their workers as stuck after a stall period and starts
// others in their place.
func TestWritePoolWatchdog(t *testing.T) {
	p := newWritePool(2, time.Millisecond)
	var blocked []*task
	for range 2 {
		k := &task{release: make(chan struct{}), ran: make(chan struct{})}
		blocked = append(blocked, k)
		p.run(k)
	}
	healthy := &task{ran: make(chan struct{})}
	p.run(healthy)
	waitRan(t, healthy, "the writer behind two blocked ones")
	for _, k := range blocked {
		close(k.release)
		waitRan(t, k, "a released writer")
	}
	waitIdle(t, p)
	// The watchdog disarms at its next look, leaving no timer behind.
	deadline := time.Now().Add(30 * time.Second)
	for {
		p.mu.Lock()
		watching := p.watching
		p.mu.Unlock()
		if !watching {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the watchdog is still armed with no writer waiting")
		}
		time.Sleep(time.Millisecond)
	}
}

// A queue that never drains (writers keep being woken while others wait)
// holds what waits, not every writer taken since it last drained, and
// hands them out in the order they were woken across its compactions.
func TestWritePoolQueueStaysBounded(t *testing.T) {
	p := newWritePool(1, time.Hour)
	block := &task{release: make(chan struct{}), ran: make(chan struct{})}
	p.run(block) // the one worker is busy: the rest queue
	for i := range 100 {
		p.run(&task{ran: make(chan struct{}), n: i})
	}
	// Take one and add one, 100,000 times, as a worker under steady load.
	p.mu.Lock()
	for i := range 100_000 {
		w := p.nextLocked()
		if w == nil {
			p.mu.Unlock()
			t.Fatal("the queue ran dry")
		}
		if n := w.(*task).n; n != i {
			p.mu.Unlock()
			t.Fatalf("take %d handed out writer %d: the queue lost its order", i, n)
		}
		p.queue = append(p.queue, &task{ran: make(chan struct{}), n: 100 + i})
	}
	waiting, capacity := len(p.queue)-p.head, cap(p.queue)
	p.mu.Unlock()
	if waiting != 100 {
		t.Fatalf("%d writers wait, want 100", waiting)
	}
	if capacity > 4096 {
		t.Fatalf("the queue's array holds %d slots for 100 waiting writers", capacity)
	}
	close(block.release)
	waitIdle(t, p)
}

// Writers queued behind many stalled ones get a worker within a few
// watchdog looks: each look that finds stuck workers lets twice as many
// run as the last, so 200 stalled writers ahead of a healthy one are
// passed in about log2(200/2) looks, not 200/2.
func TestWritePoolSurgesPastStalledPeers(t *testing.T) {
	p := newWritePool(2, time.Hour) // the looks are made by the test
	release := make(chan struct{})
	for range 200 {
		p.run(&task{release: release, ran: make(chan struct{})})
	}
	fast := &task{ran: make(chan struct{})}
	p.run(fast)
	queued := func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, w := range p.queue[p.head:] {
			if w == writer(fast) {
				return true
			}
		}
		return false
	}
	looks := 0
	for queued() {
		if looks++; looks > 10 {
			t.Fatalf("the healthy writer still waits after %d looks of the watchdog", looks-1)
		}
		p.mu.Lock()
		for w := range p.workers { // every worker so far has been busy for a stall period
			w.since = time.Now().Add(-2 * time.Hour)
		}
		p.mu.Unlock()
		p.watch()
	}
	waitRan(t, fast, "the healthy writer")
	close(release)
	waitIdle(t, p)
	p.mu.Lock()
	surge := p.surge
	p.mu.Unlock()
	if surge != 0 {
		t.Fatalf("surge %d left once the queue drained", surge)
	}
}

// blockedTasks queues n writers that each wait for their own release.
func blockedTasks(p *writePool, n int) []*task {
	tasks := make([]*task, n)
	for i := range tasks {
		tasks[i] = &task{release: make(chan struct{}), ran: make(chan struct{}), n: i}
		p.run(tasks[i])
	}
	return tasks
}

// poolCounts is what the pool's tests look at: its workers, stuck or not,
// and the writers waiting.
type poolCounts struct{ running, stuck, waiting int }

func countsOf(p *writePool) poolCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	var c poolCounts
	for w := range p.workers {
		if w.stuck {
			c.stuck++
		} else {
			c.running++
		}
	}
	c.waiting = len(p.queue) - p.head
	return c
}

// A trickle of stalled peers under steady load (every look finds one more
// stuck worker, the queue never drains) does not double the surge look
// after look: workers not stuck stay within size plus the stuck ones.
func TestWritePoolSurgeBoundedByStuckWorkers(t *testing.T) {
	p := newWritePool(2, time.Hour) // the looks are made by the test
	tasks := blockedTasks(p, 200)
	defer func() {
		for _, k := range tasks {
			close(k.release)
		}
		waitIdle(t, p)
	}()
	for look := 1; look <= 8; look++ {
		p.mu.Lock()
		for w := range p.workers {
			if !w.stuck { // one worker more has been busy for a stall period
				w.since = time.Now().Add(-2 * time.Hour)
				break
			}
		}
		p.mu.Unlock()
		p.watch()
		c := countsOf(p)
		if c.stuck != look {
			t.Fatalf("look %d: %d workers stuck, want %d", look, c.stuck, look)
		}
		if c.running > p.size+c.stuck {
			t.Fatalf("look %d: %d workers running beside %d stuck ones, want at most size %d plus the stuck", look, c.running, c.stuck, p.size)
		}
		if c.running < p.size {
			t.Fatalf("look %d: %d workers running, want at least size %d while writers wait", look, c.running, p.size)
		}
	}
}

// Once the surge is over, the workers started for it end as their writers
// return instead of taking the next: workers are back to size while the
// queue still holds writers.
func TestWritePoolSurplusWorkersEnd(t *testing.T) {
	p := newWritePool(2, time.Hour) // the looks are made by the test
	tasks := blockedTasks(p, 100)
	released := 0
	defer func() {
		for _, k := range tasks[released:] {
			close(k.release)
		}
		waitIdle(t, p)
	}()
	// Both workers stall: the surge lets two more run beyond size.
	p.mu.Lock()
	for w := range p.workers {
		w.since = time.Now().Add(-2 * time.Hour)
	}
	p.mu.Unlock()
	p.watch()
	if c := countsOf(p); c != (poolCounts{running: 4, stuck: 2, waiting: 94}) {
		t.Fatalf("after the stall: %+v, want 4 running, 2 stuck, 94 waiting", c)
	}
	// The stalled peers come back; the next look finds nobody stuck and
	// ends the surge.
	release := func(want poolCounts) {
		t.Helper()
		k := tasks[released]
		close(k.release)
		released++
		waitRan(t, k, fmt.Sprintf("writer %d", k.n))
		deadline := time.Now().Add(30 * time.Second)
		for countsOf(p) != want {
			if time.Now().After(deadline) {
				t.Fatalf("after writer %d returned: %+v, want %+v", k.n, countsOf(p), want)
			}
			time.Sleep(time.Millisecond)
		}
	}
	release(poolCounts{running: 4, stuck: 1, waiting: 94})
	release(poolCounts{running: 4, stuck: 0, waiting: 94})
	p.watch()
	// Writers 2 to 5 run on the four workers: the first two to return end
	// their workers, the next ones take the queue.
	release(poolCounts{running: 3, waiting: 94})
	release(poolCounts{running: 2, waiting: 94})
	release(poolCounts{running: 2, waiting: 93})
}
