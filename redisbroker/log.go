package redisbroker

import (
	"context"
	"errors"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Entry is one push in a session's resume log.
type Entry struct {
	Seq     uint64
	Payload []byte
}

// Replay returns the pushes of session id after seq after, up to the
// session's seq now. complete is false if some of them have left the log
// (resume_buffer) or the session is gone: the client cannot continue from
// after.
func (b *Broker) Replay(ctx context.Context, id string, after uint64) (entries []Entry, complete bool, err error) {
	return b.replayRange(ctx, id, after, 0)
}

// replayRange reads the pushes after seq after and up to seq upTo (0: up to
// the session's seq now).
func (b *Broker) replayRange(ctx context.Context, id string, after, upTo uint64) ([]Entry, bool, error) {
	cctx, cancel := b.call(ctx)
	defer cancel()
	var seqCmd *redis.StringCmd
	var rng *redis.XMessageSliceCmd
	end := "+"
	if upTo > 0 {
		end = strconv.FormatUint(upTo, 10) + "-1"
	}
	_, err := b.rdb.Pipelined(cctx, func(p redis.Pipeliner) error {
		seqCmd = p.HGet(cctx, b.k.session(id), "seq")
		rng = p.XRange(cctx, b.k.log(id), strconv.FormatUint(after+1, 10)+"-1", end)
		return nil
	})
	if errors.Is(err, redis.Nil) {
		return nil, false, nil // the session is gone
	}
	if err != nil {
		return nil, false, unavailable("reading a resume log", err)
	}
	last, _ := strconv.ParseUint(seqCmd.Val(), 10, 64)
	if upTo == 0 || upTo > last {
		upTo = last
	}
	if after > last {
		return nil, false, nil
	}
	entries := make([]Entry, 0, len(rng.Val()))
	want := after + 1
	for _, m := range rng.Val() {
		seq := entrySeq(m.ID)
		if seq > upTo {
			break
		}
		if seq != want {
			return nil, false, nil // trimmed past want
		}
		p, _ := m.Values["p"].(string)
		entries = append(entries, Entry{Seq: seq, Payload: []byte(p)})
		want++
	}
	return entries, want == upTo+1, nil
}

// entrySeq reads the seq from a log entry id <seq>-1.
func entrySeq(id string) uint64 {
	s, _, _ := strings.Cut(id, "-")
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}

// Trim drops the pushes of session id up to seq: the client has them.
func (b *Broker) Trim(ctx context.Context, id string, seq uint64) error {
	cctx, cancel := b.call(ctx)
	defer cancel()
	err := b.rdb.XTrimMinID(cctx, b.k.log(id), strconv.FormatUint(seq+1, 10)+"-1").Err()
	if err != nil {
		return unavailable("trimming a resume log", err)
	}
	return nil
}
