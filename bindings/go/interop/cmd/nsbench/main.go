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
//	        [-tcp-buffer BYTES]
//
// -tcp-buffer sets both TCP buffers of libmeshvpn's stacks (meshvpn
// variant only; netstack_xfer's --tcp-buffer); 0 keeps the default.
//
// The transfer, its byte check and its RESULT line are package nsxfer's,
// shared with cmd/tsnetbench.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	meshvpn "github.com/meshvpn/libmeshvpn/bindings/go"
	"github.com/meshvpn/libmeshvpn/bindings/go/interop/nsxfer"
)

const mtu = 1420

var addrs = [2]netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")}

// meshvpnPair is two libmeshvpn engines, peers of each other on loopback,
// each with a Netstack.
func meshvpnPair(tcpBuffer int) [2]nsxfer.Node {
	var keys [2]meshvpn.Key
	var engines [2]*meshvpn.Engine
	for i := range engines {
		k, err := meshvpn.GenerateKey()
		if err != nil {
			nsxfer.Die("key: %v", err)
		}
		keys[i] = k
		engines[i], err = meshvpn.New(meshvpn.Config{
			PrivateKey: &keys[i],
			Addresses:  []netip.Prefix{netip.PrefixFrom(addrs[i], 32)},
		})
		if err != nil {
			nsxfer.Die("engine: %v", err)
		}
	}
	var nodes [2]nsxfer.Node
	for i, e := range engines {
		other := engines[1-i]
		p, err := other.ListenPort()
		if err != nil {
			nsxfer.Die("listen port: %v", err)
		}
		if err := e.AddPeer(meshvpn.PeerConfig{
			PublicKey:  keys[1-i].PublicKey(),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(addrs[1-i], 32)},
			Endpoint:   fmt.Sprintf("127.0.0.1:%d", p),
		}); err != nil {
			nsxfer.Die("add peer: %v", err)
		}
		ns, err := e.NewNetstack(&meshvpn.NetstackOptions{TCPRxBuffer: tcpBuffer, TCPTxBuffer: tcpBuffer})
		if err != nil {
			nsxfer.Die("netstack: %v", err)
		}
		nodes[i] = nsxfer.Node{
			Dial: func(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
				return ns.DialContext(ctx, "tcp", to.String())
			},
			Listen: func(at netip.AddrPort) (net.Listener, error) { return ns.Listen("tcp", at.String()) },
			Close:  func() { ns.Close(); e.Close() },
		}
	}
	return nodes
}

// gvisorPair is two wireguard-go devices, peers of each other on loopback,
// each on a gVisor netstack TUN.
func gvisorPair() [2]nsxfer.Node {
	var keys [2]meshvpn.Key
	var devs [2]*device.Device
	var nets [2]*netstack.Net
	var ports [2]int
	for i := range devs {
		k, err := meshvpn.GenerateKey()
		if err != nil {
			nsxfer.Die("key: %v", err)
		}
		keys[i] = k
		tun, tnet, err := netstack.CreateNetTUN([]netip.Addr{addrs[i]}, nil, mtu)
		if err != nil {
			nsxfer.Die("gVisor TUN: %v", err)
		}
		nets[i] = tnet
		devs[i] = device.NewDevice(tun, conn.NewDefaultBind(), device.NewLogger(device.LogLevelError, "wireguard-go: "))
		if err := devs[i].IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", k.Hex())); err != nil {
			nsxfer.Die("wireguard-go config: %v", err)
		}
		if err := devs[i].Up(); err != nil {
			nsxfer.Die("wireguard-go up: %v", err)
		}
		get, err := devs[i].IpcGet()
		if err != nil {
			nsxfer.Die("wireguard-go get: %v", err)
		}
		for _, line := range strings.Split(get, "\n") {
			if v, ok := strings.CutPrefix(line, "listen_port="); ok {
				fmt.Sscan(v, &ports[i])
			}
		}
		if ports[i] == 0 {
			nsxfer.Die("no listen_port in wireguard-go's reply:\n%s", get)
		}
	}
	var nodes [2]nsxfer.Node
	for i, d := range devs {
		j := 1 - i
		if err := d.IpcSet(fmt.Sprintf("public_key=%s\nallowed_ip=%s/32\nendpoint=127.0.0.1:%d\n",
			keys[j].PublicKey().Hex(), addrs[j], ports[j])); err != nil {
			nsxfer.Die("wireguard-go peer: %v", err)
		}
		tnet := nets[i]
		nodes[i] = nsxfer.Node{
			Dial: func(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
				return tnet.DialContextTCPAddrPort(ctx, to)
			},
			Listen: func(at netip.AddrPort) (net.Listener, error) { return tnet.ListenTCPAddrPort(at) },
			Close:  d.Close,
		}
	}
	return nodes
}

func main() {
	variant := flag.String("variant", "", "meshvpn (the Go binding) or gvisor (wireguard-go's netstack)")
	streams := flag.Uint64("streams", 1, "TCP streams, 1..64")
	total := flag.Uint64("bytes", 1<<30, "bytes moved in all, split evenly between the streams")
	timeout := flag.Int("timeout", 300, "seconds the whole transfer may take")
	tcpBuffer := flag.Int("tcp-buffer", 0, "both TCP buffers of the meshvpn variant's stacks, bytes (0: the default)")
	flag.Parse()
	var nodes [2]nsxfer.Node
	switch *variant {
	case "meshvpn":
		nodes = meshvpnPair(*tcpBuffer)
	case "gvisor":
		nodes = gvisorPair()
	default:
		nsxfer.Die("-variant takes meshvpn or gvisor")
	}
	defer nodes[0].Close()
	defer nodes[1].Close()
	nsxfer.Run(*variant, nodes, netip.AddrPortFrom(addrs[1], nsxfer.Port), *streams, *total,
		time.Duration(*timeout)*time.Second, 10*time.Second)
}
