//! Where a key's copies go, without I/O: `quiverd` and the deterministic
//! simulation run this one rule.
//!
//! - Receives: the ring, the key, how many replicas, the nodes the
//!   coordinator sees down (its failure detector's word, passed in), and
//!   for a write its coordinator holds already (a causal write) that
//!   coordinator.
//! - Does: the key's replicas are its preference list; each replica that
//!   is down gets a stand-in that holds its hint (sloppy quorum): the
//!   healthy nodes past the replicas in ring order first, then the healthy
//!   replicas, the coordinator last (so that a causal write's hint shares
//!   a record with a replica's part), dealt round-robin when several
//!   replicas are down.
//! - Hands on: a [`Placement`] for the quorum logic.

use quiver_ring::ring::Ring;
use quiver_ring::NodeId;

use super::quorum::Placement;

/// Where `key`'s copies go, as a coordinator that sees `down` down places
/// them (`coordinator`: a causal write's, which holds its copy already).
pub fn place(ring: &Ring, key: &[u8], replicas: usize, down: &[NodeId], coordinator: Option<NodeId>) -> Placement {
    let list = ring.preference_list(key, replicas);
    if !list.iter().any(|id| down.contains(id)) {
        return Placement::from(list);
    }
    let order = ring.preference_list(key, ring.view().members.len());
    let healthy = |id: &&NodeId| !down.contains(id);
    let (replicas_in_order, past) = order.split_at(list.len().min(order.len()));
    let mut candidates: Vec<NodeId> = past.iter().filter(healthy).copied().collect();
    candidates.extend(replicas_in_order.iter().filter(healthy).filter(|&&id| Some(id) != coordinator));
    candidates.extend(coordinator.filter(|id| !down.contains(id)));
    let down_replicas = list.iter().filter(|id| down.contains(id));
    let stand_ins = match candidates.is_empty() {
        true => Vec::new(),
        false => down_replicas.enumerate().map(|(i, &id)| (id, candidates[i % candidates.len()])).collect(),
    };
    Placement { replicas: list, stand_ins }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::ring::{Member, RingView};

    fn ring(nodes: u64) -> Ring {
        let member = |id: u64| Member {
            id: NodeId(id),
            name: format!("n{id}"),
            client_addr: String::new(),
            peer_addr: String::new(),
        };
        Ring::new(RingView { epoch: 1, members: (1..=nodes).map(member).collect() })
    }

    #[test]
    fn a_replica_that_is_down_gets_the_first_healthy_node_past_the_replicas() {
        let ring = ring(5);
        let key = b"k";
        let order = ring.preference_list(key, 5);
        assert_eq!(place(&ring, key, 3, &[], None), Placement::from(order[..3].to_vec()));

        let placed = place(&ring, key, 3, &[order[1]], None);
        assert_eq!(placed.replicas, order[..3].to_vec());
        assert_eq!(placed.stand_ins, vec![(order[1], order[3])]);

        // The first node past them down too: the next one.
        let placed = place(&ring, key, 3, &[order[1], order[3]], None);
        assert_eq!(placed.stand_ins, vec![(order[1], order[4])]);

        // Two replicas down: dealt round-robin over the candidates.
        let placed = place(&ring, key, 3, &[order[0], order[2]], None);
        assert_eq!(placed.stand_ins, vec![(order[0], order[3]), (order[2], order[4])]);
    }

    /// Three nodes, all replicas: the healthy replicas stand in, a causal
    /// write's coordinator last; a node cut off from every peer holds the
    /// hints itself.
    #[test]
    fn without_nodes_past_the_replicas_the_healthy_replicas_stand_in() {
        let ring = ring(3);
        let key = b"k";
        let order = ring.preference_list(key, 3);
        let placed = place(&ring, key, 3, &[order[2]], Some(order[0]));
        assert_eq!(placed.stand_ins, vec![(order[2], order[1])], "the coordinator last");
        let placed = place(&ring, key, 3, &[order[2]], None);
        assert_eq!(placed.stand_ins, vec![(order[2], order[0])]);

        let cut_off = order[1];
        let others = [order[0], order[2]];
        let placed = place(&ring, key, 3, &others, Some(cut_off));
        assert_eq!(placed.stand_ins, vec![(order[0], cut_off), (order[2], cut_off)]);
    }
}
