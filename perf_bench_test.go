package duplex

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/protocol"
	"github.com/gobwas/ws"
)

// The answers written without reflection are the bytes json.Marshal
// writes, whatever the ref, data and error text.
func TestEncodeAnswerMatchesMarshal(t *testing.T) {
	refs := []json.RawMessage{nil, json.RawMessage(`1`), json.RawMessage(`"a-1"`), json.RawMessage(`"<&>"`), json.RawMessage(`null`)}
	datas := []json.RawMessage{nil, json.RawMessage(`{"ok":true}`), json.RawMessage(`"x y"`), json.RawMessage(`{"a": [1, 2]}`), json.RawMessage(`"\u2028<b>"`)}
	errs := []string{"", "Bad Request", `method "X" is not allowed`, "tab\there", "é"}
	for _, ref := range refs {
		for _, data := range datas {
			for _, e := range errs {
				for _, enc := range []string{"", "base64"} {
					f := protocol.Answer{Type: protocol.TypeReply, Ref: ref, Status: 200, Data: data, Encoding: enc, Error: e}
					if got, want := encodeAnswer(f), mustJSON(f); !bytes.Equal(got, want) {
						t.Errorf("encodeAnswer(%+v) = %s, json.Marshal: %s", f, got, want)
					}
				}
			}
		}
	}
}

// A push frame's suffix is the channel and data as json.Marshal and
// json.Compact write them.
func TestNewPushMatchesMarshal(t *testing.T) {
	for _, ch := range []string{"", "room-1", `a"b`, "<x>", "ü"} {
		for _, data := range []string{"", `1`, `{"a":1}`, `{ "a" : [1, 2] }`, `"a b"`} {
			var want bytes.Buffer
			if ch != "" {
				want.WriteString(`,"channel":`)
				want.Write(mustJSON(ch))
			}
			want.WriteString(`,"data":`)
			if data == "" {
				want.WriteString("null")
			} else if err := json.Compact(&want, []byte(data)); err != nil {
				t.Fatal(err)
			}
			want.WriteByte('}')
			if got := newPush(ch, json.RawMessage(data)).suffix; !bytes.Equal(got, want.Bytes()) {
				t.Errorf("newPush(%q, %s) = %s, want %s", ch, data, got, want.Bytes())
			}
		}
	}
}

// readHeader reads what ws.ReadHeader reads.
func TestReadHeaderMatchesGobwas(t *testing.T) {
	for _, n := range []int64{0, 5, 125, 126, 300, 65535, 65536, 1 << 20} {
		for _, masked := range []bool{false, true} {
			h := ws.Header{Fin: n%2 == 0, OpCode: ws.OpText, Length: n, Masked: masked}
			if masked {
				h.Mask = [4]byte{1, 2, 3, 4}
			}
			var buf bytes.Buffer
			if err := ws.WriteHeader(&buf, h); err != nil {
				t.Fatal(err)
			}
			buf.WriteString("rest")
			br := bufio.NewReaderSize(&buf, wsReadBuffer)
			got, err := readHeader(br)
			if err != nil || got != h {
				t.Fatalf("readHeader = %+v, %v; want %+v", got, err, h)
			}
			if rest, _ := br.Peek(4); string(rest) != "rest" {
				t.Fatalf("after the header: %q", rest)
			}
		}
	}
	if _, err := readHeader(bufio.NewReader(bytes.NewReader([]byte{0x81, 0xfe, 0}))); err == nil {
		t.Fatal("a truncated header was read")
	}
}

