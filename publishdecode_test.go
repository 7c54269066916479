package duplex

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// decodeByUnmarshal is decodePublish for a single publish as it is without
// decodePlainPublish: json.Unmarshal, then checkPublish. It is what the
// plain path must agree with.
func decodeByUnmarshal(body []byte) ([]*publishMsg, *apiError) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return nil, badPublish("empty body")
	}
	m := new(publishMsg)
	if e := json.Unmarshal(body, m); e != nil {
		return nil, badPublish("invalid JSON: %v", e)
	}
	if e := checkPublish(m); e != nil {
		return nil, e
	}
	return []*publishMsg{m}, nil
}

// checkPlainPublish fails t when decodePlainPublish answers for body
// otherwise than json.Unmarshal, or when decodePublish answers otherwise
// than decodeByUnmarshal. It reports whether the plain path answered.
func checkPlainPublish(t *testing.T, body []byte) bool {
	t.Helper()
	trimmed := bytes.TrimSpace(body)
	var fast publishMsg
	plain := decodePlainPublish(trimmed, &fast)
	if plain {
		var want publishMsg
		if err := json.Unmarshal(trimmed, &want); err != nil {
			t.Fatalf("plain path decoded %q, which json.Unmarshal refuses: %v", body, err)
		}
		if !reflect.DeepEqual(fast, want) {
			t.Fatalf("plain path decoded %q as %s, json.Unmarshal as %s", body, showPublish(&fast), showPublish(&want))
		}
	} else if !reflect.DeepEqual(fast, publishMsg{}) {
		t.Fatalf("plain path refused %q but changed the publish to %s", body, showPublish(&fast))
	}
	if len(trimmed) > 0 && trimmed[0] == '[' {
		return plain // a batch: decodePublish does not take the plain path
	}
	got, _, gotErr := decodePublish(body)
	want, wantErr := decodeByUnmarshal(body)
	switch {
	case (gotErr == nil) != (wantErr == nil):
		t.Fatalf("decodePublish(%q): error %v, by json.Unmarshal %v", body, gotErr, wantErr)
	case gotErr != nil:
		if *gotErr != *wantErr {
			t.Fatalf("decodePublish(%q): error %d %q, by json.Unmarshal %d %q", body, gotErr.status, gotErr.msg, wantErr.status, wantErr.msg)
		}
	case len(got) != 1 || !reflect.DeepEqual(*got[0], *want[0]):
		t.Fatalf("decodePublish(%q) = %s, by json.Unmarshal %s", body, showPublish(got[0]), showPublish(want[0]))
	}
	return plain
}

// showPublish prints a publish with its data and close reason as text.
func showPublish(m *publishMsg) string {
	cl, d := "<nil>", "<nil>"
	if m.Close != nil {
		cl = strconv.Quote(*m.Close)
	}
	if m.Data != nil {
		d = strconv.Quote(string(m.Data))
	}
	return fmt.Sprintf("{channel %q user %q session %q id %q except %q data %s close %s}",
		m.Channel, m.User, m.Session, m.ID, m.Except, d, cl)
}

// nested is data nested depth levels deep.
func nested(depth int) string {
	return strings.Repeat("[", depth) + strings.Repeat("]", depth)
}

