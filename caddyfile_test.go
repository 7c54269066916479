package duplex

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

var update = flag.Bool("update", false, "rewrite the expected JSON of testdata/adapt/*.caddytest")

const adaptSeparator = "----------\n"

// TestAdaptGolden adapts every testdata/adapt/*.caddytest Caddyfile (the
// part before the separator line) and compares the JSON with the part after
// it; the demo's Caddyfile is compared with testdata/demo/Caddyfile.json. Run `go test -run TestAdaptGolden -update` to rewrite the JSON after a
// deliberate change, and review the diff.
func TestAdaptGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/adapt/*.caddytest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	// Caddyfiles kept elsewhere in testdata have their JSON beside them.
	for _, file := range append(files, "testdata/demo/Caddyfile") {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			caddyfile, want, ok := strings.Cut(string(raw), adaptSeparator)
			golden := file
			if !strings.HasSuffix(file, ".caddytest") {
				golden = file + ".json"
				caddyfile, ok = string(raw), true
				b, _ := os.ReadFile(golden)
				want = string(b)
			}
			if !ok {
				t.Fatalf("%s: no %q separator line", file, strings.TrimSpace(adaptSeparator))
			}
			got := adapt(t, file, caddyfile)
			if *update {
				out := []byte(caddyfile + adaptSeparator + got)
				if golden != file {
					out = []byte(got)
				}
				if err := os.WriteFile(golden, out, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got != want {
				t.Errorf("%s: adapted JSON differs from the golden file\n--- got\n%s\n--- want\n%s", file, got, want)
			}
			// The JSON must also load: every module provisions and validates.
			var cfg caddy.Config
			if err := json.Unmarshal([]byte(got), &cfg); err != nil {
				t.Fatal(err)
			}
			if err := caddy.Validate(&cfg); err != nil {
				t.Errorf("%s: adapted config does not validate: %v", file, err)
			}
		})
	}
}

func adapt(t *testing.T, file, caddyfile string) string {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	out, warnings, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": file})
	if err != nil {
		t.Fatalf("%s: adapt: %v", file, err)
	}
	for _, w := range warnings {
		t.Errorf("%s: adapt warning: %s", file, w.String())
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	return buf.String() + "\n"
}

// TestAdaptErrors checks that every bad Caddyfile in testdata/adapt/errors
// fails to adapt with the error its first line announces
// (`# want: <text> @ line <n>`), naming the file and line.
func TestAdaptErrors(t *testing.T) {
	files, err := filepath.Glob("testdata/adapt/errors/*.caddyfile")
	if err != nil || len(files) == 0 {
		t.Fatalf("no error cases: %v", err)
	}
	wantRE := regexp.MustCompile(`^# want: (.+) @ line (\d+)\n`)
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			m := wantRE.FindSubmatch(raw)
			if m == nil {
				t.Fatalf("%s: first line must be `# want: <text> @ line <n>`", file)
			}
			_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt(raw, map[string]any{"filename": file})
			if err == nil {
				t.Fatalf("%s: adapted without error; want %q", file, m[1])
			}
			if !strings.Contains(err.Error(), string(m[1])) {
				t.Errorf("%s: error %q does not say %q", file, err, m[1])
			}
			if loc := file + ":" + string(m[2]); !strings.Contains(err.Error(), loc) {
				t.Errorf("%s: error %q does not name %s", file, err, loc)
			}
		})
	}
}

// The demo's cluster Caddyfile (make demo-cluster) adapts for each node,
// with the broker and the node's ports from the environment.
func TestDemoClusterCaddyfile(t *testing.T) {
	t.Setenv("PORT", "8081")
	t.Setenv("ADMIN", "2020")
	raw, err := os.ReadFile("testdata/demo/Caddyfile.cluster")
	if err != nil {
		t.Fatal(err)
	}
	got := adapt(t, "testdata/demo/Caddyfile.cluster", string(raw))
	for _, want := range []string{`"broker": "redis"`, `"127.0.0.1:6390"`, `":8081"`, `"localhost:2020"`, `"handler": "duplex_client"`} {
		if !strings.Contains(got, want) {
			t.Errorf("adapted config lacks %s:\n%s", want, got)
		}
	}
}
