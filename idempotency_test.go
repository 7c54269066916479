package duplex

import (
	"strconv"
	"testing"
	"testing/synctest"
	"time"
)

// TestIdempotencyIDsExpireByTime: a publish id is remembered for its
// window (README: "Publishing and the sessions API": a repeat within 2
// minutes is ignored) and then forgotten by time alone, without another
// publish arriving to prune it; the same id then applies again.
func TestIdempotencyIDsExpireByTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		c := newIdempotency()
		applied := 0
		publish := func() (int, error) { applied++; return 3, nil }
		remembered := func() int {
			c.mu.Lock()
			defer c.mu.Unlock()
			if len(c.seen) != c.order.Len() {
				t.Fatalf("%d ids indexed, %d in order", len(c.seen), c.order.Len())
			}
			return len(c.seen)
		}

		for i := range 1000 {
			if n, err := c.do("evt-"+strconv.Itoa(i), time.Now(), publish); err != nil || n != 3 {
				t.Fatalf("publish %d: %d %v", i, n, err)
			}
		}
		time.Sleep(idempotencyWindow / 2)
		if n, _ := c.do("evt-7", time.Now(), publish); n != 3 || applied != 1000 {
			t.Fatalf("a repeat within the window was applied (%d publishes)", applied)
		}
		if got := remembered(); got != 1000 {
			t.Fatalf("%d ids remembered within the window, want 1000", got)
		}

		// The window passes with no publish at all.
		time.Sleep(idempotencyWindow/2 + time.Second)
		synctest.Wait()
		if got := remembered(); got != 0 {
			t.Fatalf("%d ids still remembered after their window, with no other publish", got)
		}
		c.mu.Lock()
		timer := c.prune
		c.mu.Unlock()
		if timer != nil {
			t.Fatalf("a prune timer is still set with no id remembered")
		}
		if _, err := c.do("evt-7", time.Now(), publish); err != nil || applied != 1001 {
			t.Fatalf("an id past its window was not applied again (%d publishes)", applied)
		}
		// Ids that arrive at different times each last their own window.
		time.Sleep(time.Minute)
		c.do("late", time.Now(), publish)
		time.Sleep(idempotencyWindow - time.Minute + time.Second)
		synctest.Wait()
		if got := remembered(); got != 1 {
			t.Fatalf("%d ids remembered, want only the later one", got)
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if got := remembered(); got != 0 {
			t.Fatalf("%d ids remembered after every window passed", got)
		}
	})
}
