//! The hash ring: which nodes hold a key.
//!
//! A key's *token* is the xxh3 hash of its bytes: stable across builds,
//! platforms and restarts (never std's hasher, which is seeded per
//! process). Every node owns [`TOKENS_PER_NODE`] points of the 64-bit ring,
//! derived from its id alone, so every node and client that knows the
//! members computes the same ring without exchanging tokens. A key's
//! *preference list* is the first N distinct nodes met going clockwise
//! from its token (the first token at or after it, wrapping around).
//!
//! With 256 tokens a node owns about `1/n` of the ring: a node's share is
//! the sum of 256 random gaps, within a few percent of `1/n` typically and
//! within 35 % of it with overwhelming probability (the property tests
//! check that bound for 3 to 10 nodes). A node added to `n` takes about
//! `1/(n+1)` of the ring, every part of it from the nodes that held it
//! before; no other key moves.
//!
//! The ring a node or client holds is a [`RingView`]: the members and an
//! epoch that rises with every change of membership, so an older view is
//! told from a newer one.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::version::NodeId;

/// Points on the ring per node.
pub const TOKENS_PER_NODE: u32 = 256;

/// Keys that start with this are a node's own: the vector written with a
/// key's value is stored under this prefix and the key (see
/// [`vector_key_of`]). Clients cannot use such keys.
pub const VECTOR_KEY_PREFIX: &[u8] = b"\xff\xfevector\x00";

/// The key that holds the vector written with `key`'s value.
pub fn vector_key_of(key: &[u8]) -> Vec<u8> {
    [VECTOR_KEY_PREFIX, key].concat()
}

/// The key whose vector `key` holds, if it is a vector key.
pub fn vector_key_base(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(VECTOR_KEY_PREFIX)
}

/// The ring position of `key`. A vector key has its base key's, so that it
/// lives on the same replicas, in the same token range.
pub fn key_token(key: &[u8]) -> u64 {
    xxh3_64(vector_key_base(key).unwrap_or(key))
}

/// The `i`th token of `node`.
fn node_token(node: NodeId, i: u32) -> u64 {
    xxh3_64_with_seed(&i.to_le_bytes(), node.0)
}

/// One node of the cluster, as every other node and client knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    /// Where clients reach it (TCP).
    pub client_addr: String,
    /// Where peers reach it (QUIC).
    pub peer_addr: String,
}

/// The members of the cluster at one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingView {
    /// Rises with every change of membership.
    pub epoch: u64,
    pub members: Vec<Member>,
}

/// The tokens after `after` up to `upto` (inclusive), clockwise: the keys
/// one token of the ring owns. `after == upto` is the whole ring (a ring of
/// one token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRange {
    pub after: u64,
    pub upto: u64,
}

impl TokenRange {
    /// Whether `token` is in the range.
    pub fn contains(&self, token: u64) -> bool {
        match self.after.cmp(&self.upto) {
            std::cmp::Ordering::Less => self.after < token && token <= self.upto,
            std::cmp::Ordering::Greater => token > self.after || token <= self.upto,
            std::cmp::Ordering::Equal => true,
        }
    }

    /// Whether `key`'s token is in the range.
    pub fn holds(&self, key: &[u8]) -> bool {
        self.contains(key_token(key))
    }
}

/// A ring computed from a [`RingView`]: every token, sorted.
#[derive(Clone, Debug)]
pub struct Ring {
    view: RingView,
    /// `(token, index into view.members)`, sorted by token (ties by node id:
    /// every holder of the view sorts them alike).
    tokens: Vec<(u64, u32)>,
}

