package duplexcmd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func adminFlag(cmd *cobra.Command) {
	def := os.Getenv("CADDY_ADMIN")
	if def == "" {
		def = "localhost:2019"
	}
	cmd.Flags().String("admin", def, "address of Caddy's admin endpoint")
}

// adminRequest sends a request to the admin endpoint and writes its
// answer to out. An answer of 400 or more is an error.
func adminRequest(cmd *cobra.Command, method, path string, body []byte) error {
	addr, _ := cmd.Flags().GetString("admin")
	base := addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil {
		return fmt.Errorf("duplex: admin address %q: %w", addr, err)
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
	defer cancel()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(u.String(), "/")+path, r)
	if err != nil {
		return fmt.Errorf("duplex: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("duplex: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("duplex: %s %s: reading the answer: %w", method, path, err)
	}
	if len(bytes.TrimSpace(raw)) > 0 {
		var pretty bytes.Buffer
		if json.Indent(&pretty, raw, "", "  ") == nil {
			raw = pretty.Bytes()
		}
		fmt.Fprintln(cmd.OutOrStdout(), strings.TrimSpace(string(raw)))
	}
	if resp.StatusCode >= 400 {
		return fmt.Errorf("duplex: %s %s: status %d", method, path, resp.StatusCode)
	}
	return nil
}

func publishCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "publish [--session ID | --user NAME | --channel NAME] [JSON]",
		Short: "Publish a push (or a batch) through the admin API",
		Long: `Publish POSTs to /duplex/publish on Caddy's admin endpoint and prints
the answer ({"delivered":N}). Without a target flag, JSON is the whole
publish body (an object or a batch array); with --session, --user or
--channel it is the push's data. JSON comes from the argument, or from
standard input when there is none. With --close REASON the target is
closed instead of pushed to.

  caddy duplex publish '{"channel":"room:1","data":{"text":"hi"}}'
  caddy duplex publish --channel room:1 '{"text":"hi"}'
  echo '[{"user":"alice","data":1},{"user":"bob","data":2}]' | caddy duplex publish
  caddy duplex publish --session Q2x… --close logout`,
		Args:         cobra.MaximumNArgs(1),
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			body, err := publishBody(cmd, args)
			if err != nil {
				return err
			}
			return adminRequest(cmd, http.MethodPost, "/duplex/publish", body)
		},
	}
	adminFlag(cmd)
	cmd.Flags().String("session", "", "publish to this session")
	cmd.Flags().String("user", "", "publish to every session of this user")
	cmd.Flags().String("channel", "", "publish to every session subscribed to this channel")
	cmd.Flags().String("close", "", "close the target with this reason instead of pushing")
	cmd.Flags().String("id", "", "idempotency key: a repeat within 2 minutes is applied once")
	cmd.Flags().String("except", "", "session id to leave out")
	return cmd
}

// publishBody builds the publish request body from the flags and the
// argument (or standard input).
func publishBody(cmd *cobra.Command, args []string) ([]byte, error) {
	f := cmd.Flags()
	target := map[string]any{}
	for _, k := range []string{"session", "user", "channel", "close", "id", "except"} {
		if v, _ := f.GetString(k); v != "" {
			target[k] = v
		}
	}
	_, hasClose := target["close"]
	var in []byte
	switch {
	case len(args) == 1:
		in = []byte(args[0])
	case hasClose:
	default:
		b, err := io.ReadAll(cmd.InOrStdin())
		if err != nil {
			return nil, fmt.Errorf("duplex: reading standard input: %w", err)
		}
		in = b
	}
	in = bytes.TrimSpace(in)
	if len(in) > 0 && !json.Valid(in) {
		return nil, fmt.Errorf("duplex: publish: not valid JSON: %q", in)
	}
	if len(target) == 0 {
		if len(in) == 0 {
			return nil, fmt.Errorf("duplex: publish: no body (give JSON, or --session/--user/--channel with data)")
		}
		return in, nil
	}
	if len(in) > 0 {
		target["data"] = json.RawMessage(in)
	}
	return json.Marshal(target)
}

func sessionsCommand() *cobra.Command {
	list := &cobra.Command{
		Use:   "sessions [--user NAME] [--channel NAME]",
		Short: "List sessions through the admin API (show <id>, delete <id>)",
		Long: `Sessions lists the sessions Caddy holds (as JSON), optionally only a
user's or a channel's; "show" prints one session, "delete" ends one
(its client gets close 4000 "deleted").

  caddy duplex sessions
  caddy duplex sessions --user alice
  caddy duplex sessions show Q2x…
  caddy duplex sessions delete Q2x…`,
		Args:         cobra.NoArgs,
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			q := url.Values{}
			for _, k := range []string{"user", "channel"} {
				if v, _ := cmd.Flags().GetString(k); v != "" {
					q.Set(k, v)
				}
			}
			path := "/duplex/sessions"
			if len(q) > 0 {
				path += "?" + q.Encode()
			}
			return adminRequest(cmd, http.MethodGet, path, nil)
		},
	}
	adminFlag(list)
	list.Flags().String("user", "", "only this user's sessions")
	list.Flags().String("channel", "", "only sessions subscribed to this channel")

	show := &cobra.Command{
		Use:          "show <id>",
		Short:        "Print one session",
		Args:         cobra.ExactArgs(1),
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return adminRequest(cmd, http.MethodGet, "/duplex/sessions/"+url.PathEscape(args[0]), nil)
		},
	}
	del := &cobra.Command{
		Use:          "delete <id>",
		Short:        "End a session (its client gets close 4000)",
		Args:         cobra.ExactArgs(1),
		SilenceUsage: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := adminRequest(cmd, http.MethodDelete, "/duplex/sessions/"+url.PathEscape(args[0]), nil); err != nil {
				return err
			}
			fmt.Fprintln(cmd.ErrOrStderr(), "deleted", args[0])
			return nil
		},
	}
	adminFlag(show)
	adminFlag(del)
	list.AddCommand(show, del)
	return list
}
