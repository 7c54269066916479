// Package caddytest holds what the test harnesses of the plugin's packages
// (the plugin's own, client, command) share to run the real Caddy: a build of Caddy with the
// plugin and the race detector, free ports for it, and a buffer for its
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

// FreePorts returns n distinct free TCP ports on 127.0.0.1: each listener
// is held until all are picked, so none repeats. (The plugin's harness,
// whose tests run in parallel, has its own, which also never hands out a
// port twice in one test process.)
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
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
