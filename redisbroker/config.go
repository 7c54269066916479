package redisbroker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Config says which Redis to use and how this node is named.
type Config struct {
	// Addrs are Redis addresses (host:port): one for standalone Redis,
	// several for Redis Cluster, or the Sentinels with MasterName.
	Addrs []string
	// MasterName is the Sentinel master's name (Sentinel only).
	MasterName string
	// Username and Password authenticate to Redis (ACL or requirepass).
	Username, Password string
	// DB is the database number (standalone and Sentinel only).
	DB int
	// TLS, if set, connects with TLS.
	TLS *tls.Config
	// Prefix starts every key and channel name, so one Redis can serve
	// several clusters. Default "duplex".
	Prefix string
	// NodeID names this node; unique per process. Default: random.
	NodeID string
	// Timeout bounds every Redis call. Default 5s.
	Timeout time.Duration
	// NodeTTL is how long a node without a heartbeat counts as alive.
	// Default 15s; nodes heartbeat every NodeTTL/3.
	NodeTTL time.Duration

	// Observe, if set, is told of every Redis round trip (for metrics).
	Observe func(d time.Duration, err error)
	// Events, if set, is told of what the broker does on its own:
	// "gap_repair", and "nodes" with the live node count.
	Events func(kind string, n int)
}

// Defaults.
const (
	DefaultPrefix  = "duplex"
	DefaultTimeout = 5 * time.Second
	DefaultNodeTTL = 15 * time.Second
)

func (c Config) withDefaults() (Config, error) {
	if len(c.Addrs) == 0 {
		return c, errors.New("redisbroker: no Redis address")
	}
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.NodeID == "" {
		c.NodeID = randomID()
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.NodeTTL <= 0 {
		c.NodeTTL = DefaultNodeTTL
	}
	if c.DB < 0 {
		return c, fmt.Errorf("redisbroker: db %d: must not be negative", c.DB)
	}
	return c, nil
}

// client opens go-redis's universal client: a cluster client for several
// addresses without a master name, a failover client with one, a plain
// client otherwise.
func (c Config) client() redis.UniversalClient {
	rdb := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:        c.Addrs,
		MasterName:   c.MasterName,
		Username:     c.Username,
		Password:     c.Password,
		DB:           c.DB,
		TLSConfig:    c.TLS,
		DialTimeout:  c.Timeout,
		ReadTimeout:  c.Timeout,
		WriteTimeout: c.Timeout,
		// Fail fast: a caller answers 503 rather than waiting on retries.
		MaxRetries: 1,
	})
	if c.Observe != nil {
		rdb.AddHook(observer{c.Observe})
	}
	return rdb
}

// observer times Redis round trips for Config.Observe.
type observer struct{ observe func(time.Duration, error) }

func (o observer) DialHook(next redis.DialHook) redis.DialHook { return next }

func (o observer) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { return o.process(ctx, cmd, next) }
}

// process runs cmd through next and tells o of its round trip.
func (o observer) process(ctx context.Context, cmd redis.Cmder, next redis.ProcessHook) error {
	start := time.Now()
	err := next(ctx, cmd)
	o.observe(time.Since(start), ignoreNil(err))
	return err
}

func (o observer) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		start := time.Now()
		err := next(ctx, cmds)
		o.observe(time.Since(start), ignoreNil(err))
		return err
	}
}

// ignoreNil drops redis.Nil (a missing key is an answer, not a failure).
func ignoreNil(err error) error {
	if errors.Is(err, redis.Nil) {
		return nil
	}
	return err
}
