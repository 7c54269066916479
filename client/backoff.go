package client

import (
	"math/rand/v2"
	"time"
)

// backoff is the delay before reconnection attempt n (from 0): full
// jitter, uniformly random between 0 and min·2ⁿ capped at max.
func backoff(n int, min, max time.Duration) time.Duration {
	ceil := max
	if n < 32 && min<<n > 0 && min<<n < max {
		ceil = min << n
	}
	if ceil <= 0 {
		return 0
	}
	return rand.N(ceil + 1)
}
