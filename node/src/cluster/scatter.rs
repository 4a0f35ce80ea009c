//! The parts of a cluster-wide search that need no I/O: which node
//! searches which token ranges, how the parts' hits are merged, and which
//! merged hits survive the check against the keys' current values.
//! [`super::store::ClusterStore`] runs them over the peer links;
//! `tests/cluster_sim.rs` runs them over its seeded network.

use std::collections::BTreeMap;

use quiver_ring::ring::{Ring, TokenRange};
use quiver_ring::wire::{ErrorKind, SearchHit, ServerError};

/// A search that cannot be planned: every replica of this range is down,
/// and the search would miss its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unplannable {
    pub range: TokenRange,
}

impl From<Unplannable> for ServerError {
    fn from(unplannable: Unplannable) -> ServerError {
        let TokenRange { after, upto } = unplannable.range;
        ServerError::new(
            ErrorKind::Unavailable,
            format!(
                "every replica of the ring's range ({after:016x}, {upto:016x}] is down: a search would miss its keys"
            ),
        )
    }
}
use quiver_ring::NodeId;

/// Which node searches which ranges: each range of the ring goes to one of
/// its `replicas` replicas, `me` where it is one (no message), else the
/// first that is not `down`; so every key is looked at exactly once. When
/// every replica of some range is down the search would miss its keys, so
/// it is refused (the node answers `Unavailable`).
pub fn plan(
    ring: &Ring,
    replicas: usize,
    me: NodeId,
    down: &[NodeId],
) -> Result<BTreeMap<NodeId, Vec<TokenRange>>, Unplannable> {
    let mut parts: BTreeMap<NodeId, Vec<TokenRange>> = BTreeMap::new();
    for (range, holders) in ring.ranges(replicas) {
        let chosen = match holders.contains(&me) {
            true => Some(me),
            false => holders.iter().find(|id| !down.contains(id)).copied(),
        };
        let Some(node) = chosen else { return Err(Unplannable { range }) };
        parts.entry(node).or_default().push(range);
    }
    Ok(parts)
}

/// The best `k` of the parts' hits: highest score first (ties by key), one
/// hit per key (a key's replicas may each have been asked for a range
/// around a ring change; the best-scored copy stays).
pub fn merge(parts: impl IntoIterator<Item = Vec<SearchHit>>, k: usize) -> Vec<SearchHit> {
    let mut hits: Vec<SearchHit> = parts.into_iter().flatten().collect();
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.key.cmp(&b.key)));
    let mut seen = std::collections::HashSet::new();
    hits.retain(|hit| seen.insert(hit.key.clone()));
    hits.truncate(k);
    hits
}

/// The hits whose value is still their key's value in `current` (read after
/// the search, one entry per hit, in order): a replica that was behind
/// found a value since overwritten or deleted, and that hit is left out.
pub fn keep_current(hits: Vec<SearchHit>, current: Vec<Option<Vec<u8>>>) -> Vec<SearchHit> {
    hits.into_iter()
        .zip(current)
        .filter(|(hit, now)| now.as_deref() == Some(hit.value.as_slice()))
        .map(|(hit, _)| hit)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::ring::{key_token, Member, RingView};

    fn ring(nodes: u64) -> Ring {
        let member = |id| Member {
            id: NodeId(id),
            name: format!("n{id}"),
            client_addr: String::new(),
            peer_addr: String::new(),
        };
        let members = (1..=nodes).map(member).collect();
        Ring::new(RingView { epoch: 1, members })
    }

    fn hit(key: &str, score: f64) -> SearchHit {
        SearchHit { key: key.into(), score, value: format!("value of {key}").into_bytes() }
    }

    #[test]
    fn every_token_is_searched_by_exactly_one_live_replica_of_it() {
        let mut rng = quiver_ring::rand::SplitMix64::new(7);
        for nodes in 1..=6u64 {
            let ring = ring(nodes);
            for me in 1..=nodes {
                // Up to two nodes down other than `me`: with three replicas
                // every range keeps one.
                let down: Vec<NodeId> =
                    (1..=nodes).filter(|&id| id != me && rng.between(0, 2) == 0).take(2).map(NodeId).collect();
                let parts = plan(&ring, 3, NodeId(me), &down).expect("a replica of every range is up");
                for probe in 0..2_000u64 {
                    let key = probe.to_le_bytes();
                    let token = key_token(&key);
                    let searching: Vec<NodeId> = parts
                        .iter()
                        .filter(|(_, ranges)| ranges.iter().any(|range| range.contains(token)))
                        .map(|(&node, _)| node)
                        .collect();
                    assert_eq!(searching.len(), 1, "token {token} searched by {searching:?}");
                    let node = searching[0];
                    assert!(!down.contains(&node), "a down node was asked");
                    let replicas = ring.preference_list(&key, 3);
                    assert!(replicas.contains(&node), "{node:?} does not hold {key:?}");
                    if replicas.contains(&NodeId(me)) {
                        assert_eq!(node, NodeId(me), "the coordinator holds the key but asked another");
                    }
                }
            }
        }
    }

    #[test]
    fn a_range_with_every_replica_down_is_unavailable() {
        let ring = ring(4);
        let down = [NodeId(2), NodeId(3), NodeId(4)];
        let Unplannable { range } = plan(&ring, 3, NodeId(1), &down).unwrap_err();
        assert!(ring.preference_list_of_token(range.upto, 3).iter().all(|id| down.contains(id)));
        assert_eq!(ServerError::from(Unplannable { range }).kind, ErrorKind::Unavailable);
    }

    #[test]
    fn merged_hits_are_the_best_k_one_per_key() {
        let parts = vec![vec![hit("a", 1.0), hit("b", 3.0)], vec![hit("c", 2.0), hit("b", 0.5)], vec![hit("d", 2.0)]];
        let merged: Vec<(String, f64)> =
            merge(parts, 3).into_iter().map(|h| (String::from_utf8(h.key).unwrap(), h.score)).collect();
        assert_eq!(merged, [("b".into(), 3.0), ("c".into(), 2.0), ("d".into(), 2.0)]);
    }

    #[test]
    fn hits_whose_value_changed_are_left_out() {
        let hits = vec![hit("a", 3.0), hit("b", 2.0), hit("c", 1.0)];
        let current = vec![Some(b"value of a".to_vec()), Some(b"newer".to_vec()), None];
        let kept: Vec<Vec<u8>> = keep_current(hits, current).into_iter().map(|h| h.key).collect();
        assert_eq!(kept, [b"a".to_vec()]);
    }
}
