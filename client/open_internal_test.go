package client

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// openServer is a stand-in server for openings, with the connections the
// client made to it.
type openServer struct {
	*httptest.Server
	mu    sync.Mutex
	conns []net.Conn // the client's side
}

func newOpenServer(t *testing.T, h2 bool, h http.HandlerFunc) *openServer {
	s := &openServer{Server: httptest.NewUnstartedServer(h)}
	if h2 {
		s.EnableHTTP2 = true
		s.StartTLS()
	} else {
		s.Start()
	}
	t.Cleanup(s.Close)
	return s
}

// dialer is a client dialer for the server's URL.
func (s *openServer) dialer(t *testing.T, h2 bool) *dialer {
	opts := Options{HTTP: HTTP1, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err == nil {
			s.mu.Lock()
			s.conns = append(s.conns, c)
			s.mu.Unlock()
		}
		return c, err
	}}
	if h2 {
		pool := x509.NewCertPool()
		pool.AddCert(s.Certificate())
		opts.HTTP = HTTP2
		opts.TLSConfig = &tls.Config{RootCAs: pool}
	}
	opts, err := opts.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(s.URL + "/live")
	if err != nil {
		t.Fatal(err)
	}
	return &dialer{u: u, opts: &opts}
}

// closed fails unless the client made connections and has closed them all
// (a closed connection refuses a deadline).
func (s *openServer) closed(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.conns) == 0 {
		t.Fatal("the opening made no connection")
	}
	for _, c := range s.conns {
		if err := c.SetReadDeadline(time.Time{}); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("a connection of the opening is still open after it failed (%v)", err)
		}
	}
	s.conns = nil
}

// An opening of stream or SSE that the server answers with an error
// status, or with 200 and the wrong content type, fails with the
// statusError the connecting loop reads (401 and 403 end a session), and
// leaves no connection open; so does one whose context ends before the
// answer, once it does. The SSE GET has no body.
func TestOpeningRefused(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		for _, tr := range []struct{ name, accept, wrongType string }{
			{Stream, "application/x-ndjson", "text/event-stream"},
			{SSE, "text/event-stream", "application/x-ndjson"},
		} {
			t.Run(tr.name+map[bool]string{false: " h1", true: " h2"}[h2], func(t *testing.T) {
				var answer atomic.Value // the http.HandlerFunc answering now
				srv := newOpenServer(t, h2, func(w http.ResponseWriter, r *http.Request) {
					if got := r.Header.Get("Accept"); got != tr.accept {
						t.Errorf("Accept %q, want %q", got, tr.accept)
					}
					if tr.name == SSE && (r.Method != http.MethodGet || r.ContentLength != 0 || len(r.TransferEncoding) > 0) {
						t.Errorf("SSE opening %s with Content-Length %d, Transfer-Encoding %q: want a GET without a body",
							r.Method, r.ContentLength, r.TransferEncoding)
					}
					if tr.name == Stream && r.ProtoMajor == 1 {
						// As the server does: Go's HTTP/1.1 server would
						// otherwise wait for the end of the body (a pipe the
						// client ends only with the connection) before it
						// answers.
						w.Header().Set("Connection", "close")
					}
					answer.Load().(http.HandlerFunc)(w, r)
				})
				d := srv.dialer(t, h2)
				for _, c := range []struct {
					why    string
					answer http.HandlerFunc
					status int
					body   string
				}{
					{"403", func(w http.ResponseWriter, r *http.Request) {
						http.Error(w, "not you", http.StatusForbidden)
					}, http.StatusForbidden, "not you"},
					{"wrong content type", func(w http.ResponseWriter, r *http.Request) {
						w.Header().Set("Content-Type", tr.wrongType)
						io.WriteString(w, "something else\n")
					}, http.StatusOK, "something else"},
				} {
					answer.Store(c.answer)
					_, err := d.dial(context.Background(), tr.name, "")
					var se *statusError
					if !errors.As(err, &se) || se.transport != tr.name || se.status != c.status || se.body != c.body {
						t.Fatalf("%s: %v, want a statusError %s %d %q", c.why, err, tr.name, c.status, c.body)
					}
					if want := "duplex client: " + tr.name + " opening refused"; !strings.HasPrefix(err.Error(), want) {
						t.Fatalf("%s: %q, want it to start with %q", c.why, err, want)
					}
					srv.closed(t)
				}

				// An HTTP/1.1 handler that has not read its body does not see
				// the connection close: it waits for the test to end.
				hung := make(chan struct{})
				t.Cleanup(func() { close(hung) })
				answer.Store(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					select {
					case <-r.Context().Done():
					case <-hung:
					}
				}))
				ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
				defer cancel()
				start := time.Now()
				_, err := d.dial(ctx, tr.name, "")
				if err == nil || !strings.HasPrefix(err.Error(), "duplex client: "+tr.name+": ") {
					t.Fatalf("opening whose context ended: %v, want a %s error", err, tr.name)
				}
				if took := time.Since(start); took > 5*time.Second {
					t.Fatalf("opening whose context ended after 200ms failed after %s", took)
				}
				srv.closed(t)
			})
		}
	}
}
