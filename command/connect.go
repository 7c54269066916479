package duplexcmd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/caddy-duplex/duplex/client"
)

func connectCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "connect <url>",
		Short: "Open a session and relay frames between it and the terminal",
		Long: `Connect opens a session at <url> (http, https, ws or wss) over the first
transport that opens, and relays frames: every frame from the server is
printed on standard output as one JSON line (pings aside); every line
read from standard input is sent:

  {…}                       a line starting with { is a frame, sent as it is
  [METHOD] /path [JSON]     a message with an id (1, 2, …), e.g.
                            /live/rooms/1 {"text":"hi"}   or   GET /live/history

The session reconnects and resumes by itself when the connection drops;
state changes go to standard error as lines starting with "#". At the end
of standard input, connect waits for the answers to the messages it sent
(at most --timeout), then closes the session; --stay keeps it open for
pushes until interrupted.

  caddy duplex connect http://localhost:8080/live
  echo '/live/rooms/lobby/join' | caddy duplex connect http://localhost:8080/live
  caddy duplex connect --transport sse -H 'Authorization: Bearer t0k' https://example.com/live`,
		Args:         cobra.ExactArgs(1),
		SilenceUsage: true,
		RunE:         runConnect,
	}
	f := cmd.Flags()
	f.StringSlice("transport", []string{client.WebSocket, client.Stream, client.SSE}, "transports to try, in order")
	f.String("http", "", "HTTP version: h1, h2 (TLS or h2c; WebSocket over RFC 8441), or empty for automatic")
	f.StringArrayP("header", "H", nil, `header for the opening request and SSE POSTs ("Name: value"), repeatable`)
	f.Bool("insecure", false, "do not verify the server's TLS certificate")
	f.Duration("timeout", 30*time.Second, "how long to wait for answers at the end of input")
	f.Bool("stay", false, "keep the session open at the end of input, until interrupted")
	return cmd
}

func runConnect(cmd *cobra.Command, args []string) error {
	f := cmd.Flags()
	transports, _ := f.GetStringSlice("transport")
	httpVersion, _ := f.GetString("http")
	headers, _ := f.GetStringArray("header")
	insecure, _ := f.GetBool("insecure")
	timeout, _ := f.GetDuration("timeout")
	stay, _ := f.GetBool("stay")

	hdr := http.Header{}
	for _, h := range headers {
		k, v, ok := strings.Cut(h, ":")
		if !ok {
			return fmt.Errorf("duplex connect: header %q: want \"Name: value\"", h)
		}
		hdr.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}

	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	out := &frameOut{w: cmd.OutOrStdout(), waiting: map[string]bool{}, idle: make(chan struct{}, 1)}
	errOut := cmd.ErrOrStderr()
	ended := make(chan struct{}) // closed when the session ends
	var endOnce sync.Once
	opts := client.Options{
		Transports: transports,
		HTTP:       httpVersion,
		Header:     hdr,
		OnFrame:    out.frame,
		OnPush:     func(client.Push) {}, // printed by OnFrame
		OnOpen: func(o client.Open) {
			fmt.Fprintf(errOut, "# open: session %s over %s, resumed %v\n", o.Session, o.Transport, o.Resumed)
		},
		OnState: func(s client.State) {
			if s == client.StateReconnecting || s == client.StateClosed {
				fmt.Fprintf(errOut, "# %s\n", s)
			}
			if s == client.StateClosed {
				endOnce.Do(func() { close(ended) })
			}
		},
	}
	if insecure {
		opts.TLSConfig = &tls.Config{InsecureSkipVerify: true}
	}
	dctx, cancel := context.WithTimeout(ctx, timeout)
	s, err := client.Dial(dctx, args[0], opts)
	cancel()
	if err != nil {
		return err
	}
	defer s.Close()

	lines := make(chan string)
	readDone := make(chan error, 1)
	go func() { // ends with standard input (or the process)
		readDone <- readLines(cmd.InOrStdin(), lines, ctx.Done())
	}()
	next := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ended:
			return sessionEnd(s)
		case line := <-lines:
			frame, id, err := parseLine(line, &next)
			if err != nil {
				fmt.Fprintf(errOut, "# %v\n", err)
				continue
			}
			if frame == nil {
				continue
			}
			out.expect(id)
			if err := s.SendFrame(frame); err != nil {
				return err
			}
		case err := <-readDone:
			if err != nil {
				return fmt.Errorf("duplex connect: reading standard input: %w", err)
			}
			if stay {
				select {
				case <-ctx.Done():
				case <-ended:
					return sessionEnd(s)
				}
				return nil
			}
			return out.drain(ctx, s, timeout)
		}
	}
}

