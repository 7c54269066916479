package duplex

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"path"
	"reflect"
	"strings"
	"unsafe"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// A session sends requests through the rest of the route (the handlers
// after duplex): one per client message, and the connect and disconnect
// hooks. They are built from a requestBase and served by routeCall.

// requestBase is what a session's requests are made of, copied from the
// opening request of its latest connection: its URL, its headers as the
// app sees them on messages, its addresses and TLS state, and the
// placeholders and vars the handlers before duplex set (e.g.
// {http.auth.user.id}). A session keeps this copy instead of the opening
// request, whose replacer holds the response writer and, through it, the
// connection and its buffers.
type requestBase struct {
	path, rawPath, query string
	host, remote         string
	tls                  *tls.ConnectionState
	local                net.Addr
	header               http.Header // as messages carry it: see messageHeader
	srv                  *caddyhttp.Server
	// placeholders set at the opening, and its vars
	statics map[string]any
	vars    map[string]any
}

// newRequestBase copies what a session's requests need from opening r.
func newRequestBase(r *http.Request) *requestBase {
	b := &requestBase{
		path:    r.URL.Path,
		rawPath: r.URL.RawPath,
		query:   r.URL.RawQuery,
		host:    r.Host,
		remote:  r.RemoteAddr,
		tls:     r.TLS,
		header:  messageHeader(r.Header),
	}
	b.srv, _ = r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	b.local, _ = r.Context().Value(http.LocalAddrContextKey).(net.Addr)
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		b.statics = replacerValues(repl)
	}
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		b.vars = maps.Clone(vars)
	}
	return b
}

// replacerValues copies the values handlers stored in a replacer with Set
// (such as {http.auth.user.id}). Caddy's Replacer offers no way to list
// them, so they are read from its value map; if a Caddy version lays it
// out differently, nothing is copied (and the placeholder tests fail).
func replacerValues(repl *caddy.Replacer) map[string]any {
	if replacerStatic == nil {
		return nil
	}
	v := reflect.ValueOf(repl).Elem().FieldByIndex(replacerStatic)
	m := *(*map[string]any)(unsafe.Pointer(v.UnsafeAddr()))
	if len(m) == 0 {
		return nil
	}
	return maps.Clone(m)
}

// replacerStatic is the index of the Replacer's value map, nil if it has
// none of that name and type.
var replacerStatic = func() []int {
	f, ok := reflect.TypeFor[caddy.Replacer]().FieldByName("static")
	if !ok || f.Type != reflect.TypeFor[map[string]any]() {
		return nil
	}
	return f.Index
}()

