package client

import (
	"testing"
	"time"
)

func TestBackoffFullJitter(t *testing.T) {
	const lo, hi = 500 * time.Millisecond, 20 * time.Second
	for n := range 40 {
		ceil := min(hi, lo<<min(n, 30))
		var top time.Duration
		for range 2000 {
			d := backoff(n, lo, hi)
			if d < 0 || d > ceil {
				t.Fatalf("attempt %d: %s outside [0, %s]", n, d, ceil)
			}
			top = max(top, d)
		}
		// Full jitter spreads over the whole range.
		if top < ceil/2 {
			t.Fatalf("attempt %d: largest of 2000 delays %s, want some above %s", n, top, ceil/2)
		}
	}
}
