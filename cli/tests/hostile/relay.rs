//! Hostile cases: relay (filled in by its fix).
