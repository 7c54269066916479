package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The harness shares the machine with whatever else runs on it. loadMeter
// measures how much CPU other processes used during the run, so a table
// taken on a busy machine says so.
type loadMeter struct {
	at        time.Time
	busy      time.Duration // all CPUs, from /proc/stat
	ours      time.Duration // the harness and its waited-for children
	loadavg1m string
}

func readLoad() (loadMeter, error) {
	m := loadMeter{at: time.Now()}
	stat, err := os.ReadFile("/proc/stat")
	if err != nil {
		return m, fmt.Errorf("reading /proc/stat: %w", err)
	}
	line, _, _ := strings.Cut(string(stat), "\n")
	f := strings.Fields(line) // cpu user nice system idle iowait irq softirq steal …
	if len(f) < 9 || f[0] != "cpu" {
		return m, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	var ticks int64
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		v, _ := strconv.ParseInt(f[i], 10, 64)
		ticks += v
	}
	m.busy = time.Duration(ticks) * time.Second / clockTicks
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err != nil {
			return m, fmt.Errorf("getrusage: %w", err)
		}
		m.ours += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m.loadavg1m, _, _ = strings.Cut(string(b), " ")
	}
	return m, nil
}

// foreignShare is the share of the machine's CPU capacity that processes
// other than the harness and its children used between start and end.
func foreignShare(start, end loadMeter) float64 {
	capacity := end.at.Sub(start.at) * time.Duration(runtime.NumCPU())
	foreign := (end.busy - start.busy) - (end.ours - start.ours)
	if capacity <= 0 || foreign < 0 {
		return 0
	}
	return float64(foreign) / float64(capacity)
}
