package redisbroker

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// redisServer is a real redis-server started for one test.
type redisServer struct{ *redistest.Server }

// startRedis starts redis-server on a free port, without persistence, and
// stops it when the test ends.
func startRedis(t *testing.T) *redisServer {
	t.Helper()
	return &redisServer{redistest.Start(t, 0)}
}

func (r *redisServer) client(t *testing.T) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.Addr})
	t.Cleanup(func() { c.Close() })
	return c
}

// recorder is a Handler that keeps what it was given.
type recorder struct {
	mu       sync.Mutex // guards pushes, commands, lost, adopted and gate
	pushes   map[string][]Entry
	commands []string
	lost     []string
	adopted  []Session
	changed  chan struct{}
	// gate, if set, holds every Forwarded call, once recorded, until it
	// is closed.
	gate chan struct{}
}

func newRecorder() *recorder {
	return &recorder{pushes: make(map[string][]Entry), changed: make(chan struct{}, 1)}
}

func (r *recorder) Deliver(id string, seq uint64, payload []byte) {
	r.mu.Lock()
	r.pushes[id] = append(r.pushes[id], Entry{seq, append([]byte(nil), payload...)})
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) Command(id, kind string, payload []byte) {
	r.mu.Lock()
	r.commands = append(r.commands, id+" "+kind+" "+string(payload))
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) Lost(id string) {
	r.mu.Lock()
	r.lost = append(r.lost, id)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) Forwarded(id string, payload []byte) int {
	r.mu.Lock()
	r.commands = append(r.commands, id+" forwarded "+string(payload))
	gate := r.gate
	r.mu.Unlock()
	r.poke()
	if gate != nil {
		<-gate
	}
	return 202
}

func (r *recorder) Adopted(s Session) {
	r.mu.Lock()
	r.adopted = append(r.adopted, s)
	r.mu.Unlock()
	r.poke()
}

func (r *recorder) poke() {
	select {
	case r.changed <- struct{}{}:
	default:
	}
}

// waitFor waits until cond holds on the recorder (checked under its lock).
func (r *recorder) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	await(t, r.changed, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		return cond()
	}, func() string {
		r.mu.Lock()
		defer r.mu.Unlock()
		return fmt.Sprintf("waiting for %s: pushes %v, commands %v, lost %v", what, r.pushes, r.commands, r.lost)
	})
}

// await waits until cond holds, checking it whenever changed is signalled
// (nil: never) and every 50 ms; after 30 s it fails the test with what
// failure says.
func await(t *testing.T, changed <-chan struct{}, cond func() bool, failure func() string) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for !cond() {
		select {
		case <-changed:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatal(failure())
		}
	}
}

// seqs renders the pushes of a session as "seq:payload".
func (r *recorder) seqs(id string) string {
	var b strings.Builder
	for i, e := range r.pushes[id] {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%d:%s", e.Seq, e.Payload)
	}
	return b.String()
}

// node is a broker running against r, with its recorder.
type node struct {
	*Broker
	rec    *recorder
	cancel context.CancelFunc
	done   chan struct{}
}

func startNode(t *testing.T, r *redisServer, name string, opts ...func(*Config)) *node {
	t.Helper()
	return startNodeAt(t, []string{r.Addr}, name, opts...)
}

// startNodeAt is startNode on the Redis at addrs (several: a Redis
// Cluster).
func startNodeAt(t *testing.T, addrs []string, name string, opts ...func(*Config)) *node {
	t.Helper()
	cfg := Config{Addrs: addrs, NodeID: name, Prefix: "t", NodeTTL: 600 * time.Millisecond, Timeout: time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	n := &node{Broker: b, rec: newRecorder()}
	n.run()
	t.Cleanup(func() {
		n.stop()
		b.Close()
	})
	return n
}

func (n *node) run() {
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel, n.done = cancel, make(chan struct{})
	go func() {
		defer close(n.done)
		n.Run(ctx, n.rec)
	}()
}

func (n *node) stop() {
	n.cancel()
	<-n.done
}
