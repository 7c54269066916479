package redisbroker

import (
	"context"
	"errors"
	"fmt"
)

// ErrNodeUnreachable: the node holding a session did not answer a forward
// in time (it died, or Redis is slow): the caller answers 503. The payload
// may still reach it.
var ErrNodeUnreachable = errors.New("redisbroker: the node holding the session did not answer")

// ErrNodeNotListening is an ErrNodeUnreachable for which the payload
// surely went nowhere: nobody listens on the node's channel (it is gone).
var ErrNodeNotListening = fmt.Errorf("%w: nobody listens on its channel", ErrNodeUnreachable)

// ForwardTo hands payload to node, the node holding session id
// (Handler.Forwarded there, from its record, e.g. ByToken's), and returns
// the status that node answered. It waits at most the configured timeout.
func (b *Broker) ForwardTo(ctx context.Context, node, id string, payload []byte) (int, error) {
	req := randomID()
	ch := make(chan int, 1)
	b.mu.Lock()
	b.waits[req] = ch
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.waits, req)
		b.mu.Unlock()
	}()
	cctx, cancel := b.call(ctx)
	defer cancel()
	n, err := b.rdb.Publish(cctx, b.k.node(node), "f "+id+" "+req+"@"+b.cfg.NodeID+" "+string(payload)).Result()
	if err != nil {
		return 0, unavailable("forwarding", err)
	}
	if n == 0 {
		return 0, ErrNodeNotListening
	}
	select {
	case status := <-ch:
		return status, nil
	case <-cctx.Done():
		return 0, ErrNodeUnreachable
	}
}