// BenchmarkBuildMessageRequest is the request a client message becomes,
// before the route serves it.
func BenchmarkBuildMessageRequest(b *testing.B) {
	open := httptest.NewRequest(http.MethodGet, "http://example.com/live?channel=c1", nil)
	open.Header.Set("User-Agent", "bench")
	open.Header.Set("Origin", "http://example.com")
	open.Header.Set("Cookie", "session=abc")
	open.Header.Set("Upgrade", "websocket")
	open.Header.Set("Connection", "Upgrade")
	open.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	base := newRequestBase(open)
	s := &session{id: "sid", user: "u1"}
	f := &protocol.Message{ID: json.RawMessage(`7`)}
	body := []byte(`{"n":1}`)
	b.ReportAllocs()
	for b.Loop() {
		call := &routeCall{base: base, method: http.MethodPost, header: s.messageHeader(f, transportWebSocket),
			body: body, contentType: "application/json"}
		rec := newRecorder(1 << 16)
		if _, err := call.request(b.Context(), rec); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodeReply is the reply frame of a JSON answer.
func BenchmarkEncodeReply(b *testing.B) {
	ref := json.RawMessage(`7`)
	body := []byte(`{"ok":true,"n":12345}`)
	b.ReportAllocs()
	for b.Loop() {
		encodeReply(ref, 200, "application/json", body)
	}
}

// BenchmarkDecodePublish is a single publish and a batch of 20.
func BenchmarkDecodePublish(b *testing.B) {
	single := []byte(`{"channel":"c17","data":{"n":1,"t":1700000000000}}`)
	var batch bytes.Buffer
	batch.WriteByte('[')
	for i := range 20 {
		if i > 0 {
			batch.WriteByte(',')
		}
		batch.Write(single)
	}
	batch.WriteByte(']')
	for _, c := range []struct {
		name string
		body []byte
	}{{"single", single}, {"batch20", batch.Bytes()}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := decodePublish(c.body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkDecodePublishPlain is a typical single publish decoded by
// decodePublish, which takes the plain path (fast), and by json.Unmarshal
// and checkPublish, as it was before the plain path (unmarshal).
func BenchmarkDecodePublishPlain(b *testing.B) {
	body := []byte(`{"channel":"c-123","data":{"n":1,"text":"hello"}}`)
	b.Run("fast", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, err := decodePublish(body); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("unmarshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := decodeByUnmarshal(body); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkServePublish is the publish handler serving one single publish
// to a channel of one session: body read, decode, delivery into the
// session's resume buffer and outbox, answer. The request and response
// are reused, so what is counted is the handler's own.
func BenchmarkServePublish(b *testing.B) {
	h := newHub()
	s := testSession(h, "s", "", 1<<40)
	h.add(s, []string{"c17"}, nil)
	body := []byte(`{"channel":"c17","data":{"n":1,"t":1700000000000}}`)
	var rb rewoundBody
	r := httptest.NewRequest(http.MethodPost, "/duplex/publish", nil)
	r.Body, r.ContentLength = &rb, int64(len(body))
	w := &discardResponse{h: http.Header{}}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%256 == 0 {
			s.cur.out.frames, s.cur.out.bytes = s.cur.out.frames[:0], 0
		}
		rb.Reset(body)
		h.servePublish(w, r)
		if w.code != http.StatusOK {
			b.Fatalf("status %d", w.code)
		}
	}
}

// rewoundBody is a request body read again from its start after Reset.
type rewoundBody struct{ bytes.Reader }

func (*rewoundBody) Close() error { return nil }

// discardResponse is a ResponseWriter that keeps the status only.
type discardResponse struct {
	h    http.Header
	code int
}

func (d *discardResponse) Header() http.Header         { return d.h }
func (d *discardResponse) WriteHeader(code int)        { d.code = code }
func (d *discardResponse) Write(p []byte) (int, error) { return len(p), nil }

// BenchmarkReadFrame is reading one short masked client frame; reads/op
// counts the reads from the connection (each one a read(2) on a socket).
func BenchmarkReadFrame(b *testing.B) {
	var frame bytes.Buffer
	payload := []byte(`{"id":1,"data":{"n":1}}`)
	if err := ws.WriteFrame(&frame, ws.MaskFrame(ws.NewTextFrame(payload))); err != nil {
		b.Fatal(err)
	}
	r := &countingReader{r: bytes.NewReader(frame.Bytes())}
	c := &wsConn{br: bufio.NewReaderSize(r, wsReadBuffer), maxSize: 1 << 16,
		setRead: func(time.Time) error { return nil }}
	b.ReportAllocs()
	for b.Loop() {
		r.r.Reset(frame.Bytes())
		c.br.Reset(r)
		if _, _, err := c.readMessage(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(r.n)/float64(b.N), "reads/op")
}

type countingReader struct {
	r *bytes.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	c.n++
	return c.r.Read(p)
}
