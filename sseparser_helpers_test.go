package duplex_test

// A WHATWG Server-Sent Events parser ("Parsing an event stream" in the HTML
// standard), the one every test that reads an event stream uses: the
// transport clients (clients_test.go), the raw SSE client
// (sx_helpers_test.go) and the curl test (transport_test.go). sse_test.go
// tests the parser itself.

import (
	"strconv"
	"strings"
)

// sseEvent is one dispatched event.
type sseEvent struct {
	Type string // the event field, "message" if none
	Data string // data lines joined with \n
	ID   string // the last event ID in effect when it was dispatched
	// HasID reports whether this event's own block carried an (accepted)
	// id field, as opposed to inheriting the last event ID.
	HasID bool
	// Retry is the reconnection time in effect at dispatch (-1: none yet).
	Retry int
}

// sseParser parses an event stream fed in arbitrary chunks. Lines end with
// \n, \r\n or \r; a \r\n split across two chunks is one line ending.
type sseParser struct {
	// OnComment, if set, is called with the text after ':' of comment lines.
	OnComment func(string)
	// Retry is the last valid retry field (-1 until one is seen).
	Retry int
	// LastID is the last event ID buffer.
	LastID string

	line    []byte
	afterCR bool
	started bool
	data    strings.Builder
	typ     string
	idSet   bool
}

func newSSEParser() *sseParser { return &sseParser{Retry: -1} }

// Feed parses b and returns the events it completed.
func (p *sseParser) Feed(b []byte) []sseEvent {
	var evs []sseEvent
	for _, c := range b {
		if p.afterCR {
			p.afterCR = false
			if c == '\n' {
				continue // the \n of a \r\n
			}
		}
		switch c {
		case '\r':
			p.afterCR = true
			evs = p.processLine(evs)
		case '\n':
			evs = p.processLine(evs)
		default:
			p.line = append(p.line, c)
		}
	}
	return evs
}

func (p *sseParser) processLine(evs []sseEvent) []sseEvent {
	line := string(p.line)
	p.line = p.line[:0]
	if !p.started {
		p.started = true
		line = strings.TrimPrefix(line, "\uFEFF") // one leading BOM
	}
	if line == "" {
		return p.dispatch(evs)
	}
	if line[0] == ':' {
		if p.OnComment != nil {
			p.OnComment(line[1:])
		}
		return evs
	}
	field, value := line, ""
	if i := strings.IndexByte(line, ':'); i >= 0 {
		field, value = line[:i], line[i+1:]
		value = strings.TrimPrefix(value, " ") // only one space
	}
	switch field {
	case "event":
		p.typ = value
	case "data":
		p.data.WriteString(value)
		p.data.WriteByte('\n')
	case "id":
		if !strings.ContainsRune(value, 0) {
			p.LastID = value
			p.idSet = true
		}
	case "retry":
		if value != "" && strings.Trim(value, "0123456789") == "" {
			if n, err := strconv.Atoi(value); err == nil {
				p.Retry = n
			}
		}
	default:
		// unknown fields are ignored
	}
	return evs
}

func (p *sseParser) dispatch(evs []sseEvent) []sseEvent {
	data := p.data.String()
	typ, idSet := p.typ, p.idSet
	p.data.Reset()
	p.typ, p.idSet = "", false
	if data == "" {
		return evs
	}
	data = strings.TrimSuffix(data, "\n")
	if typ == "" {
		typ = "message"
	}
	return append(evs, sseEvent{Type: typ, Data: data, ID: p.LastID, HasID: idSet, Retry: p.Retry})
}
