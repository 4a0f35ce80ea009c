//! The ring as the client routes by it: which nodes to send a key to, in
//! which order, and how a batch splits by replica set. No I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use quiver_ring::ring::{Member, Ring};
use quiver_ring::wire::RingInfo;
use quiver_ring::NodeId;

/// A ring and the client address of each member.
#[derive(Debug)]
pub(crate) struct Routes {
    ring: Ring,
    replicas: usize,
    /// Members to try after the others ([`crate::retry::order`]).
    avoid: Vec<NodeId>,
}

/// Where a client reaches `member`: its client address, with a wildcard
/// host (a node listening on `0.0.0.0`) replaced by its peer address's host.
fn reachable(member: &Member) -> Option<String> {
    let client: SocketAddr = match member.client_addr.parse() {
        Ok(addr) => addr,
        // A host name: as given.
        Err(_) => return (!member.client_addr.is_empty()).then(|| member.client_addr.clone()),
    };
    if !client.ip().is_unspecified() {
        return Some(client.to_string());
    }
    let peer: SocketAddr = member.peer_addr.parse().ok()?;
    Some(SocketAddr::new(peer.ip(), client.port()).to_string())
}

/// Keys (by index) that share one replica set, and where to send them.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Group {
    /// The replicas' client addresses, in the preference order of the
    /// group's first key.
    pub targets: Vec<String>,
    pub indices: Vec<usize>,
}

impl Routes {
    pub fn new(info: RingInfo) -> Routes {
        Routes { replicas: info.replicas.max(1) as usize, ring: Ring::new(info.view), avoid: info.avoid }
    }

    /// Whether there is more than one node to choose from.
    pub fn is_cluster(&self) -> bool {
        self.ring.view().members.len() > 1
    }

    /// The client addresses of `nodes`, those to avoid last.
    fn addrs(&self, nodes: &[NodeId]) -> Vec<String> {
        let nodes = crate::retry::order(nodes.to_vec(), &self.avoid);
        nodes.iter().filter_map(|id| self.ring.member(*id)).filter_map(reachable).collect()
    }

    /// The client addresses of `key`'s replicas, first choice first, those
    /// to avoid last (members whose address is not known yet are left
    /// out).
    pub fn replicas(&self, key: &[u8]) -> Vec<String> {
        self.addrs(&self.ring.preference_list(key, self.replicas))
    }

    /// Splits `keys` by replica set: keys held by the same nodes go
    /// together (a key given twice lands in one group), in their order.
    pub fn split<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) -> Vec<Group> {
        let mut groups: BTreeMap<Vec<NodeId>, (Vec<NodeId>, Vec<usize>)> = BTreeMap::new();
        for (index, key) in keys.into_iter().enumerate() {
            let list = self.ring.preference_list(key, self.replicas);
            let mut set = list.clone();
            set.sort();
            groups.entry(set).or_insert_with(|| (list, Vec::new())).1.push(index);
        }
        groups.into_values().map(|(first, indices)| Group { targets: self.addrs(&first), indices }).collect()
    }
}

/// `items` (in the order their keys were split) dealt out to `groups`:
/// each group's part in its own order, every item moved, none copied.
pub(crate) fn deal<T>(items: Vec<T>, groups: &[Group]) -> Vec<Vec<T>> {
    let mut items: Vec<Option<T>> = items.into_iter().map(Some).collect();
    groups.iter().map(|g| g.indices.iter().filter_map(|&i| items.get_mut(i)?.take()).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_ring::ring::RingView;

    fn member(id: u64, client: &str, peer: &str) -> Member {
        Member { id: NodeId(id), name: format!("n{id}"), client_addr: client.into(), peer_addr: peer.into() }
    }

    fn routes(members: Vec<Member>, replicas: u32) -> Routes {
        Routes::new(RingInfo { replicas, view: RingView { epoch: 1, members }, avoid: Vec::new() })
    }

    /// A member the ring says to avoid is tried after the key's other
    /// replicas, for single keys and groups alike.
    #[test]
    fn members_to_avoid_come_last() {
        let members: Vec<Member> = (1..=3).map(|i| member(i, &format!("127.0.0.1:{i}"), "")).collect();
        let view = RingView { epoch: 1, members };
        let routes = Routes::new(RingInfo { replicas: 3, view, avoid: vec![NodeId(3)] });
        let keys: Vec<Vec<u8>> = (0..50u32).map(|i| i.to_be_bytes().to_vec()).collect();
        for key in &keys {
            let list = routes.replicas(key);
            assert_eq!(list.len(), 3);
            assert_eq!(list[2], "127.0.0.1:3", "{list:?}");
        }
        assert!(routes.split(keys.iter().map(Vec::as_slice)).iter().all(|g| g.targets[2] == "127.0.0.1:3"));
    }

    #[test]
    fn a_wildcard_client_address_takes_the_peer_hosts() {
        assert_eq!(reachable(&member(1, "0.0.0.0:7700", "10.0.0.5:7701")).as_deref(), Some("10.0.0.5:7700"));
        assert_eq!(reachable(&member(1, "127.0.0.2:1", "10.0.0.5:2")).as_deref(), Some("127.0.0.2:1"));
        assert_eq!(reachable(&member(1, "db1:7700", "")).as_deref(), Some("db1:7700"));
        assert_eq!(reachable(&member(1, "", "10.0.0.5:2")), None, "not known yet");
    }

    /// Each key goes first to its preference list's first node, and a split
    /// puts together exactly the keys that have the same replicas.
    #[test]
    fn keys_route_to_their_replicas_and_split_by_replica_set() {
        let members: Vec<Member> = (1..=5).map(|i| member(i, &format!("127.0.0.1:{i}"), "")).collect();
        let routes = routes(members, 3);
        let keys: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
        for key in &keys {
            let list = routes.ring.preference_list(key, 3);
            let want: Vec<String> = list.iter().map(|id| format!("127.0.0.1:{}", id.0)).collect();
            assert_eq!(routes.replicas(key), want);
        }
        let groups = routes.split(keys.iter().map(Vec::as_slice));
        let mut seen: Vec<usize> = groups.iter().flat_map(|g| g.indices.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..keys.len()).collect::<Vec<_>>(), "every key in exactly one group");
        for group in &groups {
            let set = |key: &[u8]| {
                let mut list = routes.replicas(key);
                list.sort();
                list
            };
            let first = set(&keys[group.indices[0]]);
            assert!(group.indices.iter().all(|&i| set(&keys[i]) == first));
            let mut targets = group.targets.clone();
            targets.sort();
            assert_eq!(targets, first);
        }
        assert!(groups.len() > 1 && groups.len() <= 10, "5 nodes have at most C(5,3) = 10 replica sets");
        let parts = deal(keys.clone(), &groups);
        for (group, part) in groups.iter().zip(&parts) {
            let expected: Vec<Vec<u8>> = group.indices.iter().map(|&i| keys[i].clone()).collect();
            assert_eq!(part, &expected, "each group gets its own keys, in order");
        }
    }

    /// With as many nodes as replicas, every key has the same replica set:
    /// a batch stays whole.
    #[test]
    fn three_nodes_of_three_replicas_keep_a_batch_whole() {
        let routes = routes((1..=3).map(|i| member(i, &format!("127.0.0.1:{i}"), "")).collect(), 3);
        let keys: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(routes.split(keys.iter().map(Vec::as_slice)).len(), 1);
        assert!(routes.is_cluster());
    }
}
