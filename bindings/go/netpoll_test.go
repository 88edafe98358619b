package meshvpn

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// throughNetpoller makes every blocking call of a socket with wait
// descriptors park in Go's netpoller for the rest of the test.
func throughNetpoller(t *testing.T) {
	netpollOnly.Store(true)
	t.Cleanup(func() { netpollOnly.Store(false) })
}

// The deadline, close and wake semantics hold when every call parks in
// the netpoller instead of blocking in the library.
func TestSocketSemanticsThroughTheNetpoller(t *testing.T) {
	throughNetpoller(t)
	t.Run("Deadlines", TestDeadlines)
	t.Run("CloseWhileBlocked", TestCloseWhileBlockedAndUseAfterClose)
	t.Run("SetDeadlineWakesReadAndWrite", TestSetDeadlineWakesABlockedReadAndWriteTogether)
	t.Run("UDPEcho", TestUDPEchoAndPing)
	t.Run("HTTP", TestHTTPOverTheMesh)
	t.Run("EngineClose", TestEngineCloseWakesNetstackCalls)
}

// osThreads is the process's thread count (Linux).
func osThreads(t *testing.T) int {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads: line in /proc/self/status")
	return 0
}

// Reads waiting on many idle connections hold no thread each: past
// blockingCalls they park in the netpoller, and data still wakes every
// one of them.
func TestManyBlockedReadsHoldNoThreads(t *testing.T) {
	const conns = 300
	a, b := pair(t)
	na, err := a.e.NewNetstack(&NetstackOptions{MaxSockets: 2 * conns})
	if err != nil {
		t.Fatal(err)
	}
	defer na.Close()
	nb, err := b.e.NewNetstack(&NetstackOptions{MaxSockets: 2 * conns})
	if err != nil {
		t.Fatal(err)
	}
	defer nb.Close()
	l, err := nb.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr := netip.AddrPortFrom(b.addr, uint16(l.Addr().(*net.TCPAddr).Port)).String()
	clients := make([]net.Conn, conns)
	servers := make([]net.Conn, conns)
	for i := range clients {
		if clients[i], err = na.Dial("tcp", addr); err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		defer clients[i].Close()
		if servers[i], err = l.Accept(); err != nil {
			t.Fatalf("accept %d: %v", i, err)
		}
		defer servers[i].Close()
	}
	before := osThreads(t)
	type result struct {
		i   int
		got []byte
		err error
	}
	results := make(chan result, conns)
	for i, c := range clients {
		go func() {
			c.SetReadDeadline(time.Now().Add(60 * time.Second))
			buf := make([]byte, 16)
			n, err := c.Read(buf)
			results <- result{i, buf[:n], err}
		}()
		// One at a time: a burst of goroutines making cgo calls at once
		// makes the runtime start threads for a moment (sysmon hands
		// their Ps off), which would hide what waiting costs.
		time.Sleep(2 * time.Millisecond)
	}
	// Let every read start and find nothing.
	time.Sleep(500 * time.Millisecond)
	if during := osThreads(t); during-before > 50 {
		t.Fatalf("%d reads waiting took %d threads (%d before, %d during)", conns, during-before, before, during)
	} else {
		t.Logf("%d reads waiting: %d threads before, %d during", conns, before, during)
	}
	for i, s := range servers {
		if _, err := s.Write([]byte(strconv.Itoa(i))); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	for range conns {
		select {
		case r := <-results:
			if r.err != nil || !bytes.Equal(r.got, []byte(strconv.Itoa(r.i))) {
				t.Fatalf("read %d: %q, %v", r.i, r.got, r.err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a parked read was never woken")
		}
	}
}
