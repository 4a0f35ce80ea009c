//! Serde helpers that encode byte strings as bytes, not as sequences of
//! numbers.
//!
//! serde treats a `Vec<u8>` like any other sequence: one call per byte on
//! both sides, which was the largest cost of encoding and decoding bulk
//! sets. postcard writes a byte string and a sequence of `u8` identically (a
//! varint length, then the raw bytes), so these helpers change speed, never
//! the bytes on the wire or on disk; the tests below hold them to that.
//!
//! Use with `#[serde(with = "crate::bytes::...")]`; a plain `Vec<u8>` or
//! `Option<Vec<u8>>` field uses `serde_bytes` itself.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use serde::{Deserialize, Deserializer, Serializer};
use serde_bytes::{ByteBuf, Bytes};

/// `Vec<Vec<u8>>`.
pub mod list {
    use super::*;

    pub fn serialize<S: Serializer>(items: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|b| Bytes::new(b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Ok(Vec::<ByteBuf>::deserialize(d)?.into_iter().map(ByteBuf::into_vec).collect())
    }
}

/// `Vec<Option<Vec<u8>>>`.
pub mod optional_list {
    use super::*;

    pub fn serialize<S: Serializer>(items: &[Option<Vec<u8>>], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|b| b.as_deref().map(Bytes::new)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Option<Vec<u8>>>, D::Error> {
        Ok(Vec::<Option<ByteBuf>>::deserialize(d)?.into_iter().map(|b| b.map(ByteBuf::into_vec)).collect())
    }
}

/// `Vec<(Vec<u8>, Vec<u8>)>`.
pub mod pairs {
    use super::*;

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer>(items: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|(k, v)| (Bytes::new(k), Bytes::new(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pairs, D::Error> {
        Ok(Vec::<(ByteBuf, ByteBuf)>::deserialize(d)?.into_iter().map(|(k, v)| (k.into_vec(), v.into_vec())).collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    /// The same shapes, once with the helpers and once as serde's defaults.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Fast {
        #[serde(with = "serde_bytes")]
        one: Vec<u8>,
        #[serde(with = "serde_bytes")]
        maybe: Option<Vec<u8>>,
        #[serde(with = "super::list")]
        list: Vec<Vec<u8>>,
        #[serde(with = "super::optional_list")]
        optional: Vec<Option<Vec<u8>>>,
        #[serde(with = "super::pairs")]
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain {
        one: Vec<u8>,
        maybe: Option<Vec<u8>>,
        list: Vec<Vec<u8>>,
        optional: Vec<Option<Vec<u8>>>,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
    }

    proptest::proptest! {
        #[test]
        fn postcard_bytes_are_unchanged(
            one in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            maybe in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..200)),
            list in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..20), 0..5),
            optional in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)), 0..5),
            pairs in proptest::collection::vec(
                (proptest::collection::vec(proptest::num::u8::ANY, 0..20),
                 proptest::collection::vec(proptest::num::u8::ANY, 0..200)), 0..5),
        ) {
            let plain = Plain { one, maybe, list, optional, pairs };
            let fast = Fast {
                one: plain.one.clone(),
                maybe: plain.maybe.clone(),
                list: plain.list.clone(),
                optional: plain.optional.clone(),
                pairs: plain.pairs.clone(),
            };
            let bytes = postcard::to_stdvec(&plain).unwrap();
            proptest::prop_assert_eq!(&postcard::to_stdvec(&fast).unwrap(), &bytes);
            proptest::prop_assert_eq!(postcard::from_bytes::<Fast>(&bytes).unwrap(), fast);
        }
    }
}
