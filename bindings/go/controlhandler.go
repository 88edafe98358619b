package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <meshvpn.h>
import "C"

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"syscall"
)

// ControlPath is the path nodes connect to (wss://HOST:PORT/v1-meshvpn/control):
// where to mount ControlServer.Handler.
const ControlPath = "/v1-meshvpn/control"

// controlExporterLabel is the TLS exporter label nodes bind their key
// proof to (control/src/proto.rs EXPORTER_LABEL; the C function's doc).
const controlExporterLabel = "EXPORTER-meshvpn-control-v1"

// Handler returns the control server as an http.Handler, for a host that
// serves HTTPS from its own router (k3s serves its tunnel from its own Go
// router on 6443): mount it at ControlPath. It serves the same protocol,
// sessions and caps (MaxSessions, MaxSessionsPerSource, counted by
// r.RemoteAddr) as a TunnelServer with TunnelServerConfig.Control.
//
// For each websocket upgrade it hijacks the connection and hands the
// library one end of a socketpair with the request head, r.RemoteAddr
// (offered to the other nodes as an endpoint of the node: behind a proxy
// that rewrites RemoteAddr, that is what they get) and the TLS session's
// exporter value (nodes bind their key proof to the TLS session, which
// this server ends); it then copies bytes between the connection and the
// socketpair until either side ends, and closes both. Close ends every
// session served this way.
//
// Answers of its own: 404 for another path; 505 for HTTP/2 (a websocket
// upgrade needs HTTP/1.1; nodes offer only http/1.1 in ALPN, so a server
// with HTTP/2 enabled still answers them over HTTP/1.1); 426 for a request that is not a websocket upgrade; 400
// without TLS (the key proof needs a TLS session); 503 after Close. Over a
// cap the library answers 503 on the connection, as on its own listener.
func (s *ControlServer) Handler() http.Handler { return controlHandler{s} }

type controlHandler struct{ s *ControlServer }

// headerHas says whether the comma-separated header name lists token (case
// insensitive), as RFC 6455 wants Connection and Upgrade read.
func headerHas(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func (c controlHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != ControlPath {
		http.NotFound(w, r)
		return
	}
	if r.ProtoMajor != 1 {
		http.Error(w, "the meshvpn control protocol is a websocket upgrade, which needs HTTP/1.1; this request came over "+r.Proto, http.StatusHTTPVersionNotSupported)
		return
	}
	if r.Method != http.MethodGet || !headerHas(r.Header, "Connection", "upgrade") || !headerHas(r.Header, "Upgrade", "websocket") {
		w.Header().Set("Upgrade", "websocket")
		w.Header().Set("Connection", "Upgrade")
		http.Error(w, "the meshvpn control protocol: a websocket upgrade (GET with Connection: Upgrade and Upgrade: websocket) is required", http.StatusUpgradeRequired)
		return
	}
	if r.TLS == nil {
		http.Error(w, "the meshvpn control protocol needs TLS: nodes bind their key proof to the TLS session", http.StatusBadRequest)
		return
	}
	remote, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		http.Error(w, "cannot tell the client's address: "+r.RemoteAddr, http.StatusInternalServerError)
		return
	}
	// The library parses ADDRESS:PORT; a zone name means nothing there.
	remote = netip.AddrPortFrom(remote.Addr().WithZone(""), remote.Port())
	exporter, err := r.TLS.ExportKeyingMaterial(controlExporterLabel, nil, C.MESHVPN_CONTROL_EXPORTER_LEN)
	if err != nil {
		http.Error(w, "TLS exporter: "+err.Error(), http.StatusInternalServerError)
		return
	}
	if c.s.h.load() == 0 {
		http.Error(w, "the control server was closed", http.StatusServiceUnavailable)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "this server's connections cannot be hijacked", http.StatusInternalServerError)
		return
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		http.Error(w, "socketpair: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	ours, err := fileConn(fds[0])
	if err != nil {
		syscall.Close(fds[1])
		http.Error(w, "socketpair: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		ours.Close()
		syscall.Close(fds[1])
		return
	}
	// The request as the client sent it, for the library's websocket
	// handshake (Sec-WebSocket-Key and the rest of the headers).
	var head bytes.Buffer
	fmt.Fprintf(&head, "GET %s HTTP/1.1\r\nHost: %s\r\n", ControlPath, r.Host)
	_ = r.Header.Write(&head)
	head.WriteString("\r\n")
	var a arena
	headC, headLen := a.bytes(head.Bytes())
	remoteC := a.str(remote.String())
	exporterC, _ := a.bytes(exporter)
	handed := false
	// Over a cap, or on a bad head, the library has answered on its end
	// (or closed it); the copy below relays that and ends.
	_ = c.s.do("ControlServer.Handler", func(h *C.meshvpn_control_server) C.meshvpn_result {
		handed = true
		return C.meshvpn_control_server_serve_conn(h, C.int(fds[1]), headC, headLen, remoteC, exporterC)
	})
	a.free()
	if !handed {
		// Closed in between: the library never owned fds[1].
		syscall.Close(fds[1])
		ours.Close()
		_, _ = io.WriteString(conn, "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
		conn.Close()
		return
	}
	go relayHijacked(conn, brw.Reader, ours)
}

// fileConn makes a net.Conn of a socket descriptor (closing the descriptor:
// net.FileConn works on a copy).
func fileConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "meshvpn-control")
	defer f.Close()
	return net.FileConn(f)
}

// relayHijacked copies between the client's connection (what its reader
// buffered first) and the library's socketpair end until either side
// ends, then closes both.
func relayHijacked(conn net.Conn, buffered interface {
	io.Reader
	Buffered() int
}, ours net.Conn) {
	done := make(chan struct{}, 2)
	go func() {
		if n := buffered.Buffered(); n > 0 {
			_, _ = io.CopyN(ours, buffered, int64(n))
		}
		_, _ = io.Copy(ours, conn)
		done <- struct{}{}
	}()
	go func() {
		_, _ = io.Copy(conn, ours)
		done <- struct{}{}
	}()
	<-done
	conn.Close()
	ours.Close()
	<-done
}
