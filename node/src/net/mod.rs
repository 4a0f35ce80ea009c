//! The node's network edges.
//!
//! - [`client`]: the TCP listener for clients (length-prefixed postcard
//!   frames, many requests in flight per connection, out-of-order replies).
//! - [`peer`]: node-to-node links over QUIC, mutually authenticated.
//! - [`tls`]: the cluster CA, node certificates, and the QUIC TLS settings.

pub mod client;
pub mod peer;
pub mod tls;
