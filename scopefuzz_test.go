package duplex

import (
	"context"
	"net/http"
	"path"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// FuzzScopeMethods: a frame's method and path go through what a message
// goes through before the route (method upper-cased and checked, target
// parsed, request prepared) and then the scope check, both the default one
// (the opening path /live and below) and a messages block (path /rooms/*
// and method GET POST). Whatever a scope accepts is inside it, has a clean
// path the app cannot resolve elsewhere, and never has the method CONNECT,
// TRACE or PRI (README: "Security defaults", "The session protocol").
func FuzzScopeMethods(f *testing.F) {
	for _, s := range [][2]string{
		{"POST", "/live/rooms/1?x=1"}, {"get", "/rooms/1"}, {"get", "/live/../internal/publish"},
		{"TRACE", "/live"}, {"pri", "/rooms/x"}, {"connect", "/rooms/x"}, {"DELETE", "/admin/users/42"},
		{"post", "/rooms/%2e%2e/admin"}, {"GET", "/rooms//x"}, {"GET", "/ROOMS/x"}, {"", "/livex"},
		{"GET", "/private/secret.txt"}, {"POST", "/internal/publish"}, {"GET", "//evil.example/rooms/x"},
		{"POST", "/rooms/..%2fadmin"}, {"POST", "/live%2f..%2fadmin"}, {"Get", "/rooms/"},
	} {
		f.Add(s[0], s[1])
	}
	nop := zap.NewNop()
	byDefault := &Handler{logger: nop}
	rooms := &Handler{logger: nop, messages: caddyhttp.MatcherSet{
		caddyhttp.MatchPath{"/rooms/*"},
		caddyhttp.MatchMethod{http.MethodGet, http.MethodPost},
	}}
	base := &requestBase{path: "/live", host: "example.com", header: http.Header{}}
	f.Fuzz(func(t *testing.T, method, target string) {
		m := http.MethodPost
		if method != "" {
			m = strings.ToUpper(method)
		}
		if !validMethod(m) {
			return
		}
		switch m {
		case http.MethodConnect, http.MethodTrace, "PRI":
			t.Fatalf("method %q passes", method)
		}
		req, err := base.request(m, target, nil, nil, "")
		if err != nil {
			return
		}
		req = base.prepare(context.Background(), req, newRecorder(1<<10))
		p := req.URL.Path
		inDefault, inRooms := byDefault.inScope(req, base), rooms.inScope(req, base)
		if inDefault && p != "/live" && !strings.HasPrefix(p, "/live/") {
			t.Fatalf("%s %q: path %q accepted by the default scope of /live", method, target, p)
		}
		if inRooms && (!strings.HasPrefix(strings.ToLower(p), "/rooms/") || (m != http.MethodGet && m != http.MethodPost)) {
			t.Fatalf("%s %q: %s %q accepted by messages { path /rooms/* ; method GET POST }", method, target, m, p)
		}
		if inDefault || inRooms {
			clean := path.Clean(p)
			if strings.HasSuffix(p, "/") && clean != "/" {
				clean += "/"
			}
			if clean != p || req.URL.Host != "" {
				t.Fatalf("%s %q: accepted with path %q (clean: %q), host %q", method, target, p, clean, req.URL.Host)
			}
		}
	})
}
