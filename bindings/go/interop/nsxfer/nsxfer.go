// Package nsxfer is the transfer shared by the Go halves of
// benches/netstack_compare.sh (cmd/nsbench and cmd/tsnetbench): N TCP
// streams from one node's userspace stack to the other's, every byte
// verified, byte for byte what the Rust benches/src/bin/netstack_xfer.rs
// sends.
//
// Each connection starts with a 16-byte header (stream index, length,
// little-endian) and then carries the deterministic pattern of pattern()
// for that index; the receiver compares every byte and counts them, so a
// broken transfer fails (exit 1) instead of printing a figure. On success
// Run prints one line:
//
//	RESULT variant=V streams=N bytes=B secs=S cpu_s=C
//
// secs is the wall time from the first write to the last verified byte,
// cpu_s the process's user+system CPU time (getrusage) over that window.
//
// It is its own module without dependencies so that commands with very
// different dependency sets (wireguard-go and gVisor; tailscale.com) share
// it without sharing a module graph.
package nsxfer

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

const (
	// period is prime, so the pattern never lines up with segment or
	// buffer sizes and a misplaced segment shows as a mismatch.
	period = 65521
	ioSize = 128 << 10
	// Port is the port the receiving node listens on.
	Port = 5201
)

// Die prints the message and exits with status 1.
func Die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, filepath.Base(os.Args[0])+": "+format+"\n", args...)
	os.Exit(1)
}

// pattern is stream index's bytes, one period plus one write long: byte o
// of the stream is pattern[o%period] (the same xorshift64 as the Rust side).
func pattern(index uint64) []byte {
	x := uint64(0x9E3779B97F4A7C15) ^ (index + 1)
	p := make([]byte, period+ioSize)
	for i := 0; i < period; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		p[i] = byte(x >> 24)
	}
	for i := period; i < len(p); i++ {
		p[i] = p[i-period]
	}
	return p
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		Die("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// Node is one side: a dialer and a listener on its userspace stack, and
// what shuts it down.
type Node struct {
	Dial   func(ctx context.Context, to netip.AddrPort) (net.Conn, error)
	Listen func(at netip.AddrPort) (net.Listener, error)
	Close  func()
}

func send(c net.Conn, index, n uint64) error {
	p := pattern(index)
	var head [16]byte
	binary.LittleEndian.PutUint64(head[:8], index)
	binary.LittleEndian.PutUint64(head[8:], n)
	if _, err := c.Write(head[:]); err != nil {
		return fmt.Errorf("stream %d: write: %w", index, err)
	}
	for off := uint64(0); off < n; {
		k := min(n-off, ioSize)
		at := off % period
		if _, err := c.Write(p[at : at+k]); err != nil {
			return fmt.Errorf("stream %d: write at %d: %w", index, off, err)
		}
		off += k
	}
	return nil
}

// receive reads one stream to its announced length, comparing every byte;
// it returns the bytes verified.
func receive(c net.Conn, streams, want uint64) (uint64, error) {
	var head [16]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return 0, fmt.Errorf("read header: %w", err)
	}
	index := binary.LittleEndian.Uint64(head[:8])
	n := binary.LittleEndian.Uint64(head[8:])
	if index >= streams || n != want {
		return 0, fmt.Errorf("bad header: stream %d of %d, length %d", index, streams, n)
	}
	p := pattern(index)
	buf := make([]byte, ioSize)
	var got uint64
	for got < n {
		k, err := c.Read(buf[:min(n-got, ioSize)])
		if k > 0 {
			at := got % period
			if !bytes.Equal(buf[:k], p[at:at+uint64(k)]) {
				return got, fmt.Errorf("stream %d: wrong bytes in %d..%d", index, got, got+uint64(k))
			}
			got += uint64(k)
		}
		if err != nil && got < n {
			return got, fmt.Errorf("stream %d: read at %d of %d: %w", index, got, n, err)
		}
	}
	return got, nil
}

// Run moves total bytes, split evenly between streams, from nodes[0] to
// nodes[1] listening at to, within timeout, and prints the RESULT line
// labelled variant; any failure exits with status 1. The first dial may
// wait up to dialWait for the path between the nodes to come up.
func Run(variant string, nodes [2]Node, to netip.AddrPort, streams, total uint64, timeout, dialWait time.Duration) {
	if streams == 0 || streams > 64 || total < streams {
		Die("-streams takes 1..64 and -bytes at least one per stream")
	}
	per := total / streams
	deadline := time.Now().Add(timeout)
	// Past the deadline a blocked read or write fails, so the run fails
	// instead of hanging.
	stop := time.AfterFunc(time.Until(deadline)+5*time.Second, func() { Die("timed out after %v", timeout) })
	defer stop.Stop()

	l, err := nodes[1].Listen(to)
	if err != nil {
		Die("listen: %v", err)
	}
	defer l.Close()
	var tx, rx []net.Conn
	for i := uint64(0); i < streams; i++ {
		// The first dial also waits for the handshake.
		ctx, cancel := context.WithTimeout(context.Background(), dialWait)
		c, err := nodes[0].Dial(ctx, to)
		cancel()
		if err != nil {
			Die("dial %d: %v", i, err)
		}
		a, err := l.Accept()
		if err != nil {
			Die("accept %d: %v", i, err)
		}
		c.SetDeadline(deadline)
		a.SetDeadline(deadline)
		tx = append(tx, c)
		rx = append(rx, a)
	}

	cpu0 := cpuSeconds()
	t0 := time.Now()
	sendErr := make(chan error, len(tx))
	for i, c := range tx {
		go func() { sendErr <- send(c, uint64(i), per) }()
	}
	type result struct {
		n   uint64
		err error
	}
	got := make(chan result, len(rx))
	for _, c := range rx {
		go func() {
			n, err := receive(c, streams, per)
			got <- result{n, err}
		}()
	}
	var moved uint64
	for range rx {
		r := <-got
		if r.err != nil {
			Die("%v", r.err)
		}
		moved += r.n
	}
	for range tx {
		if err := <-sendErr; err != nil {
			Die("%v", err)
		}
	}
	secs := time.Since(t0).Seconds()
	cpu := cpuSeconds() - cpu0
	if moved != per*streams {
		Die("moved %d bytes, expected %d", moved, per*streams)
	}
	for _, c := range append(tx, rx...) {
		c.Close()
	}
	fmt.Printf("RESULT variant=%s streams=%d bytes=%d secs=%.3f cpu_s=%.2f\n", variant, streams, moved, secs, cpu)
}
