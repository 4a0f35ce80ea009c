//! Property tests of the hash ring: preference lists, load, and what moves
//! when a node joins. Node ids are random (a node's id is drawn at its first
//! start), keys are random, and every bound is stated in `ring.rs`.

use proptest::prelude::*;
use quiver_ring::rand::SplitMix64;
use quiver_ring::ring::{Member, Ring, RingView};
use quiver_ring::NodeId;

/// A node's share may differ from an even share by this fraction of it.
const LOAD_BOUND: f64 = 0.35;

fn ring(ids: &[u64], epoch: u64) -> Ring {
    let members = ids
        .iter()
        .map(|&id| Member {
            id: NodeId(id),
            name: format!("{id:x}"),
            client_addr: String::new(),
            peer_addr: String::new(),
        })
        .collect();
    Ring::new(RingView { epoch, members })
}

fn keys(seed: u64, count: usize) -> Vec<Vec<u8>> {
    let mut rng = SplitMix64::new(seed);
    (0..count).map(|_| rng.next_u64().to_le_bytes().to_vec()).collect()
}

/// Distinct random node ids.
fn ids(count: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::btree_set(1u64.., count).prop_map(|set| set.into_iter().collect())
}

proptest! {
    #[test]
    fn a_preference_list_is_n_distinct_nodes_starting_at_the_keys_owner(ids in ids(1..=10), n in 1usize..=5, seed in any::<u64>()) {
        let ring = ring(&ids, 1);
        for key in keys(seed, 200) {
            let list = ring.preference_list(&key, n);
            prop_assert_eq!(list.len(), n.min(ids.len()));
            let mut distinct = list.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), list.len());
            prop_assert!(list.iter().all(|id| ids.contains(&id.0)));
            // A shorter list is a prefix of a longer one.
            prop_assert_eq!(&ring.preference_list(&key, 1)[..], &list[..1]);
        }
    }

    #[test]
    fn every_node_holds_about_an_even_share(ids in ids(3..=10), seed in any::<u64>()) {
        let ring = ring(&ids, 1);
        let n = ids.len() as f64;
        for (id, share) in ids.iter().zip(ring.primary_shares()) {
            prop_assert!((share * n - 1.0).abs() <= LOAD_BOUND, "node {:x}: {:.4} of the ring, even is {:.4}", id, share, 1.0 / n);
        }
        // As one of 3 replicas, over sampled keys.
        let keys = keys(seed, 20_000);
        let replicas = 3.min(ids.len());
        for id in &ids {
            let held = keys.iter().filter(|k| ring.preference_list(k, replicas).contains(&NodeId(*id))).count();
            let even = keys.len() as f64 * replicas as f64 / n;
            prop_assert!((held as f64 / even - 1.0).abs() <= LOAD_BOUND, "node {:x} holds {} keys, even is {:.0}", id, held, even);
        }
    }

    #[test]
    fn a_node_that_joins_takes_about_its_share_and_nothing_else_moves(ids in ids(3..=10), new in 1u64.., seed in any::<u64>()) {
        prop_assume!(!ids.contains(&new));
        let before = ring(&ids, 1);
        let mut joined = ids.clone();
        joined.push(new);
        let after = ring(&joined, 2);
        let keys = keys(seed, 20_000);
        let mut moved = 0;
        for key in &keys {
            let (old, now) = (before.preference_list(key, 3), after.preference_list(key, 3));
            if old[0] != now[0] {
                prop_assert_eq!(now[0], NodeId(new), "a primary moved to an old node");
                moved += 1;
            }
            if old != now {
                // The new node entered the list; the others keep their order
                // and the last one of the old list left it.
                prop_assert!(now.contains(&NodeId(new)));
                let rest: Vec<NodeId> = now.iter().copied().filter(|&id| id != NodeId(new)).collect();
                prop_assert_eq!(&rest[..], &old[..old.len() - 1]);
            }
        }
        let even = keys.len() as f64 / joined.len() as f64;
        prop_assert!((moved as f64 / even - 1.0).abs() <= LOAD_BOUND, "{} of {} keys moved, about {:.0} expected", moved, keys.len(), even);
    }
}
