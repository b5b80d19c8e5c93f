//! Fleet scenarios.
