//! The cluster layer: what makes one node part of a masterless cluster.
//!
//! - [`membership`]: the configured peers and the heartbeats that tell
//!   which are up and how far their clocks are.
//! - [`quorum`]: the coordinator's quorum logic without I/O (what to send,
//!   when an operation is done or unavailable), and what a replica does
//!   with what it receives; `tests/cluster_sim.rs` runs a whole cluster of
//!   it in one process, over a seeded network that drops and delays.
//!
//! Wiring the quorum logic to the peer links and the engine, hinted handoff
//! and the smart client come next.

pub mod membership;
pub mod quorum;
