#!/usr/bin/env bash
# Side by side in the same 3-node flannel topology (real flanneld, etcd,
# pods behind cni0, extension backend configured by `meshvpn flannel ...`):
# meshvpn, Debian wireguard-go and current wireguard-go (benches/wggo).
# Pod-to-pod iperf3 TCP 1 and 4 flows, ping idle and loaded; one table.
# The topology lives in cli/tests/netns/flannel.sh (its --bench mode).
# Needs what that suite needs (root, etcd, go, iperf3, wireguard-go).
exec bash "$(dirname "$0")/../cli/tests/netns/flannel.sh" --bench "$@"
