package redisbroker

import (
	"testing"

	"go.uber.org/goleak"
)

// Every broker a test starts is stopped and closed: no goroutine is left.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
