package jsclient

import (
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("duplex_client", parseCaddyfile)
	// Before respond, reverse_proxy and file_server, so that a flat site
	// block's `duplex_client /duplex.js` is not hidden by them.
	httpcaddyfile.RegisterDirectiveOrder("duplex_client", httpcaddyfile.Before, "respond")
}

// parseCaddyfile sets up the handler from Caddyfile tokens:
//
//	duplex_client [<matcher>]
//
// It takes no arguments and no block.
func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next() // the directive name
	if h.NextArg() {
		return nil, h.Errf("duplex_client: takes no arguments, got %q", h.Val())
	}
	if h.NextBlock(0) {
		return nil, h.Errf("duplex_client: takes no options, got %q", h.Val())
	}
	return new(Handler), nil
}
