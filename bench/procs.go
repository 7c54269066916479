package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on every Linux architecture Go supports).
const clockTicks = 100

// proc is a child process started by the harness. Every proc is registered
// so that killAll can end it on exit, error or Ctrl-C.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *bytes.Buffer // stdout and stderr, kept for error reports
	done chan struct{}
	err  error
}

var (
	procsMu sync.Mutex
	procs   = map[*proc]struct{}{}
)

// startProc starts bin with args in dir; extra environment entries are
// added to the harness's own.
func startProc(name, dir, bin string, args []string, env ...string) (*proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	// If the harness dies without cleaning up, the kernel ends the child.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p := &proc{name: name, cmd: cmd, out: &out.buf, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	procsMu.Lock()
	procs[p] = struct{}{}
	procsMu.Unlock()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// lockedBuffer is a bytes.Buffer safe for the two writers exec gives it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() > 1<<20 { // keep the head: startup errors are there
		return len(p), nil
	}
	return b.buf.Write(p)
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports an error if the process has ended.
func (p *proc) exited() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: %v\n%s", p.name, p.err, tail(p.out.String(), 4000))
	default:
		return nil
	}
}

// stop ends the process: SIGTERM, then SIGKILL after grace.
func (p *proc) stop(grace time.Duration) {
	defer func() {
		procsMu.Lock()
		delete(procs, p)
		procsMu.Unlock()
	}()
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// killAll kills every process the harness started and still runs.
func killAll() {
	procsMu.Lock()
	defer procsMu.Unlock()
	for p := range procs {
		_ = p.cmd.Process.Kill()
	}
	for p := range procs {
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
		delete(procs, p)
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// usage is a process's resident memory and CPU time at one moment.
type usage struct {
	rssKiB int64
	cpu    time.Duration // utime + stime
}

// readUsage reads VmRSS from /proc/<pid>/status and utime+stime from
// /proc/<pid>/stat.
func readUsage(pid int) (usage, error) {
	var u usage
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, fmt.Errorf("reading RSS: %w", err)
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				u.rssKiB, _ = strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, fmt.Errorf("reading CPU time: %w", err)
	}
	// Fields after "(comm)": state is the first; utime and stime are
	// fields 14 and 15 of the whole line, so 12th and 13th here.
	i := bytes.LastIndexByte(stat, ')')
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		return u, fmt.Errorf("unexpected /proc/%d/stat: %q", pid, stat)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	u.cpu = time.Duration(ut+st) * time.Second / clockTicks
	return u, nil
}

// raiseFileLimit lifts the soft open-file limit to the hard one. Calling
// Setrlimit explicitly also makes child processes inherit it (os/exec
// otherwise restores the original soft limit in children).
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("getrlimit NOFILE: %w", err)
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("setrlimit NOFILE to %d: %w", lim.Max, err)
	}
	return lim.Cur, nil
}

// buildBinaries builds Caddy with the plugin (unless caddy is already
// given), the reference server and the upstream into dir (without -race,
// with -trimpath). root is the module root.
func buildBinaries(root, dir, caddyBin string) (caddy, reference, upstream string, err error) {
	targets := []struct {
		pkg string
		out *string
	}{
		{"./bench/reference", &reference},
		{"./bench/upstream", &upstream},
	}
	if caddyBin == "" {
		targets = append(targets, struct {
			pkg string
			out *string
		}{"./cmd/caddy", &caddy})
	} else {
		caddy = caddyBin
	}
	for _, t := range targets {
		*t.out = filepath.Join(dir, filepath.Base(t.pkg))
		cmd := exec.Command("go", "build", "-trimpath", "-o", *t.out, t.pkg)
		cmd.Dir = root
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		logf("building %s", t.pkg)
		if err := cmd.Run(); err != nil {
			return "", "", "", fmt.Errorf("go build %s: %w\n%s", t.pkg, err, out.String())
		}
	}
	return caddy, reference, upstream, nil
}

// moduleRoot finds the directory holding go.mod, from the working
// directory upwards.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found: run the harness inside the repository")
		}
		dir = parent
	}
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// waitHTTP polls url until it answers (any status) or timeout passes or p
// exits.
func waitHTTP(p *proc, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	c := &http.Client{Timeout: time.Second}
	for {
		if err := p.exited(); err != nil {
			return err
		}
		resp, err := c.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not answering at %s within %s: %w", p.name, url, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
