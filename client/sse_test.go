package client_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-duplex/duplex/client"
)

// SSE POSTs the server refuses for now (429) are sent again after
// Retry-After; a frame it refuses as bad (400) fails its call and is not
// sent again; a POST a cluster node could not hand over in time (504) may
// still be taken: it is not sent again, and its call gets the answer that
// comes. The server here is a stand-in that answers POSTs itself.
func TestSSEPostRefusals(t *testing.T) {
	frames := make(chan string, 16)
	var mu sync.Mutex
	posts := map[string]int{} // by path in the frame
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if r.Method == http.MethodGet {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "retry: 2000\n\nevent: open\ndata: {\"type\":\"open\",\"session\":\"s1\",\"token\":\"t1\",\"resumed\":false,\"heartbeat\":25}\n\n")
			rc.Flush()
			for {
				select {
				case f := <-frames:
					fmt.Fprintf(w, "event: x\ndata: %s\n\n", f)
					rc.Flush()
				case <-r.Context().Done():
					return
				}
			}
		}
		if r.Header.Get("Duplex-Token") != "t1" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		body, _ := io.ReadAll(r.Body)
		var f struct{ ID, Path string }
		if json.Unmarshal(body, &f) != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		mu.Lock()
		posts[f.Path]++
		n := posts[f.Path]
		mu.Unlock()
		switch {
		case f.Path == "/busy" && n == 1:
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		case f.Path == "/unanswered":
			w.WriteHeader(http.StatusGatewayTimeout)
			frames <- fmt.Sprintf(`{"type":"reply","ref":%q,"status":200,"data":{"posts":%d}}`, f.ID, n)
			return
		case f.Path == "/bad":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"error":"frame 0: bad path"}`)
			return
		}
		w.WriteHeader(http.StatusAccepted)
		frames <- fmt.Sprintf(`{"type":"reply","ref":%q,"status":200,"data":{"posts":%d}}`, f.ID, n)
	}))
	defer srv.Close()
	defer srv.CloseClientConnections()

	s, err := client.Dial(withContext(t), srv.URL+"/live", client.Options{Transports: []string{client.SSE}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	reply, err := s.Call(withContext(t), "/busy", nil)
	if err != nil || string(reply) != `{"posts":2}` {
		t.Fatalf("call after a 429: %s %v, want the reply to the second POST", reply, err)
	}
	reply, err = s.Call(withContext(t), "/unanswered", nil)
	if err != nil || string(reply) != `{"posts":1}` {
		t.Fatalf("call after a 504: %s %v, want the reply to the one POST", reply, err)
	}
	_, err = s.Call(withContext(t), "/bad", nil)
	var de *client.Error
	if !errors.As(err, &de) || de.Status != http.StatusBadRequest || !strings.Contains(de.Message, "bad path") {
		t.Fatalf("refused frame: %v, want a *client.Error 400", err)
	}
	if _, err := s.Call(withContext(t), "/after", nil); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if posts["/bad"] != 1 {
		t.Fatalf("the refused frame was posted %d times, want 1", posts["/bad"])
	}
	if posts["/unanswered"] != 1 {
		t.Fatalf("the frame answered 504 was posted %d times, want 1", posts["/unanswered"])
	}
}
