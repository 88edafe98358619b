// Package meshvpn is the Go binding of libmeshvpn: a userspace WireGuard
// engine (boringtun's protocol core) built as a Rust library with a C ABI,
// linked statically through cgo so that a Go program stays one binary.
//
// An Engine is created from a Config or from wg-quick text, runs its own
// threads, and is released with Close:
//
//	key, _ := meshvpn.GenerateKey()
//	e, err := meshvpn.New(meshvpn.Config{PrivateKey: &key, ListenPort: 51820})
//	if err != nil { ... }
//	defer e.Close()
//	err = e.AddPeer(meshvpn.PeerConfig{
//		PublicKey:  peerKey,
//		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.42.1.0/24")},
//		Endpoint:   "192.0.2.7:51820",
//	})
//
// Inner IP packets go in with SendPacket/SendPackets and come out with
// ReadPackets (the packet API); every call is safe for concurrent use.
//
// Errors are *Error values that wrap a Result code: test them with
// errors.Is(err, meshvpn.ErrNoRoute), errors.Is(err, net.ErrClosed) (after
// Close), or errors.Is(err, os.ErrDeadlineExceeded) (a read timeout).
//
// A ControlServer is the mesh's coordination (join keys, nodes, routes,
// the ACL policy) embedded in the program, served on a TunnelServer's port
// through TunnelServerConfig.Control, next to the k3s tunnel and the
// relay (see README.md and docs/control.md).
//
// Join(ctx, JoinConfig{ControlURL, JoinKey, ...}) makes this program a
// node of a mesh run by a control server (`meshvpn control serve`): its
// Node has the Engine, a Netstack in userspace mode, Status and Events
// (pushed by the library through a callback into a bounded channel that
// drops its oldest event when nobody reads; see Node.Events).
//
// A Netstack dials TCP (Dial, DialContext) and UDP (DialUDP, or Dial with
// "udp": a connected *UDPConn, a net.Conn that reports an ICMP refusal as
// an error matching syscall.ECONNREFUSED), listens (Listen,
// ListenPacket) and pings.
//
// Building: see README.md. By default the package links
// bindings/go/lib/libmeshvpn.a, made by `make -C bindings/go lib`, and the
// header include/meshvpn.h of the repository; with -tags meshvpn_pkgconfig
// it uses an installed library found by pkg-config.
package meshvpn
