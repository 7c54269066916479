package redisbroker

// keys names the Redis keys and channels under one prefix (see the key
// layout in the package documentation).
type keys struct{ prefix string }

func (k keys) session(id string) string  { return k.sessionHead() + id + "}" }
func (k keys) log(id string) string      { return k.sessionHead() + id + "}:log" }
func (k keys) channels(id string) string { return k.sessionHead() + id + "}:ch" }
func (k keys) channel(c string) string   { return k.prefix + ":c:{" + c + "}" }
func (k keys) user(u string) string      { return k.prefix + ":u:{" + u + "}" }

// members is the set of a publish target's sessions: user's, or, without
// a user, channel's.
func (k keys) members(user, channel string) string {
	if user != "" {
		return k.user(user)
	}
	return k.channel(channel)
}
func (k keys) token(t string) string { return k.prefix + ":t:{" + t + "}" }
func (k keys) publishID(id string) string {
	return k.prefix + ":p:{" + id + "}"
}

// forward is a forward's payload stored for its holder, by request id.
func (k keys) forward(req string) string { return k.prefix + ":f:{" + req + "}" }

func (k keys) nodes() string           { return k.prefix + ":nodes" }
func (k keys) epoch() string           { return k.prefix + ":epoch" }
func (k keys) node(name string) string { return k.prefix + ":n:" + name }

// nodeSessions is the set of the sessions a node holds.
func (k keys) nodeSessions(name string) string { return k.prefix + ":ns:{" + name + "}" }

// reaping is the lock of the node that ends a dead node's sessions.
func (k keys) reaping(name string) string { return k.prefix + ":reap:{" + name + "}" }

// sessionHead is what a session's keys start with, before its id
// (membersPublishScript builds them from it).
func (k keys) sessionHead() string { return k.prefix + ":s:{" }
