package duplex

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
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
