//! The cluster layer: what makes one node part of a masterless cluster.
//!
//! - [`membership`]: the configured peers and the heartbeats that tell
//!   which are up and how far their clocks are.
//! - [`quorum`]: the coordinator's quorum logic without I/O (what to send,
//!   when an operation is done or unavailable), and what a replica does
//!   with what it receives; `tests/cluster_sim.rs` runs a whole cluster of
//!   it in one process, over a seeded network that drops and delays.
//!
//! - [`store`]: [`store::ClusterStore`], the `Store` of a node in a
//!   cluster: writes to N replicas acknowledged at W, reads at R with read
//!   repair, over the peer links and the node's own engine; and the replica
//!   side.
//! - [`scatter`]: a cluster-wide search without I/O: which node searches
//!   which token ranges, merging their hits, leaving out stale ones.
//! - [`hints`]: the hints a node holds for replicas that are down (sloppy
//!   quorum, hinted handoff); [`batchlog`]: bulk sets logged on two nodes
//!   before they are applied; both kept in a [`setlog`].
//! - [`antientropy`]: hash trees of what a node holds, and the exchange
//!   that finds the keys two replicas hold differently, without I/O;
//!   [`trees`]: the trees a node keeps of its own data; [`repair`]: the
//!   exchanges between nodes, on a schedule and on demand.

pub mod antientropy;
pub mod batchlog;
pub mod calls;
pub mod hints;
pub mod membership;
pub mod placement;
pub mod quorum;
pub mod repair;
pub mod scatter;
pub mod setlog;
pub mod store;
pub mod trees;
