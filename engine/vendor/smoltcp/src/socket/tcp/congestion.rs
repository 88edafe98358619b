use crate::time::Instant;

use super::RttEstimator;

pub(super) mod no_control;

#[cfg(feature = "socket-tcp-cubic")]
pub(super) mod cubic;

#[cfg(feature = "socket-tcp-reno")]
pub(super) mod reno;

/// meshvpn patch: how much an ACK of `acked` bytes grows the window in slow
/// start: all it acknowledged (RFC 3465 byte counting without its limit L, as
/// Linux's `tcp_slow_start` credits every segment a stretch ACK covers), so a
/// receiver that ACKs every Nth segment does not slow the sender down; but
/// not past `ssthresh` (the rest of the ACK belongs to congestion avoidance).
/// Upstream grew the window by at most 1 MSS per ACK, which made slow start
/// grow 1.5x per RTT against a receiver that ACKs every second segment.
#[cfg(any(feature = "socket-tcp-cubic", feature = "socket-tcp-reno"))]
pub(super) fn slow_start_increase(cwnd: usize, ssthresh: usize, acked: usize) -> usize {
    acked.min(ssthresh.saturating_sub(cwnd))
}

/// meshvpn patch: how much an ACK of `acked` bytes grows the window in
/// congestion avoidance for a Reno-like rule of one MSS per window of data
/// acknowledged: `mss * acked / cwnd` (at least 1 byte), the per-ACK form of
/// RFC 3465's byte counting. Upstream added `mss * mss / cwnd` per ACK whatever
/// it acknowledged, so a receiver that ACKs every Nth segment made the window
/// grow N/2 times more slowly than one that ACKs every second.
#[cfg(any(feature = "socket-tcp-cubic", feature = "socket-tcp-reno"))]
pub(super) fn avoidance_increase(cwnd: usize, acked: usize, mss: usize) -> usize {
    (mss.saturating_mul(acked) / cwnd.max(1)).max(1)
}

#[allow(unused_variables)]
pub(super) trait Controller {
    /// Returns the number of bytes that can be sent.
    fn window(&self) -> usize;

    /// Set the remote window size.
    fn set_remote_window(&mut self, remote_window: usize) {}

    fn on_ack(&mut self, now: Instant, len: usize, in_flight: usize, rtt: &RttEstimator) {}

    /// Fired on each duplicate ack received, after `on_loss` has been called.
    fn on_dup_ack(&mut self, now: Instant, len: usize, in_flight: usize) {}

    /// Fired on a retransmission timeout.
    fn on_rto(&mut self, now: Instant, in_flight: usize) {}

    /// Fired after an inferred loss via three duplicate acks.
    fn on_loss(&mut self, now: Instant, in_flight: usize) {}

    fn pre_transmit(&mut self, now: Instant) {}

    fn post_transmit(&mut self, now: Instant, len: usize) {}

    /// Set the maximum segment size.
    fn set_mss(&mut self, mss: usize) {}
}

#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(super) enum AnyController {
    None(no_control::NoControl),

    #[cfg(feature = "socket-tcp-reno")]
    Reno(reno::Reno),

    #[cfg(feature = "socket-tcp-cubic")]
    Cubic(cubic::Cubic),
}

impl AnyController {
    /// Create a new congestion controller.
    /// `AnyController::new()` selects the best congestion controller based on the features.
    ///
    /// - If `socket-tcp-cubic` feature is enabled, it will use `Cubic`.
    /// - If `socket-tcp-reno` feature is enabled, it will use `Reno`.
    /// - If both `socket-tcp-cubic` and `socket-tcp-reno` features are enabled, it will use `Cubic`.
    ///    - `Cubic` is more efficient regarding throughput.
    ///    - `Reno` is more conservative and is suitable for low-power devices.
    /// - If no congestion controller is available, it will use `NoControl`.
    ///
    /// Users can also select a congestion controller manually by [`super::Socket::set_congestion_control()`]
    /// method at run-time.
    #[allow(unreachable_code)]
    #[inline]
    pub fn new() -> Self {
        #[cfg(feature = "socket-tcp-cubic")]
        {
            return AnyController::Cubic(cubic::Cubic::new());
        }

        #[cfg(feature = "socket-tcp-reno")]
        {
            return AnyController::Reno(reno::Reno::new());
        }

        AnyController::None(no_control::NoControl)
    }

    #[inline]
    pub fn inner_mut(&mut self) -> &mut dyn Controller {
        match self {
            AnyController::None(n) => n,

            #[cfg(feature = "socket-tcp-reno")]
            AnyController::Reno(r) => r,

            #[cfg(feature = "socket-tcp-cubic")]
            AnyController::Cubic(c) => c,
        }
    }

    #[inline]
    pub fn inner(&self) -> &dyn Controller {
        match self {
            AnyController::None(n) => n,

            #[cfg(feature = "socket-tcp-reno")]
            AnyController::Reno(r) => r,

            #[cfg(feature = "socket-tcp-cubic")]
            AnyController::Cubic(c) => c,
        }
    }
}
