package duplex

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// publishListener serves the publish and sessions API (hub.serveAPI, under
// /duplex/) on addresses of the duplex app's own (publish_listen), on a
// plain net/http server: none of the per-request work of Caddy's admin
// endpoint (a request logger built with the request's headers, a metrics
// label map, its mux) or of a site route. It is meant for an app
// publishing at high rates from the same host or a private network; see
// "Publishing on an address of its own" in the README.
//
// Like the admin endpoint it has no authentication, so it refuses what a
// browser could send it: requests carrying Origin or Sec-Fetch-* headers,
// and, on a TCP address, requests for a Host other than an IP address,
// localhost or the address's own host (DNS rebinding).
type publishListener struct {
	hub     *hub
	servers []*http.Server
	// hosts are the Host names a TCP listener accepts besides IP
	// addresses and localhost: the listen addresses' own hosts.
	hosts map[string]bool
}

// publishAddr is the handler of one publish_listen address.
type publishAddr struct {
	*publishListener
	// unix: the address is a unix socket, so no Host is refused (no
	// browser reaches a unix socket).
	unix bool
}

// parsePublishListen parses publish_listen addresses: a Caddy network
// address of one port (host:port, tcp/host:port, unix//path).
func parsePublishListen(addrs []string) ([]caddy.NetworkAddress, error) {
	nas := make([]caddy.NetworkAddress, 0, len(addrs))
	for _, addr := range addrs {
		na, err := caddy.ParseNetworkAddress(addr)
		if err != nil {
			return nil, fmt.Errorf("duplex: publish_listen %q: %w", addr, err)
		}
		if na.IsFdNetwork() {
			return nil, fmt.Errorf("duplex: publish_listen %q: file descriptor networks are not supported", addr)
		}
		if !na.IsUnixNetwork() && (na.StartPort == 0 || na.PortRangeSize() != 1) {
			return nil, fmt.Errorf("duplex: publish_listen %q: want one port (host:port)", addr)
		}
		nas = append(nas, na)
	}
	return nas, nil
}

// startPublishListener listens on nas and serves the API there. Listeners
// are Caddy's own (NetworkAddress.Listen), shared across config reloads:
// the new config's server takes the address over while the old one
// finishes (stop).
func startPublishListener(ctx caddy.Context, h *hub, nas []caddy.NetworkAddress) (*publishListener, error) {
	p := &publishListener{hub: h, hosts: make(map[string]bool)}
	log := ctx.Logger().Named("publish_listen")
	// The servers' own complaints (a client's bad request, a failed
	// accept) at DEBUG, as Caddy's HTTP servers log theirs.
	errLog, err := zap.NewStdLogAt(log, zap.DebugLevel)
	if err != nil {
		return nil, fmt.Errorf("duplex: publish_listen: %w", err)
	}
	for _, na := range nas {
		if !na.IsUnixNetwork() && na.Host != "" {
			p.hosts[strings.ToLower(na.Host)] = true
		}
	}
	for _, na := range nas {
		ln, err := na.Listen(ctx, 0, net.ListenConfig{})
		if err != nil {
			p.stop()
			return nil, fmt.Errorf("duplex: publish_listen %s: %w", na, err)
		}
		l, ok := ln.(net.Listener)
		if !ok {
			if c, ok := ln.(interface{ Close() error }); ok {
				_ = c.Close()
			}
			p.stop()
			return nil, fmt.Errorf("duplex: publish_listen %s: not a stream listener (%T)", na, ln)
		}
		srv := &http.Server{
			Handler:           publishAddr{p, na.IsUnixNetwork()},
			ReadHeaderTimeout: 10 * time.Second,
			ReadTimeout:       30 * time.Second,
			IdleTimeout:       2 * time.Minute,
			MaxHeaderBytes:    64 << 10,
			ErrorLog:          errLog,
		}
		p.servers = append(p.servers, srv)
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("serving the publish API", zap.String("address", na.String()), zap.Error(err))
			}
		}()
		log.Info("serving the publish API", zap.String("address", na.String()))
		if !na.IsUnixNetwork() && !loopbackHost(na.Host) {
			log.Warn("the publish API has no authentication: make sure only your app can reach this address",
				zap.String("address", na.String()))
		}
	}
	return p, nil
}

// stop lets requests in progress finish (for up to 5 seconds), then closes
// the servers; the listeners stay open while a newer config uses them.
func (p *publishListener) stop() {
	if p == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, srv := range p.servers {
		if srv.Shutdown(ctx) != nil {
			_ = srv.Close()
		}
	}
}

// ServeHTTP serves /duplex/… as the admin endpoint does, after the checks
// above.
func (p publishAddr) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if why := p.refusal(r); why != "" {
		writeAPIError(w, &apiError{status: http.StatusForbidden, msg: why})
		return
	}
	path, ok := strings.CutPrefix(r.URL.Path, "/duplex/")
	if !ok {
		writeAPIError(w, &apiError{status: http.StatusNotFound, msg: "no such endpoint: the API is under /duplex/"})
		return
	}
	p.hub.serveAPI(w, r, path)
}

// refusal says why r is refused, "" if it is not.
func (p publishAddr) refusal(r *http.Request) string {
	if r.Header["Origin"] != nil || r.Header["Sec-Fetch-Mode"] != nil || r.Header["Sec-Fetch-Site"] != nil {
		return "requests from browsers are refused on publish_listen"
	}
	if p.unix {
		return ""
	}
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(strings.Trim(host, "[]"))
	if host == "localhost" || net.ParseIP(host) != nil || p.hosts[host] {
		return ""
	}
	return "host " + r.Host + " is refused on publish_listen: use an IP address, localhost or the listen address's host"
}

// loopbackHost reports whether host (of a listen address) is a loopback
// address or localhost; "" (every interface) is not.
func loopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
