package duplex_test

import (
	"encoding/base64"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// An auth handler before duplex refuses an opening before duplex sees it,
// so Caddy's debug log records the refused request, cursor and all. The
// README's log filter (global `log` with `format filter`) keeps resume
// cursors out of every log line: this test runs that exact configuration.
func TestSecurityCursorFilteredFromLogs(t *testing.T) {
	t.Parallel()
	app := newTestApp(t)
	hash, err := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	c := startCaddy(t, sub(globalOpts(readmeLogFilter)+`
http://127.0.0.1:{{.HTTP}} {
	route /live* {
		basic_auth {
			alice {{.Hash}}
		}
		duplex
		reverse_proxy {{.Upstream}}
	}
}
`, "Upstream", app.Addr, "Hash", string(hash)))

	good := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:s3cret"))
	ws := openSession(t, c.wsURL("/live"), hdrs("Authorization", good))
	cursor := ws.Token + ":0"
	ws.Close()

	// Resumes without credentials: basic_auth refuses them (401), cursor
	// in the query, in Duplex-Resume and in Last-Event-ID.
	if st := rejectedStatus(t, c.wsURL("/live?resume="+url.QueryEscape(cursor)), nil); st != http.StatusUnauthorized {
		t.Errorf("resume without credentials (query): %d, want 401", st)
	}
	if st := rejectedStatus(t, c.wsURL("/live"), hdrs("Duplex-Resume", cursor)); st != http.StatusUnauthorized {
		t.Errorf("resume without credentials (Duplex-Resume): %d, want 401", st)
	}
	if st, _ := doJSON(t, http.MethodGet, c.url("/live"), nil, "Accept", "text/event-stream", "Last-Event-ID", cursor); st != http.StatusUnauthorized {
		t.Errorf("SSE resume without credentials: %d, want 401", st)
	}
	c.stop(t)
	logs := c.logs()
	if strings.Count(logs, `"status":401`) < 3 {
		t.Fatalf("Caddy's debug log does not show the three refusals: the scan would prove nothing\n%s", logs)
	}
	if strings.Contains(logs, ws.Token) {
		t.Errorf("the resume token appears in Caddy's log:\n%s", strings.Join(linesWith(logs, ws.Token), "\n"))
	}
}

// readmeLogFilter is the log configuration the README recommends for sites
// with duplex routes; keep the two identical.
const readmeLogFilter = `	log {
		level DEBUG
		format filter {
			request>uri query {
				delete resume
			}
			request>headers>Duplex-Resume delete
			request>headers>Duplex-Token delete
			request>headers>Last-Event-Id delete
		}
	}`
