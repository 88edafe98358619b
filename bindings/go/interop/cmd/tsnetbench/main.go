// Command tsnetbench is the tsnet variant of benches/netstack_compare.sh:
// the transfer of package nsxfer (N TCP streams, every byte verified,
// byte for byte what cmd/nsbench and the Rust netstack_xfer send) between
// two Tailscale tsnet.Server nodes in this one process, each with its own
// gVisor netstack and magicsock, joined to a control server the caller
// runs (the script starts headscale on loopback).
//
//	tsnetbench -control URL -authkey KEY -dir DIR [-streams N] [-bytes TOTAL]
//	           [-timeout SECONDS] [-path-wait SECONDS] [-v]
//
// Before the transfer it waits until the sender reaches the receiver
// directly (a disco ping answered on a UDP endpoint, not through a DERP
// relay) and fails if that does not happen within -path-wait; after it, it
// checks the path again and fails if it changed. After nsxfer's RESULT
// line (variant=tsnet) it prints the path both times:
//
//	PATH before=direct:127.0.0.1:41641 after=direct:127.0.0.1:41641
//
// The nodes only advertise what the control server's STUN reports
// (TS_DEBUG_OMIT_LOCAL_ADDRS), so with a control server on loopback their
// endpoints are loopback ones; DERP, if the control server offers one, is
// spoken over plain HTTP (TS_DEBUG_USE_DERP_HTTP); log upload
// (TS_NO_LOGS_NO_SUPPORT), port mapping (TS_DISABLE_PORTMAPPER) and DNS
// (captive portal detection looks up tailscale.com names) are off, so
// nothing leaves loopback.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/meshvpn/libmeshvpn/bindings/go/interop/nsxfer"
	"tailscale.com/envknob"
	"tailscale.com/logtail"
	"tailscale.com/tailcfg"
	"tailscale.com/tsnet"
)

func main() {
	control := flag.String("control", "", "control server URL (headscale)")
	authKey := flag.String("authkey", "", "reusable pre-auth key for both nodes")
	dir := flag.String("dir", "", "state directory (one subdirectory per node)")
	streams := flag.Uint64("streams", 1, "TCP streams, 1..64")
	total := flag.Uint64("bytes", 1<<30, "bytes moved in all, split evenly between the streams")
	timeout := flag.Int("timeout", 300, "seconds the whole transfer may take")
	pathWait := flag.Int("path-wait", 30, "seconds to wait for the nodes to join and reach each other directly")
	verbose := flag.Bool("v", false, "tsnet's backend logs on stderr")
	flag.Parse()
	if *control == "" || *authKey == "" || *dir == "" {
		nsxfer.Die("-control, -authkey and -dir are required")
	}
	// Before any node starts: these knobs are read when magicsock, the
	// DERP client and the logger run, and Setenv updates the registered ones.
	envknob.Setenv("TS_DEBUG_OMIT_LOCAL_ADDRS", "true")
	envknob.Setenv("TS_DEBUG_USE_DERP_HTTP", "true")
	envknob.Setenv("TS_DISABLE_PORTMAPPER", "true")
	envknob.SetNoLogsNoSupport()
	logtail.Disable()
	// Nothing here needs a name (the control URL and the DERP map hold IP
	// addresses), but captive portal detection looks up tailscale.com
	// names; no lookup leaves the process, so no packet leaves loopback.
	net.DefaultResolver = &net.Resolver{
		PreferGo: true,
		Dial: func(_ context.Context, _, server string) (net.Conn, error) {
			return nil, fmt.Errorf("tsnetbench: DNS off (a lookup tried %s)", server)
		},
	}

	backendLogf := func(string, ...any) {}
	if *verbose {
		l := log.New(os.Stderr, "", log.Lmicroseconds)
		backendLogf = l.Printf
	}
	userLog := log.New(os.Stderr, "tsnet: ", 0)
	var servers [2]*tsnet.Server
	var ips [2]netip.Addr
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*pathWait)*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range servers {
		servers[i] = &tsnet.Server{
			Dir:        filepath.Join(*dir, fmt.Sprintf("node%d", i)),
			Hostname:   fmt.Sprintf("nsb%d", i),
			ControlURL: *control,
			AuthKey:    *authKey,
			Ephemeral:  true,
			Logf:       backendLogf,
			UserLogf:   userLog.Printf,
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := servers[i].Up(ctx)
			if err != nil {
				errs[i] = fmt.Errorf("node %d up: %w", i, err)
				return
			}
			for _, ip := range st.TailscaleIPs {
				if ip.Is4() {
					ips[i] = ip
				}
			}
			if !ips[i].IsValid() {
				errs[i] = fmt.Errorf("node %d has no IPv4 address: %v", i, st.TailscaleIPs)
			}
		}()
	}
	wg.Wait()
	for _, s := range servers {
		defer s.Close()
	}
	for _, err := range errs {
		if err != nil {
			nsxfer.Die("%v", err)
		}
	}
	before, err := waitDirect(ctx, servers[0], ips[1])
	if err != nil {
		nsxfer.Die("%v", err)
	}

	var nodes [2]nsxfer.Node
	for i, s := range servers {
		nodes[i] = nsxfer.Node{
			Dial: func(ctx context.Context, to netip.AddrPort) (net.Conn, error) {
				return s.Dial(ctx, "tcp", to.String())
			},
			Listen: func(at netip.AddrPort) (net.Listener, error) { return s.Listen("tcp", at.String()) },
			Close:  func() { s.Close() },
		}
	}
	nsxfer.Run("tsnet", nodes, netip.AddrPortFrom(ips[1], nsxfer.Port), *streams, *total,
		time.Duration(*timeout)*time.Second, 10*time.Second)

	after, err := peerPath(servers[0], ips[1])
	if err != nil {
		nsxfer.Die("%v", err)
	}
	fmt.Printf("PATH before=%s after=%s\n", before, after)
	if after != before {
		nsxfer.Die("the path changed during the transfer: %s, then %s", before, after)
	}
}

// waitDirect disco-pings to from s until a pong comes back from a UDP
// endpoint rather than through DERP, and returns the path as
// "direct:ENDPOINT".
func waitDirect(ctx context.Context, s *tsnet.Server, to netip.Addr) (string, error) {
	lc, err := s.LocalClient()
	if err != nil {
		return "", err
	}
	last := "no reply"
	for {
		pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		r, err := lc.Ping(pctx, to, tailcfg.PingDisco)
		cancel()
		switch {
		case err != nil:
			last = err.Error()
		case r.Err != "":
			last = r.Err
		case r.Endpoint != "":
			return "direct:" + r.Endpoint, nil
		case r.DERPRegionID != 0:
			last = fmt.Sprintf("relayed through DERP region %d (%s)", r.DERPRegionID, r.DERPRegionCode)
		case r.PeerRelay != "":
			last = "relayed through peer relay " + r.PeerRelay
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no direct path to %v: last ping: %s", to, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// peerPath is the path s's status reports to the peer at ip:
// "direct:ADDR" or "relay:REGION".
func peerPath(s *tsnet.Server, ip netip.Addr) (string, error) {
	lc, err := s.LocalClient()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := lc.Status(ctx)
	if err != nil {
		return "", err
	}
	for _, p := range st.Peer {
		for _, a := range p.TailscaleIPs {
			if a == ip {
				if p.CurAddr != "" {
					return "direct:" + p.CurAddr, nil
				}
				return "relay:" + p.Relay, nil
			}
		}
	}
	return "", fmt.Errorf("peer %v not in the status", ip)
}
