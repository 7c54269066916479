package duplex

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// apiError is an answer of the publish and sessions API other than 2xx.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func badPublish(format string, args ...any) *apiError {
	return &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

// decodePublish parses a publish body: one publish object or an array of
// them. The body is decoded once, straight into the publishes; every
// publish is checked before any is applied. A single publish of the usual
// shape is read by decodePlainPublish, its data left in the body (which
// the caller then leaves as it is); anything else by json.Unmarshal.
func decodePublish(body []byte) (msgs []*publishMsg, batch bool, err *apiError) {
	body = bytes.TrimSpace(body)
	if len(body) == 0 {
		return nil, false, badPublish("empty body")
	}
	if body[0] != '[' {
		m := new(publishMsg)
		if !decodePlainPublish(body, m) {
			if e := json.Unmarshal(body, m); e != nil {
				return nil, false, badPublish("invalid JSON: %v", e)
			}
		}
		if e := checkPublish(m); e != nil {
			return nil, false, e
		}
		return []*publishMsg{m}, false, nil
	}
	var items []publishMsg
	if e := json.Unmarshal(body, &items); e != nil {
		return nil, true, badPublish("invalid JSON: %v", e)
	}
	if len(items) == 0 {
		return nil, true, badPublish("empty batch")
	}
	msgs = make([]*publishMsg, len(items))
	for i := range items {
		if e := checkPublish(&items[i]); e != nil {
			e.msg = fmt.Sprintf("item %d: %s", i, e.msg)
			return nil, true, e
		}
		msgs[i] = &items[i]
	}
	return msgs, true, nil
}

// checkPublish checks a decoded publish: exactly one target, and data or
// close.
func checkPublish(m *publishMsg) *apiError {
	targets := 0
	for _, t := range [3]string{m.Channel, m.User, m.Session} {
		if t != "" {
			targets++
		}
	}
	switch {
	case targets == 0:
		return badPublish("no target: give one of channel, user or session")
	case targets > 1:
		return badPublish("more than one target: give only one of channel, user or session")
	case m.Close == nil && m.Data == nil:
		return badPublish("nothing to do: give data or close")
	case m.Close != nil && m.Data != nil:
		return badPublish("give either data or close, not both")
	}
	return nil
}

// publishResult is one publish's outcome in a batch answer.
type publishResult struct {
	Delivered *int   `json:"delivered,omitempty"`
	Status    int    `json:"status,omitempty"`
	Error     string `json:"error,omitempty"`
}

// servePublish serves POST /duplex/publish: 200 {"delivered":N}, or for a
// batch 200 {"delivered":total,"results":[…]}; 400 for a bad body, 404 for
// an unknown session (single publish).
func (h *hub) servePublish(w http.ResponseWriter, r *http.Request) {
	result := "bad_request"
	defer func() {
		if result == "ok" {
			metrics.publishOK.Inc()
		} else {
			metrics.publishes.WithLabelValues(result).Inc()
		}
	}()
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeAPIError(w, &apiError{status: http.StatusMethodNotAllowed, msg: "use POST"})
		return
	}
	body, err := readBody(w, r)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeAPIError(w, badPublish("body larger than %d bytes", maxPublishBody))
			return
		}
		writeAPIError(w, badPublish("reading body: %v", err))
		return
	}
	msgs, batch, perr := decodePublish(body)
	if perr != nil {
		writeAPIError(w, perr)
		return
	}
	if !batch {
		m := msgs[0]
		n, err := h.publish(r.Context(), m)
		switch {
		case errors.Is(err, errUnknownSession):
			result = "unknown_session"
			writeAPIError(w, &apiError{status: http.StatusNotFound, msg: "unknown session " + m.Session})
		case err != nil:
			result = "error"
			ae := brokerError(err)
			if ae.status == http.StatusServiceUnavailable {
				w.Header().Set("Retry-After", retryAfter)
			}
			writeAPIError(w, ae)
		default:
			result = "ok"
			writeDelivered(w, n)
		}
		return
	}
	total := 0
	results := make([]publishResult, 0, len(msgs))
	for _, m := range msgs {
		n, err := h.publish(r.Context(), m)
		switch {
		case errors.Is(err, errUnknownSession):
			results = append(results, publishResult{Status: http.StatusNotFound, Error: "unknown session " + m.Session})
		case err != nil:
			ae := brokerError(err)
			results = append(results, publishResult{Status: ae.status, Error: ae.msg})
		default:
			total += n
			results = append(results, publishResult{Delivered: &n})
		}
	}
	result = "ok"
	writeJSON(w, http.StatusOK, batchAnswer{Delivered: total, Results: results})
}

// batchAnswer is the answer to a batch publish.
type batchAnswer struct {
	Delivered int             `json:"delivered"`
	Results   []publishResult `json:"results"`
}

// writeDelivered answers a single publish: 200 {"delivered":n}, written
// without the reflection of an encoder.
func writeDelivered(w http.ResponseWriter, n int) {
	var buf [40]byte
	b := append(buf[:0], `{"delivered":`...)
	b = strconv.AppendInt(b, int64(n), 10)
	b = append(b, "}\n"...)
	w.Header()["Content-Type"] = jsonContentType
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b)
}

// jsonContentType is the Content-Type of publish answers, shared so that
// setting it allocates nothing (nothing modifies a header value in place).
var jsonContentType = []string{"application/json"}

// bodyReadAhead is the most readBody allocates for a body before its
// bytes arrive.
const bodyReadAhead = 64 << 10

