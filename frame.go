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
	return mustJSON(protocol.Answer{Type: protocol.TypeAck, Ref: ref})
}

func encodeError(ref json.RawMessage, status int, msg string) []byte {
	if msg == "" {
		msg = statusText(status)
	}
	return mustJSON(protocol.Answer{Type: protocol.TypeError, Ref: ref, Status: status, Error: msg})
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
