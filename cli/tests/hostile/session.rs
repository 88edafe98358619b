//! Hostile cases: session (filled in by its fix).
