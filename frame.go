package duplex

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/caddy-duplex/duplex/protocol"
)

// closeInfo says why a connection or session ends; it becomes the close
// frame.
type closeInfo struct {
	Code      int
	Reason    string
	Reconnect bool
	// kind is the reason's metric label when the close ends the session.
	kind string
	// quiet: the client closed the connection (its WebSocket close was
	// echoed), so no close frame follows; RFC 6455 allows no data after
	// a close.
	quiet bool
	// moved: another node resumed the session; it ends here without a
	// disconnect hook (that node owns the session now).
	moved bool
}

var (
	closeRestart = closeInfo{Code: protocol.CodeRestart, Reason: "server restarting", Reconnect: true}
	// closeShutdown ends sessions for good when the process exits.
	closeShutdown = closeInfo{Code: protocol.CodeRestart, Reason: "shutdown", Reconnect: true, kind: "shutdown"}
	closeSlow     = closeInfo{Code: protocol.CodeSlowConsumer, Reason: "send queue full", Reconnect: true}
	// closeReplaced goes to a connection whose session a newer one resumed.
	closeReplaced = closeInfo{Code: protocol.CodeReplaced, Reason: "resumed on another connection"}
	// closeMoved ends this node's copy of a session another node resumed.
	closeMoved = closeInfo{Code: protocol.CodeReplaced, Reason: "resumed on another connection", moved: true}
	// closeLost ends a session whose pushes a clustered broker can no
	// longer deliver without a gap (Redis lost them): the client
	// reconnects and starts over (resumed:false).
	closeLost = closeInfo{Code: protocol.CodeRestart, Reason: "session state lost", Reconnect: true, kind: "lost"}
)

func closedByApp(reason string) closeInfo {
	return closeInfo{Code: protocol.CodeClosedByApp, Reason: reason, kind: "app"}
}

// clientError is a client frame that cannot be served; it becomes an error
// frame with its status.
type clientError struct {
	status int
	msg    string
}

func (e *clientError) Error() string { return e.msg }

func badFrame(format string, args ...any) *clientError {
	return &clientError{status: 400, msg: fmt.Sprintf(format, args...)}
}

const maxIDLength = 256

// decodeClientFrame parses one client frame. On error, f.ID is the
// frame's id when it could be read, so the error frame can name it.
func decodeClientFrame(b []byte) (f protocol.Message, err *clientError) {
	if !utf8.Valid(b) {
		return f, badFrame("frame is not valid UTF-8")
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 || b[0] != '{' {
		return f, badFrame("frame must be a JSON object")
	}
	if e := json.Unmarshal(b, &f); e != nil {
		// The frame may still carry a readable id to report against.
		var probe struct {
			ID json.RawMessage `json:"id"`
		}
		if json.Unmarshal(b, &probe) == nil && validID(probe.ID) == nil {
			f.ID = probe.ID
		} else {
			f.ID = nil
		}
		return f, badFrame("malformed frame: %v", e)
	}
	if e := validID(f.ID); e != nil {
		f.ID = nil
		return f, e
	}
	switch f.Type {
	case "", protocol.TypeMessage, protocol.TypeAck:
	default:
		return f, badFrame("unknown frame type %q", f.Type)
	}
	return f, nil
}

// validID accepts a frame id that is a short JSON string (without control
// characters, so it can travel in a header) or a JSON number.
func validID(id json.RawMessage) *clientError {
	if len(id) == 0 || string(id) == "null" {
		return nil
	}
	if len(id) > maxIDLength {
		return badFrame("id longer than %d bytes", maxIDLength)
	}
	switch {
	case id[0] == '"':
		var s string
		if json.Unmarshal(id, &s) != nil {
			return badFrame("id is not a valid string")
		}
		for _, r := range s {
			if r < 0x20 || r == 0x7f {
				return badFrame("id contains control characters")
			}
		}
		return nil
	case id[0] == '-' || (id[0] >= '0' && id[0] <= '9'):
		return nil
	}
	return badFrame("id must be a string or a number")
}

// idText is the id as it goes into the Duplex-Message-Id header.
func idText(id json.RawMessage) string {
	if len(id) == 0 || string(id) == "null" {
		return ""
	}
	if id[0] == '"' {
		var s string
		_ = json.Unmarshal(id, &s)
		return s
	}
	return string(id)
}

// hasID reports whether the client frame asked for an answer.
func hasID(id json.RawMessage) bool { return len(id) > 0 && string(id) != "null" }

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		// Only our own frame structs are marshalled here.
		panic(fmt.Sprintf("duplex: encoding frame: %v", err))
	}
	return b
}

func encodeOpen(f protocol.Open) []byte {
	f.Type = protocol.TypeOpen
	return mustJSON(f)
}

func encodeClose(c closeInfo) []byte {
	return mustJSON(protocol.Close{Type: protocol.TypeClose, Code: c.Code, Reason: c.Reason, Reconnect: c.Reconnect})
}

func encodeAck(ref json.RawMessage) []byte {
	return encodeAnswer(protocol.Answer{Type: protocol.TypeAck, Ref: ref})
}

func encodeError(ref json.RawMessage, status int, msg string) []byte {
	if msg == "" {
		msg = statusText(status)
	}
	return encodeAnswer(protocol.Answer{Type: protocol.TypeError, Ref: ref, Status: status, Error: msg})
}

