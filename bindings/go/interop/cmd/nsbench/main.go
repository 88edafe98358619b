// Command nsbench is the Go half of benches/netstack_compare.sh: the same
// in-process transfer as the Rust benches/src/bin/netstack_xfer.rs (two
// nodes on loopback UDP, N TCP streams from one to the other, every byte
// verified) through one of two userspace stacks:
//
//	nsbench -variant meshvpn  libmeshvpn's stack through the Go binding
//	nsbench -variant gvisor   wireguard-go with its gVisor netstack
//	                          (golang.zx2c4.com/wireguard/tun/netstack)
//
//	nsbench -variant V [-streams N] [-bytes TOTAL] [-timeout SECONDS]
//
// Each connection starts with a 16-byte header (stream index, length,
// little-endian) and then carries the deterministic pattern of pattern()
// for that index, byte for byte what netstack_xfer sends; the receiver
// compares every byte and counts them, so a broken transfer fails (exit 1)
// instead of printing a figure. On success one line:
//
//	RESULT variant=V streams=N bytes=B secs=S cpu_s=C
//
// secs is the wall time from the first write to the last verified byte,
// cpu_s the process's user+system CPU time (getrusage) over that window.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	meshvpn "github.com/meshvpn/libmeshvpn/bindings/go"
)

const (
	// period is prime, so the pattern never lines up with segment or
	// buffer sizes and a misplaced segment shows as a mismatch.
	period = 65521
	ioSize = 128 << 10
	port   = 5201
	mtu    = 1420
)

var addrs = [2]netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")}

func die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "nsbench: "+format+"\n", args...)
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
		die("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// node is one side: a dialer and a listener on its userspace stack.
type node struct {
	dial   func(ctx context.Context, to netip.AddrPort) (net.Conn, error)
	listen func(at netip.AddrPort) (net.Listener, error)
	close  func()
}

// meshvpnPair is two libmeshvpn engines, peers of each other on loopback,
// each with a Netstack.
func meshvpnPair() [2]node {
	var keys [2]meshvpn.Key
	var engines [2]*meshvpn.Engine
	for i := range engines {
		k, err := meshvpn.GenerateKey()
		if err != nil {
			die("key: %v", err)
		}
		keys[i] = k
		engines[i], err = meshvpn.New(meshvpn.Config{
			PrivateKey: &keys[i],
			Addresses:  []netip.Prefix{netip.PrefixFrom(addrs[i], 32)},
		})
		if err != nil {
			die("engine: %v", err)
		}
	}
	var nodes [2]node
	for i, e := range engines {
		other := engines[1-i]
		p, err := other.ListenPort()
		if err != nil {
			die("listen port: %v", err)
		}
		if err := e.AddPeer(meshvpn.PeerConfig{
			PublicKey:  keys[1-i].PublicKey(),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(addrs[1-i], 32)},
			Endpoint:   fmt.Sprintf("127.0.0.1:%d", p),
		}); err != nil {
			die("add peer: %v", err)
		}
		ns, err := e.NewNetstack(nil)
		if err != nil {
			die("netstack: %v", err)
		}
		nodes[i] = node{
			dial: func(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
				return ns.DialContext(ctx, "tcp", to.String())
			},
			listen: func(at netip.AddrPort) (net.Listener, error) { return ns.Listen("tcp", at.String()) },
			close:  func() { ns.Close(); e.Close() },
		}
	}
	return nodes
}

