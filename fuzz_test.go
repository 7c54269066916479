package duplex

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// FuzzDecodeClientFrame: any input is either a frame or a 4xx error, never
// a panic; an accepted frame's id is one the error frames can echo.
func FuzzDecodeClientFrame(f *testing.F) {
	for _, s := range []string{
		`{"id":"c1","data":{"a":[1,2,{"b":null}]},"method":"PUT","path":"/x?y=1"}`,
		`{"type":"ack","seq":17}`, `{"id":12.5e3}`, `{"type":"bogus"}`, `[]`, `"str"`,
		"{\"id\":\"\xff\"}", `{"data":` + string(bytes.Repeat([]byte("["), 5000)) + `}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, err := decodeClientFrame(b)
		if err != nil {
			if err.status < 400 || err.status > 499 {
				t.Fatalf("status %d for %q", err.status, b)
			}
			if len(fr.ID) > 0 && validID(fr.ID) != nil {
				t.Fatalf("error names an invalid id %q", fr.ID)
			}
			return
		}
		if validID(fr.ID) != nil {
			t.Fatalf("accepted invalid id %q", fr.ID)
		}
		// The answer frames built from it must be valid JSON.
		if !json.Valid(encodeError(fr.ID, 400, "x")) || !json.Valid(encodeAck(fr.ID)) {
			t.Fatalf("answer to %q is not JSON", b)
		}
	})
}

// FuzzReadLine: the NDJSON line reader returns lines no longer than the
// limit, reports longer ones as errTooBig and never loses the next line.
func FuzzReadLine(f *testing.F) {
	f.Add([]byte("{\"a\":1}\n\n{\"b\":2}\r\n"), 8)
	f.Add(bytes.Repeat([]byte("x"), 9000), 100)
	f.Fuzz(func(t *testing.T, in []byte, max int) {
		if max <= 0 || max > 1<<16 {
			return
		}
		br := bufio.NewReaderSize(bytes.NewReader(in), 16)
		for i := 0; i < len(in)+2; i++ {
			line, err := readLine(br, int64(max))
			if errors.Is(err, io.EOF) {
				return
			}
			if errors.Is(err, errTooBig) {
				continue
			}
			if err != nil {
				t.Fatalf("readLine: %v", err)
			}
			if len(line) > max {
				t.Fatalf("line of %d bytes over the %d limit", len(line), max)
			}
			if bytes.ContainsAny(line, "\n") {
				t.Fatalf("line contains a newline: %q", line)
			}
		}
		t.Fatalf("readLine did not reach EOF")
	})
}

// FuzzDecodePublish: a publish body is accepted with exactly one target
// and data xor close, or rejected with 400; never a panic.
func FuzzDecodePublish(f *testing.F) {
	for _, s := range []string{
		`{"channel":"a","data":1}`, `[{"user":"u","data":{}},{"session":"s","close":"bye"}]`,
		`{"channel":"a","user":"b","data":1}`, `{"data":1}`, `[]`, `[1]`, `{"channel":"a"}`,
		`{"channel":"a","data":1,"except":"x"}`, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		msgs, _, err := decodePublish(b)
		if err != nil {
			if err.status != 400 {
				t.Fatalf("status %d", err.status)
			}
			return
		}
		for _, m := range msgs {
			n := 0
			for _, t := range []string{m.Channel, m.User, m.Session} {
				if t != "" {
					n++
				}
			}
			if n != 1 || (m.Close == nil) == (m.Data == nil) {
				t.Fatalf("accepted %+v from %q", m, b)
			}
			if m.Close == nil {
				frame := append(append([]byte(nil), pushPrefix...), '1')
				frame = append(frame, newPush(m.Channel, m.Data).suffix...)
				if !json.Valid(frame) || bytes.ContainsAny(frame, "\n\r") {
					t.Fatalf("push frame %q from %q is not one line of JSON", frame, b)
				}
			}
		}
	})
}

// FuzzDecodePublishFast: wherever decodePlainPublish answers, its publish
// is the one json.Unmarshal decodes, data bytes included; and decodePublish
// answers a single publish as json.Unmarshal and checkPublish do, error
// text included. Each input is tried as a body, and as the choices of
// publishFromChoices, which builds mostly plain bodies.
func FuzzDecodePublishFast(f *testing.F) {
	for _, s := range []string{
		`{"channel":"c-123","data":{"n":1,"text":"hello"}}`,
		`{"channel":"c","user":"u","session":"s","id":"i","data":1,"except":"e","close":"x"}`,
		`{"session":"s1","close":"bye"}`, `{"session":"s","close":null}`, `{"session":"s","close":""}`,
		" \n{ \"channel\" : \"c\" ,\r\n\t\"data\" : { \"a\" : [ 1 , 2 ] } }\n",
		`{"channel":"c","data":{"a":{"b":[{"c":null},true,false,-1.5e3,"}]\"{["]}}}`,
		`{"channel":"c","data":null}`, `{"channel":"c","data":"a\"b\\\u00e9"}`, `{"channel":"c","data":"é"}`,
		`{"chann\u0065l":"c","data":1}`, `{"channel":"c\u0041","data":1}`, `{"channel":"é","data":1}`,
		`{"channel":null,"data":1}`, `{"channel":1,"data":1}`, `{"session":"s","close":1}`,
		`{"channel":"a","channel":"b","data":1}`, `{"Channel":"c","data":1}`, `{"channel":"c","x":1,"data":1}`,
		`{"channel":"c","data":[1,}`, `{"channel":"c","data":1}x`, `{}`, `[{"channel":"c","data":1}]`, `null`,
		`{"channel":"c","data":` + strings.Repeat("[", 1001) + strings.Repeat("]", 1001) + `}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkPlainPublish(t, b)
		checkPlainPublish(t, publishFromChoices(b))
	})
}

