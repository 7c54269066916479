package protocol

import "encoding/json"

// Frame types: the "type" field of every frame.
const (
	TypeOpen    = "open"    // server: the first frame of every connection
	TypePush    = "push"    // server: a push from the app, numbered by seq
	TypeAck     = "ack"     // server: a message served without a body; client: pushes received up to seq
	TypeReply   = "reply"   // server: a message's answer with a body
	TypeError   = "error"   // server: a message refused or failed, with its status
	TypeClose   = "close"   // server: the connection or session ends
	TypePing    = "ping"    // server: a heartbeat visible to scripts (SSE; WebSocket with ?ping=text)
	TypeMessage = "message" // client: a message for the app (the default type)
)

// Close codes, in close frames and as the WebSocket close code.
const (
	// CodeClosedByApp: the app or an operator ended the session
	// (Duplex-Close, a publish with "close", DELETE on the sessions API,
	// max_detached).
	CodeClosedByApp = 4000
	// CodeTooMany: the user opened more sessions than max_sessions_per_user;
	// the oldest is closed.
	CodeTooMany = 4001
	// CodeMaxAge: the connection reached max_age; reconnecting passes the
	// auth chain (and connect hook) again and resumes the session.
	CodeMaxAge = 4003
	// CodeSlowConsumer: the connection could not keep up with its pushes;
	// the session can be resumed.
	CodeSlowConsumer = 4008
	// CodeReplaced: a newer connection resumed the session.
	CodeReplaced = 4009
	// CodeRestart: the config the session ran under was unloaded (reload
	// or shutdown); reconnecting lands on the new config.
	CodeRestart = 4012
	// CodePolicy: the client kept sending over its message rate.
	CodePolicy = 1008
)

// Open is the first frame of every connection.
type Open struct {
	Type    string `json:"type"`
	Session string `json:"session"`
	// Token is the session's secret, the first part of its cursor.
	Token   string `json:"token"`
	Resumed bool   `json:"resumed"`
	// Heartbeat is the heartbeat interval in seconds.
	Heartbeat int64 `json:"heartbeat"`
	// Data is the connect hook's answer, if any.
	Data json.RawMessage `json:"data,omitempty"`
}

// Answer is an ack, reply or error frame: the answer to the client
// message whose id is Ref.
type Answer struct {
	Type     string          `json:"type"`
	Ref      json.RawMessage `json:"ref,omitempty"`
	Status   int             `json:"status,omitempty"`
	Data     json.RawMessage `json:"data,omitempty"`
	Encoding string          `json:"encoding,omitempty"` // "base64" for a binary body
	Error    string          `json:"error,omitempty"`
}

// Close is a close frame. With Reconnect the client resumes the session on
// a new connection; without, the session is over.
type Close struct {
	Type      string `json:"type"`
	Code      int    `json:"code"`
	Reason    string `json:"reason"`
	Reconnect bool   `json:"reconnect"`
}

// Message is a frame from the client: a message for the app (Type
// "message" or empty) or an ack of the pushes up to Seq (Type "ack"). A
// message with an ID gets exactly one answer.
type Message struct {
	Type   string          `json:"type,omitempty"`
	ID     json.RawMessage `json:"id,omitempty"`
	Data   json.RawMessage `json:"data,omitempty"`
	Method string          `json:"method,omitempty"`
	Path   string          `json:"path,omitempty"`
	Seq    uint64          `json:"seq,omitempty"`
}

// Frame is any frame the server sends, for clients to decode: the union
// of the fields of Open, push frames, Answer and Close.
type Frame struct {
	Type string `json:"type"`
	// open
	Session   string  `json:"session"`
	Token     string  `json:"token"`
	Resumed   bool    `json:"resumed"`
	Heartbeat float64 `json:"heartbeat"`
	// push (Seq, Channel, Data), answers (Ref, Status, Data, Encoding,
	// Error), open (Data)
	Data     json.RawMessage `json:"data"`
	Seq      uint64          `json:"seq"`
	Channel  string          `json:"channel"`
	Ref      json.RawMessage `json:"ref"`
	Status   int             `json:"status"`
	Error    string          `json:"error"`
	Encoding string          `json:"encoding"`
	// close
	Code      int    `json:"code"`
	Reason    string `json:"reason"`
	Reconnect bool   `json:"reconnect"`
}