// gvisorPair is two wireguard-go devices, peers of each other on loopback,
// each on a gVisor netstack TUN.
func gvisorPair() [2]node {
	var keys [2]meshvpn.Key
	var devs [2]*device.Device
	var nets [2]*netstack.Net
	var ports [2]int
	for i := range devs {
		k, err := meshvpn.GenerateKey()
		if err != nil {
			die("key: %v", err)
		}
		keys[i] = k
		tun, tnet, err := netstack.CreateNetTUN([]netip.Addr{addrs[i]}, nil, mtu)
		if err != nil {
			die("gVisor TUN: %v", err)
		}
		nets[i] = tnet
		devs[i] = device.NewDevice(tun, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "wireguard-go: "))
		if err := devs[i].IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", k.Hex())); err != nil {
			die("wireguard-go config: %v", err)
		}
		if err := devs[i].Up(); err != nil {
			die("wireguard-go up: %v", err)
		}
		get, err := devs[i].IpcGet()
		if err != nil {
			die("wireguard-go get: %v", err)
		}
		for _, line := range strings.Split(get, "\n") {
			if v, ok := strings.CutPrefix(line, "listen_port="); ok {
				fmt.Sscan(v, &ports[i])
			}
		}
		if ports[i] == 0 {
			die("no listen_port in wireguard-go's reply:\n%s", get)
		}
	}
	var nodes [2]node
	for i, d := range devs {
		j := 1 - i
		if err := d.IpcSet(fmt.Sprintf("public_key=%s\nallowed_ip=%s/32\nendpoint=127.0.0.1:%d\n",
			keys[j].PublicKey().Hex(), addrs[j], ports[j])); err != nil {
			die("wireguard-go peer: %v", err)
		}
		tnet := nets[i]
		nodes[i] = node{
			dial: func(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
				return tnet.DialContextTCPAddrPort(ctx, to)
			},
			listen: func(at netip.AddrPort) (net.Listener, error) { return tnet.ListenTCPAddrPort(at) },
			close:  d.Close,
		}
	}
	return nodes
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

func main() {
	variant := flag.String("variant", "", "meshvpn (the Go binding) or gvisor (wireguard-go's netstack)")
	streams := flag.Uint64("streams", 1, "TCP streams, 1..64")
	total := flag.Uint64("bytes", 1<<30, "bytes moved in all, split evenly between the streams")
	timeout := flag.Int("timeout", 300, "seconds the whole transfer may take")
	flag.Parse()
	if *streams == 0 || *streams > 64 || *total < *streams {
		die("-streams takes 1..64 and -bytes at least one per stream")
	}
	var nodes [2]node
	switch *variant {
	case "meshvpn":
		nodes = meshvpnPair()
	case "gvisor":
		nodes = gvisorPair()
	default:
		die("-variant takes meshvpn or gvisor")
	}
	defer nodes[0].close()
	defer nodes[1].close()
	per := *total / *streams
	deadline := time.Now().Add(time.Duration(*timeout) * time.Second)
	// Past the deadline a blocked read or write fails, so the run fails
	// instead of hanging.
	stop := time.AfterFunc(time.Until(deadline)+5*time.Second, func() { die("timed out after %d s", *timeout) })
	defer stop.Stop()

	to := netip.AddrPortFrom(addrs[1], port)
	l, err := nodes[1].listen(to)
	if err != nil {
		die("listen: %v", err)
	}
	defer l.Close()
	var tx, rx []net.Conn
	for i := uint64(0); i < *streams; i++ {
		// The first dial also waits for the handshake.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := nodes[0].dial(ctx, to)
		cancel()
		if err != nil {
			die("dial %d: %v", i, err)
		}
		a, err := l.Accept()
		if err != nil {
			die("accept %d: %v", i, err)
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
			n, err := receive(c, *streams, per)
			got <- result{n, err}
		}()
	}
	var moved uint64
	for range rx {
		r := <-got
		if r.err != nil {
			die("%v", r.err)
		}
		moved += r.n
	}
	for range tx {
		if err := <-sendErr; err != nil {
			die("%v", err)
		}
	}
	secs := time.Since(t0).Seconds()
	cpu := cpuSeconds() - cpu0
	if moved != per**streams {
		die("moved %d bytes, expected %d", moved, per**streams)
	}
	for _, c := range append(tx, rx...) {
		c.Close()
	}
	fmt.Printf("RESULT variant=%s streams=%d bytes=%d secs=%.3f cpu_s=%.2f\n", *variant, *streams, moved, secs, cpu)
}
