// Command tunnelbench is the Go half of benches/tunnel_compare.sh: it makes
// certificates, runs a byte source, runs a Go remotedialer server and client
// pair (both Go ends) with a local forward, and measures throughput.
//
//	tunnelbench certs -dir DIR
//	tunnelbench freeport
//	tunnelbench source -listen ADDR
//	tunnelbench gopair -listen ADDR -forward ADDR -target ADDR
//	tunnelbench load -addr ADDR -streams N -bytes PER_STREAM
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/meshvpn/libmeshvpn/bindings/go/interop/internal/rdtest"
)

func die(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "tunnelbench: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		die("usage: tunnelbench certs|freeport|source|gopair|load ...")
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	dir := fs.String("dir", ".", "certs: output directory")
	listen := fs.String("listen", "127.0.0.1:0", "listen address")
	forward := fs.String("forward", "", "gopair: local forward address")
	target := fs.String("target", "", "gopair: target dialed through the tunnel")
	addr := fs.String("addr", "", "load: address to connect to")
	streams := fs.Int("streams", 1, "load: concurrent streams")
	size := fs.Int64("bytes", 64<<20, "load: bytes per stream")
	fs.Parse(os.Args[2:])
	switch os.Args[1] {
	case "certs":
		if err := rdtest.NewPKI().WriteFiles(*dir); err != nil {
			die("%v", err)
		}
	case "freeport":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			die("%v", err)
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port)
		ln.Close()
	case "source":
		source(*listen)
	case "gopair":
		gopair(*listen, *forward, *target)
	case "load":
		load(*addr, *streams, *size)
	default:
		die("unknown mode %q", os.Args[1])
	}
}

// source answers each connection's 8-byte big-endian length with that many bytes.
func source(listen string) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		die("%v", err)
	}
	fmt.Println("ready", ln.Addr())
	block := make([]byte, 256<<10)
	for i := range block {
		block[i] = byte(i * 7)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			die("%v", err)
		}
		go func() {
			defer c.Close()
			var hdr [8]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
			left := int64(binary.BigEndian.Uint64(hdr[:]))
			for left > 0 {
				n := int64(len(block))
				if left < n {
					n = left
				}
				if _, err := c.Write(block[:n]); err != nil {
					return
				}
				left -= n
			}
		}()
	}
}

// gopair runs the Go remotedialer server and client in this process, over
// TLS on loopback, with a forward listener dialing through the server.
func gopair(listen, forward, target string) {
	p := rdtest.NewPKI()
	srv, err := rdtest.StartServer(listen, p, nil)
	if err != nil {
		die("%v", err)
	}
	allow := func(proto, address string) bool { return proto == "tcp" && address == target }
	go rdtest.RunClientCert(context.Background(), "wss://"+srv.Addr+rdtest.Path, p, allow)
	if !srv.WaitSession(rdtest.NodeCN, 20*time.Second) {
		die("Go client never connected")
	}
	ln, err := net.Listen("tcp", forward)
	if err != nil {
		die("%v", err)
	}
	fmt.Println("ready", ln.Addr())
	dial := srv.RD.Dialer(rdtest.NodeCN)
	for {
		c, err := ln.Accept()
		if err != nil {
			die("%v", err)
		}
		go func() {
			defer c.Close()
			t, err := dial(context.Background(), "tcp", target)
			if err != nil {
				return
			}
			defer t.Close()
			done := make(chan struct{})
			go func() { io.Copy(t, c); t.Close(); close(done) }()
			io.Copy(c, t)
			c.Close()
			<-done
		}()
	}
}

func oneStream(addr string, size int64) error {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(size))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Minute))
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("got %d of %d bytes", n, size)
	}
	return nil
}

// load waits until a small transfer works, then runs `streams` concurrent
// transfers of `size` bytes and prints the aggregate throughput.
func load(addr string, streams int, size int64) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := oneStream(addr, 1024)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			die("tunnel at %s never worked: %v", addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, streams)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := oneStream(addr, size); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		die("stream failed: %v", err)
	}
	total := float64(size) * float64(streams)
	fmt.Printf("streams=%d bytes=%d seconds=%.3f MBps=%.1f\n", streams, int64(total), elapsed.Seconds(), total/elapsed.Seconds()/1e6)
}
