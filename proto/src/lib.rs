//! Generated API types (skeleton).
