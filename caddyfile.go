package duplex

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("duplex", parseHandler)
	httpcaddyfile.RegisterHandlerDirective("duplex_publish", parsePublish)
	httpcaddyfile.RegisterDirectiveOrder("duplex", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterDirectiveOrder("duplex_publish", httpcaddyfile.Before, "reverse_proxy")
	httpcaddyfile.RegisterGlobalOption("duplex", parseGlobal)
}

func parseHandler(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

func parsePublish(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	p := new(Publish)
	err := p.UnmarshalCaddyfile(h.Dispenser)
	return p, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	duplex [<matcher>] {
//		auth {
//			<matchers…>            # any request matchers; the opening must match them (else 401)
//		}
//		messages {
//			<matchers…>            # every client message must match them (else error 403);
//		}                          # default: the opening path and the paths below it
//		user <template>            # session identity, e.g. {http.auth.user.id}
//		channels <template…>       # initial subscriptions, placeholders allowed
//		transports <name…>         # enabled transports in order; default: websocket stream sse
//		heartbeat <duration>       # default 25s
//		max_message_size <size>    # default 64KiB
//		max_inflight <n>           # default 1 (strictly in order)
//		message_timeout <duration> # default 30s
//		send_queue <size>          # default 1MiB
//		resume_window <duration>   # default 2m
//		resume_buffer <n> [<size>] # pushes kept for a resume; default 1000 and 8MiB
//		allowed_origins <origin…>  # default: same origin (scheme, host, port) only; * allows all
//		rate <n>/s [burst <m>]     # client messages per session; default 100/s burst 200; "rate off"
//		max_sessions_per_user <n>  # default 0 = unlimited; the oldest is closed
//		max_sessions <n>           # sessions in the process; default 0 = unlimited
//		max_sessions_per_ip <n>    # sessions per client IP on this handler (429); default 0 = unlimited
//		max_detached <n>           # detached sessions this handler keeps; default 10000
//		max_age <duration>         # per connection; default 0 = unlimited
//		connect                    # run the opening through the route first (app accepts/rejects)
//		disconnect <path>          # POST {"reason":…} here when a session ends for good
//	}
//
// Every subdirective may appear once, except channels and
// allowed_origins, whose arguments add up.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] && name != "channels" && name != "allowed_origins" {
			return d.Errf("duplex: %s given more than once", name)
		}
		seen[name] = true
		switch name {
		case "auth":
			if d.NextArg() {
				return d.ArgErr()
			}
			set, err := caddyhttp.ParseCaddyfileNestedMatcherSet(d)
			if err != nil {
				return d.Errf("duplex: auth: %v", err)
			}
			if len(set) == 0 {
				return d.Err("duplex: auth needs at least one matcher")
			}
			h.AuthRaw = set

		case "messages":
			if d.NextArg() {
				return d.ArgErr()
			}
			set, err := caddyhttp.ParseCaddyfileNestedMatcherSet(d)
			if err != nil {
				return d.Errf("duplex: messages: %v", err)
			}
			if len(set) == 0 {
				return d.Err("duplex: messages needs at least one matcher")
			}
			h.MessagesRaw = set

		case "user":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			h.User = v

		case "channels":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.Channels = append(h.Channels, args...)

		case "transports":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			for _, t := range args {
				if !slices.Contains(knownTransports, t) {
					return d.Errf("duplex: unknown transport %q (supported: %v)", t, knownTransports)
				}
				if slices.Contains(h.Transports, t) {
					return d.Errf("duplex: transport %q listed twice", t)
				}
				h.Transports = append(h.Transports, t)
			}

		case "rate":
			if err := h.parseRate(d); err != nil {
				return err
			}

		case "max_sessions_per_user", "max_sessions", "max_sessions_per_ip", "max_detached":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			lowest := 0 // 0 is unlimited
			if name == "max_detached" {
				lowest = 1
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < lowest {
				return d.Errf("duplex: %s: want a whole number ≥ %d, got %q", name, lowest, v)
			}
			switch name {
			case "max_sessions":
				h.MaxSessions = n
			case "max_sessions_per_ip":
				h.MaxSessionsPerIP = n
			case "max_detached":
				h.MaxDetached = n
			default:
				h.MaxSessionsPerUser = n
			}

		case "heartbeat", "message_timeout", "resume_window", "max_age":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur < 0 || (dur == 0 && name != "max_age") {
				return d.Errf("duplex: %s: invalid duration %q (want e.g. 25s)", name, v)
			}
			switch name {
			case "heartbeat":
				h.Heartbeat = caddy.Duration(dur)
			case "message_timeout":
				h.MessageTimeout = caddy.Duration(dur)
			case "max_age":
				h.MaxAge = caddy.Duration(dur)
			default:
				h.ResumeWindow = caddy.Duration(dur)
			}

		case "max_message_size", "send_queue":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			size, err := humanize.ParseBytes(v)
			if err != nil || size == 0 || size > 1<<40 {
				return d.Errf("duplex: %s: invalid size %q (want e.g. 64KiB)", name, v)
			}
			if name == "max_message_size" {
				h.MaxMessageSize = int64(size)
			} else {
				h.SendQueue = int64(size)
			}

		case "max_inflight":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return d.Errf("duplex: %s: want a whole number ≥ 1, got %q", name, v)
			}
			h.MaxInflight = n

		case "resume_buffer":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.Err("duplex: resume_buffer: want <count> [<size>]")
			}
			n, err := strconv.Atoi(args[0])
			if err != nil || n < 1 {
				return d.Errf("duplex: resume_buffer: want a whole number ≥ 1, got %q", args[0])
			}
			h.ResumeBuffer = n
			if len(args) == 2 {
				size, err := humanize.ParseBytes(args[1])
				if err != nil || size == 0 || size > 1<<40 {
					return d.Errf("duplex: resume_buffer: invalid size %q (want e.g. 8MiB)", args[1])
				}
				h.ResumeBufferSize = int64(size)
			}

		case "connect":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.Connect = true

		case "disconnect":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if !strings.HasPrefix(v, "/") {
				return d.Errf("duplex: disconnect: want a path starting with /, got %q", v)
			}
			h.Disconnect = v

		case "allowed_origins":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.AllowedOrigins = append(h.AllowedOrigins, args...)

		default:
			return d.Errf("duplex: unknown subdirective %q", name)
		}
	}
	return nil
}

