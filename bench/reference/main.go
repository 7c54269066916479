// Command reference is the benchmark's floor: the least a server must do to
// offer what caddy-duplex offers, with none of its guarantees. Plain
// net/http, gobwas/ws (the plugin's WebSocket library), an in-memory channel
// map, a publish endpoint taking the same JSON ({"channel":…,"data":…} or an
// array of them) and an http.Client to the same upstream. No auth, origin
// check, heartbeat, resume, limits, metrics or logs; a full send queue drops.
//
// /live serves WebSocket (GET + Upgrade), stream (POST application/x-ndjson,
// full duplex) and SSE (GET text/event-stream; frames POSTed back with
// Duplex-Token); the session joins ?channel=. POST /publish pushes.
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/gobwas/ws"
)

// frame is queued for a session's writer: a push (its shared suffix; the
// writer adds the session's seq) or a complete frame.
type frame struct {
	push bool
	b    []byte
}

type session struct {
	token string
	out   chan frame
}

var (
	mu       sync.RWMutex
	channels = map[string]map[*session]struct{}{}
	tokens   = map[string]*session{}
	upstream string
	client   = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}}
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8090", "listen address")
	flag.StringVar(&upstream, "upstream", "http://127.0.0.1:8091", "upstream serving messages")
	flag.Parse()
	http.HandleFunc("/live", live)
	http.HandleFunc("/publish", publish)
	log.Fatal(http.ListenAndServe(*addr, nil))
}

// open registers a session on channel and queues its open frame.
func open(channel string) *session {
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	s := &session{token: hex.EncodeToString(id), out: make(chan frame, 64)}
	s.out <- frame{b: []byte(`{"type":"open","session":"` + s.token[:16] + `","token":"` + s.token + `"}`)}
	mu.Lock()
	if channels[channel] == nil {
		channels[channel] = map[*session]struct{}{}
	}
	channels[channel][s] = struct{}{}
	tokens[s.token] = s
	mu.Unlock()
	return s
}

func (s *session) remove(channel string) {
	mu.Lock()
	delete(channels[channel], s)
	delete(tokens, s.token)
	mu.Unlock()
}

// writeLoop writes queued frames until done; write emits one frame from its
// parts, flush sends what was written.
func (s *session) writeLoop(done <-chan struct{}, write func(...[]byte) error, flush func() error) {
	var seq uint64
	var num [20]byte
	for {
		select {
		case <-done:
			return
		case f := <-s.out:
			var err error
			if f.push {
				seq++
				err = write([]byte(`{"type":"push","seq":`), strconv.AppendUint(num[:0], seq, 10), f.b)
			} else {
				err = write(f.b)
			}
			if err == nil && len(s.out) == 0 {
				err = flush()
			}
			if err != nil {
				return
			}
		}
	}
}

