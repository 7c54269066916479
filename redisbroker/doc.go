// Package redisbroker keeps caddy-duplex sessions in Redis so that several
// Caddy nodes share one set of sessions: the session registry, each
// session's push sequence and resume log, channel and user membership, and
// a pub/sub channel per node that carries pushes to the node holding a
// session. It works with standalone Redis, Sentinel and Redis Cluster
// through go-redis's universal client.
//
// # Key layout
//
// Every key starts with the configured prefix (P below, "duplex" by
// default). The keys of one session share the hash tag {id}, so a session's
// keys live in one Redis Cluster slot and one script can update them
// atomically:
//
//	P:s:{id}        hash    node, user, scope, seq, epoch
//	P:s:{id}:log    stream  the resume log: entry id <seq>-1, field p = payload;
//	                        capped at resume_buffer entries (XADD MAXLEN)
//	P:s:{id}:ch     set     the session's channels
//	P:c:{channel}   set     the sessions on a channel
//	P:u:{user}      set     the sessions of a user
//	P:t:{token}     string  session id by token (the token's SHA-256, hex)
//	P:p:{id}        string  a publish id's delivered count, for 2 minutes
//	P:f:{request}   string  a forward's payload over 32 KiB, until the node
//	                        holding its session reads it (GETDEL, Redis 6.2)
//	                        or the broker's timeout passes
//	P:nodes         zset    live nodes by last heartbeat (unix ms)
//	P:epoch         string  set once per Redis data set; a node that sees it
//	                        change knows Redis lost its data
//
// Detached sessions' keys expire with resume_window; attached ones do not
// expire while their node heartbeats. An expired session leaves the channel
// and user sets lazily: the next publish to them drops it (a script cannot
// touch them, they live in other slots).
//
// # A publish
//
// A publish resolves its targets (one SMEMBERS for a channel or user),
// groups them by Redis Cluster slot, in batches of 256 sessions, and runs
// the publish script once per batch, all batches of a publish in one
// pipeline: for each session one HMGET (node, closed, resume_buffer), one
// HINCRBY of its seq and one XADD to its log, atomic per session; then one
// PUBLISH per node holding some of them, naming the sessions and their seqs
// with the payload once. Cost per publish: 3 commands per target session
// plus one PUBLISH per node and batch, plus one SMEMBERS for channel and
// user targets.
//
// Round trips: on Redis Cluster two for a channel or user (the members,
// then the pipeline), one for a session. On standalone Redis and Sentinel,
// where every key is on one server, a channel or user publish is one round
// trip: a script reads the members and applies the publish to them in
// place of the first. With more than 256 members it applies nothing and
// returns them, and the publish goes on as on Redis Cluster: two round
// trips, as there.
//
// # Gaps
//
// Pub/sub is lossy (reconnects, output-buffer kills, failovers); the log is
// not. The node keeps, for every session it holds, the last seq it
// delivered; a push whose seq is further on is preceded by the missing ones
// read from the log, and after every pub/sub (re)subscription the node
// reads each session's seq and repairs what it missed. A session whose
// missing pushes are no longer in its log (or whose Redis lost its data)
// is reported lost, never delivered with a gap.
package redisbroker