// encodeAnswer encodes an ack, reply or error frame exactly as
// json.Marshal does, without its reflection when the raw parts (ref and
// data) need no rewriting: already compact and with nothing to escape.
func encodeAnswer(f protocol.Answer) []byte {
	if !plainJSON(f.Ref) || !plainJSON(f.Data) {
		return mustJSON(f)
	}
	b := make([]byte, 0, 48+len(f.Ref)+len(f.Data)+len(f.Error))
	b = append(b, `{"type":`...)
	b = appendJSONString(b, f.Type)
	if len(f.Ref) > 0 {
		b = append(b, `,"ref":`...)
		b = append(b, f.Ref...)
	}
	if f.Status != 0 {
		b = append(b, `,"status":`...)
		b = strconv.AppendInt(b, int64(f.Status), 10)
	}
	if len(f.Data) > 0 {
		b = append(b, `,"data":`...)
		b = append(b, f.Data...)
	}
	if f.Encoding != "" {
		b = append(b, `,"encoding":`...)
		b = appendJSONString(b, f.Encoding)
	}
	if f.Error != "" {
		b = append(b, `,"error":`...)
		b = appendJSONString(b, f.Error)
	}
	return append(b, '}')
}

// plainJSON reports whether raw JSON (valid) is what json.Marshal writes
// for it: no whitespace to compact and no character it escapes (<, >, &,
// U+2028, U+2029).
func plainJSON(b []byte) bool {
	for _, c := range b {
		switch c {
		case ' ', '\t', '\n', '\r', '<', '>', '&', 0xE2:
			return false
		}
	}
	return true
}

// appendJSONString appends s as a JSON string, as json.Marshal writes it.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			return append(b, mustJSON(s)...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}

func statusText(status int) string {
	if t := http.StatusText(status); t != "" {
		return t
	}
	return "status " + strconv.Itoa(status)
}

// encodeReply embeds an app's answer body: JSON as JSON, text as a string,
// anything else as base64.
func encodeReply(ref json.RawMessage, status int, contentType string, body []byte) []byte {
	f := protocol.Answer{Type: protocol.TypeReply, Ref: ref, Status: status}
	f.Data, f.Encoding = embedBody(contentType, body)
	return encodeAnswer(f)
}

// embedBody turns a response body into a frame's data field. A JSON body
// already compact is used as it is.
func embedBody(contentType string, body []byte) (json.RawMessage, string) {
	mt := bodyMediaType(contentType)
	isJSON := mt == "application/json" || strings.HasSuffix(mt, "+json")
	if isJSON {
		if !bytes.ContainsAny(body, " \t\r\n") {
			if json.Valid(body) {
				return body, ""
			}
		} else {
			var buf bytes.Buffer
			buf.Grow(len(body))
			if json.Compact(&buf, body) == nil {
				return buf.Bytes(), ""
			}
		}
	}
	if utf8.Valid(body) && (mt == "" || isJSON || strings.HasPrefix(mt, "text/") || !isBinaryType(mt)) {
		return appendJSONString(nil, string(body)), ""
	}
	return mustJSON(base64.StdEncoding.EncodeToString(body)), "base64"
}

// bodyMediaType is the media type of a Content-Type, lower case; the
// common application/json is recognised without parsing.
func bodyMediaType(contentType string) string {
	switch contentType {
	case "application/json", "application/json; charset=utf-8":
		return "application/json"
	case "":
		return ""
	}
	mt, _, _ := mime.ParseMediaType(contentType)
	return mt
}

func isBinaryType(mt string) bool {
	switch {
	case strings.HasPrefix(mt, "image/"), strings.HasPrefix(mt, "audio/"),
		strings.HasPrefix(mt, "video/"), mt == "application/octet-stream",
		mt == "application/pdf", mt == "application/zip":
		return true
	}
	return false
}

// errorText is the text of an app's error answer for the error frame.
func errorText(status int, body []byte) string {
	const maxErrorText = 4 << 10
	s := strings.TrimSpace(string(body))
	if s == "" || !utf8.ValidString(s) {
		return statusText(status)
	}
	if len(s) > maxErrorText {
		s = s[:maxErrorText]
		for !utf8.ValidString(s) {
			s = s[:len(s)-1]
		}
	}
	return s
}

// push is one publish's payload, encoded once for every session it reaches:
// the per-session frame is pushPrefix + seq + suffix.
type push struct {
	suffix []byte // `,"channel":"…","data":…}` or `,"data":…}`
}

var pushPrefix = []byte(`{"type":"push","seq":`)

func newPush(channel string, data json.RawMessage) *push {
	b := make([]byte, 0, len(channel)+len(data)+24)
	if channel != "" {
		b = append(b, `,"channel":`...)
		b = appendJSONString(b, channel)
	}
	b = append(b, `,"data":`...)
	switch {
	case len(data) == 0:
		b = append(b, "null"...)
	case !bytes.ContainsAny(data, " \t\r\n"):
		b = append(b, data...) // compact already
	default:
		buf := bytes.NewBuffer(b)
		_ = json.Compact(buf, data)
		b = buf.Bytes()
	}
	return &push{suffix: append(b, '}')}
}

// frameSize is the encoded size of the push frame with sequence number seq.
func (p *push) frameSize(seq uint64) int {
	return len(pushPrefix) + decimalLen(seq) + len(p.suffix)
}

func decimalLen(n uint64) int {
	l := 1
	for n >= 10 {
		n /= 10
		l++
	}
	return l
}