// FuzzMessageTarget: a frame's path and method either make a request whose
// path is clean and absolute (so the messages scope sees what the app
// will), or are refused; CONNECT, TRACE and PRI never pass; a path the
// default scope accepts is the opening path or below it.
func FuzzMessageTarget(f *testing.F) {
	for _, s := range [][2]string{
		{"POST", "/live/rooms/1?x=1"}, {"get", "/live/../admin"}, {"TRACE", "/live"},
		{"pri", "//evil.example/x"}, {"DELETE", "/live/%2e%2e/admin"}, {"PUT", "/live//x"},
		{"POST", "/livex"}, {"x y", "/live"}, {"POST", "http://h/live"},
		{"POST", `/live/x\..\..\admin`}, {"POST", "/live/x%5c..%5cadmin"},
	} {
		f.Add(s[0], s[1])
	}
	base := &requestBase{path: "/live", host: "example.com", header: http.Header{}}
	f.Fuzz(func(t *testing.T, method, target string) {
		method = strings.ToUpper(method)
		if !validMethod(method) {
			return
		}
		switch method {
		case http.MethodConnect, http.MethodTrace, "PRI":
			t.Fatalf("method %q accepted", method)
		}
		if target == "" {
			return
		}
		req, err := base.request(method, target, nil, nil, "")
		if err != nil {
			return
		}
		p := req.URL.Path
		if !strings.HasPrefix(p, "/") || strings.Contains(p, "//") || strings.Contains(p, "/../") || strings.HasSuffix(p, "/..") || strings.Contains(p, "/./") || strings.Contains(p, "\\") || req.URL.Host != "" {
			t.Fatalf("target %q made path %q (host %q)", target, p, req.URL.Host)
		}
		if underPath(p, "/live") && p != "/live" && !strings.HasPrefix(p, "/live/") {
			t.Fatalf("%q counted under /live", p)
		}
	})
}

// FuzzPostFrames: an SSE POST body yields frames that each decode and fit
// max_message_size, no more of them than allowed, or a 4xx error; never a
// panic.
func FuzzPostFrames(f *testing.F) {
	f.Add([]byte("{\"id\":1}\n{\"id\":2}\n"), true)
	f.Add([]byte(`{"id":"a","data":[1,2]}`), false)
	f.Add(bytes.Repeat([]byte("{}\n"), 100), true)
	f.Add([]byte("{\"id\":1}\r\n\n\n{bad"), true)
	f.Fuzz(func(t *testing.T, body []byte, ndjson bool) {
		const maxSize, maxFrames = 64, 8
		frames, err := readPostFrames(bytes.NewReader(body), ndjson, maxSize, maxFrames)
		if err != nil {
			if err.status < 400 || err.status > 499 {
				t.Fatalf("status %d", err.status)
			}
			return
		}
		if len(frames) == 0 || len(frames) > maxFrames || (!ndjson && len(frames) != 1) {
			t.Fatalf("%d frames", len(frames))
		}
		for _, fr := range frames {
			if len(fr) > maxSize {
				t.Fatalf("frame of %d bytes", len(fr))
			}
			if _, ferr := decodeClientFrame(fr); ferr != nil {
				t.Fatalf("frame %q passed but does not decode: %s", fr, ferr.msg)
			}
		}
	})
}
