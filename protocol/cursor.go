package protocol

import (
	"strconv"
	"strings"
)

// Cursor is where a client stands in its session: the session's token and
// the seq of the last push it has (0 before the first). It travels as
// "<token>:<seq>" in Duplex-Resume, ?resume= and SSE event ids, and
// resumes the session on any connection.
type Cursor struct {
	Token string
	Seq   uint64
}

func (c Cursor) String() string {
	return c.Token + ":" + strconv.FormatUint(c.Seq, 10)
}

// ParseCursor reads a cursor; ok is false if c is not one.
func ParseCursor(c string) (cur Cursor, ok bool) {
	i := strings.LastIndexByte(c, ':')
	if i <= 0 {
		return Cursor{}, false
	}
	seq, err := strconv.ParseUint(c[i+1:], 10, 64)
	if err != nil {
		return Cursor{}, false
	}
	return Cursor{Token: c[:i], Seq: seq}, true
}
