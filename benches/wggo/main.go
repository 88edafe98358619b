// Command wggo runs current wireguard-go (the Go module, with its UDP
// GSO/GRO and TUN offloads) on one interface, configured over the UAPI
// socket with `wg`, like Debian's wireguard-go binary. benches/compare.sh
// builds it as a second, current baseline.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: wggo IFNAME (runs in the foreground)")
		os.Exit(2)
	}
	name := os.Args[1]
	dev, err := tun.CreateTUN(name, device.DefaultMTU)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot create TUN %s: %v\n", name, err)
		os.Exit(1)
	}
	logger := device.NewLogger(device.LogLevelError, "("+name+") ")
	d := device.NewDevice(dev, conn.NewDefaultBind(), logger)
	file, err := ipc.UAPIOpen(name)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot open the UAPI socket: %v\n", err)
		os.Exit(1)
	}
	uapi, err := ipc.UAPIListen(name, file)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot listen on the UAPI socket: %v\n", err)
		os.Exit(1)
	}
	go func() {
		for {
			c, err := uapi.Accept()
			if err != nil {
				return
			}
			go d.IpcHandle(c)
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case <-d.Wait():
	}
	uapi.Close()
	d.Close()
}
