// Package rdtest has the pieces the interop tests and the benchmark share:
// an in-memory PKI, a Go remotedialer server on a TLS listener that can be
// stopped with its websockets, and a Go remotedialer client loop.
package rdtest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/rancher/remotedialer"
)

// Path is where k3s mounts the tunnel.
const Path = "/v1-k3s/connect"

// NodeCN is the client certificate's CN, the client key of a k3s node.
const NodeCN = "system:node:agent1"

// PKI is a CA, a server certificate for 127.0.0.1/localhost and a client certificate.
type PKI struct {
	CAPool               *x509.CertPool
	Server, Client       tls.Certificate
	CAPEM                []byte
	ServerPEM, ServerKey []byte
	ClientPEM, ClientKey []byte
}

func mustKey() *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return k
}

func pemBlock(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}

func keyPEM(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err)
	}
	return pemBlock("PRIVATE KEY", der)
}

// NewPKI makes fresh certificates.
func NewPKI() *PKI {
	now := time.Now()
	caKey := mustKey()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "interop CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		panic(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, subject pkix.Name, usage x509.ExtKeyUsage, server bool) ([]byte, *ecdsa.PrivateKey) {
		k := mustKey()
		t := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: subject,
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		}
		if server {
			t.DNSNames = []string{"localhost"}
			t.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
		der, err := x509.CreateCertificate(rand.Reader, t, ca, &k.PublicKey, caKey)
		if err != nil {
			panic(err)
		}
		return der, k
	}
	sDER, sKey := issue(2, pkix.Name{CommonName: "localhost"}, x509.ExtKeyUsageServerAuth, true)
	cDER, cKey := issue(3, pkix.Name{CommonName: NodeCN, Organization: []string{"system:nodes"}}, x509.ExtKeyUsageClientAuth, false)
	p := &PKI{
		CAPool: x509.NewCertPool(), CAPEM: pemBlock("CERTIFICATE", caDER),
		ServerPEM: pemBlock("CERTIFICATE", sDER), ServerKey: keyPEM(sKey),
		ClientPEM: pemBlock("CERTIFICATE", cDER), ClientKey: keyPEM(cKey),
	}
	p.CAPool.AddCert(ca)
	if p.Server, err = tls.X509KeyPair(p.ServerPEM, p.ServerKey); err != nil {
		panic(err)
	}
	if p.Client, err = tls.X509KeyPair(p.ClientPEM, p.ClientKey); err != nil {
		panic(err)
	}
	return p
}

// WriteFiles writes ca.pem, server.pem, server.key, client.pem, client.key into dir.
func (p *PKI) WriteFiles(dir string) error {
	for name, data := range map[string][]byte{
		"ca.pem": p.CAPEM, "server.pem": p.ServerPEM, "server.key": p.ServerKey,
		"client.pem": p.ClientPEM, "client.key": p.ClientKey,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// Server is a Go remotedialer server on a TLS listener, as k3s runs it.
type Server struct {
	RD       *remotedialer.Server
	Addr     string
	Sessions atomic.Int64 // authorized upgrades
	ln       net.Listener
	srv      *http.Server
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
}

type trackingListener struct {
	net.Listener
	s *Server
}

func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.s.mu.Lock()
		l.s.conns[c] = struct{}{}
		l.s.mu.Unlock()
	}
	return c, err
}

// StartServer listens on addr ("127.0.0.1:0" for any port). Agents
// authenticate with a client certificate (client key = CN) or with
// "Authorization: Bearer <token>" (client key = token's entry in tokens).
func StartServer(addr string, p *PKI, tokens map[string]string) (*Server, error) {
	s := &Server{conns: map[net.Conn]struct{}{}}
	auth := func(req *http.Request) (string, bool, error) {
		if h := req.Header.Get("Authorization"); strings.HasPrefix(h, "Bearer ") {
			if key, ok := tokens[strings.TrimPrefix(h, "Bearer ")]; ok {
				s.Sessions.Add(1)
				return key, true, nil
			}
		}
		if req.TLS != nil && len(req.TLS.PeerCertificates) > 0 {
			s.Sessions.Add(1)
			return req.TLS.PeerCertificates[0].Subject.CommonName, true, nil
		}
		return "", false, nil
	}
	s.RD = remotedialer.New(auth, remotedialer.DefaultErrorWriter)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s.Addr = ln.Addr().String()
	tlsConf := &tls.Config{
		Certificates: []tls.Certificate{p.Server},
		ClientCAs:    p.CAPool,
		ClientAuth:   tls.VerifyClientCertIfGiven,
	}
	s.ln = tls.NewListener(trackingListener{ln, s}, tlsConf)
	mux := http.NewServeMux()
	mux.Handle(Path, s.RD)
	s.srv = &http.Server{Handler: mux, ErrorLog: nil}
	go s.srv.Serve(s.ln)
	return s, nil
}

// Stop closes the listener and every connection, websockets included.
func (s *Server) Stop() {
	s.srv.Close()
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
}

// WaitSession waits until clientKey has a session.
func (s *Server) WaitSession(clientKey string, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if s.RD.HasSession(clientKey) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// HTTPClient returns a client whose every connection goes through clientKey's
// tunnel to target.
func (s *Server) HTTPClient(clientKey, target string) *http.Client {
	dial := s.RD.Dialer(clientKey)
	return &http.Client{
		Timeout: 60 * time.Second,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return dial(ctx, "tcp", target)
			},
		},
	}
}

// RunClient runs a Go remotedialer client against url until ctx ends,
// reconnecting like k3s does; Connects counts sessions.
func RunClient(ctx context.Context, url string, p *PKI, token string, allow func(proto, address string) bool, connects *atomic.Int64) {
	headers := http.Header{}
	if token != "" {
		headers.Set("Authorization", "Bearer "+token)
	}
	dialer := &websocket.Dialer{
		TLSClientConfig:  &tls.Config{RootCAs: p.CAPool},
		HandshakeTimeout: 10 * time.Second,
	}
	for ctx.Err() == nil {
		_ = remotedialer.ConnectToProxy(ctx, url, headers, allow, dialer, func(context.Context, *remotedialer.Session) error {
			if connects != nil {
				connects.Add(1)
			}
			return nil
		})
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// RunClientCert runs a Go remotedialer client authenticating with the node's
// client certificate, reconnecting until ctx ends.
func RunClientCert(ctx context.Context, url string, p *PKI, allow func(proto, address string) bool) {
	dialer := &websocket.Dialer{
		TLSClientConfig:  &tls.Config{RootCAs: p.CAPool, Certificates: []tls.Certificate{p.Client}},
		HandshakeTimeout: 10 * time.Second,
	}
	for ctx.Err() == nil {
		_ = remotedialer.ConnectToProxy(ctx, url, nil, allow, dialer, nil)
		select {
		case <-ctx.Done():
		case <-time.After(200 * time.Millisecond):
		}
	}
}
