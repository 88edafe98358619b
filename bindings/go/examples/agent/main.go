// Command agent joins a WireGuard mesh from a wg-quick config file and
// serves HTTP on its mesh address, entirely in userspace: no TUN device,
// no kernel module, no root. It is the shape of a k3s node agent that
// embeds libmeshvpn.
//
//	agent -config /etc/meshvpn/node.conf -listen :8080
//
// Every other node of the mesh (wireguard-go, the kernel, another agent)
// then reaches it with `curl http://<Address>:8080/`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	meshvpn "github.com/meshvpn/libmeshvpn/bindings/go"
)

func main() {
	config := flag.String("config", "", "wg-quick config file ([Interface] with PrivateKey and Address, [Peer] sections)")
	listen := flag.String("listen", ":8080", "TCP address to serve HTTP on, on the mesh addresses")
	verbose := flag.Bool("v", false, "log the engine's debug messages")
	flag.Parse()
	if *config == "" {
		fmt.Fprintln(os.Stderr, "usage: agent -config FILE [-listen :8080] [-v]")
		os.Exit(2)
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if err := run(log, *config, *listen); err != nil {
		log.Error("agent failed", "err", err)
		os.Exit(1)
	}
}

func run(log *slog.Logger, configPath, listen string) error {
	text, err := os.ReadFile(configPath)
	if err != nil {
		return err
	}
	if err := meshvpn.SetLogger(log); err != nil && !errors.Is(err, meshvpn.ErrLogUnavailable) {
		return err
	}
	engine, err := meshvpn.NewFromWgQuick(string(text))
	if err != nil {
		return fmt.Errorf("%s: %w", configPath, err)
	}
	defer engine.Close()
	ns, err := engine.NewNetstack(nil)
	if err != nil {
		return fmt.Errorf("userspace stack (does the config have an Address?): %w", err)
	}
	defer ns.Close()
	l, err := ns.Listen("tcp", listen)
	if err != nil {
		return err
	}
	pub, _ := engine.PublicKey()
	port, _ := engine.ListenPort()
	log.Info("joined the mesh", "public_key", pub.String(), "udp_port", port, "http", l.Addr().String())

	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s over the mesh; you are %s\n", r.Host, r.RemoteAddr)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down")
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(shutdown)
}
