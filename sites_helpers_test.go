package duplex_test

// Caddyfile fragments that many tests serve, for startCaddy (a whole
// Caddyfile: globalOpts and a site) and startDuplexEnv (routes, served on
// its plain HTTP and HTTPS sites) alike.

import "strings"

// liveRoute is the route most tests open sessions on: /live*, where the
// duplex handler takes the user from the X-User header and sends every
// message to the upstream app ({{.Upstream}}). opts are duplex options,
// one a line.
func liveRoute(opts ...string) string {
	return liveRouteBehind("", opts...)
}

// liveRouteBehind is liveRoute with front, a handler (e.g. a header) that
// comes before the duplex handler in the route.
func liveRouteBehind(front string, opts ...string) string {
	var b strings.Builder
	b.WriteString("\troute /live* {\n")
	if front != "" {
		b.WriteString("\t\t" + front + "\n")
	}
	b.WriteString("\t\tduplex {\n\t\t\tmessages {\n\t\t\t\tpath *\n\t\t\t}\n\t\t\tuser {http.request.header.X-User}\n")
	for _, o := range opts {
		b.WriteString("\t\t\t" + o + "\n")
	}
	b.WriteString("\t\t}\n\t\treverse_proxy {{.Upstream}}\n\t}\n")
	return b.String()
}

// siteLive is the usual site: liveRoute, with channels from the X-Room
// header (and lobby).
var siteLive = liveSite("channels lobby room:{http.request.header.X-Room}")

// liveSite is the site at http://127.0.0.1:{{.HTTP}} that serves
// liveRoute with opts and nothing else.
func liveSite(opts ...string) string {
	return siteOf(liveRoute(opts...))
}

// siteOf is the site at http://127.0.0.1:{{.HTTP}} that serves routes.
func siteOf(routes string) string {
	return "\nhttp://127.0.0.1:{{.HTTP}} {\n" + routes + "}\n"
}
