//! Hostile cases: uapi (filled in by its fix).
