package client

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/caddy-duplex/duplex/protocol"
)

// serverFrame is any frame the server sends (README, "Frames").
type serverFrame = protocol.Frame

// messageFrame is a client message, as the client writes it: its id is
// always a string.
type messageFrame struct {
	ID     string          `json:"id,omitempty"`
	Method string          `json:"method,omitempty"`
	Path   string          `json:"path,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
}

// Push is one push from the app, numbered by Seq from 1 within a session.
type Push struct {
	Seq     uint64
	Channel string // empty for pushes to the session or its user
	Data    json.RawMessage
}

// Open describes an opened connection. Resumed is false for a new session:
// after the first Open, that means the session was lost and the app should
// reload its state.
type Open struct {
	Session   string
	Resumed   bool
	Transport string
	Heartbeat time.Duration
	Data      json.RawMessage // the connect hook's answer, if any
}

// CloseInfo is a close frame from the server. With Reconnect the client
// resumes the session on a new connection; without, the session is over.
type CloseInfo struct {
	Code      int
	Reason    string
	Reconnect bool
}

// State is where a session is in its life.
type State int

const (
	StateConnecting   State = iota // the first opening
	StateOpen                      // a connection is open
	StateReconnecting              // the connection dropped; resuming
	StateClosed                    // the session is over
)

func (s State) String() string {
	switch s {
	case StateConnecting:
		return "connecting"
	case StateOpen:
		return "open"
	case StateReconnecting:
		return "reconnecting"
	case StateClosed:
		return "closed"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// encodeData turns a call's data into the frame's data field: nil is
// absent, json.RawMessage and []byte-free values are used as JSON.
func encodeData(data any) (json.RawMessage, error) {
	switch d := data.(type) {
	case nil:
		return nil, nil
	case json.RawMessage:
		if !json.Valid(d) {
			return nil, fmt.Errorf("duplex client: data is not valid JSON")
		}
		return d, nil
	}
	b, err := json.Marshal(data)
	if err != nil {
		return nil, fmt.Errorf("duplex client: encoding data: %w", err)
	}
	return b, nil
}

// refString is a frame's ref as the string id the client gave it.
func refString(ref json.RawMessage) string {
	var s string
	if json.Unmarshal(ref, &s) == nil {
		return s
	}
	return string(ref)
}
