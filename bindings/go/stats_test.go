package meshvpn

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// Packets waiting behind a handshake that never completes stop at the
// buffer ceiling: the rest are refused with ErrPacketDropped and counted in
// Stats.BufferLimitDrops and as DropSinkFull on their peers.
func TestSetBufferLimitDropsAndCounts(t *testing.T) {
	k, _ := GenerateKey()
	e, err := New(Config{PrivateKey: &k, Addresses: []netip.Prefix{netip.MustParsePrefix("10.77.0.1/24")}})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	// Peers that never answer: a bound socket nobody reads.
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var peers []Key
	for i := range 4 {
		pk, _ := GenerateKey()
		peers = append(peers, pk.PublicKey())
		err := e.AddPeer(PeerConfig{
			PublicKey:  pk.PublicKey(),
			AllowedIPs: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, 0, byte(10 + i)}), 32)},
			Endpoint:   silent.LocalAddr().String(),
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if limit, err := e.BufferLimit(); err != nil || limit != DefaultBufferLimit {
		t.Fatalf("default buffer limit %d, %v", limit, err)
	}
	if err := e.SetBufferLimit(20000); err != nil {
		t.Fatal(err)
	}
	if limit, err := e.BufferLimit(); err != nil || limit != 20000 {
		t.Fatalf("buffer limit %d after setting 20000, %v", limit, err)
	}
	if err := e.SetBufferLimit(-1); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("negative limit: %v", err)
	}

	src := netip.MustParseAddr("10.77.0.1")
	dropped := 0
	for i := range 200 {
		dst := netip.AddrFrom4([4]byte{10, 77, 0, byte(10 + i%4)})
		switch err := e.SendPacket(udpPacket(src, dst, 1000, byte(i))); {
		case err == nil:
		case errors.Is(err, ErrPacketDropped):
			dropped++
		default:
			t.Fatalf("packet %d: %v", i, err)
		}
	}
	if dropped != 180 {
		t.Fatalf("%d of 200 packets dropped at 20000 bytes, want 180", dropped)
	}
	s, err := e.Stats()
	if err != nil || s.BufferLimitDrops != 180 || s.UDPSendDropped != 0 {
		t.Fatalf("stats %+v, %v", s, err)
	}
	var sinkFull uint64
	for _, p := range peers {
		ps, err := e.PeerStats(p)
		if err != nil {
			t.Fatal(err)
		}
		sinkFull += ps.Drops[DropSinkFull]
		if ps.Drops.Total() != ps.Drops[DropSinkFull] {
			t.Fatalf("drops other than sink_full: %v", ps.Drops)
		}
		if want := fmt.Sprintf("sink_full:%d", ps.Drops[DropSinkFull]); !strings.Contains(fmt.Sprint(ps), want) {
			t.Fatalf("%v does not show %s", ps, want)
		}
	}
	if sinkFull != 180 {
		t.Fatalf("sink_full drops %d, want 180", sinkFull)
	}
	e.Close()
	if err := e.SetBufferLimit(1000); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after Close: %v", err)
	}
}

// Drop reasons print by name, the names C and Rust use.
func TestDropReasonsPrintByName(t *testing.T) {
	for r, want := range map[DropReason]string{
		DropNoEndpoint:       "no_endpoint",
		DropSourceNotAllowed: "source_not_allowed",
		DropSinkFull:         "sink_full",
		DropOversized:        "oversized",
		DropReason(15):       "DropReason(15)",
		DropReason(-1):       "DropReason(-1)",
	} {
		if got := r.String(); got != want {
			t.Errorf("%d prints %q, want %q", int(r), got, want)
		}
	}
	var d Drops
	d[DropReplay] = 3
	d[DropSinkFull] = 7
	d[14] = 2 // a reason newer than this binding
	got := fmt.Sprint(d)
	t.Logf("fmt.Sprint(drops) = %s", got)
	for _, want := range []string{"replay:3", "sink_full:7", "no_endpoint:0", "oversized:0", "DropReason(14):2"} {
		if !strings.Contains(got, want) {
			t.Errorf("fmt.Sprint(drops) = %s, lacks %s", got, want)
		}
	}
	if strings.Contains(got, "DropReason(13)") {
		t.Errorf("unused empty slots printed: %s", got)
	}
	if d.Total() != 12 {
		t.Errorf("Total %d, want 12", d.Total())
	}
	if !strings.Contains(fmt.Sprintf("%+v", PeerStats{Drops: d}), "Drops:{no_endpoint:0 ") {
		t.Errorf("PeerStats prints drops as %+v", PeerStats{Drops: d})
	}
}
