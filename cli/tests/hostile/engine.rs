//! Hostile cases: engine (filled in by its fix).
