package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// Names of the two servers measured side by side.
const (
	nameDuplex    = "caddy-duplex"
	nameReference = "reference"
)

// server is a running session server under test: Caddy with the plugin or
// the reference server.
type server struct {
	name       string
	proc       *proc
	host       string // 127.0.0.1:port of the session endpoint
	livePath   string // where sessions open
	publishURL string // POST {"channel":…,"data":…}
	routeURL   string // Caddy only: the same on a site route (duplex_publish)
	listenURL  string // Caddy only: the same on the duplex app's publish_listen address
	directURL  string // Caddy only: plain reverse_proxy to the upstream
	adminURL   string // Caddy only: admin endpoint (pprof)
}

// binaries are the programs the harness runs.
type binaries struct {
	caddy, reference, upstream string
	workDir                    string // temp dir for Caddyfiles and storage
	proxyIdleConns             int    // Caddy's keepalive_idle_conns_per_host (0: default)
}

// caddyfile is Caddy's config: the duplex route in front of the upstream
// (each session joins ?channel=), a plain reverse_proxy route to the same
// upstream for the direct-request baseline, the publish API on a site route
// (duplex_publish) and on publish_listen besides the admin endpoint, logs
// at WARN.
const caddyfile = `{
	admin 127.0.0.1:%[1]d
	auto_https off
	skip_install_trust
	persist_config off
	storage file_system %[4]s
	log {
		level WARN
	}
	duplex {
		publish_listen 127.0.0.1:%[6]d
	}
}
http://127.0.0.1:%[2]d {
	route /live* {
		duplex {
			channels {http.request.uri.query.channel}
			transports websocket stream sse
		}
		reverse_proxy 127.0.0.1:%[3]d%[5]s
	}
	route /direct* {
		reverse_proxy 127.0.0.1:%[3]d%[5]s
	}
	handle /publish {
		duplex_publish
	}
}
`

// proxyOptions is the reverse_proxy block: empty for Caddy's defaults, or
// a larger idle keep-alive pool to the upstream.
func proxyOptions(idleConns int) string {
	if idleConns <= 0 {
		return ""
	}
	return fmt.Sprintf(" {\n\t\t\ttransport http {\n\t\t\t\tkeepalive_idle_conns_per_host %d\n\t\t\t}\n\t\t}", idleConns)
}

// startServer starts a fresh instance of the named server in front of the
// upstream on upstreamPort.
func startServer(name string, bins binaries, upstreamPort int) (*server, error) {
	switch name {
	case nameDuplex:
		return startCaddy(bins, upstreamPort)
	case nameReference:
		return startReference(bins, upstreamPort)
	}
	return nil, fmt.Errorf("unknown server %q", name)
}

func startCaddy(bins binaries, upstreamPort int) (*server, error) {
	var listen int
	s, err := startCaddyWith(bins, func(c caddyPorts) string {
		listen = c.publish
		return fmt.Sprintf(caddyfile, c.admin, c.http, upstreamPort, c.storage, proxyOptions(bins.proxyIdleConns), c.publish)
	})
	if err != nil {
		return nil, err
	}
	s.listenURL = "http://127.0.0.1:" + strconv.Itoa(listen) + "/duplex/publish"
	return s, nil
}

// caddyPorts are the free ports and storage directory a Caddy instance's
// Caddyfile is written for.
type caddyPorts struct {
	admin, http int
	publish     int // for publish_listen, if the Caddyfile has it
	storage     string
}

// startCaddyWith starts Caddy with the Caddyfile config returns for its
// ports and storage directory; the site must serve /direct (it is polled
// until Caddy answers).
func startCaddyWith(bins binaries, config func(caddyPorts) string) (*server, error) {
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	admin, httpPort := ports[0], ports[1]
	dir, err := os.MkdirTemp(bins.workDir, "caddy-")
	if err != nil {
		return nil, fmt.Errorf("caddy dir: %w", err)
	}
	cf := filepath.Join(dir, "Caddyfile")
	body := config(caddyPorts{admin: admin, http: httpPort, publish: ports[2], storage: filepath.Join(dir, "storage")})
	if err := os.WriteFile(cf, []byte(body), 0o644); err != nil {
		return nil, fmt.Errorf("writing Caddyfile: %w", err)
	}
	p, err := startProc(nameDuplex, dir, bins.caddy,
		[]string{"run", "--config", cf, "--adapter", "caddyfile"},
		"HOME="+dir, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	if err != nil {
		return nil, err
	}
	s := &server{
		name:       nameDuplex,
		proc:       p,
		host:       "127.0.0.1:" + strconv.Itoa(httpPort),
		livePath:   "/live",
		publishURL: "http://127.0.0.1:" + strconv.Itoa(admin) + "/duplex/publish",
		directURL:  "http://127.0.0.1:" + strconv.Itoa(httpPort) + "/direct",
		routeURL:   "http://127.0.0.1:" + strconv.Itoa(httpPort) + "/publish",
		adminURL:   "http://127.0.0.1:" + strconv.Itoa(admin),
	}
	if err := waitHTTP(p, s.adminURL+"/config/", 30*time.Second); err != nil {
		p.stop(time.Second)
		return nil, err
	}
	if err := waitHTTP(p, "http://"+s.host+"/direct", 30*time.Second); err != nil {
		p.stop(time.Second)
		return nil, err
	}
	return s, nil
}

func startReference(bins binaries, upstreamPort int) (*server, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	host := "127.0.0.1:" + strconv.Itoa(ports[0])
	p, err := startProc(nameReference, bins.workDir, bins.reference,
		[]string{"-addr", host, "-upstream", "http://127.0.0.1:" + strconv.Itoa(upstreamPort)})
	if err != nil {
		return nil, err
	}
	s := &server{name: nameReference, proc: p, host: host, livePath: "/live", publishURL: "http://" + host + "/publish"}
	if err := waitHTTP(p, s.publishURL, 10*time.Second); err != nil {
		p.stop(time.Second)
		return nil, err
	}
	return s, nil
}

// startUpstream starts the app both servers send client messages to.
func startUpstream(bins binaries) (*proc, int, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, 0, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(ports[0])
	p, err := startProc("upstream", bins.workDir, bins.upstream, []string{"-addr", addr})
	if err != nil {
		return nil, 0, err
	}
	if err := waitHTTP(p, "http://"+addr+"/", 10*time.Second); err != nil {
		p.stop(time.Second)
		return nil, 0, err
	}
	return p, ports[0], nil
}

// stop ends the server process.
func (s *server) stop() { s.proc.stop(3 * time.Second) }

// usage samples the server's RSS and CPU time.
func (s *server) usage() (usage, error) {
	if err := s.proc.exited(); err != nil {
		return usage{}, err
	}
	return readUsage(s.proc.pid())
}
