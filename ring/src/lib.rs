//! Quiver's shared cluster vocabulary. No I/O, no clock reads: every function
//! here is a pure computation, so the node, the client and the tests can all
//! agree on it.
//!
//! - [`clock`]: hybrid logical clocks, the timestamps every version carries.
//! - [`version`]: dots, version vectors, versions and the sibling-merge rule
//!   that every replica and every storage level applies the same way.

pub mod bytes;
pub mod clock;
pub mod rand;
pub mod version;
pub mod wire;

pub use clock::{Hlc, HlcClock};
pub use version::{BatchId, Dot, NodeId, Siblings, Stamp, Stamper, Version, VersionVector};
