// Package redistest starts real redis-server processes for tests: no
// persistence, bound to 127.0.0.1, killed when the test ends (or with the
// test process, if it is killed).
package redistest

import (
	"bufio"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/internal/caddytest"
)

// Server is a running redis-server.
type Server struct {
	Addr string // 127.0.0.1:<port>
	Cmd  *exec.Cmd
	args []string
}

// Start starts redis-server on port (0: a free one) with the extra
// command-line args, waits until it accepts connections and stops it when
// the test ends. The server's directory (--dir) is a temporary one, so
// relative file names in args (e.g. a cluster config file) land there.
func Start(t testing.TB, port int, args ...string) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server is not installed (apt-get install redis-server): %v", err)
	}
	if port == 0 {
		port = caddytest.FreePorts(t, 1)[0]
	}
	cmd := exec.Command(bin, append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", t.TempDir()}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready, exited := make(chan struct{}), make(chan struct{})
	var lastLine string // written before exited is closed
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(out)
		var once sync.Once
		for sc.Scan() {
			if strings.Contains(sc.Text(), "Ready to accept connections") {
				once.Do(func() { close(ready) })
			}
			lastLine = sc.Text()
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT) // a test may have stopped it
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	select {
	case <-ready:
	case <-exited:
		t.Fatalf("redis-server exited before it was ready: %s", lastLine)
	case <-time.After(30 * time.Second):
		t.Fatal("redis-server did not start")
	}
	return &Server{Addr: "127.0.0.1:" + strconv.Itoa(port), Cmd: cmd, args: args}
}

// Port is the server's port.
func (s *Server) Port() int {
	_, p, _ := net.SplitHostPort(s.Addr)
	n, _ := strconv.Atoi(p)
	return n
}

// Restart kills the server and starts an empty one on the same port.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	_ = s.Cmd.Process.Kill()
	_ = s.Cmd.Wait()
	*s = *Start(t, s.Port(), s.args...)
}

// StartCluster starts a Redis Cluster of three masters (no replicas) on
// free ports, waits until every master reports it ok and returns their
// addresses. The servers stop when the test ends.
func StartCluster(t testing.TB) []string {
	t.Helper()
	if _, err := exec.LookPath("redis-cli"); err != nil {
		t.Fatalf("redis-cli is not installed (apt-get install redis-tools): %v", err)
	}
	var addrs []string
	for range 3 {
		// The cluster bus port is its own free port: by default it is the
		// port + 10000, which Redis refuses above 55535 and nobody reserved.
		ports := caddytest.FreePorts(t, 2)
		addrs = append(addrs, Start(t, ports[0], "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(ports[1])).Addr)
	}
	args := slices.Concat([]string{"--cluster", "create"}, addrs, []string{"--cluster-replicas", "0", "--cluster-yes"})
	if out, err := exec.Command("redis-cli", args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, a := range addrs {
		deadline := time.Now().Add(30 * time.Second)
		for {
			if strings.Contains(CLI(t, a, "CLUSTER", "INFO"), "cluster_state:ok") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out after 30s waiting for the cluster to be ok on %s", a)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return addrs
}

// CLI runs redis-cli with args against the server at addr and returns its
// output, trimmed; it fails the test if redis-cli fails.
func CLI(t testing.TB, addr string, args ...string) string {
	t.Helper()
	_, port, _ := net.SplitHostPort(addr)
	out, err := exec.Command("redis-cli", append([]string{"-p", port}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("redis-cli %v on %s: %v %s", args, addr, err, out)
	}
	return strings.TrimSpace(string(out))
}

// Calls is how many times the server at addr has run command (lower case,
// e.g. "publish", "pubsub|numsub") since it started or its last CONFIG
// RESETSTAT, from INFO commandstats.
func Calls(t testing.TB, addr, command string) int {
	t.Helper()
	for line := range strings.Lines(CLI(t, addr, "INFO", "commandstats")) {
		if rest, ok := strings.CutPrefix(line, "cmdstat_"+command+":calls="); ok {
			n, err := strconv.Atoi(rest[:strings.IndexByte(rest, ',')])
			if err != nil {
				t.Fatalf("INFO commandstats on %s: %q", addr, line)
			}
			return n
		}
	}
	return 0
}
