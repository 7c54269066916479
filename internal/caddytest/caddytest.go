// Package caddytest holds what the test harnesses of the plugin's packages
// (the plugin's own, client, command) share to run the real Caddy: a build of Caddy with the
// plugin and the race detector, free ports for it (and for redis-server,
// see internal/redistest), and a buffer for its
// output that the test and Caddy's writers may use at once.
package caddytest

import (
	"bytes"
	"fmt"
	"net"
	"os/exec"
	"sync"
	"testing"
)

// BuildRace builds Caddy with the plugin (./cmd/caddy of the module at
// moduleDir) and the race detector into out.
func BuildRace(moduleDir, out string) error {
	build := exec.Command("go", "build", "-race", "-o", out, "./cmd/caddy")
	build.Dir = moduleDir
	if b, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -race ./cmd/caddy: %v\n%s", err, b)
	}
	return nil
}

// handedOut remembers every port FreePorts gave, so that tests running in
// parallel never get the same one: the kernel may give a just-closed port
// to the next listen on port 0, before the test it was meant for binds it.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}

// FreePorts returns n distinct free TCP ports on 127.0.0.1, none of them
// handed out before in this test process. Each listener is held until all
// are picked, so none repeats within one call either.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 1000 {
			t.Fatalf("no free port found")
		}
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		ls = append(ls, l)
		port := l.Addr().(*net.TCPAddr).Port
		if handedOut.ports[port] {
			continue
		}
		handedOut.ports[port] = true
		ports = append(ports, port)
	}
	return ports
}

// SyncBuffer is a bytes.Buffer safe for concurrent use.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
