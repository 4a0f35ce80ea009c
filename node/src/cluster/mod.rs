//! The cluster layer: what makes one node part of a masterless cluster.
//!
//! - [`membership`]: the configured peers and the heartbeats that tell
//!   which are up and how far their clocks are.
//!
//! The coordinator (quorum reads and writes), replication and hinted
//! handoff come next, on top of the peer links of [`crate::net::peer`].

pub mod membership;
