package redisbroker

import (
	"context"
	"slices"
	"strconv"
	"strings"
)

// pend starts holding session id with its pushes waiting: they are
// delivered from Hold on.
func (b *Broker) pend(id string) {
	b.mu.Lock()
	b.held[id] = &holding{pending: true}
	b.mu.Unlock()
}

// Hold makes this node deliver session id's pushes after seq (the caller
// has the ones up to it, from Register or Attach and Replay). Pushes that
// arrived since Register or Attach are delivered now, and missing ones
// read from the log.
func (b *Broker) Hold(ctx context.Context, h Handler, id string, seq uint64) {
	b.mu.Lock()
	hd := b.held[id]
	if hd == nil {
		hd = &holding{}
		b.held[id] = hd
	}
	b.mu.Unlock()
	hd.mu.Lock()
	defer hd.mu.Unlock()
	waiting := hd.waiting
	hd.pending, hd.waiting, hd.last = false, nil, seq
	slices.SortFunc(waiting, func(x, y Entry) int { return cmpSeq(x.Seq, y.Seq) })
	for _, e := range waiting {
		b.deliverLocked(ctx, h, id, hd, e)
	}
}

// Release stops delivering session id's pushes on this node.
func (b *Broker) Release(id string) {
	b.mu.Lock()
	delete(b.held, id)
	b.mu.Unlock()
}

func (b *Broker) holding(id string) *holding {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.held[id]
}

// receive handles one message on this node's channel: "m" and "x" a
// publish's pushes and closes (see receiveBatch), "c <id> <kind>
// <payload>" a command, "f <id> <request>@<node> <payload>" a forward to
// answer, "k <id> <request>@<node>" one whose payload is stored under
// P:f:{request} (larger than forwardInlineMax; see ForwardTo), "r
// <request> <status>" the answer to one of this node's forwards: an HTTP
// status, or 0 if the forward's stored payload was gone.
func (b *Broker) receive(ctx context.Context, h Handler, msg string) {
	kind, rest, _ := cutSpace(msg)
	if kind == "m" || kind == "x" {
		b.receiveBatch(ctx, h, kind, rest)
		return
	}
	id, rest, _ := cutSpace(rest)
	switch kind {
	case "c":
		cmd, payload, _ := cutSpace(rest)
		if cmd == "takeover" {
			b.Release(id)
		}
		h.Command(id, cmd, []byte(payload))
	case "f":
		from, payload, _ := cutSpace(rest)
		req, node, _ := strings.Cut(from, "@")
		status := h.Forwarded(id, []byte(payload))
		// The answer goes out beside this loop, which must not wait a
		// Redis round trip with every push to this node behind it.
		go b.answer(ctx, node, req, status)
	case "k":
		req, node, _ := strings.Cut(rest, "@")
		// So does the read of the payload, and Forwarded after it.
		go b.receiveStored(ctx, h, id, req, node)
	case "r":
		status, err := strconv.Atoi(rest)
		if err != nil {
			return
		}
		b.mu.Lock()
		ch := b.waits[id] // the request id
		b.mu.Unlock()
		if ch != nil {
			select {
			case ch <- status:
			default:
			}
		}
	}
}

// receiveBatch handles a publish's message to this node: "m <length>
// <payload> <id>:<seq> …" pushes, "x <length> <close frame> <id> …"
// closes.
func (b *Broker) receiveBatch(ctx context.Context, h Handler, kind, rest string) {
	lenText, rest, _ := cutSpace(rest)
	n, err := strconv.Atoi(lenText)
	if err != nil || n < 0 || n > len(rest) {
		return
	}
	// One copy of the payload for all the sessions of the batch.
	payload, entries := []byte(rest[:n]), strings.TrimPrefix(rest[n:], " ")
	for entries != "" {
		var entry string
		entry, entries, _ = cutSpace(entries)
		if kind == "x" {
			h.Command(entry, "close", payload)
			continue
		}
		id, seqText, _ := strings.Cut(entry, ":")
		seq, err := strconv.ParseUint(seqText, 10, 64)
		if err != nil {
			continue
		}
		b.receivePush(ctx, h, id, seq, payload)
	}
}

// receivePush delivers push seq of session id, if this node holds it.
func (b *Broker) receivePush(ctx context.Context, h Handler, id string, seq uint64, payload []byte) {
	hd := b.holding(id)
	if hd == nil {
		return // not held here (any more): its log has it
	}
	hd.mu.Lock()
	defer hd.mu.Unlock()
	e := Entry{Seq: seq, Payload: payload}
	if hd.pending {
		hd.waiting = append(hd.waiting, e)
		return
	}
	b.deliverLocked(ctx, h, id, hd, e)
}

// deliverLocked delivers e to session id after the pushes it missed, read
// from the log; a push already delivered is dropped. hd.mu is held.
func (b *Broker) deliverLocked(ctx context.Context, h Handler, id string, hd *holding, e Entry) {
	if hd.lost || e.Seq <= hd.last {
		return
	}
	if e.Seq > hd.last+1 {
		missed, complete, err := b.replayRange(ctx, id, hd.last, e.Seq-1)
		if err != nil || !complete {
			b.loseLocked(h, id, hd)
			return
		}
		b.repaired()
		for _, m := range missed {
			h.Deliver(id, m.Seq, m.Payload)
			hd.last = m.Seq
		}
	}
	h.Deliver(id, e.Seq, e.Payload)
	hd.last = e.Seq
}

// resync catches every session held here up with its log: after a pub/sub
// (re)subscription, pushes published meanwhile never reached this node.
func (b *Broker) resync(ctx context.Context, h Handler) {
	b.mu.Lock()
	ids := make([]string, 0, len(b.held))
	for id := range b.held {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	for _, id := range ids {
		hd := b.holding(id)
		if hd == nil {
			continue
		}
		hd.mu.Lock()
		if !hd.pending && !hd.lost {
			missed, complete, err := b.replayRange(ctx, id, hd.last, 0)
			switch {
			case err != nil:
				// Redis is away: the next resubscription tries again.
			case !complete:
				b.loseLocked(h, id, hd)
			default:
				if len(missed) > 0 {
					b.repaired()
				}
				for _, m := range missed {
					h.Deliver(id, m.Seq, m.Payload)
					hd.last = m.Seq
				}
			}
		}
		hd.mu.Unlock()
	}
}

// lose reports session id lost.
func (b *Broker) lose(h Handler, id string) {
	hd := b.holding(id)
	if hd == nil {
		return
	}
	hd.mu.Lock()
	defer hd.mu.Unlock()
	b.loseLocked(h, id, hd)
}

func (b *Broker) loseLocked(h Handler, id string, hd *holding) {
	if hd.lost {
		return
	}
	hd.lost = true
	b.Release(id)
	h.Lost(id)
}

func cutSpace(s string) (before, after string, found bool) {
	return strings.Cut(s, " ")
}

func cmpSeq(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func (b *Broker) repaired() {
	b.gapRepairs.Add(1)
	if b.cfg.Events != nil {
		b.cfg.Events("gap_repair", 1)
	}
}
