package duplex_test

// Every message the server accepted gets an answer, also across a dropped
// connection (README: "Guarantees and resuming"): messages in flight at
// the app or still queued when the connection drops are served while the
// session is detached, and their answers come after the resume's open (a
// second copy is allowed, a missing one is not).

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sxGateApp answers each message only when the test lets it through: it
// reports every arrival on arrived, then waits for a token on release.
type sxGateApp struct {
	Addr    string
	arrived chan string
	release chan struct{}
	got     sxAppRequests
}

func newSxGateApp(t *testing.T) *sxGateApp {
	t.Helper()
	a := &sxGateApp{arrived: make(chan string, 256), release: make(chan struct{}, 256)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.got.add(r, nil)
		id := r.Header.Get("Duplex-Message-Id")
		a.arrived <- id
		select {
		case <-a.release:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]string{"served": id})
	}))
	a.Addr = strings.TrimPrefix(srv.URL, "http://")
	t.Cleanup(srv.Close)
	return a
}

// waitArrivals waits for n messages to reach the app.
func (a *sxGateApp) waitArrivals(t *testing.T, n int) []string {
	t.Helper()
	var ids []string
	for range n {
		select {
		case id := <-a.arrived:
			ids = append(ids, id)
		case <-time.After(sxWait):
			t.Fatalf("only %d messages reached the app, want %d", len(ids), n)
		}
	}
	return ids
}

func (a *sxGateApp) let(n int) {
	for range n {
		a.release <- struct{}{}
	}
}

const sxAnswersSite = `
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		duplex {
			max_inflight {{.Inflight}}
		}
		reverse_proxy {{.Upstream}}
	}
}
`

func sxWaitDetached(t *testing.T, c *caddyProc, id string) {
	t.Helper()
	waitUntil(t, "the session to be detached", sxWait, func() bool {
		st, b := doJSON(t, http.MethodGet, c.adminURL("/duplex/sessions/"+id), nil)
		var info struct{ Attached bool }
		return st == http.StatusOK && json.Unmarshal(b, &info) == nil && !info.Attached
	})
}

// sxCollectAnswers reads frames until every id in want has an answer;
// each must be the app's reply naming it (a second copy is allowed). It
// fails on a close frame or when no frame comes.
func sxCollectAnswers(t *testing.T, next func() (sxFrame, bool), want []string) {
	t.Helper()
	sxAwaitAnswers(t, next, want, func(f sxFrame) {
		d, _ := f["data"].(map[string]any)
		if f.typ() != "reply" || d["served"] != f.ref() {
			t.Fatalf("answer %v, want the app's reply naming its own message", f)
		}
	})
}

func sxIDs(prefix string, n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = prefix + strconv.Itoa(i)
	}
	return ids
}

// TestAnswersAcrossResumeSSE: an SSE POST of 11 frames is accepted (202);
// the stream drops while the first is at the app; some are served while
// the session is detached, the rest after the resume. The resume is
// resumed:true and every one of the 11 gets its answer.
func TestAnswersAcrossResumeSSE(t *testing.T) {
	t.Parallel()
	for _, inflight := range []int{1, 4} {
		t.Run("max_inflight "+strconv.Itoa(inflight), func(t *testing.T) {
			t.Parallel()
			app := newSxGateApp(t)
			c := startCaddy(t, sub(globalOpts("")+sxAnswersSite, "Upstream", app.Addr, "Inflight", strconv.Itoa(inflight)))
			s := sxOpenSSE(t, c.url("/live"), nil)
			sid, tok := s.open.str("session"), s.token()

			ids := sxIDs("m", 11)
			var body strings.Builder
			for _, id := range ids {
				body.WriteString(`{"id":"` + id + `","path":"/live/gate"}` + "\n")
			}
			if st, b := sxPost(t, c.url("/live"), tok, "application/x-ndjson", []byte(body.String())); st != http.StatusAccepted {
				t.Fatalf("POST of 11 frames: %d %s, want 202", st, b)
			}
			app.waitArrivals(t, inflight) // in flight at the app
			s.drop()
			sxWaitDetached(t, c, sid)

			// Five are served while the session is detached.
			app.let(5)
			app.waitArrivals(t, 5)

			r := sxOpenSSE(t, c.url("/live"), hdrs("Last-Event-ID", tok+":0"))
			if r.open["resumed"] != true || r.open.str("session") != sid {
				t.Fatalf("resume: %v, want resumed:true of %s", r.open, sid)
			}
			app.let(6)
			sxCollectAnswers(t, r.next, ids)
		})
	}
}

// TestAnswersAcrossResumeWebSocket: the same over WebSocket: 11 frames
// written, the connection cut while the first is at the app.
func TestAnswersAcrossResumeWebSocket(t *testing.T) {
	t.Parallel()
	for _, inflight := range []int{1, 4} {
		t.Run("max_inflight "+strconv.Itoa(inflight), func(t *testing.T) {
			t.Parallel()
			app := newSxGateApp(t)
			c := startCaddy(t, sub(globalOpts("")+sxAnswersSite, "Upstream", app.Addr, "Inflight", strconv.Itoa(inflight)))
			s := sxOpenWS(t, c.wsURL("/live"), nil)
			sid, tok := s.open.str("session"), s.open.str("token")

			ids := sxIDs("w", 11)
			for _, id := range ids {
				s.send(t, map[string]any{"id": id, "path": "/live/gate"})
			}
			app.waitArrivals(t, inflight)
			// The connection drops without a close handshake. A FIN, not
			// a RST: the kernel would discard frames the server has not
			// read yet on a RST, and those were never accepted.
			s.halfClose(t)
			sxWaitDetached(t, c, sid)
			s.shut()

			app.let(5)
			app.waitArrivals(t, 5)

			r := sxOpenWS(t, c.wsURL("/live"), hdrs("Duplex-Resume", tok+":0"))
			if r.open["resumed"] != true || r.open.str("session") != sid {
				t.Fatalf("resume: %v, want resumed:true of %s", r.open, sid)
			}
			app.let(6)
			sxCollectAnswers(t, r.next, ids)
		})
	}
}