// sessionEnd is the outcome of a session that ended by itself: fine when
// the server closed it (its close frame was printed), an error otherwise
// (e.g. reconnections refused with 401).
func sessionEnd(s *client.Session) error {
	if err := s.Err(); err != nil && !errors.Is(err, client.ErrClosed) {
		return err
	}
	return nil
}

// readLines sends the lines of r to lines until r ends or done closes.
func readLines(r io.Reader, lines chan<- string, done <-chan struct{}) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		select {
		case lines <- sc.Text():
		case <-done:
			return nil
		}
	}
	return sc.Err()
}

// parseLine turns an input line into a frame, and the id whose answer to
// wait for ("" for none).
func parseLine(line string, next *int) (json.RawMessage, string, error) {
	line = strings.TrimSpace(line)
	if line == "" {
		return nil, "", nil
	}
	if line[0] == '{' {
		var f struct {
			ID json.RawMessage `json:"id"`
		}
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			return nil, "", fmt.Errorf("not a JSON frame: %w", err)
		}
		return json.RawMessage(line), compactID(f.ID), nil
	}
	method := ""
	if line[0] != '/' {
		m, rest, _ := strings.Cut(line, " ")
		method, line = strings.ToUpper(m), strings.TrimSpace(rest)
	}
	path, data, _ := strings.Cut(line, " ")
	if !strings.HasPrefix(path, "/") {
		return nil, "", fmt.Errorf("want {frame} or [METHOD] /path [JSON], got %q", line)
	}
	data = strings.TrimSpace(data)
	if data != "" && !json.Valid([]byte(data)) {
		return nil, "", fmt.Errorf("data is not valid JSON: %s", data)
	}
	*next++
	id := strconv.Itoa(*next)
	m := map[string]any{"id": id, "path": path}
	if method != "" {
		m["method"] = method
	}
	if data != "" {
		m["data"] = json.RawMessage(data)
	}
	b, _ := json.Marshal(m)
	return b, compactID(json.RawMessage(strconv.Quote(id))), nil
}

func compactID(id json.RawMessage) string {
	if len(id) == 0 || string(id) == "null" {
		return ""
	}
	var b bytes.Buffer
	if json.Compact(&b, id) != nil {
		return ""
	}
	return b.String()
}

// frameOut prints server frames and tracks the messages not answered yet.
type frameOut struct {
	w io.Writer

	mu      sync.Mutex      // guards w and waiting
	waiting map[string]bool // ids (compact JSON) sent and not answered
	idle    chan struct{}   // (buffered 1) signalled when waiting empties
}

func (o *frameOut) expect(id string) {
	if id == "" {
		return
	}
	o.mu.Lock()
	o.waiting[id] = true
	o.mu.Unlock()
}

func (o *frameOut) frame(raw json.RawMessage) {
	var f struct {
		Type string          `json:"type"`
		Ref  json.RawMessage `json:"ref"`
	}
	_ = json.Unmarshal(raw, &f)
	o.mu.Lock()
	defer o.mu.Unlock()
	fmt.Fprintf(o.w, "%s\n", raw)
	if ref := compactID(f.Ref); ref != "" && (f.Type == "ack" || f.Type == "reply" || f.Type == "error") {
		delete(o.waiting, ref)
		if len(o.waiting) == 0 {
			select {
			case o.idle <- struct{}{}:
			default:
			}
		}
	}
}

// drain waits until every message sent has its answer, the session ends,
// or the timeout passes.
func (o *frameOut) drain(ctx context.Context, s *client.Session, timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		o.mu.Lock()
		n := len(o.waiting)
		o.mu.Unlock()
		if n == 0 || s.Err() != nil {
			return nil
		}
		select {
		case <-o.idle:
		case <-tick.C:
		case <-ctx.Done():
			return nil
		case <-t.C:
			return fmt.Errorf("duplex connect: %d message(s) not answered within %s", n, timeout)
		}
	}
}
