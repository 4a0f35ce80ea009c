//! How keys are laid out in the engine: a keyspace byte, then for data the
//! key's ring token, then the key.
//!
//! ```text
//! data:   0x00 | token (u64, big-endian) | user key
//! hints:  0x01 | ...        batch log: 0x02 | ...        postings: 0x03 | ...
//! vectors: 0x04 | ...
//! ```
//!
//! The engine orders keys by their bytes, so data is ordered by token: a
//! token range (what a node streams to another that joins, or compares
//! with a replica in anti-entropy) is one contiguous scan, from
//! [`token_range_start`] to the start of the range after it. What must
//! later share one WAL record with the data it belongs to (hinted writes,
//! the batch log, index postings) has a keyspace of its own in the same
//! engine; a scan of one keyspace never sees another's keys.

use quiver_ring::ring::key_token;

/// The keyspaces, by their first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Keyspace {
    Data = 0,
    Hints = 1,
    BatchLog = 2,
    Postings = 3,
    Vectors = 4,
}

/// Bytes before the user key in a data key.
pub const DATA_PREFIX: usize = 1 + 8;

/// The stored form of the user key `key`.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(DATA_PREFIX + key.len());
    stored.push(Keyspace::Data as u8);
    stored.extend_from_slice(&key_token(key).to_be_bytes());
    stored.extend_from_slice(key);
    stored
}

/// The user key of a stored data key (`None` if it is not one).
pub fn user_key(stored: &[u8]) -> Option<&[u8]> {
    match stored.split_first() {
        Some((&first, rest)) if first == Keyspace::Data as u8 => rest.get(DATA_PREFIX - 1..),
        _ => None,
    }
}

/// The first stored key of data whose token is at least `token`.
pub fn token_range_start(token: u64) -> Vec<u8> {
    let mut start = vec![Keyspace::Data as u8];
    start.extend_from_slice(&token.to_be_bytes());
    start
}

/// The first key of keyspace `space` (and the end of the one before it).
pub fn keyspace_start(space: Keyspace) -> Vec<u8> {
    vec![space as u8]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn data_keys_sort_by_token_and_give_their_key_back(keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..20), 1..50)) {
            let mut stored: Vec<Vec<u8>> = keys.iter().map(|k| data_key(k)).collect();
            stored.sort();
            let tokens: Vec<u64> = stored.iter().map(|s| key_token(user_key(s).unwrap())).collect();
            prop_assert!(tokens.windows(2).all(|w| w[0] <= w[1]), "stored keys are in token order");
            for (key, s) in keys.iter().zip(keys.iter().map(|k| data_key(k))) {
                prop_assert_eq!(user_key(&s), Some(key.as_slice()));
                prop_assert!(s >= token_range_start(key_token(key)));
                prop_assert!(s < keyspace_start(Keyspace::Hints));
            }
        }
    }

    #[test]
    fn only_data_keys_have_user_keys() {
        assert_eq!(user_key(&[Keyspace::Hints as u8, 1, 2]), None);
        assert_eq!(user_key(&[]), None);
        assert_eq!(user_key(&[0, 1, 2]), None, "shorter than a token");
    }
}