func TestDecodePlainPublish(t *testing.T) {
	for _, c := range []struct {
		body  string
		plain bool // decodePlainPublish answers, rather than leaving it to json.Unmarshal
	}{
		// The usual shapes.
		{`{"channel":"c-123","data":{"n":1,"text":"hello"}}`, true},
		{`{"user":"alice","data":"hi"}`, true},
		{`{"session":"s1","close":"bye"}`, true},
		{`{"channel":"room:1","data":[1,2,3],"except":"s9","id":"pub-7"}`, true},
		{`{"data":{"n":1},"channel":"c"}`, true},
		{`{"channel":"a b ~!#$%&'()*+,-./:;<=>?@[]^_{|}` + "`" + `","data":1}`, true},
		// Every key: a valid object that checkPublish refuses.
		{`{"channel":"c","user":"u","session":"s","id":"i","data":1,"except":"e","close":"x"}`, true},
		{`{}`, true},
		{`{ }`, true},
		{`{"channel":"c"}`, true},
		{`{"channel":"","data":1}`, true},
		// Space: around the body (trimmed), between every token, and
		// inside the data, which is kept as written.
		{" \n\t{ \"channel\" :\t\"c\" ,\r\n \"data\" : { \"a\" : [ 1 , 2 ] , \"b\" : { } } \n}\r\n ", true},
		{"{\"channel\":\"c\",\"data\":1 }", true},
		{"{\"channel\":\"c\",\"data\":\"x\"\n}", true},
		// Data of every kind: kept as written, escapes and all.
		{`{"channel":"c","data":null}`, true},
		{`{"channel":"c","data":true}`, true},
		{`{"channel":"c","data":false}`, true},
		{`{"channel":"c","data":-12.5e+3}`, true},
		{`{"channel":"c","data":0}`, true},
		{`{"channel":"c","data":[]}`, true},
		{`{"channel":"c","data":""}`, true},
		{`{"channel":"c","data":"a\"b\\c\u00e9\n\/"}`, true},
		{`{"channel":"c","data":"é ü 日本"}`, true},
		{`{"channel":"c","data":{"s":"}]\"{[","t":"\\"}}`, true},
		{`{"channel":"c","data":{"a":{"b":{"c":[{"d":[null]}]}}}}`, true},
		{`{"channel":"c","data":` + nested(maxPlainDepth) + `}`, true},
		// close: null leaves it nil, "" is an empty reason.
		{`{"session":"s","close":null}`, true},
		{`{"session":"s","close":""}`, true},
		{`{"session":"s","close":null,"data":1}`, true},
		{`{"session":"s","close":"","data":1}`, true},

		// Left to json.Unmarshal.
		{`[{"channel":"c","data":1}]`, false},
		{`[]`, false},
		{`null`, false},
		{`"channel"`, false},
		{`1`, false},
		{"\ufeff{\"channel\":\"c\",\"data\":1}", false},
		// Escapes and non-ASCII in keys and string fields.
		{`{"chann\u0065l":"c","data":1}`, false},
		{`{"channel":"c\u0041","data":1}`, false},
		{`{"channel":"a\/b","data":1}`, false},
		{`{"channel":"é","data":1}`, false},
		{"{\"channel\":\"\xff\",\"data\":1}", false},
		{"{\"channel\":\"c\x7f\",\"data\":1}", false},
		{"{\"channel\":\"c\x01\",\"data\":1}", false},
		{`{"session":"s","close":"au revoir \u263a"}`, false},
		// Unknown keys, and names json.Unmarshal matches by case folding.
		{`{"channel":"c","data":1,"extra":2}`, false},
		{`{"Channel":"c","data":1}`, false},
		{`{"channel":"c","DATA":1}`, false},
		{"{\"\u017fession\":\"s\",\"data\":1}", false}, // ſ folds to s
		{`{"":"c","data":1}`, false},
		// Repeated keys: json.Unmarshal keeps the last.
		{`{"channel":"a","channel":"b","data":1}`, false},
		{`{"channel":"c","data":1,"data":2}`, false},
		{`{"session":"s","close":"a","close":null}`, false},
		// null and other types for the string fields.
		{`{"channel":null,"data":1}`, false},
		{`{"channel":"c","user":null,"data":1}`, false},
		{`{"channel":1,"data":1}`, false},
		{`{"channel":true,"data":1}`, false},
		{`{"channel":{"a":1},"data":1}`, false},
		{`{"channel":["c"],"data":1}`, false},
		{`{"session":"s","close":1}`, false},
		{`{"session":"s","close":false}`, false},
		{`{"session":"s","close":{}}`, false},
		// Invalid bodies, for json.Unmarshal's error text.
		{`{`, false},
		{`{"channel"`, false},
		{`{"channel":`, false},
		{`{"channel":"c`, false},
		{`{"channel":"c"`, false},
		{`{"channel":"c",`, false},
		{`{"channel":"c","data":}`, false},
		{`{"channel":"c","data":1,}`, false},
		{`{"channel":"c" "data":1}`, false},
		{`{"channel":"c";"data":1}`, false},
		{`{"channel"="c","data":1}`, false},
		{`{"channel":"c","data":1}x`, false},
		{`{"channel":"c","data":1}}`, false},
		{`{"channel":"c","data":1} {}`, false},
		{`{"channel":"c","data":[1,}`, false},
		{`{"channel":"c","data":[1,2}`, false},
		{`{"channel":"c","data":{"a":1]}`, false},
		{`{"channel":"c","data":{"a"}}`, false},
		{`{"channel":"c","data":tru}`, false},
		{`{"channel":"c","data":nul}`, false},
		{`{"channel":"c","data":01}`, false},
		{`{"channel":"c","data":1.}`, false},
		{`{"channel":"c","data":-}`, false},
		{`{"channel":"c","data":1 2}`, false},
		{`{"channel":"c","data":"a\x"}`, false},
		{`{"channel":"c","data":"a`, false},
		{`{"channel":"c","data":"a\"}`, false},
		{"{\"channel\":\"c\",\"data\":\"a\x01\"}", false},
		{"{\"channel\":\"c\",\v\"data\":1}", false},
		{"{\"channel\":\"c\",\"data\":1\u00a0}", false},
		{`{"session":"s","close":nul}`, false},
		{`{"session":"s","close":nullx}`, false},
		{`{"session":"s","close":null x}`, false},
		{`{,}`, false},
		{`{"channel":"c",}`, false},
		// Data too deep for the plain path, and around the depth where
		// json.Unmarshal, counting the publish object, gives up.
		{`{"channel":"c","data":` + nested(maxPlainDepth+1) + `}`, false},
		{`{"channel":"c","data":` + nested(9999) + `}`, false},
		{`{"channel":"c","data":` + nested(10000) + `}`, false},
	} {
		if got := checkPlainPublish(t, []byte(c.body)); got != c.plain {
			name := c.body
			if len(name) > 80 {
				name = name[:80] + "…"
			}
			t.Errorf("decodePlainPublish(%q) answered %v, want %v", name, got, c.plain)
		}
	}
}