// parseRate parses `rate <n>/s [burst <m>]` (also /m) or `rate off`.
func (h *Handler) parseRate(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) == 1 && args[0] == "off" {
		h.Rate = -1
		return nil
	}
	if len(args) != 1 && !(len(args) == 3 && args[1] == "burst") {
		return d.Err("duplex: rate: want <n>/s [burst <m>] or off")
	}
	num, per, ok := strings.Cut(args[0], "/")
	n, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || n <= 0 {
		return d.Errf("duplex: rate: want e.g. 100/s, got %q", args[0])
	}
	switch per {
	case "s":
		h.Rate = n
	case "m":
		h.Rate = n / 60
	default:
		return d.Errf("duplex: rate: per second (/s) or per minute (/m), got %q", args[0])
	}
	if len(args) == 3 {
		b, err := strconv.Atoi(args[2])
		if err != nil || b < 1 {
			return d.Errf("duplex: rate: burst: want a whole number ≥ 1, got %q", args[2])
		}
		h.Burst = b
	}
	return nil
}

// UnmarshalCaddyfile sets up the publish handler. Syntax:
//
//	duplex_publish [<matcher>]
//
// It takes no options; put the auth you want before it in the route.
func (p *Publish) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	if d.NextBlock(0) {
		return d.Errf("duplex_publish: takes no options, got %q", d.Val())
	}
	return nil
}

