//! See tests/timers.rs.
