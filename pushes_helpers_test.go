package duplex_test

// Reading the pushes of sessions opened with the project's Go client.

import (
	"context"
	"strconv"
	"testing"

	"github.com/caddy-duplex/duplex/client"
)

// nextPush returns the next push of s, failing the test (what names the
// push awaited) if ctx ends first.
func nextPush(ctx context.Context, t *testing.T, s *client.Session, what string) client.Push {
	t.Helper()
	select {
	case p := <-s.Pushes():
		return p
	case <-ctx.Done():
		t.Fatalf("%s: %v", what, ctx.Err())
	}
	return client.Push{}
}

// expectCountedPushes reads n pushes of s, which were published with data
// 0, 1, … n-1: push i must carry data i and seq i+1, so that a gap, a
// duplicate or a push out of order fails the test. who names the session
// in failures.
func expectCountedPushes(ctx context.Context, t *testing.T, s *client.Session, n int, who string) {
	t.Helper()
	for i := range n {
		p := nextPush(ctx, t, s, who+": push "+strconv.Itoa(i))
		if string(p.Data) != strconv.Itoa(i) || p.Seq != uint64(i+1) {
			t.Fatalf("%s: push %d is seq %d data %s", who, i, p.Seq, p.Data)
		}
	}
}
