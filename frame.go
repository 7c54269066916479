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
)

// Frame types (README: the session protocol).
const (
	frameOpen    = "open"
	framePush    = "push"
	frameAck     = "ack"
	frameReply   = "reply"
	frameErr     = "error"
	frameClose   = "close"
	frameMessage = "message"
)

// Close codes sent in close frames (and as the WebSocket close code).
const (
	// codeClosedByApp: the app or an operator ended the session
	// (Duplex-Close, publish "close", DELETE on the sessions API).
	codeClosedByApp = 4000
	// codeSlowConsumer: the session could not keep up with its pushes.
	codeSlowConsumer = 4008
	// codeReplaced: a newer connection resumed the session.
	codeReplaced = 4009
	// codeRestart: the config the session ran under was unloaded
	// (reload or shutdown); reconnecting lands on the new config.
	codeRestart = 4012
)

// closeInfo says why a connection or session ends; it becomes the close
// frame (encodeClose sets its type).
type closeInfo struct {
	Type      string `json:"type"`
	Code      int    `json:"code"`
	Reason    string `json:"reason"`
	Reconnect bool   `json:"reconnect"`
	// kind is the reason's metric label when the close ends the session.
	kind string
	// quiet: the client closed the connection (its WebSocket close was
	// echoed), so no close frame follows; RFC 6455 allows no data after
	// a close.
	quiet bool
}

var (
	closeRestart = closeInfo{Code: codeRestart, Reason: "server restarting", Reconnect: true}
	// closeShutdown ends sessions for good when the process exits.
	closeShutdown = closeInfo{Code: codeRestart, Reason: "shutdown", Reconnect: true, kind: "shutdown"}
	closeSlow     = closeInfo{Code: codeSlowConsumer, Reason: "send queue full", Reconnect: true}
	// closeReplaced goes to a connection whose session a newer one resumed.
	closeReplaced = closeInfo{Code: codeReplaced, Reason: "resumed on another connection"}
)

func closedByApp(reason string) closeInfo {
	return closeInfo{Code: codeClosedByApp, Reason: reason, kind: "app"}
}

// openFrame is the first frame of every session.
type openFrame struct {
	Type      string          `json:"type"`
	Session   string          `json:"session"`
	Token     string          `json:"token"`
	Resumed   bool            `json:"resumed"`
	Heartbeat int64           `json:"heartbeat"`
	Data      json.RawMessage `json:"data,omitempty"`
}

// answerFrame is an ack, reply or error frame.
type answerFrame struct {
	Type     string          `json:"type"`
	Ref      json.RawMessage `json:"ref,omitempty"`
	Status   int             `json:"status,omitempty"`
	Data     json.RawMessage `json:"data,omitempty"`
	Encoding string          `json:"encoding,omitempty"`
	Error    string          `json:"error,omitempty"`
}

// clientFrame is a frame sent by the client.
type clientFrame struct {
	Type   string          `json:"type"`
	ID     json.RawMessage `json:"id"`
	Data   json.RawMessage `json:"data"`
	Method string          `json:"method"`
	Path   string          `json:"path"`
	Seq    uint64          `json:"seq"`
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

// decodeClientFrame parses one client frame. On error, ref is the frame's
// id when it could be read, so the error frame can name it.
func decodeClientFrame(b []byte) (f clientFrame, err *clientError) {
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
	case "", frameMessage, frameAck:
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

func encodeOpen(f openFrame) []byte {
	f.Type = frameOpen
	return mustJSON(f)
}

func encodeClose(c closeInfo) []byte {
	c.Type = frameClose
	return mustJSON(c)
}

func encodeAck(ref json.RawMessage) []byte {
	return mustJSON(answerFrame{Type: frameAck, Ref: ref})
}

func encodeError(ref json.RawMessage, status int, msg string) []byte {
	if msg == "" {
		msg = statusText(status)
	}
	return mustJSON(answerFrame{Type: frameErr, Ref: ref, Status: status, Error: msg})
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
	f := answerFrame{Type: frameReply, Ref: ref, Status: status}
	f.Data, f.Encoding = embedBody(contentType, body)
	return mustJSON(f)
}

// embedBody turns a response body into a frame's data field.
func embedBody(contentType string, body []byte) (json.RawMessage, string) {
	mt, _, _ := mime.ParseMediaType(contentType)
	isJSON := mt == "application/json" || strings.HasSuffix(mt, "+json")
	if isJSON && json.Valid(body) {
		var buf bytes.Buffer
		if json.Compact(&buf, body) == nil {
			return buf.Bytes(), ""
		}
	}
	if utf8.Valid(body) && (mt == "" || isJSON || strings.HasPrefix(mt, "text/") || !isBinaryType(mt)) {
		return mustJSON(string(body)), ""
	}
	return mustJSON(base64.StdEncoding.EncodeToString(body)), "base64"
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
	var b bytes.Buffer
	b.Grow(len(channel) + len(data) + 24)
	if channel != "" {
		b.WriteString(`,"channel":`)
		b.Write(mustJSON(channel))
	}
	b.WriteString(`,"data":`)
	if len(data) == 0 {
		b.WriteString("null")
	} else {
		_ = json.Compact(&b, data)
	}
	b.WriteByte('}')
	return &push{suffix: b.Bytes()}
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