// request builds a request through the route: method and target (path and
// optional query; "" is the opening path), the base's headers plus extra,
// and body (sent as contentType).
func (b *requestBase) request(method, target string, extra http.Header, body []byte, contentType string) (*http.Request, error) {
	u := &url.URL{Path: b.path, RawPath: b.rawPath, RawQuery: b.query}
	if target != "" {
		pu, err := parseTarget(target)
		if err != nil {
			return nil, err
		}
		u = &url.URL{Path: pu.Path, RawPath: pu.RawPath, RawQuery: pu.RawQuery}
		if u.RawQuery == "" {
			u.RawQuery = b.query
		}
	}
	hdr := cloneHeader(b.header, len(extra)+1)
	for k, v := range extra {
		hdr[k] = v
	}
	var rb io.ReadCloser = http.NoBody
	if len(body) > 0 {
		hdr["Content-Type"] = []string{contentType}
		rb = io.NopCloser(bytes.NewReader(body))
	}
	req := &http.Request{
		Method:        method,
		URL:           u,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		Body:          rb,
		ContentLength: int64(len(body)),
		Host:          b.host,
		RemoteAddr:    b.remote,
		RequestURI:    u.RequestURI(),
		TLS:           b.tls,
	}
	if len(body) > 0 {
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	return req, nil
}

// cloneHeader is h.Clone() with room for more keys, so that adding
// them does not grow the map.
func cloneHeader(h http.Header, more int) http.Header {
	n := 0
	for _, vv := range h {
		n += len(vv)
	}
	sv := make([]string, n)
	h2 := make(http.Header, len(h)+more)
	for k, vv := range h {
		if vv == nil {
			h2[k] = nil
			continue
		}
		n = copy(sv, vv)
		h2[k] = sv[:n:n]
		sv = sv[n:]
	}
	return h2
}

// parseTarget checks a message's path: absolute, no scheme or host, and
// clean (no dot segments or repeated slashes, which the app might resolve
// to a path outside the session's message scope).
func parseTarget(target string) (*url.URL, error) {
	if target[0] != '/' {
		return nil, errors.New("path must start with /")
	}
	pu, err := url.ParseRequestURI(target)
	if err != nil {
		return nil, fmt.Errorf("invalid path: %v", err)
	}
	if pu.Host != "" || pu.Scheme != "" || pu.Fragment != "" {
		return nil, errors.New("path must be a path, not a URL")
	}
	clean := path.Clean(pu.Path)
	if strings.HasSuffix(pu.Path, "/") && clean != "/" {
		clean += "/"
	}
	if clean != pu.Path {
		return nil, errors.New("path must be clean: no . or .. segments, no repeated slashes")
	}
	if strings.ContainsRune(pu.Path, '\\') {
		// An app that reads a backslash as a slash would see dot segments
		// the scope check did not.
		return nil, errors.New("path must not contain a backslash")
	}
	return pu, nil
}

// underPath reports whether p is base or a path below it: the default
// message scope.
func underPath(p, base string) bool {
	base = strings.TrimSuffix(base, "/")
	return base == "" || p == base || strings.HasPrefix(p, base+"/")
}

// subrequestKey marks, in a request's context, a request a session sends
// through the route (a message or a hook). duplex and duplex_publish refuse
// them, wherever the route places them.
type subrequestKey struct{}

// isSubrequest reports whether r was sent through the route by a session.
func isSubrequest(r *http.Request) bool {
	return r.Context().Value(subrequestKey{}) != nil
}

// errSubrequest refuses a session's request at duplex or duplex_publish.
var errSubrequest = caddyhttp.Error(http.StatusForbidden,
	errors.New("duplex: a session's messages and hooks never reach duplex or duplex_publish"))

// prepare gives req a context and replacer of its own, as Caddy's server
// does for every request, under parent (for cancellation), with the
// opening's placeholders and vars available too, and marks it as a
// session's request.
func (b *requestBase) prepare(parent context.Context, req *http.Request, w http.ResponseWriter) *http.Request {
	ctx := context.WithValue(parent, subrequestKey{}, true)
	if b.local != nil {
		ctx = context.WithValue(ctx, http.LocalAddrContextKey, b.local)
	}
	repl := caddy.NewReplacer()
	req = caddyhttp.PrepareRequest(req.WithContext(ctx), repl, w, b.srv)
	if len(b.statics) > 0 {
		statics := b.statics
		repl.Map(func(key string) (any, bool) {
			v, ok := statics[key]
			return v, ok
		})
	}
	if vars, ok := req.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		for k, v := range b.vars {
			if _, set := vars[k]; !set {
				vars[k] = v
			}
		}
	}
	return req
}

// routeCall is one request through the route a session was opened on: a
// client message, or the connect or disconnect hook. They differ only in
// method, target, headers and body; each is built from the opening's
// requestBase and served by the handlers after duplex in its route.
type routeCall struct {
	base        *requestBase
	next        caddyhttp.Handler
	method      string
	target      string      // path and optional query; "" is the opening path
	header      http.Header // added to the base's headers
	body        []byte
	contentType string
}

// request builds the call's request under parent (for cancellation), to
// be answered into w.
func (c *routeCall) request(parent context.Context, w http.ResponseWriter) (*http.Request, error) {
	req, err := c.base.request(c.method, c.target, c.header, c.body, c.contentType)
	if err != nil {
		return nil, err
	}
	return c.base.prepare(parent, req, w), nil
}

// serve serves req through the route, turning a panic into a 500 error.
func (c *routeCall) serve(w http.ResponseWriter, req *http.Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = caddyhttp.Error(http.StatusInternalServerError, fmt.Errorf("duplex: panic in the route: %v", p))
		}
	}()
	return c.next.ServeHTTP(w, req)
}

// errorStatus is the HTTP status a route error stands for.
func errorStatus(err error, otherwise int) int {
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode != 0 {
		return he.StatusCode
	}
	return otherwise
}
