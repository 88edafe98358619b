package meshvpn

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/cgo"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// joinNode joins s's mesh in userspace mode on loopback.
func joinNode(t *testing.T, s *controlServer, key, name string, buffer int) *Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n, err := Join(ctx, JoinConfig{
		ControlURL:  s.url,
		JoinKey:     key,
		Hostname:    name,
		Userspace:   true,
		EndpointIPs: []string{"127.0.0.1"},
		EventBuffer: buffer,
	})
	if err != nil {
		t.Fatalf("join %s: %v", name, err)
	}
	return n
}

// waitFor polls cond (bounded) for state that no event announces.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestEventsArriveByCallback: the node's events reach Events() through
// the library's callback (the sink counts its calls; with the callback not
// registered nothing arrives), including the event queued during Join.
func TestEventsArriveByCallback(t *testing.T) {
	panics := callbackPanics.Load()
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	a := joinNode(t, s, key, "a", 0)
	defer a.Close()
	waitEvent(t, a, "joined", func(e NodeEvent) bool { return e.Type == "joined" })
	b := joinNode(t, s, key, "b", 0)
	defer b.Close()
	joined := time.Now()
	waitEvent(t, a, "map_applied with b", func(e NodeEvent) bool { return e.Type == "map_applied" && e.Peers == 1 })
	t.Logf("a's map_applied arrived %v after b's Join returned", time.Since(joined))
	if got := a.sink.delivered.Load(); got < 2 {
		t.Fatalf("the callback delivered %d events, want at least joined and map_applied", got)
	}
	if p := callbackPanics.Load() - panics; p != 0 {
		t.Fatalf("%d panics in the event callback", p)
	}
}

