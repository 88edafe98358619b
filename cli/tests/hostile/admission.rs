//! Hostile cases: admission (filled in by its fix).
