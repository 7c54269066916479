package duplex

import (
	"encoding/json"
	"testing"
)

func TestDecodeClientFrame(t *testing.T) {
	cases := []struct {
		in      string
		status  int    // 0: valid
		wantRef string // the id the error frame names
	}{
		{`{"id":"c1","data":{"a":1},"path":"/x"}`, 0, ""},
		{`{"type":"message","id":7,"data":null}`, 0, ""},
		{`{"type":"ack","seq":17}`, 0, ""},
		{`not json`, 400, ""},
		{`[1,2]`, 400, ""},
		{`{"id":"c2","data":}`, 400, ""},
		{`{"id":"c3","type":"bogus"}`, 400, `"c3"`},
		{`{"id":{"x":1}}`, 400, ""},
		{`{"id":"a\nb"}`, 400, ""},
		{"{\"id\":\"c4\",\"data\":\"\xff\"}", 400, ""},
	}
	for _, tc := range cases {
		f, err := decodeClientFrame([]byte(tc.in))
		switch {
		case tc.status == 0 && err != nil:
			t.Errorf("%s: unexpected error %v", tc.in, err)
		case tc.status != 0 && err == nil:
			t.Errorf("%s: accepted, want %d", tc.in, tc.status)
		case tc.status != 0 && err.status != tc.status:
			t.Errorf("%s: status %d, want %d", tc.in, err.status, tc.status)
		case tc.status != 0 && string(f.ID) != tc.wantRef:
			t.Errorf("%s: error names id %q, want %q", tc.in, f.ID, tc.wantRef)
		}
	}
}

func TestEmbedBody(t *testing.T) {
	cases := []struct {
		ct, body, data, enc string
	}{
		{"application/json", `{ "a" : [1, 2] }`, `{"a":[1,2]}`, ""},
		{"application/problem+json; charset=utf-8", `{"x":1}`, `{"x":1}`, ""},
		{"application/json", `not json`, `"not json"`, ""},
		{"text/plain; charset=utf-8", "héllo", `"héllo"`, ""},
		{"", "plain", `"plain"`, ""},
		{"application/octet-stream", "\x00\x01\xff", `"AAH/"`, "base64"},
		{"image/png", "PNG", `"UE5H"`, "base64"},
	}
	for _, tc := range cases {
		data, enc := embedBody(tc.ct, []byte(tc.body))
		if string(data) != tc.data || enc != tc.enc {
			t.Errorf("embedBody(%q, %q) = %s %q; want %s %q", tc.ct, tc.body, data, enc, tc.data, tc.enc)
		}
	}
}

func TestPushFrameIsValidJSON(t *testing.T) {
	p := newPush("room:\"1\"", json.RawMessage("{\n \"t\": \"x\"\n}"))
	frame := string(pushPrefix) + "12" + string(p.suffix)
	var got map[string]any
	if err := json.Unmarshal([]byte(frame), &got); err != nil {
		t.Fatalf("push frame %s: %v", frame, err)
	}
	if got["seq"].(float64) != 12 || got["channel"] != "room:\"1\"" || got["data"].(map[string]any)["t"] != "x" {
		t.Errorf("push frame decoded to %v", got)
	}
	if p.frameSize(12) != len(frame) {
		t.Errorf("frameSize = %d, want %d", p.frameSize(12), len(frame))
	}
	for _, c := range frame {
		if c == '\n' {
			t.Errorf("push frame contains a newline: %q", frame)
		}
	}
}

// BenchmarkDecodeClientFrame measures decoding a typical client message.
func BenchmarkDecodeClientFrame(b *testing.B) {
	in := []byte(`{"id":"c123","method":"POST","path":"/rooms/1","data":{"name":"bob","text":"hello there"}}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, err := decodeClientFrame(in); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEncodePush measures encoding a publish's payload (once per
// publish, whatever the number of subscribers).
func BenchmarkEncodePush(b *testing.B) {
	data := json.RawMessage(`{"name":"bob","text":"hello there","at":"2026-11-25T10:00:00Z"}`)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_ = newPush("room:lobby", data)
	}
}
