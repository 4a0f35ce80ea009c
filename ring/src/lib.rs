//! Quiver's shared cluster vocabulary. No I/O, no clock reads: every function
//! here is a pure computation, so the node, the client and the tests can all
//! agree on it.
//!
//! - [`clock`]: hybrid logical clocks, the timestamps every version carries.
//! - [`ring`]: the hash ring, which nodes hold a key.
//! - [`version`]: dots, contexts, versions and the sibling-merge rule that
//!   every replica and every storage level applies the same way.

pub mod bytes;
pub mod clock;
pub mod rand;
pub mod ring;
pub mod version;
pub mod wire;

pub use clock::{ClockError, Hlc, HlcClock, MAX_OFFSET_MS};
pub use version::{
    BatchId, Causal, Context, Dot, NodeId, Order, Siblings, Stamp, Stamper, Version, VersionVector, SIBLINGS_MAX,
};
