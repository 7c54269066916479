package client

import (
	"encoding/json"
	"strconv"
)

// call is a message waiting for its answer (ack, reply or error frame).
type call struct {
	id   string
	done chan struct{} // closed once data and err are set
	data json.RawMessage
	err  error
}

// outgoing is a frame waiting to be written: a message (with its call if
// it has an id) or an ack of the pushes received.
type outgoing struct {
	frame []byte
	call  *call // nil for fire-and-forget messages
	ack   bool  // an ack of pushes (not sent again after a failed write)
}

// callTable is the bookkeeping of pending calls; the session's mutex
// guards it.
type callTable struct {
	next    uint64
	pending map[string]*call
}

func (t *callTable) add() *call {
	if t.pending == nil {
		t.pending = map[string]*call{}
	}
	t.next++
	c := &call{id: "c" + strconv.FormatUint(t.next, 10), done: make(chan struct{})}
	t.pending[c.id] = c
	return c
}

// settle gives call id its result, once; a second answer to the same id
// (possible across a resume) is ignored.
func (t *callTable) settle(id string, data json.RawMessage, err error) {
	c, ok := t.pending[id]
	if !ok {
		return
	}
	delete(t.pending, id)
	c.data, c.err = data, err
	close(c.done)
}

// has reports whether call c still waits for its answer.
func (t *callTable) has(c *call) bool { return t.pending[c.id] == c }

// forget drops c without an answer (its caller gave up).
func (t *callTable) forget(c *call) {
	if t.pending[c.id] == c {
		delete(t.pending, c.id)
	}
}

// failAll settles every pending call with err.
func (t *callTable) failAll(err error) {
	for id := range t.pending {
		t.settle(id, nil, err)
	}
}
