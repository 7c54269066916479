package duplex

import (
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// AdminAPI serves the publish and sessions API on Caddy's admin endpoint,
// under /duplex/. The admin endpoint listens on localhost by default, so the
// API is not reachable from the network unless the admin endpoint is. It is
// turned off by the global option `duplex { admin_publish off }`.
//
//	POST   /duplex/publish
//	GET    /duplex/sessions[?user=&channel=]
//	GET    /duplex/sessions/<id>
//	DELETE /duplex/sessions/<id>
//	POST   /duplex/sessions/<id>/channels
//	GET    /duplex/cluster
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.duplex",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes of the duplex API.
func (AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{
		Pattern: "/duplex/",
		Handler: caddy.AdminHandlerFunc(serveAdmin),
	}}
}

func serveAdmin(w http.ResponseWriter, r *http.Request) error {
	h := globalHub
	if !h.adminPublish() {
		return caddy.APIError{
			HTTPStatus: http.StatusNotFound,
			Message:    "the duplex API is turned off on the admin endpoint (admin_publish off)",
		}
	}
	h.serveAPI(w, r, strings.TrimPrefix(r.URL.Path, "/duplex/"))
	return nil
}

var _ caddy.AdminRouter = AdminAPI{}
