//! `quiver-chaos`: proves with real processes and SIGKILL that Quiver loses
//! nothing it acknowledged, applies every bulk set entirely or not at all,
//! and never mixes two concurrent bulk sets.
//!
//! - [`node`]: starting and killing `quiverd` processes (also used by the
//!   node's end-to-end tests);
//! - [`run`]: one run: the node, the killer, writers, checkpoints, the report;
//! - [`workload`]: the three workloads and what each one checks.

pub mod node;
pub mod run;
pub mod workload;
