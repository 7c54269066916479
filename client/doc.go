// Package client is a Go client for caddy-duplex sessions: it opens a
// session over WebSocket (HTTP/1.1 or HTTP/2), a full-duplex NDJSON stream
// (HTTP/1.1, HTTP/2 over TLS or h2c) or Server-Sent Events plus POSTs,
// sends messages that the app answers, receives pushes in order, and keeps
// the session across dropped connections by resuming with its cursor.
//
//	s, err := client.Dial(ctx, "https://example.com/live", client.Options{})
//	if err != nil { … }
//	defer s.Close()
//	reply, err := s.Call(ctx, "/live/rooms/1", map[string]string{"text": "hi"})
//	for p := range s.Pushes() { … }
//
// The protocol is described in the README ("The session protocol",
// "Guarantees and resuming"). This package does not import Caddy.
package client
