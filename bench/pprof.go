package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// saveProfile fetches /debug/pprof/<query> from Caddy's admin endpoint into
// the -pprof directory. Failures are logged, not fatal.
func (e *env) saveProfile(srv *server, name, query string) {
	if err := fetchProfile(srv.adminURL+"/debug/pprof/"+query, filepath.Join(e.cfg.pprofDir, name+".pb.gz")); err != nil {
		logf("  pprof %s: %v", name, err)
	}
}

// saveMemStats saves Caddy's expvar page (runtime.MemStats: heap, stacks,
// goroutine stacks in use…) into the -pprof directory.
func (e *env) saveMemStats(srv *server, name string) {
	if err := fetchProfile(srv.adminURL+"/debug/vars", filepath.Join(e.cfg.pprofDir, name+".json")); err != nil {
		logf("  expvar %s: %v", name, err)
	}
}

// startCPUProfile starts a CPU profile of d in the background; the
// returned func waits for it to be saved.
func (e *env) startCPUProfile(srv *server, name string, d time.Duration) (wait func()) {
	secs := max(1, int(d.Seconds()))
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.saveProfile(srv, name, fmt.Sprintf("profile?seconds=%d", secs))
	}()
	return func() {
		select {
		case <-done:
		case <-time.After(time.Duration(secs+30) * time.Second):
			logf("  pprof %s: still not saved, going on", name)
		}
	}
}

func fetchProfile(url, path string) error {
	c := &http.Client{Timeout: 5 * time.Minute}
	resp, err := c.Get(url)
	if err != nil {
		return fmt.Errorf("fetching %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("fetching %s: status %d: %s", url, resp.StatusCode, b)
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("creating %s: %w", path, err)
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	logf("  pprof: saved %s", path)
	return nil
}
