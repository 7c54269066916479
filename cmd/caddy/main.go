// Command caddy is Caddy with its standard modules and the duplex plugin,
// for the demo and the tests (`go build ./cmd/caddy`). Users build their own
// with xcaddy: xcaddy build --with github.com/caddy-duplex/duplex
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddy-duplex/duplex"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func main() {
	caddycmd.Main()
}
