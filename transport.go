package duplex

import "errors"

// Transport names, as used in the `transports` option and the
// Duplex-Transport header.
const (
	transportWebSocket = "websocket"
	transportStream    = "stream"
	transportSSE       = "sse"
)

// errTooBig is returned by readMessage for a client message larger than
// max_message_size; the message was discarded and the connection is still
// usable.
var errTooBig = errors.New("duplex: message too big")

// transport moves frames over one client connection. A session reads from
// it in one goroutine and writes to it from another; implementations make
// control writes (pongs, pings, close) safe to call alongside writeFrame.
type transport interface {
	// readMessage returns the next client message, and whether it was
	// binary. It returns errTooBig for an oversize message and any other
	// error once the connection is gone.
	readMessage() (msg []byte, binary bool, err error)
	// writeFrame buffers one server frame of type typ, the concatenation
	// of a, b and c (split so a push can be written without being copied).
	// seq is the push sequence number, 0 for other frames.
	writeFrame(typ string, seq uint64, a, b, c []byte) error
	// flush sends what writeFrame buffered.
	flush() error
	// ping sends a heartbeat.
	ping() error
	// close sends the transport's own close signal, if it has one (the
	// close frame was written before). Calls after the first do nothing.
	close(code int, reason string) error
	// end releases the connection: a blocked readMessage or write returns.
	end() error
}