// readBody reads a publish body of at most maxPublishBody bytes, into a
// buffer of its announced length when it has one: at most bodyReadAhead
// of it up front, the rest as the bytes arrive, so a client announcing a
// large body it then sends slowly (or never) holds no more than that.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	body := http.MaxBytesReader(w, r.Body, maxPublishBody)
	if n := r.ContentLength; n > 0 && n <= maxPublishBody {
		buf := make([]byte, 0, min(n, bodyReadAhead)+1) // +1: room to see the end
		for {
			if len(buf) == cap(buf) {
				if int64(len(buf)) > n {
					break // longer than announced: read on, within the limit
				}
				// Double, up to the announced length (+1).
				buf = slices.Grow(buf, int(min(n+1-int64(len(buf)), int64(len(buf)))))
			}
			m, err := body.Read(buf[len(buf):cap(buf)])
			buf = buf[:len(buf)+m]
			if errors.Is(err, io.EOF) {
				return buf, nil
			}
			if err != nil {
				return nil, err
			}
		}
		rest, err := io.ReadAll(body)
		return append(buf, rest...), err
	}
	return io.ReadAll(body)
}

// serveSessions serves the sessions API under prefix (e.g. /duplex/sessions):
// GET list (?user=, ?channel=), GET/DELETE one, POST /<id>/channels.
func (h *hub) serveSessions(w http.ResponseWriter, r *http.Request, rest string) {
	rest = strings.Trim(rest, "/")
	b := h.brokerOf()
	fail := func(err error, id string) {
		if errors.Is(err, errUnknownSession) {
			writeAPIError(w, &apiError{status: http.StatusNotFound, msg: "unknown session " + id})
			return
		}
		if ae := brokerError(err); ae.status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", retryAfter)
			writeAPIError(w, ae)
			return
		}
		writeAPIError(w, brokerError(err))
	}
	if rest == "" {
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", http.MethodGet)
			writeAPIError(w, &apiError{status: http.StatusMethodNotAllowed, msg: "use GET"})
			return
		}
		q := r.URL.Query()
		list, err := b.sessions(r.Context(), q.Get("user"), q.Get("channel"))
		if err != nil {
			fail(err, "")
			return
		}
		writeJSON(w, http.StatusOK, list)
		return
	}
	id, sub, _ := strings.Cut(rest, "/")
	switch {
	case sub == "" && r.Method == http.MethodGet:
		info, err := b.info(r.Context(), id)
		if err != nil {
			fail(err, id)
			return
		}
		writeJSON(w, http.StatusOK, info)
	case sub == "" && r.Method == http.MethodDelete:
		// A close to the session, on whichever node holds it.
		deleted := "deleted"
		if _, err := h.publish(r.Context(), &publishMsg{Session: id, Close: &deleted}); err != nil {
			fail(err, id)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	case sub == "channels" && r.Method == http.MethodPost:
		var change struct {
			Add    []string `json:"add"`
			Remove []string `json:"remove"`
		}
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxPublishBody))
		if err != nil || json.Unmarshal(body, &change) != nil {
			writeAPIError(w, badPublish(`body must be {"add":[…],"remove":[…]}`))
			return
		}
		s := h.get(id)
		if s != nil {
			err = h.subscribe(r.Context(), s, change.Add, change.Remove)
		} else {
			// Held by another node (or by none): the broker keeps its
			// channels.
			err = b.subscribe(r.Context(), &session{id: id}, change.Add, change.Remove)
		}
		if err != nil {
			fail(err, id)
			return
		}
		info, err := b.info(r.Context(), id)
		if err != nil {
			fail(err, id)
			return
		}
		writeJSON(w, http.StatusOK, info)
	default:
		writeAPIError(w, &apiError{status: http.StatusNotFound, msg: "no such endpoint"})
	}
}

// serveAPI routes a request for the API whose paths are relative to
// /duplex/ (publish, sessions…).
func (h *hub) serveAPI(w http.ResponseWriter, r *http.Request, path string) {
	switch {
	case path == "publish":
		h.servePublish(w, r)
	case path == "sessions" || strings.HasPrefix(path, "sessions/"):
		h.serveSessions(w, r, strings.TrimPrefix(path, "sessions"))
	case path == "cluster" && r.Method == http.MethodGet:
		info, err := h.brokerOf().cluster(r.Context())
		if err != nil {
			w.Header().Set("Retry-After", retryAfter)
			writeAPIError(w, brokerError(err))
			return
		}
		writeJSON(w, http.StatusOK, info)
	default:
		writeAPIError(w, &apiError{status: http.StatusNotFound, msg: "no such endpoint"})
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// retryAfter is the Retry-After of a 503 while the broker is unavailable.
const retryAfter = "2"

// brokerError is the API answer for a failed publish or channel change:
// 503 while the broker is unavailable (nothing was stored), else 502.
func brokerError(err error) *apiError {
	var u errBrokerUnavailable
	if errors.As(err, &u) {
		return &apiError{status: http.StatusServiceUnavailable, msg: err.Error()}
	}
	return &apiError{status: http.StatusBadGateway, msg: err.Error()}
}

func writeAPIError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.status, map[string]string{"error": e.msg})
}

// ServeHTTP serves the publish API on the route the handler is placed in:
// a POST publishes (same body and answers as the admin endpoint's
// /duplex/publish). A session's messages and hooks are refused (403),
// whatever the route order.
func (p *Publish) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if isSubrequest(r) {
		return errSubrequest // a session's message never publishes
	}
	p.hub.servePublish(w, r)
	return nil
}
