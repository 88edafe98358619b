// Command flanneld is flannel v0.28.10's own daemon, linked for the test
// suite from flannel's packages: its etcd subnet manager, its backend
// manager and its "extension" backend, wired the way flannel's main.go
// wires them (newSubnetManager, getConfig, LookupExtIface,
// backend.NewManager, RegisterNetwork, HandleSubnetFile, bn.Run,
// CompleteLease). flannel's own main package cannot be built here: it
// imports every backend, one of which pulls a cloud SDK module the module
// proxy does not serve. Only the "extension" backend is linked, and the
// traffic manager (iptables/nftables masquerade) is left out: the suite runs
// flannel with ipMasq off, where main.go only uses it to clean up rules.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/flannel-io/flannel/pkg/backend"
	_ "github.com/flannel-io/flannel/pkg/backend/extension"
	"github.com/flannel-io/flannel/pkg/ip"
	"github.com/flannel-io/flannel/pkg/ipmatch"
	"github.com/flannel-io/flannel/pkg/subnet"
	etcd "github.com/flannel-io/flannel/pkg/subnet/etcd"
	"github.com/joho/godotenv"
	log "k8s.io/klog/v2"
)

func main() {
	endpoints := flag.String("etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd endpoints")
	prefix := flag.String("etcd-prefix", "/coreos.com/network", "etcd prefix")
	iface := flag.String("iface", "", "interface (name or IP) to use for the public IP")
	publicIP := flag.String("public-ip", "", "IP announced to the other nodes")
	subnetFile := flag.String("subnet-file", "/run/flannel/subnet.env", "subnet file")
	renewMargin := flag.Int("subnet-lease-renew-margin", 60, "minutes before lease expiry to renew")
	flag.Parse()

	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; cancel() }()

	cfg := &etcd.EtcdConfig{Endpoints: strings.Split(*endpoints, ","), Prefix: *prefix}
	prevSubnet := readCIDR(*subnetFile, "FLANNEL_SUBNET")
	sm, err := etcd.NewLocalManager(ctx, cfg, prevSubnet, ip.IP6Net{}, *renewMargin)
	if err != nil {
		log.Error("Failed to create SubnetManager: ", err)
		os.Exit(1)
	}

	var config *subnet.Config
	for config == nil {
		config, err = sm.GetNetworkConfig(ctx)
		if err != nil || config == nil {
			log.Errorf("Couldn't fetch network config: %v", err)
			select {
			case <-ctx.Done():
				os.Exit(0)
			case <-time.After(time.Second):
			}
		}
	}
	ipStack, err := ipmatch.GetIPFamily(config.EnableIPv4, config.EnableIPv6)
	if err != nil {
		log.Error(err)
		os.Exit(1)
	}
	extIface, err := ipmatch.LookupExtIface(*iface, "", "", ipStack, ipmatch.PublicIPOpts{PublicIP: *publicIP})
	if err != nil {
		log.Error("Failed to find any valid interface to use: ", err)
		os.Exit(1)
	}

	wg := sync.WaitGroup{}
	bm := backend.NewManager(ctx, sm, extIface)
	be, err := bm.GetBackend(config.BackendType)
	if err != nil {
		log.Errorf("Error fetching backend: %s", err)
		os.Exit(1)
	}
	bn, err := be.RegisterNetwork(ctx, &wg, config)
	if err != nil {
		log.Errorf("Error registering network: %s", err)
		os.Exit(1)
	}
	if err := sm.HandleSubnetFile(*subnetFile, config, false, bn.Lease().Subnet, bn.Lease().IPv6Subnet, bn.MTU()); err != nil {
		log.Warningf("Failed to write subnet file: %s", err)
	} else {
		log.Info("flannel is ready")
	}
	wg.Add(1)
	go func() { bn.Run(ctx); wg.Done() }()
	if err := sm.CompleteLease(ctx, bn.Lease(), &wg); err != nil {
		log.Errorf("CompleteLease execute error err: %v", err)
		cancel()
	}
	wg.Wait()
	log.Info("Exiting cleanly...")
}

// readCIDR is main.go's ReadCIDRFromSubnetFile: a restarted flanneld asks
// for the subnet it had.
func readCIDR(path, key string) ip.IP4Net {
	vals, err := godotenv.Read(path)
	if err != nil {
		return ip.IP4Net{}
	}
	var n ip.IP4Net
	if s, ok := vals[key]; ok && n.UnmarshalJSON([]byte(`"`+s+`"`)) == nil {
		return n
	}
	return ip.IP4Net{}
}
