// Command app is the caddy-duplex demo backend: an ordinary HTTP chat app.
//
// It knows nothing about WebSockets. Caddy's duplex handler turns every
// client frame into a plain HTTP request (POST /rooms/{room}, …) and the app
// pushes to connected browsers by POSTing to Caddy's publish API.
package main

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

//go:embed index.html
var indexHTML []byte

// historySize is how many messages each room remembers.
const historySize = 50

// roomName restricts room names so a channel name never contains a comma
// (Duplex-Subscribe is a comma-separated list) or other surprises.
var roomName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// Message is one chat line, as stored in the history and pushed to browsers.
type Message struct {
	Name string `json:"name"`
	Text string `json:"text"`
	At   string `json:"at"`
}

// app holds the in-memory state: the last historySize messages per room.
type app struct {
	publishURL string
	client     *http.Client

	mu      sync.Mutex
	history map[string][]Message
}

func main() {
	listen := flag.String("listen", envOr("DEMO_APP_LISTEN", "127.0.0.1:3000"), "address to listen on (env DEMO_APP_LISTEN)")
	publish := flag.String("publish", envOr("DEMO_PUBLISH_URL", "http://localhost:2019/duplex/publish"), "URL of the duplex publish API (env DEMO_PUBLISH_URL)")
	flag.Parse()

	a := &app{
		publishURL: *publish,
		client:     &http.Client{Timeout: 5 * time.Second},
		history:    map[string][]Message{},
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Write(indexHTML)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })
	mux.HandleFunc("POST /rooms/{room}", a.postMessage)
	mux.HandleFunc("POST /rooms/{room}/join", a.join)

	slog.Info("demo app listening", "addr", *listen, "publish", *publish)
	if err := http.ListenAndServe(*listen, mux); err != nil {
		slog.Error("server stopped", "err", err)
		os.Exit(1)
	}
}

// postMessage serves a chat message sent by a browser over the duplex session:
// it validates it, stores it and publishes it to the room's channel.
func (a *app) postMessage(w http.ResponseWriter, r *http.Request) {
	room, ok := roomFrom(w, r)
	if !ok {
		return
	}
	var in struct{ Name, Text string }
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 64<<10)).Decode(&in); err != nil {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "body must be JSON {name, text}"})
		return
	}
	in.Name, in.Text = strings.TrimSpace(in.Name), strings.TrimSpace(in.Text)
	switch {
	case in.Text == "":
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "text is empty"})
		return
	case utf8.RuneCountInString(in.Text) > 1000:
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "text is longer than 1000 characters"})
		return
	}
	if in.Name == "" {
		in.Name = "anonymous"
	}
	if utf8.RuneCountInString(in.Name) > 40 {
		in.Name = string([]rune(in.Name)[:40])
	}
	msg := Message{Name: in.Name, Text: in.Text, At: time.Now().UTC().Format(time.RFC3339)}

	a.mu.Lock()
	h := append(a.history[room], msg)
	if len(h) > historySize {
		h = h[len(h)-historySize:]
	}
	a.history[room] = h
	a.mu.Unlock()

	slog.Info("message", "room", room, "name", msg.Name,
		"session", r.Header.Get("Duplex-Session"), "user", r.Header.Get("Duplex-User"),
		"transport", r.Header.Get("Duplex-Transport"))

	if err := a.publish(r.Context(), "room:"+room, msg); err != nil {
		slog.Error("publish failed", "room", room, "err", err)
		writeJSON(w, http.StatusBadGateway, map[string]string{"error": "could not publish: " + err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]bool{"ok": true})
}

// join answers with the room's history and subscribes the calling session to
// the room's channel through the Duplex-Subscribe response header (Caddy acts
// on it and removes it before the reply reaches the browser).
func (a *app) join(w http.ResponseWriter, r *http.Request) {
	room, ok := roomFrom(w, r)
	if !ok {
		return
	}
	a.mu.Lock()
	history := append([]Message{}, a.history[room]...)
	a.mu.Unlock()

	slog.Info("join", "room", room, "session", r.Header.Get("Duplex-Session"))
	w.Header().Set("Duplex-Subscribe", "room:"+room)
	writeJSON(w, http.StatusOK, map[string]any{"history": history})
}

// publish POSTs {"channel":…,"data":…} to Caddy's publish API.
func (a *app) publish(ctx context.Context, channel string, data any) error {
	body, err := json.Marshal(map[string]any{"channel": channel, "data": data})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.publishURL, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var out struct {
		Delivered int    `json:"delivered"`
		Error     string `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("publish API answered %s %s", resp.Status, out.Error)
	}
	slog.Debug("published", "channel", channel, "delivered", out.Delivered)
	return nil
}

// roomFrom reads and checks the {room} path value, answering 400 if it is bad.
func roomFrom(w http.ResponseWriter, r *http.Request) (string, bool) {
	room := r.PathValue("room")
	if !roomName.MatchString(room) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "room must match " + roomName.String()})
		return "", false
	}
	return room, true
}

// writeJSON answers with status and v encoded as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// envOr returns the environment variable key, or def when it is unset or empty.
func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
