package client

import (
	"errors"
	"fmt"
	"io"
)

// Error is the server's error frame answering a call: the app answered
// with a status of 400 or more, was unreachable (502) or too slow (504),
// or the message was refused (400 bad frame, 403 outside the session's
// message paths, 413 too large, 429 over the rate limit).
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string {
	return fmt.Sprintf("duplex client: status %d: %s", e.Status, e.Message)
}

var (
	// ErrClosed: the session has ended — Close was called, or the server
	// closed the session for good. Calls pending then fail with an error
	// wrapping it.
	ErrClosed = errors.New("duplex client: session closed")
	// ErrSessionLost: a reconnection could not resume the session (its
	// resume window was over, or it was deleted) and a new session was
	// opened in its place (Open.Resumed is false). Calls pending on the
	// old session fail with an error wrapping it; the app should reload
	// its state.
	ErrSessionLost = errors.New("duplex client: session lost")
)

// CloseError is why the server closed the session for good; it wraps
// ErrClosed.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("duplex client: session closed by the server (%d %s)", e.Code, e.Reason)
}

func (e *CloseError) Unwrap() error { return ErrClosed }

// WebSocketClose is the WebSocket close frame with which the server ended
// a connection (see Options.OnDisconnect); it wraps io.EOF.
type WebSocketClose struct {
	Code   int
	Reason string
}

func (e *WebSocketClose) Error() string {
	return fmt.Sprintf("duplex client: websocket closed by the server (%d %s)", e.Code, e.Reason)
}

func (e *WebSocketClose) Unwrap() error { return io.EOF }

// statusError is an opening refused with an HTTP status.
type statusError struct {
	transport string
	status    int
	body      string
}

func (e *statusError) Error() string {
	return fmt.Sprintf("duplex client: %s opening refused: status %d %q", e.transport, e.status, e.body)
}
