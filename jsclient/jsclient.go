// Package jsclient serves the caddy-duplex browser client: duplex.js, one
// dependency-free ES module, and its TypeScript declarations duplex.d.ts,
// embedded in the plugin and served by the duplex_client HTTP handler
// (README, "JavaScript client").
package jsclient

import (
	"bytes"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

var (
	//go:embed duplex.js
	moduleJS []byte
	//go:embed duplex.d.ts
	declarationsTS []byte
)

func init() {
	caddy.RegisterModule(Handler{})
}

// asset is one embedded file with its headers.
type asset struct {
	body        []byte
	contentType string
	etag        string
}

func newAsset(body []byte, contentType string) asset {
	sum := sha256.Sum256(body)
	return asset{body: body, contentType: contentType, etag: `"` + hex.EncodeToString(sum[:16]) + `"`}
}

var (
	jsAsset  = newAsset(moduleJS, "text/javascript; charset=utf-8")
	dtsAsset = newAsset(declarationsTS, "application/typescript; charset=utf-8")
)

// Handler serves the browser client: duplex.js for any path, or
// duplex.d.ts when the path ends in ".d.ts". It answers GET and HEAD with
// a strong ETag (304 for a matching If-None-Match) and
// Cache-Control: no-cache, so browsers revalidate and pick up a new plugin
// version at once; other methods get 405.
type Handler struct{}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.duplex_client",
		New: func() caddy.Module { return new(Handler) },
	}
}

// ServeHTTP serves the embedded file; it never calls next.
func (Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	a := jsAsset
	if strings.HasSuffix(r.URL.Path, ".d.ts") {
		a = dtsAsset
	}
	h := w.Header()
	h.Set("Content-Type", a.contentType)
	h.Set("ETag", a.etag)
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Content-Type-Options", "nosniff")
	// ServeContent answers If-None-Match (304), HEAD and ranges.
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(a.body))
	return nil
}

// Interface guard
var _ caddyhttp.MiddlewareHandler = (*Handler)(nil)
