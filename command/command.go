// Package duplexcmd adds `caddy duplex` to Caddy's command line: `connect`
// opens a session and relays frames between it and the terminal;
// `publish` and `sessions` use the admin API (README, "Command line:
// caddy duplex").
package duplexcmd

import (
	"github.com/spf13/cobra"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "duplex",
		Usage: "connect|publish|sessions",
		Short: "Open duplex sessions, publish pushes, list and end sessions",
		Long: `
Tools for the duplex plugin.

  caddy duplex connect <url>     open a session and relay frames with the terminal
  caddy duplex publish [body]    POST to the admin API's /duplex/publish
  caddy duplex sessions          list sessions (show <id>, delete <id>)

publish and sessions talk to Caddy's admin endpoint (--admin, default
$CADDY_ADMIN or localhost:2019).
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(connectCommand(), publishCommand(), sessionsCommand())
		},
	})
}