// TestEventsSlowConsumerDoesNotBlockTheNode: nobody reads a's Events (a
// channel of 1) while b joins and the policy changes 4 times. The
// callback keeps taking every event (the library's own queue drops
// none), the channel keeps the newest and counts the others as dropped,
// and the node goes on: it applies the last policy and its engine carries
// a ping.
func TestEventsSlowConsumerDoesNotBlockTheNode(t *testing.T) {
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	a := joinNode(t, s, key, "a", 1)
	defer a.Close()
	b := joinNode(t, s, key, "b", 0)
	defer b.Close()
	const changes = 4
	dir := t.TempDir()
	for i := range changes {
		policy := filepath.Join(dir, fmt.Sprintf("policy%d.json", i))
		text := fmt.Sprintf(`{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:%d", "*:7"]}]}`, 8000+i)
		if err := os.WriteFile(policy, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		s.ctl(t, "policy", "set", policy)
	}
	waitFor(t, "a applies the last policy", func() bool {
		st, err := a.Status()
		return err == nil && st.PolicyVersion == changes
	})
	// joined, map_applied (b), then policy_changed (the server may fold
	// changes in quick succession into one map): at least 3, of which the
	// channel keeps one.
	waitFor(t, "the callback takes every event, the channel keeps one", func() bool {
		d := a.sink.delivered.Load()
		return d >= 3 && a.EventsDropped() == d-1
	})
	bIP, err := b.IPv4()
	if err != nil {
		t.Fatal(err)
	}
	l, err := b.Netstack().Listen("tcp", netip.AddrPortFrom(bIP, 7).String())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			_, _ = io.Copy(c, c)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.Netstack().DialContext(ctx, "tcp", netip.AddrPortFrom(bIP, 7).String())
	if err != nil {
		t.Fatalf("a's engine with its events unread: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4)
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo over the mesh: %q %v", buf, err)
	}
	st, err := a.Status()
	if err != nil {
		t.Fatal(err)
	}
	delivered, dropped := a.sink.delivered.Load(), a.EventsDropped()
	t.Logf("delivered %d, dropped from the channel %d, dropped by the library %d", delivered, dropped, st.EventsDropped)
	if st.EventsDropped != 0 {
		t.Fatalf("the library's queue dropped %d: the callback was held up", st.EventsDropped)
	}
	if dropped == 0 {
		t.Fatalf("nothing dropped: delivered %d", delivered)
	}
	// Dropping the oldest keeps the newest: the last policy's event.
	timeout := time.After(15 * time.Second)
	for {
		select {
		case ev := <-a.Events():
			if ev.Version == changes || ev.PolicyVersion == changes {
				return
			}
		case <-timeout:
			t.Fatalf("the last policy's event never came (dropped %d of %d)", a.EventsDropped(), a.sink.delivered.Load())
		}
	}
}

// TestEventsCloseRaces: nodes closed from several goroutines at once,
// one of them the Events reader, while other nodes join and leave (so
// map_applied events flow): every Close returns with Events closed, and
// no callback runs after (the sink counts late calls). Run with -race.
func TestEventsCloseRaces(t *testing.T) {
	panics := callbackPanics.Load()
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	stop := make(chan struct{})
	churned := make(chan int)
	go func() {
		n := 0
		defer func() { churned <- n }()
		for ; n < 40; n++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			c, err := Join(ctx, JoinConfig{ControlURL: s.url, JoinKey: key, Hostname: "churn", Userspace: true, EndpointIPs: []string{"127.0.0.1"}})
			cancel()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var sinks []*eventSink
	for round := range 3 {
		x := joinNode(t, s, key, fmt.Sprintf("x%d", round), 2)
		sinks = append(sinks, x.sink)
		var wg sync.WaitGroup
		closeNow := func() {
			defer wg.Done()
			if err := x.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			// Close returned: Events is closed (a receive never blocks).
			for {
				if _, ok := <-x.Events(); !ok {
					break
				}
			}
			if late := x.sink.late.Load(); late != 0 {
				t.Errorf("%d callbacks after Close returned", late)
			}
		}
		wg.Add(3)
		go func() {
			seen := 0
			for range x.Events() {
				if seen++; seen == 2 {
					go closeNow()
				}
			}
			if seen < 2 {
				// The channel closed before the reader's own Close.
				wg.Done()
			}
		}()
		waitFor(t, "a second event on x", func() bool { return x.sink.delivered.Load() >= 2 })
		go closeNow()
		go closeNow()
		wg.Wait()
	}
	close(stop)
	if n := <-churned; n == 0 {
		t.Fatal("no node joined beside the closed ones")
	}
	for i, sk := range sinks {
		if late := sk.late.Load(); late != 0 {
			t.Fatalf("node x%d: %d callbacks after Close", i, late)
		}
	}
	if p := callbackPanics.Load() - panics; p != 0 {
		t.Fatalf("%d panics in the event callback", p)
	}
}

// TestEventCallbackNeverPanics: a callback with a stale or foreign
// userdata returns quietly (a panic must not unwind into the library).
func TestEventCallbackNeverPanics(t *testing.T) {
	before := callbackPanics.Load()
	stale := cgo.NewHandle(&eventSink{ch: make(chan NodeEvent, 1)})
	stale.Delete()
	deliverEvent(uintptr(stale), []byte(`{"type":"joined"}`))
	foreign := cgo.NewHandle(42)
	defer foreign.Delete()
	deliverEvent(uintptr(foreign), []byte(`{"type":"joined"}`))
	sink := &eventSink{ch: make(chan NodeEvent, 1)}
	h := cgo.NewHandle(sink)
	defer h.Delete()
	deliverEvent(uintptr(h), []byte(`not json`))
	deliverEvent(uintptr(h), []byte(`{"type":"joined"}`))
	if got := callbackPanics.Load() - before; got != 1 {
		t.Fatalf("caught %d panics, want 1 (the stale handle)", got)
	}
	if ev := <-sink.ch; ev.Type != "joined" || sink.delivered.Load() != 2 {
		t.Fatalf("got %+v after %d calls", ev, sink.delivered.Load())
	}
}

// TestEventsCloseWaitsForARunningCallback: Close called while a (slowed)
// callback is under way returns only after it, and the callback's event
// never meets a closed channel (that would be a panic, caught and
// counted).
func TestEventsCloseWaitsForARunningCallback(t *testing.T) {
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	x := joinNode(t, s, key, "x", 0)
	defer x.Close()
	waitEvent(t, x, "joined", func(e NodeEvent) bool { return e.Type == "joined" })
	var entered, left atomic.Int32
	slow := func(s *eventSink) {
		if s != x.sink {
			return
		}
		entered.Add(1)
		time.Sleep(300 * time.Millisecond) // a slow callback, for Close to meet
		left.Add(1)
	}
	eventHook.Store(&slow)
	defer eventHook.Store(nil)
	panics := callbackPanics.Load()
	y := joinNode(t, s, key, "y", 0) // x gets a map_applied
	defer y.Close()
	waitFor(t, "x's callback under way", func() bool { return entered.Load() > 0 })
	if err := x.Close(); err != nil {
		t.Fatal(err)
	}
	if e, l := entered.Load(), left.Load(); e != l {
		t.Fatalf("Close returned while the callback ran (entered %d, left %d)", e, l)
	}
	if p := callbackPanics.Load() - panics; p != 0 {
		t.Fatalf("%d panics in the callback: it met a closed channel", p)
	}
	if late := x.sink.late.Load(); late != 0 {
		t.Fatalf("%d callbacks after Close", late)
	}
}

// TestUnclosedNodeIsClosedByItsFinalizer: the callback's handle refers to
// the event sink, not the Node, so a Node dropped without Close is
// collected and its finalizer closes it (Events closes, the library node
// is freed).
func TestUnclosedNodeIsClosedByItsFinalizer(t *testing.T) {
	s := startControl(t)
	key := s.ctl(t, "keys", "create", "--reusable")
	sink := func() *eventSink { return joinNode(t, s, key, "lost", 0).sink }()
	deadline := time.Now().Add(10 * time.Second)
	for !sink.closed.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the unreachable node was never closed by its finalizer")
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	for range sink.ch { // closed: the receive ends
	}
}