// decodePublish takes the plain path for a plain body: the data is the
// body's own bytes, and the decoding allocates less than json.Unmarshal.
func TestDecodePublishTakesPlainPath(t *testing.T) {
	body := []byte(`{"channel":"c-123","data":{"n":1,"text":"hello"}}`)
	msgs, batch, err := decodePublish(body)
	if err != nil || batch || len(msgs) != 1 {
		t.Fatalf("decodePublish(%s) = %v, %v, %v", body, msgs, batch, err)
	}
	data := msgs[0].Data
	start := uintptr(unsafe.Pointer(unsafe.SliceData(body)))
	if p := uintptr(unsafe.Pointer(unsafe.SliceData(data))); p < start || p >= start+uintptr(len(body)) {
		t.Errorf("data %s is a copy, not the body's bytes: decoded by json.Unmarshal", data)
	}
	if cap(data) != len(data) {
		t.Errorf("data has room to grow over the body: cap %d, len %d", cap(data), len(data))
	}
	plain := testing.AllocsPerRun(100, func() { _, _, _ = decodePublish(body) })
	unmarshal := testing.AllocsPerRun(100, func() { _, _ = decodeByUnmarshal(body) })
	if plain >= unmarshal {
		t.Errorf("decodePublish allocates %v times, json.Unmarshal %v: not the plain path", plain, unmarshal)
	}
}

// publishFromChoices builds a publish body from choices, one byte per
// choice, out of the pieces publishers write and the near misses around
// them: most bodies it builds are plain, the rest differ from plain in a
// key, a value, a space or a separator. The fuzzer reaches far more plain
// bodies through it than by mutating bytes.
func publishFromChoices(choices []byte) []byte {
	next := func(n int) int {
		if len(choices) == 0 {
			return 0
		}
		c := choices[0]
		choices = choices[1:]
		return int(c) % n
	}
	spaces := []string{"", "", "", "", "", "", "", " ", " ", "\n", "\t ", " \r\n ", "\v", "\u00a0"}
	keys := []string{"channel", "user", "session", "id", "data", "except", "close",
		"data", "close", "channel", "Channel", `chann\u0065l`, "extra", "", "CLOSE", "\u017fession"}
	values := []string{`"c-1"`, `""`, `"a b:/~{}[],"`, `null`, `"x"`, `"bye"`,
		`1`, `-2.5e+3`, `0`, `true`, `false`, `[]`, `{}`, `{"n":1,"text":"hello"}`,
		"{ \"a\" : [ 1 , { } ] ,\n\"b\":null }", `[[["x"]]]`, `{"s":"}\"]"}`, `"\\"`,
		`"é"`, `"a\"b"`, `"\u0041"`, `"\/"`, "\"\x7f\"", "\"\xff\"", `"}]"`,
		`[1,}`, `tru`, `01`, `{"a"}`, `"open`, `1 2`, `nul`}
	var b bytes.Buffer
	b.WriteString(spaces[next(len(spaces))])
	switch next(16) {
	case 0:
		b.WriteString("[")
	case 1:
		b.WriteString("null")
		return b.Bytes()
	default:
		b.WriteString("{")
	}
	for i, n := 0, next(6); i < n; i++ {
		if i > 0 {
			b.WriteString([]string{",", ",", ",", ",", ",", ",", ",", ", ,", ""}[next(9)])
		}
		b.WriteString(spaces[next(len(spaces))])
		b.WriteString(`"` + keys[next(len(keys))] + `"`)
		b.WriteString(spaces[next(len(spaces))])
		b.WriteString([]string{":", ":", ":", ":", ":", ":", ":", "="}[next(8)])
		b.WriteString(spaces[next(len(spaces))])
		b.WriteString(values[next(len(values))])
		b.WriteString(spaces[next(len(spaces))])
	}
	b.WriteString([]string{"}", "}", "}", "}", "}", "}", "}", "", "}}", "},", "} x"}[next(11)])
	b.WriteString(spaces[next(len(spaces))])
	return b.Bytes()
}

// The plain path agrees with json.Unmarshal on bodies built from random
// choices, and answers for a fair share of them.
func TestDecodePlainPublishGenerated(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	const n = 20000
	plain := 0
	for range n {
		choices := make([]byte, 40)
		for i := range choices {
			choices[i] = byte(r.Uint32())
		}
		if checkPlainPublish(t, publishFromChoices(choices)) {
			plain++
		}
	}
	if plain < n/20 {
		t.Errorf("the plain path answered for %d of %d bodies: the generator no longer builds plain ones", plain, n)
	}
	t.Logf("the plain path answered for %d of %d bodies", plain, n)
}
