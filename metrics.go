package duplex

import (
	"errors"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// duplexMetrics are the plugin's Prometheus metrics. The collectors are
// created once per process, so their values survive config reloads; every
// config registers them in its own registry (Caddy makes a new one per
// config load), served on the admin endpoint's /metrics.
type duplexMetrics struct {
	connections  *prometheus.GaugeVec   // open connections by transport
	opened       *prometheus.CounterVec // sessions opened, by transport
	ended        *prometheus.CounterVec // sessions ended for good, by reason
	messages     *prometheus.CounterVec // client messages, by result
	pushes       *prometheus.CounterVec // pushes, by result
	resumes      *prometheus.CounterVec // resume attempts, by result
	appLatency   prometheus.Histogram   // time the route took to answer a message
	publishes    *prometheus.CounterVec // publish API requests, by result
	slowClosures prometheus.Counter     // connections closed as slow consumers
	// cluster (broker redis)
	brokerErrors prometheus.Counter   // failed broker calls
	redisLatency prometheus.Histogram // Redis round trips
	gapRepairs   prometheus.Counter   // pushes missed on pub/sub, read from a log
	clusterNodes prometheus.Gauge     // live nodes, as of the last heartbeat

	// the push counters, resolved once: they are bumped per subscriber
	pushDelivered, pushBuffered, pushDropped prometheus.Counter
	// publishOK is publishes' "ok", resolved once: it is bumped per
	// publish request
	publishOK  prometheus.Counter
	collectors []prometheus.Collector // all of the above
}

var metrics = newDuplexMetrics()

func newDuplexMetrics() *duplexMetrics {
	const ns, sub = "caddy", "duplex"
	m := &duplexMetrics{
		connections: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "connections",
			Help: "Connections serving sessions now, by transport.",
		}, []string{"transport"}),
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "sessions_opened_total",
			Help: "Sessions opened (not counting resumes), by transport.",
		}, []string{"transport"}),
		ended: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "sessions_ended_total",
			Help: "Sessions ended for good, by reason: client, app, expired, connection_lost.",
		}, []string{"reason"}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "messages_total",
			Help: "Client messages, by result: ack, reply, app_error, timeout, bad_frame, too_large, fire_and_forget.",
		}, []string{"result"}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "pushes_total",
			Help: "Pushes taken by sessions, by result: delivered (queued on a connection), buffered (session detached, kept for resume), dropped (connection closing as a slow consumer; kept for resume).",
		}, []string{"result"}),
		resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "resumes_total",
			Help: "Openings that presented a resume cursor, by result: resumed, failed (a new session was opened).",
		}, []string{"result"}),
		appLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "app_latency_seconds",
			Help:    "Time the handlers after duplex took to answer a client message.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 12),
		}),
		publishes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "publish_requests_total",
			Help: "Publish API requests, by result: ok, bad_request, unknown_session, error.",
		}, []string{"result"}),
		slowClosures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "slow_consumer_closures_total",
			Help: "Connections closed because their send queue was full.",
		}),
	}
	m.brokerErrors = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "broker_errors_total",
		Help: "Broker calls that failed because Redis was unreachable or failing.",
	})
	m.redisLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: ns, Subsystem: sub, Name: "redis_latency_seconds",
		Help:    "Round trips to Redis (commands, pipelines and scripts) of the redis broker.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 12),
	})
	m.gapRepairs = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "gap_repairs_total",
		Help: "Times a node read pushes it had missed on Redis pub/sub from a session's log.",
	})
	m.clusterNodes = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: ns, Subsystem: sub, Name: "cluster_nodes",
		Help: "Live nodes sharing the sessions (broker redis), as this node last saw them.",
	})
	m.pushDelivered = m.pushes.WithLabelValues("delivered")
	m.pushBuffered = m.pushes.WithLabelValues("buffered")
	m.pushDropped = m.pushes.WithLabelValues("dropped")
	m.publishOK = m.publishes.WithLabelValues("ok")
	m.collectors = []prometheus.Collector{m.connections, m.opened, m.ended, m.messages,
		m.pushes, m.resumes, m.appLatency, m.publishes, m.slowClosures,
		m.brokerErrors, m.redisLatency, m.gapRepairs, m.clusterNodes}
	return m
}

// register adds the collectors to the config's registry. Several handlers
// of one config register the same collectors: that is not an error.
func (m *duplexMetrics) register(ctx caddy.Context) error {
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range m.collectors {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}