// serve sends a client message to the upstream and queues its answer.
func (s *session) serve(msg []byte) {
	var m struct{ ID, Data json.RawMessage }
	if json.Unmarshal(msg, &m) != nil {
		return
	}
	if m.ID == nil {
		m.ID = json.RawMessage("null")
	}
	resp, err := client.Post(upstream+"/live", "application/json", bytes.NewReader(m.Data))
	if err != nil {
		s.out <- frame{b: []byte(`{"type":"error","ref":` + string(m.ID) + `,"status":502}`)}
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !json.Valid(body) {
		body, _ = json.Marshal(string(body))
	}
	s.out <- frame{b: []byte(`{"type":"reply","ref":` + string(m.ID) + `,"status":` + strconv.Itoa(resp.StatusCode) + `,"data":` + string(body) + `}`)}
}

func live(w http.ResponseWriter, r *http.Request) {
	channel := r.URL.Query().Get("channel")
	switch {
	case r.Header.Get("Upgrade") != "":
		serveWebSocket(w, r, channel)
	case r.Method == http.MethodPost && r.Header.Get("Duplex-Token") != "":
		mu.RLock()
		s := tokens[r.Header.Get("Duplex-Token")]
		mu.RUnlock()
		body, _ := io.ReadAll(r.Body)
		if s == nil {
			http.Error(w, "unknown token", http.StatusUnauthorized)
			return
		}
		go func() {
			for line := range bytes.Lines(body) {
				s.serve(line)
			}
		}()
		w.WriteHeader(http.StatusAccepted)
	case r.Method == http.MethodPost:
		serveStream(w, r, channel)
	case strings.Contains(r.Header.Get("Accept"), "text/event-stream"):
		serveSSE(w, r, channel)
	default:
		http.NotFound(w, r)
	}
}

func serveWebSocket(w http.ResponseWriter, r *http.Request, channel string) {
	conn, rw, _, err := ws.UpgradeHTTP(r, w)
	if err != nil {
		return
	}
	defer conn.Close()
	s := open(channel)
	defer s.remove(channel)
	done := make(chan struct{})
	defer close(done)
	go s.writeLoop(done, func(parts ...[]byte) error {
		n := 0
		for _, p := range parts {
			n += len(p)
		}
		if err := ws.WriteHeader(rw.Writer, ws.Header{Fin: true, OpCode: ws.OpText, Length: int64(n)}); err != nil {
			return err
		}
		for _, p := range parts {
			rw.Writer.Write(p)
		}
		return nil
	}, rw.Writer.Flush)
	for { // unfragmented client frames only; control frames ignored
		h, err := ws.ReadHeader(rw.Reader)
		if err != nil || h.OpCode == ws.OpClose {
			return
		}
		payload := make([]byte, h.Length)
		if _, err := io.ReadFull(rw.Reader, payload); err != nil {
			return
		}
		ws.Cipher(payload, h.Mask, 0)
		if h.OpCode == ws.OpText {
			s.serve(payload)
		}
	}
}

func serveStream(w http.ResponseWriter, r *http.Request, channel string) {
	rc := http.NewResponseController(w)
	_ = rc.EnableFullDuplex()
	w.Header().Set("Content-Type", "application/x-ndjson")
	s := open(channel)
	defer s.remove(channel)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		s.writeLoop(done, func(parts ...[]byte) error {
			for _, p := range append(parts, []byte("\n")) {
				if _, err := w.Write(p); err != nil {
					return err
				}
			}
			return nil
		}, rc.Flush)
	})
	sc := bufio.NewScanner(r.Body)
	for sc.Scan() {
		s.serve(sc.Bytes())
	}
	<-r.Context().Done()
	close(done)
	wg.Wait()
}

func serveSSE(w http.ResponseWriter, r *http.Request, channel string) {
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	s := open(channel)
	defer s.remove(channel)
	s.writeLoop(r.Context().Done(), func(parts ...[]byte) error {
		for _, p := range append(append([][]byte{[]byte("data: ")}, parts...), []byte("\n\n")) {
			if _, err := w.Write(p); err != nil {
				return err
			}
		}
		return nil
	}, rc.Flush)
}

type publishMsg struct {
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data"`
}

func publish(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var msgs []publishMsg
	if len(body) > 0 && body[0] == '[' {
		if json.Unmarshal(body, &msgs) != nil {
			http.Error(w, `{"error":"bad JSON"}`, http.StatusBadRequest)
			return
		}
	} else {
		msgs = make([]publishMsg, 1)
		if json.Unmarshal(body, &msgs[0]) != nil {
			http.Error(w, `{"error":"bad JSON"}`, http.StatusBadRequest)
			return
		}
	}
	delivered := 0
	for _, m := range msgs {
		ch, _ := json.Marshal(m.Channel)
		suffix := []byte(`,"channel":` + string(ch) + `,"data":` + string(m.Data) + `}`)
		mu.RLock()
		for s := range channels[m.Channel] {
			select {
			case s.out <- frame{push: true, b: suffix}:
				delivered++
			default: // queue full: dropped
			}
		}
		mu.RUnlock()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write([]byte(`{"delivered":` + strconv.Itoa(delivered) + `}`))
}
