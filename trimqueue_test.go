package duplex

import "testing"

// trimQueue hands a session's acks to one trim goroutine at a time, which
// trims to the newest seq and stops once it has caught up (or the session
// ended); the next ack starts one again.
func TestTrimQueue(t *testing.T) {
	var q trimQueue
	if !q.add(1) {
		t.Fatal("the first ack did not start a trim")
	}
	if q.add(3) || q.add(2) {
		t.Fatal("an ack started a second trim while one runs")
	}
	if seq, ok := q.next(0, false); !ok || seq != 3 {
		t.Fatalf("next(0) = %d, %v; want 3 (the newest ack), true", seq, ok)
	}
	if _, ok := q.next(3, false); ok {
		t.Fatal("the trim goes on after catching up with the acks")
	}
	if !q.add(4) {
		t.Fatal("an ack after the trim stopped did not start another")
	}
	if _, ok := q.next(3, true); ok {
		t.Fatal("the trim goes on after its session ended")
	}
	if !q.add(5) {
		t.Fatal("a trim stopped by its session's end still counts as running")
	}
}