// parseGlobal parses the `duplex` global option into the duplex app.
// Syntax:
//
//	duplex {
//		admin_publish on|off   # serve /duplex/* on the admin endpoint; default on
//		publish_listen <address...>  # also serve /duplex/* there (host:port, unix//path); default none
//		broker memory          # the default: this process's sessions only
//		broker redis <address...>
//		broker redis {
//			address <address...>   # several: Redis Cluster, or Sentinels with master_name
//			master_name <name>
//			username <name>
//			password <password>    # placeholders such as {env.REDIS_PASSWORD}
//			db <n>
//			tls
//			prefix <prefix>        # default duplex
//			node_id <id>           # default random per process
//			timeout <duration>     # bound of each Redis call; default 5s
//		}
//	}
func parseGlobal(d *caddyfile.Dispenser, _ any) (any, error) {
	d.Next() // consume option name
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	app := new(App)
	for d.NextBlock(0) {
		switch d.Val() {
		case "admin_publish":
			v, err := oneArg(d)
			if err != nil {
				return nil, err
			}
			switch v {
			case "on":
				app.AdminPublish = new(true)
			case "off":
				app.AdminPublish = new(false)
			default:
				return nil, d.Errf("duplex: admin_publish: want on or off, got %q", v)
			}
		case "publish_listen":
			addrs := d.RemainingArgs()
			if len(addrs) == 0 {
				return nil, d.Err("duplex: publish_listen: want at least one address")
			}
			if _, err := parsePublishListen(addrs); err != nil {
				return nil, d.Err(err.Error())
			}
			app.PublishListen = append(app.PublishListen, addrs...)
		case "broker":
			raw, err := parseBroker(d)
			if err != nil {
				return nil, err
			}
			app.BrokerRaw = raw
		default:
			return nil, d.Errf("duplex: unknown global option %q", d.Val())
		}
	}
	return httpcaddyfile.App{
		Name:  "duplex",
		Value: caddyconfig.JSON(app, nil),
	}, nil
}

// parseBroker parses `broker memory` or `broker redis …` (see parseGlobal).
func parseBroker(d *caddyfile.Dispenser) (json.RawMessage, error) {
	nest := d.Nesting()
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	switch name := d.Val(); name {
	case "memory":
		if d.NextArg() || d.NextBlock(nest) {
			return nil, d.Err("duplex: broker memory takes no options")
		}
		return caddyconfig.JSONModuleObject(struct{}{}, "broker", "memory", nil), nil
	case "redis":
		at := d.Token()
		r := new(RedisBroker)
		r.Addresses = d.RemainingArgs()
		for d.NextBlock(nest) {
			opt := d.Val()
			switch opt {
			case "address":
				r.Addresses = append(r.Addresses, d.RemainingArgs()...)
				if len(r.Addresses) == 0 {
					return nil, d.ArgErr()
				}
			case "master_name", "username", "password", "prefix", "node_id":
				v, err := oneArg(d)
				if err != nil {
					return nil, err
				}
				switch opt {
				case "master_name":
					r.MasterName = v
				case "username":
					r.Username = v
				case "password":
					r.Password = v
				case "prefix":
					r.Prefix = v
				case "node_id":
					r.NodeID = v
				}
			case "db":
				v, err := oneArg(d)
				if err != nil {
					return nil, err
				}
				n, err := strconv.Atoi(v)
				if err != nil || n < 0 {
					return nil, d.Errf("duplex: broker redis: db: want a number ≥ 0, got %q", v)
				}
				r.DB = n
			case "tls":
				if d.NextArg() {
					return nil, d.ArgErr()
				}
				r.TLS = true
			case "timeout":
				v, err := oneArg(d)
				if err != nil {
					return nil, err
				}
				dur, err := caddy.ParseDuration(v)
				if err != nil || dur <= 0 {
					return nil, d.Errf("duplex: broker redis: timeout: invalid duration %q (want e.g. 5s)", v)
				}
				r.Timeout = caddy.Duration(dur)
			default:
				return nil, d.Errf("duplex: broker redis: unknown option %q", opt)
			}
		}
		if len(r.Addresses) == 0 {
			return nil, fmt.Errorf("duplex: broker redis: no address, at %s:%d", at.File, at.Line)
		}
		return caddyconfig.JSONModuleObject(r, "broker", "redis", nil), nil
	default:
		return nil, d.Errf("duplex: unknown broker %q (want memory or redis)", name)
	}
}

// oneArg reads exactly one argument of the current subdirective.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Publish)(nil)
)
