//! The one timeout convention of every blocking call: `meshvpn_timeout_ms`.
//!
//! An unsigned count of milliseconds: 0 does not wait (a poll),
//! `MESHVPN_WAIT_FOREVER` (`UINT32_MAX`) waits without a deadline, anything
//! else waits that long (up to about 49.7 days). Unsigned with one sentinel
//! rather than signed with "negative means forever", because a C caller
//! that computes `deadline - now` and gets a negative number must not wait
//! forever by accident; it has to spell "forever" out.

use std::time::{Duration, Instant};

/// Milliseconds a blocking call may wait: 0 polls, `MESHVPN_WAIT_FOREVER`
/// waits without a deadline.
pub type meshvpn_timeout_ms = u32;

/// The `meshvpn_timeout_ms` that waits without a deadline (until the call
/// succeeds, fails, is interrupted, or its object is closed).
pub const MESHVPN_WAIT_FOREVER: meshvpn_timeout_ms = u32::MAX;

/// `timeout_ms` as a length of time; `None` for `MESHVPN_WAIT_FOREVER`.
pub(crate) fn limit(timeout_ms: meshvpn_timeout_ms) -> Option<Duration> {
    (timeout_ms != MESHVPN_WAIT_FOREVER).then(|| Duration::from_millis(timeout_ms.into()))
}

/// When a wait of `timeout_ms` that starts now ends; `None` for
/// `MESHVPN_WAIT_FOREVER`.
pub(crate) fn deadline(timeout_ms: meshvpn_timeout_ms) -> Option<Instant> {
    limit(timeout_ms).map(|l| Instant::now() + l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_convention() {
        assert_eq!(limit(MESHVPN_WAIT_FOREVER), None);
        assert_eq!(deadline(MESHVPN_WAIT_FOREVER), None);
        assert_eq!(limit(0), Some(Duration::ZERO));
        assert_eq!(limit(1500), Some(Duration::from_millis(1500)));
        assert_eq!(
            limit(MESHVPN_WAIT_FOREVER - 1),
            Some(Duration::from_millis(u64::from(u32::MAX - 1)))
        );
        let before = Instant::now();
        let d = deadline(0).unwrap();
        assert!(d >= before && d <= Instant::now());
    }
}
