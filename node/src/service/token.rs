//! Context tokens: what a client holds between reading a key's versions
//! and writing back with them.
//!
//! A token says which versions its reader saw, and a causal write replaces
//! exactly those; so a token that claimed more than its reader saw (a
//! `floor` or a version-vector entry far in the future) would make every
//! later write of its key lose to it, acknowledged and never visible. A
//! token is therefore sealed by the node that issues it and opened only if
//! the seal holds:
//!
//! ```text
//! token := format u8 (1) | mac [16] | postcard(Body { key_hash u64, context })
//! mac   := HMAC-SHA256(secret, "quiver context token 1" | key len u32 LE | key | body), first 16 bytes
//! ```
//!
//! The secret is the cluster's (`cluster.secret` beside the cluster CA,
//! the same on every node), or a single node's own (`CONTEXT_SECRET` in its
//! data directory); both are made once and kept, so tokens survive
//! restarts. A token is opened only if it is at most
//! [`TOKEN_BYTES_MAX`] bytes, its seal holds for the key it is used with,
//! and nothing it claims (its dots, floor and highest timestamp) is later
//! than the opening node's clock allows (the wall clock plus the maximum
//! offset): a token of another cluster, another key, altered by one bit, or
//! minted with a leaked secret and a date in the future, is
//! [`ErrorKind::InvalidContext`] and writes nothing.

// This module decodes bytes from the network: what it reads must never make
// it panic.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use quiver_ring::wire::{ContextToken, ErrorKind, ServerError};
use quiver_ring::{Context, Hlc};
use serde::{Deserialize, Serialize};

/// The largest token a node opens. A context holds one entry per node that
/// made a causal version of the key (about 20 bytes each), so this leaves
/// room for clusters of hundreds of nodes.
pub const TOKEN_BYTES_MAX: usize = 16 << 10;

pub use crate::identity::SECRET_BYTES;

/// The format byte that opens every token.
const FORMAT: u8 = 1;

/// Bytes of the seal kept in a token.
const MAC_BYTES: usize = 16;

/// Put before what is sealed, so that a seal made for anything else with
/// the same secret never passes as a token's.
const DOMAIN: &[u8] = b"quiver context token 1";

/// What a token holds besides its seal.
#[derive(Serialize, Deserialize)]
struct Body {
    /// Which key it was read for, to tell a token used with another key
    /// from one that was altered.
    key_hash: u64,
    context: Context,
}

/// The hash a token keeps of its key.
fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, 0x7175_6976_6572)
}

/// Seals and opens the tokens of one cluster (or single node).
#[derive(Clone)]
pub struct TokenSeal(ring::hmac::Key);

impl std::fmt::Debug for TokenSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSeal(..)")
    }
}

fn invalid(why: impl Into<String>) -> ServerError {
    ServerError::new(ErrorKind::InvalidContext, why)
}

