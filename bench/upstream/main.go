// Command upstream is the benchmark's app: it answers every request with
// 200 and a small JSON body, after reading the request body. Caddy (for
// duplex messages and plain reverse_proxy requests) and the reference
// server both send their requests here.
package main

import (
	"flag"
	"io"
	"log"
	"net/http"
)

var answer = []byte(`{"ok":true}`)

func main() {
	addr := flag.String("addr", "127.0.0.1:8091", "listen address")
	flag.Parse()
	srv := &http.Server{
		Addr: *addr,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(answer)
		}),
	}
	log.Fatal(srv.ListenAndServe())
}
