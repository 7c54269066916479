package duplex

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// readSizes is a request body that records the size of every Read.
type readSizes struct {
	r     io.Reader
	sizes []int
}

func (b *readSizes) Read(p []byte) (int, error) {
	b.sizes = append(b.sizes, len(p))
	return b.r.Read(p)
}

// readBody allocates at most bodyReadAhead (+1) before a body's bytes
// arrive, whatever its Content-Length announces, and still reads bodies
// of every size whole: shorter than, as long as, and longer than
// announced, up to maxPublishBody.
func TestReadBodyBoundsWhatItAllocatesAhead(t *testing.T) {
	for _, tc := range []struct {
		name      string
		announced int64
		size      int
	}{
		{"small", 20, 20},
		{"large", 700 << 10, 700 << 10},
		{"the limit", maxPublishBody, maxPublishBody},
		{"shorter than announced", maxPublishBody, 10},
		{"longer than announced", 100 << 10, 300 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := bytes.Repeat([]byte("x"), tc.size)
			body := &readSizes{r: bytes.NewReader(want)}
			r := httptest.NewRequest(http.MethodPost, "/duplex/publish", body)
			r.ContentLength = tc.announced
			got, err := readBody(httptest.NewRecorder(), r)
			if err != nil {
				t.Fatalf("readBody: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, want %d", len(got), len(want))
			}
			if body.sizes[0] > bodyReadAhead+1 {
				t.Errorf("first read into %d bytes (announced %d): more than %d allocated before any byte arrived", body.sizes[0], tc.announced, bodyReadAhead+1)
			}
		})
	}
	// Over the limit: an error, as before.
	r := httptest.NewRequest(http.MethodPost, "/duplex/publish", strings.NewReader(strings.Repeat("x", maxPublishBody+1)))
	if _, err := readBody(httptest.NewRecorder(), r); err == nil {
		t.Error("a body over maxPublishBody was read without an error")
	}
}
