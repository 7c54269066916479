package client_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-duplex/duplex/client"
)

// A server that takes a stream opening and drops the connection without
// answering: the opening fails because of that, not because its context
// ran out (Go's HTTP/1.1 transport waits for a request body that is still
// open, so the body must end with the connection).
func TestStreamOpeningDropped(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			http.ReadRequest(bufio.NewReader(c)) // the headers, then hang up
			c.Close()
		}
	}()
	for _, h := range []string{client.HTTP1, client.HTTP2} {
		t.Run(h, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			_, err := client.Dial(ctx, "http://"+l.Addr().String()+"/live", client.Options{
				Transports:  []string{client.Stream},
				HTTP:        h,
				DialTimeout: time.Hour,
			})
			if err == nil {
				t.Fatal("Dial succeeded")
			}
			if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
				t.Fatalf("Dial failed only when its context ended: %v", err)
			}
		})
	}
}
