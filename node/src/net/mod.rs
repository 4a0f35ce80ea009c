//! The node's network edges.
//!
//! - [`client`]: the TCP listener for clients (length-prefixed postcard
//!   frames, many requests in flight per connection, out-of-order replies).

pub mod client;