impl TokenSeal {
    /// The seal of `secret`.
    pub fn new(secret: &[u8; SECRET_BYTES]) -> TokenSeal {
        TokenSeal(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
    }

    fn mac(&self, key: &[u8], body: &[u8]) -> [u8; MAC_BYTES] {
        let mut signing = ring::hmac::Context::with_key(&self.0);
        signing.update(DOMAIN);
        signing.update(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
        signing.update(key);
        signing.update(body);
        let tag = signing.sign();
        let mut mac = [0u8; MAC_BYTES];
        for (to, from) in mac.iter_mut().zip(tag.as_ref()) {
            *to = *from;
        }
        mac
    }

    /// The token of `context`, read for `key`.
    pub fn seal(&self, key: &[u8], context: &Context) -> ContextToken {
        let body = Body { key_hash: key_hash(key), context: context.clone() };
        // postcard fails only on types it cannot encode; a context is not one.
        self.seal_body(key, &postcard::to_stdvec(&body).unwrap_or_default())
    }

    /// A token of `body` as it is, sealed for `key`: what `seal` makes of
    /// an encoded body, and how the fuzzer reaches the decoding of bodies
    /// behind the seal.
    pub(crate) fn seal_body(&self, key: &[u8], body: &[u8]) -> ContextToken {
        let mut token = Vec::with_capacity(1 + MAC_BYTES + body.len());
        token.push(FORMAT);
        token.extend_from_slice(&self.mac(key, body));
        token.extend_from_slice(body);
        ContextToken(token)
    }

    /// The context `token` holds, if this seal made it for `key` and it
    /// claims nothing after `latest` (the opening node's wall clock plus
    /// its maximum offset).
    pub fn open(&self, key: &[u8], token: &ContextToken, latest: Hlc) -> Result<Context, ServerError> {
        let bytes = &token.0;
        if bytes.len() > TOKEN_BYTES_MAX {
            return Err(invalid(format!(
                "a context token of {} bytes is longer than any this node issues ({TOKEN_BYTES_MAX} at most)",
                bytes.len()
            )));
        }
        let (Some(&format), Some(mac), Some(body)) =
            (bytes.first(), bytes.get(1..1 + MAC_BYTES), bytes.get(1 + MAC_BYTES..))
        else {
            return Err(invalid("the context token is too short to be one; read the key's versions for its context"));
        };
        if format != FORMAT {
            return Err(invalid(format!(
                "context token format {format} is not one this node reads (it reads {FORMAT})"
            )));
        }
        if !same_bytes(mac, &self.mac(key, body)) {
            let read_for_key = postcard::from_bytes::<Body>(body).is_ok_and(|b| b.key_hash == key_hash(key));
            return Err(invalid(if read_for_key {
                "the context token was not issued by this cluster, or was altered; read the key's versions for its \
                 context"
            } else {
                "this context token was read for another key, or not issued by this cluster; read this key's \
                 versions for its own context"
            }));
        }
        let body: Body =
            postcard::from_bytes(body).map_err(|e| invalid(format!("the context token does not decode: {e}")))?;
        let context = body.context;
        let claims = context.vv.dots().map(|dot| dot.hlc).chain(context.floor.map(|(hlc, _)| hlc));
        let latest_claim = claims.chain([context.max_hlc]).max().unwrap_or(Hlc::ZERO);
        if latest_claim > latest {
            return Err(invalid(format!(
                "the context token claims a version at {latest_claim}, later than this node's clock allows \
                 ({latest})"
            )));
        }
        Ok(context)
    }
}

/// Compares in time that does not depend on where the bytes differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::version::BatchId;
    use quiver_ring::{Dot, NodeId};

    fn context() -> Context {
        let mut context =
            Context { max_hlc: Hlc(42), floor: Some((Hlc(30), BatchId::default())), ..Context::default() };
        context.vv.add(Dot { node: NodeId(3), hlc: Hlc(40) });
        context
    }

    #[test]
    fn a_token_opens_for_its_key_under_its_seal_and_survives_hex() {
        let seal = TokenSeal::new(&[7; SECRET_BYTES]);
        let token = seal.seal(b"k", &context());
        let parsed = ContextToken::from_hex(&token.to_hex()).unwrap();
        assert_eq!(seal.open(b"k", &parsed, Hlc(42)).unwrap(), context());
        let error = seal.open(b"other", &parsed, Hlc(42)).unwrap_err();
        assert_eq!(error.kind, ErrorKind::InvalidContext);
        assert!(error.message.contains("another key"), "{}", error.message);
    }

    #[test]
    fn a_token_of_another_secret_altered_or_too_long_is_refused() {
        let seal = TokenSeal::new(&[7; SECRET_BYTES]);
        let token = seal.seal(b"k", &context());
        let foreign = TokenSeal::new(&[8; SECRET_BYTES]).seal(b"k", &context());
        let error = seal.open(b"k", &foreign, Hlc(u64::MAX)).unwrap_err();
        assert!(error.message.contains("not issued by this cluster"), "{}", error.message);
        for at in 0..token.0.len() {
            for bit in 0..8 {
                let mut altered = token.clone();
                altered.0[at] ^= 1 << bit;
                let error = seal.open(b"k", &altered, Hlc(u64::MAX)).unwrap_err();
                assert_eq!(error.kind, ErrorKind::InvalidContext, "byte {at} bit {bit}");
            }
        }
        for cut in 0..token.0.len() {
            let cut = ContextToken(token.0[..cut].to_vec());
            assert_eq!(seal.open(b"k", &cut, Hlc(u64::MAX)).unwrap_err().kind, ErrorKind::InvalidContext);
        }
        let long = ContextToken(vec![FORMAT; TOKEN_BYTES_MAX + 1]);
        assert!(seal.open(b"k", &long, Hlc(u64::MAX)).unwrap_err().message.contains("longer than"));
    }

    #[test]
    fn a_token_that_claims_more_than_the_clock_allows_is_refused_even_when_sealed() {
        let seal = TokenSeal::new(&[7; SECRET_BYTES]);
        for claim in [
            Context { max_hlc: Hlc(43), ..context() },
            Context { floor: Some((Hlc(u64::MAX), BatchId::default())), ..context() },
            {
                let mut ahead = context();
                ahead.vv.add(Dot { node: NodeId(9), hlc: Hlc(u64::MAX) });
                ahead
            },
        ] {
            let error = seal.open(b"k", &seal.seal(b"k", &claim), Hlc(42)).unwrap_err();
            assert_eq!(error.kind, ErrorKind::InvalidContext);
            assert!(error.message.contains("later than this node's clock allows"), "{}", error.message);
        }
    }
}