impl Ring {
    /// The ring of `view`'s members.
    pub fn new(view: RingView) -> Ring {
        let mut tokens: Vec<(u64, u32)> = Vec::with_capacity(view.members.len() * TOKENS_PER_NODE as usize);
        for (index, member) in view.members.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            tokens.extend((0..TOKENS_PER_NODE).map(|i| (node_token(member.id, i), index)));
        }
        let id = |index: u32| view.members.get(index as usize).map(|m| m.id);
        tokens.sort_by_key(|&(token, index)| (token, id(index)));
        Ring { view, tokens }
    }

    /// The view this ring was computed from: its members and epoch.
    pub fn view(&self) -> &RingView {
        &self.view
    }

    /// The member with node id `id`.
    pub fn member(&self, id: NodeId) -> Option<&Member> {
        self.view.members.iter().find(|m| m.id == id)
    }

    /// The first `n` distinct nodes clockwise from `token` (fewer if the
    /// ring has fewer nodes).
    pub fn preference_list_of_token(&self, token: u64, n: usize) -> Vec<NodeId> {
        let n = n.min(self.view.members.len());
        let mut list: Vec<NodeId> = Vec::with_capacity(n);
        let start = self.tokens.partition_point(|&(t, _)| t < token);
        let clockwise = self.tokens.iter().skip(start).chain(self.tokens.iter().take(start));
        for &(_, index) in clockwise {
            if list.len() == n {
                break;
            }
            let Some(member) = self.view.members.get(index as usize) else { continue };
            if !list.contains(&member.id) {
                list.push(member.id);
            }
        }
        list
    }

    /// Every range of the ring (each token's, clockwise from the token
    /// before it) with its `n` replicas: together they cover every token
    /// once.
    pub fn ranges(&self, n: usize) -> Vec<(TokenRange, Vec<NodeId>)> {
        let Some(&(last, _)) = self.tokens.last() else { return Vec::new() };
        let mut ranges = Vec::with_capacity(self.tokens.len());
        let mut previous = last;
        for &(token, _) in &self.tokens {
            // Two members on one token: the second owns nothing.
            if token != previous || ranges.is_empty() {
                ranges.push((TokenRange { after: previous, upto: token }, self.preference_list_of_token(token, n)));
            }
            previous = token;
        }
        ranges
    }

    /// The nodes that hold `key`: its preference list of `n` nodes.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<NodeId> {
        self.preference_list_of_token(key_token(key), n)
    }

    /// Each member's share of the ring as the first node of a preference
    /// list (the fraction of all keys it is the primary replica of), in the
    /// members' order.
    pub fn primary_shares(&self) -> Vec<f64> {
        let mut owned = vec![0u128; self.view.members.len()];
        let (Some(&(first, _)), Some(&(last, _))) = (self.tokens.first(), self.tokens.last()) else {
            return vec![0.0; self.view.members.len()];
        };
        // A token owns the arc from the previous token (exclusive) to itself.
        let mut previous = last;
        for (i, &(token, index)) in self.tokens.iter().enumerate() {
            let arc = if i == 0 {
                (1u128 << 64) - u128::from(previous) + u128::from(first)
            } else {
                u128::from(token - previous)
            };
            if let Some(share) = owned.get_mut(index as usize) {
                *share += arc;
            }
            previous = token;
        }
        owned.iter().map(|&arc| arc as f64 / (1u128 << 64) as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64) -> Member {
        Member { id: NodeId(id), name: format!("n{id}"), client_addr: String::new(), peer_addr: String::new() }
    }

    #[test]
    fn every_key_is_in_exactly_one_range_whose_replicas_are_its_preference_list() {
        let ring = Ring::new(RingView { epoch: 1, members: (1..=4).map(member).collect() });
        let ranges = ring.ranges(3);
        assert_eq!(ranges.len(), 4 * TOKENS_PER_NODE as usize);
        for i in 0..2000u32 {
            let key = i.to_le_bytes();
            let holding: Vec<_> = ranges.iter().filter(|(range, _)| range.holds(&key)).collect();
            assert_eq!(holding.len(), 1, "key {i}");
            assert_eq!(holding[0].1, ring.preference_list(&key, 3), "key {i}");
        }
        let whole = TokenRange { after: 5, upto: 5 };
        assert!(whole.contains(0) && whole.contains(u64::MAX));
        let wrapping = TokenRange { after: u64::MAX - 1, upto: 1 };
        assert!(wrapping.contains(u64::MAX) && wrapping.contains(0) && wrapping.contains(1) && !wrapping.contains(2));
    }

    #[test]
    fn a_vector_key_lives_where_its_key_does() {
        let ring = Ring::new(RingView { epoch: 1, members: (1..=5).map(member).collect() });
        for i in 0..100u32 {
            let key = i.to_le_bytes();
            assert_eq!(key_token(&vector_key_of(&key)), key_token(&key));
            assert_eq!(ring.preference_list(&vector_key_of(&key), 3), ring.preference_list(&key, 3));
            assert_eq!(vector_key_base(&vector_key_of(&key)), Some(&key[..]));
        }
        assert_eq!(vector_key_base(b"plain"), None);
    }

    #[test]
    fn a_key_token_is_stable() {
        // Pinned: every node and client must place keys alike, whatever
        // the build.
        assert_eq!(key_token(b"user:1"), xxh3_64(b"user:1"));
        assert_eq!(node_token(NodeId(7), 3), xxh3_64_with_seed(&3u32.to_le_bytes(), 7));
    }

    #[test]
    fn a_ring_of_fewer_nodes_than_n_lists_them_all() {
        let ring = Ring::new(RingView { epoch: 1, members: vec![member(1), member(2)] });
        let list = ring.preference_list(b"k", 3);
        assert_eq!(list.len(), 2);
        assert!(list.contains(&NodeId(1)) && list.contains(&NodeId(2)));
        assert!(Ring::new(RingView::default()).preference_list(b"k", 3).is_empty());
    }

    #[test]
    fn shares_add_up_to_the_whole_ring() {
        let ring = Ring::new(RingView { epoch: 1, members: (1..=5).map(member).collect() });
        let total: f64 = ring.primary_shares().iter().sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }
}
