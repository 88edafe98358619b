//! The WireGuard cross-platform UAPI text protocol (get=1 / set=1).
