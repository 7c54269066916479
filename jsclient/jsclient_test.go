package jsclient

import (
	"bytes"
	"compress/gzip"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func serve(t *testing.T, method, path string, hdr ...string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, path, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		r.Header.Set(hdr[i], hdr[i+1])
	}
	w := httptest.NewRecorder()
	if err := (Handler{}).ServeHTTP(w, r, nil); err != nil {
		var he caddyhttp.HandlerError
		if !errors.As(err, &he) {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		w.Code = he.StatusCode
	}
	return w
}

func TestServesTheModule(t *testing.T) {
	w := serve(t, http.MethodGet, "/duplex.js")
	if w.Code != http.StatusOK {
		t.Fatalf("status %d", w.Code)
	}
	if ct := w.Header().Get("Content-Type"); ct != "text/javascript; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	if !bytes.Equal(w.Body.Bytes(), moduleJS) || !bytes.Contains(moduleJS, []byte("export function connect(")) {
		t.Errorf("body is not duplex.js (%d bytes)", w.Body.Len())
	}
	etag := w.Header().Get("ETag")
	if !strings.HasPrefix(etag, `"`) || strings.HasPrefix(etag, "W/") || len(etag) < 10 {
		t.Errorf("ETag %q, want a strong one", etag)
	}
	if cc := w.Header().Get("Cache-Control"); cc != "no-cache" {
		t.Errorf("Cache-Control %q", cc)
	}

	// Revalidation: the same ETag is 304 with no body; another is 200.
	if w := serve(t, http.MethodGet, "/duplex.js", "If-None-Match", etag); w.Code != http.StatusNotModified || w.Body.Len() != 0 {
		t.Errorf("If-None-Match %s: %d with %d bytes, want 304 and none", etag, w.Code, w.Body.Len())
	}
	if w := serve(t, http.MethodGet, "/duplex.js", "If-None-Match", `"other"`); w.Code != http.StatusOK {
		t.Errorf("If-None-Match of another version: %d, want 200", w.Code)
	}
	if w := serve(t, http.MethodHead, "/duplex.js"); w.Code != http.StatusOK || w.Body.Len() != 0 || w.Header().Get("ETag") != etag {
		t.Errorf("HEAD: %d, %d bytes, ETag %q", w.Code, w.Body.Len(), w.Header().Get("ETag"))
	}
	if w := serve(t, http.MethodPost, "/duplex.js"); w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("POST: %d, Allow %q; want 405 and GET, HEAD", w.Code, w.Header().Get("Allow"))
	}
}

func TestServesTheDeclarations(t *testing.T) {
	w := serve(t, http.MethodGet, "/static/duplex.d.ts")
	if w.Code != http.StatusOK || !bytes.Equal(w.Body.Bytes(), declarationsTS) {
		t.Fatalf("GET duplex.d.ts: %d, %d bytes", w.Code, w.Body.Len())
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/typescript; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	if w.Header().Get("ETag") == jsAsset.etag {
		t.Errorf("the declarations have the module's ETag")
	}
}

// TestGzipSize keeps the module under the size the README promises.
func TestGzipSize(t *testing.T) {
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	zw.Write(moduleJS)
	zw.Close()
	t.Logf("duplex.js: %d bytes, %d gzipped", len(moduleJS), buf.Len())
	if buf.Len() >= 6*1024 {
		t.Errorf("duplex.js is %d bytes gzipped, want under 6 KiB", buf.Len())
	}
}
