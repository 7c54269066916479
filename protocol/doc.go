// Package protocol is the wire format of caddy-duplex sessions (README:
// "The session protocol"): the frame types and close codes, the frames
// themselves as JSON structs, and the resume cursor. The server, the Go
// client and brokers share it; it depends on nothing but the standard
// library.
package protocol
