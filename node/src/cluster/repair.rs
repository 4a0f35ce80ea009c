//! Anti-entropy between nodes: runs the exchange of
//! [`super::antientropy`] over the peer links, and answers other nodes'.
//!
//! - Owns: what the exchanges found (keys repaired, bytes sent), and the
//!   progress of the round running; the last full exchange of each
//!   replica set (one with every other replica of it, all synced) it
//!   records in the [`TreeKeeper`].
//! - Receives: its schedule (`anti_entropy_ms`; 0: only on demand) and
//!   `quiver repair`'s requests; other nodes' asks ([`answer`]).
//! - Does: a *round*: for each replica set this node holds keys of, an
//!   exchange with each other replica that is up. An exchange's repairs go
//!   both ways: this node's sibling sets are sent to the other replica
//!   and merged there, the other's are pulled and merged here, 1,000 keys
//!   at a time, paced to
//!   `repair_bytes_per_sec` and `repair_keys_per_sec`. One round runs at a
//!   time.
//! - Hands on: a [`RepairReport`]; what `status` shows ([`AntiEntropyInfo`]).
//!
//! A round starts behind a barrier (the trees hold every write
//! acknowledged before it); a set whose exchanges all end in sync is
//! recorded as covered up to that write ([`TreeKeeper::covered`]), which is
//! what lets its tombstones be purged.
//!
//! Repairs stream each side's current state (`PeerRequest::Repair`, and
//! the pull merged here), held to the horizon as streams are
//! ([`crate::horizon`]): whole, but below the horizon for tombstones that
//! delete nothing on the receiving side (it purged them already) and live
//! versions that something there deletes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_ring::wire::{AntiEntropyInfo, ErrorKind, RepairReport, ServerError, TreeRoot};
use quiver_ring::{NodeId, Siblings};

use super::antientropy::{self, Exchange, Outcome, Step, Summary};
use super::calls::{answer_of, off_worker, reply_of, written};
use super::membership::Membership;
use super::trees::{not_built, FullExchange, ReplicaSet, TreeKeeper, Trees};
use crate::clock::Clock;
pub use crate::config::RepairSettings;
use crate::lock;
use crate::messages::{Ask, PeerReply, PeerRequest, Told};
use crate::net::peer::PeerError;
use crate::service::LocalStore;

pub use crate::config::SEGMENTS_PER_ASK_MAX;
/// Keys one pull asks for, at most (and what a node answers).
pub const PULL_KEYS_MAX: usize = 1000;

/// A node's side of anti-entropy (see the module's doc).
#[derive(Debug)]
pub struct Repairer {
    me: NodeId,
    trees: Arc<TreeKeeper>,
    membership: Arc<Membership>,
    local: Arc<LocalStore>,
    wall: Arc<dyn Clock>,
    settings: RepairSettings,
    timeout: Duration,
    round: Mutex<Option<(u64, u64)>>,
    running: tokio::sync::Mutex<()>,
    keys_repaired: AtomicU64,
    bytes_sent: AtomicU64,
    exchanges: AtomicU64,
    exchanges_failed: AtomicU64,
}

impl Repairer {
    pub fn new(
        trees: Arc<TreeKeeper>,
        membership: Arc<Membership>,
        local: Arc<LocalStore>,
        wall: Arc<dyn Clock>,
        settings: RepairSettings,
        timeout: Duration,
    ) -> Repairer {
        Repairer {
            me: membership.id(),
            trees,
            membership,
            local,
            wall,
            settings,
            timeout,
            round: Mutex::default(),
            running: tokio::sync::Mutex::new(()),
            keys_repaired: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            exchanges: AtomicU64::new(0),
            exchanges_failed: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> RepairSettings {
        self.settings
    }

    /// The trees it compares.
    pub fn trees(&self) -> &Arc<TreeKeeper> {
        &self.trees
    }

    /// Runs a round every `settings.every` until the repairer is dropped.
    pub fn run_in_background(self: &Arc<Self>) {
        let Some(every) = self.settings.every else { return };
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(repairer) = this.upgrade() else { return };
                let report = repairer.round().await;
                if !report.failed.is_empty() || report.keys_repaired > 0 {
                    tracing::info!(
                        keys_repaired = report.keys_repaired,
                        failed = ?report.failed,
                        "anti-entropy round"
                    );
                }
            }
        });
    }

    /// One round (see the module's doc); waits for the round running, if
    /// one is.
    pub async fn round(&self) -> RepairReport {
        let _running = self.running.lock().await;
        let mut report = RepairReport::default();
        // Every write acknowledged so far, up to `held`, is in the trees
        // every exchange below compares.
        let (Some(held), Some(trees)) = (self.trees.barrier().await, self.trees.trees()) else {
            report.failed.push(not_built().message);
            return report;
        };
        let up: Vec<NodeId> = self
            .membership
            .peers()
            .iter()
            .filter(|p| p.up && p.storage_failure.is_none())
            .filter_map(|p| p.node_id.map(NodeId))
            .collect();
        let sets: Vec<ReplicaSet> = trees.sets().into_iter().filter(|set| set.contains(&self.me)).collect();
        let total = sets.iter().map(|set| set.len().saturating_sub(1) as u64).sum();
        *lock(&self.round) = Some((0, total));
        report.sets = sets.len() as u64;
        for set in sets {
            // Recorded if every exchange of the set ends in sync: whatever
            // this node held when it began is then on every replica (or
            // deletes nothing there), so its tombstones up to `held` may
            // be purged once past the grace period.
            let began = self.wall.now_ms();
            let mut full = true;
            for &peer in set.iter().filter(|&&id| id != self.me) {
                if !up.contains(&peer) {
                    full = false;
                    report.failed.push(format!("{:016x} is down", peer.0));
                } else {
                    match self.exchange(&trees, &set, peer).await {
                        Ok(summary) => report.keys_repaired += summary.keys_repaired as u64,
                        Err(error) => {
                            full = false;
                            report.failed.push(format!("with {:016x}: {error}", peer.0));
                        }
                    }
                    report.exchanges += 1;
                }
                if let Some((done, _)) = lock(&self.round).as_mut() {
                    *done += 1;
                }
            }
            if full {
                report.sets_synced += 1;
                self.trees.covered(set, FullExchange { held, began_ms: began });
            }
        }
        *lock(&self.round) = None;
        report
    }

    /// One exchange with `peer` over the keys of `set`.
    async fn exchange(&self, trees: &Arc<Trees>, set: &ReplicaSet, peer: NodeId) -> Result<Summary, ServerError> {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        let result = self.exchange_steps(trees, set, peer).await;
        if result.is_err() {
            self.exchanges_failed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn exchange_steps(&self, trees: &Arc<Trees>, set: &ReplicaSet, peer: NodeId) -> Result<Summary, ServerError> {
        let mut exchange = Exchange::start(self.settings.segments_per_ask.clamp(1, SEGMENTS_PER_ASK_MAX));
        let pace = Pace::new(self.settings);
        loop {
            let Some(step) = exchange.poll() else {
                return Err(internal("an exchange waits for nothing"));
            };
            match step {
                Step::Ask(ask) => {
                    let request = PeerRequest::Exchange { set: set.clone(), ask };
                    let asked = encoded_len(&request);
                    let told = reply_of(self.call(peer, request).await, "an exchange", |reply| match reply {
                        PeerReply::Told(told) => Ok(told),
                        other => Err(other),
                    })?;
                    self.bytes_sent.fetch_add(asked + encoded_len(&told), Ordering::Relaxed);
                    exchange.told(told, &trees.tree(set));
                }
                Step::List(segments) => {
                    let (trees, set) = (trees.clone(), set.clone());
                    exchange.listed(off_worker(move || trees.list(&set, &segments)).await?);
                }
                Step::Repair(keys) => {
                    for chunk in keys.chunks(PULL_KEYS_MAX) {
                        let bytes = self.repair_keys(trees, peer, chunk.to_vec()).await?;
                        pace.spent(bytes, chunk.len() as u64).await;
                    }
                    exchange.repaired();
                }
                Step::Done(Outcome::Synced(summary)) => return Ok(summary),
                Step::Done(Outcome::Failed(why)) => {
                    return Err(ServerError::new(ErrorKind::Internal, format!("the exchange failed: {why}")))
                }
            }
        }
    }

    /// Sends this node's sibling sets of `keys` to `peer` and merges
    /// `peer`'s here; the bytes both took.
    async fn repair_keys(&self, trees: &Arc<Trees>, peer: NodeId, keys: Vec<Vec<u8>>) -> Result<u64, ServerError> {
        let (reading, asked) = (trees.clone(), keys.clone());
        let ours = off_worker(move || reading.siblings(&asked)).await?;
        let sets: Vec<(Vec<u8>, Siblings)> = ours.into_iter().filter_map(|(key, s)| Some((key, s?))).collect();
        let mut bytes = encoded_len(&sets);
        if !sets.is_empty() {
            written(self.call(peer, PeerRequest::Repair { sets }).await, "a repair")?;
        }
        let pulled = self.call(peer, PeerRequest::Pull { keys: keys.clone() }).await;
        let theirs = reply_of(pulled, "a repair's pull", |reply| match reply {
            PeerReply::Sets(sets) => Ok(sets),
            other => Err(other),
        })?;
        // Only what was asked is taken.
        let asked: HashSet<&Vec<u8>> = keys.iter().collect();
        let theirs: Vec<(Vec<u8>, Siblings)> =
            theirs.into_iter().filter(|(key, _)| asked.contains(key)).filter_map(|(key, s)| Some((key, s?))).collect();
        bytes += encoded_len(&theirs);
        let repaired = keys.len() as u64;
        if !theirs.is_empty() {
            let local = self.local.clone();
            answer_of(move |done| local.apply_streamed(theirs, done)).await?;
        }
        self.keys_repaired.fetch_add(repaired, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        Ok(bytes)
    }

    async fn call(&self, peer: NodeId, request: PeerRequest) -> Result<PeerReply, PeerError> {
        match self.membership.link_to(peer) {
            Some(link) => link.call(request, self.timeout).await,
            None => Err(PeerError::Unknown(peer)),
        }
    }

    pub fn status(&self) -> AntiEntropyInfo {
        let trees = self.trees.trees();
        let sets: Vec<ReplicaSet> = trees
            .as_ref()
            .map_or_else(Vec::new, |trees| trees.sets().into_iter().filter(|set| set.contains(&self.me)).collect());
        let full: Vec<u64> =
            sets.iter().map(|set| self.trees.last_full_exchange(set).map_or(0, |full| full.began_ms)).collect();
        let roots = sets
            .iter()
            .zip(&full)
            .map(|(set, &full_exchange_ms)| {
                let tree = trees.as_ref().map(|trees| trees.tree(set)).unwrap_or_default();
                let set = set.iter().map(|id| id.0).collect();
                TreeRoot { set, root: tree.root(), keys: tree.keys(), full_exchange_ms }
            })
            .collect();
        let keeper = self.trees.status();
        AntiEntropyInfo {
            trees_built: keeper.built,
            tree_keys: keeper.keys,
            sets: sets.len() as u64,
            sets_synced: full.iter().filter(|&&at| at > 0).count() as u64,
            oldest_full_exchange_ms: full.iter().copied().min().unwrap_or(0),
            keys_repaired: self.keys_repaired.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            exchanges: self.exchanges.load(Ordering::Relaxed),
            exchanges_failed: self.exchanges_failed.load(Ordering::Relaxed),
            round: *lock(&self.round),
            roots,
            tombstones_waiting: self.local.engine().stats().table_tombstones,
            tombstones_purged: keeper.purged,
        }
    }
}

/// Keeps repairs under their budgets: after each batch, sleeps until the
/// bytes and keys so far fit in the time since the exchange began.
struct Pace {
    settings: RepairSettings,
    start: tokio::time::Instant,
    spent: Mutex<(u64, u64)>,
}

impl Pace {
    fn new(settings: RepairSettings) -> Pace {
        Pace { settings, start: tokio::time::Instant::now(), spent: Mutex::new((0, 0)) }
    }

    async fn spent(&self, bytes: u64, keys: u64) {
        let (bytes, keys) = {
            let mut spent = lock(&self.spent);
            spent.0 += bytes;
            spent.1 += keys;
            *spent
        };
        let secs = |amount: u64, per_sec: u64| amount as f64 / per_sec.max(1) as f64;
        let due = secs(bytes, self.settings.bytes_per_sec).max(secs(keys, self.settings.keys_per_sec));
        tokio::time::sleep_until(self.start + Duration::from_secs_f64(due)).await;
    }
}

/// The answer to a peer's exchange step over `set`, a request already
/// checked (`check_peer_request`: its shape and bounds;
/// `check_peer_identity`: both nodes are in the set). `Unavailable` while
/// the trees are not built.
pub async fn answer(trees: &TreeKeeper, set: Vec<NodeId>, ask: Ask) -> Result<Told, ServerError> {
    let trees = trees.trees().ok_or_else(not_built)?;
    let tree = trees.tree(&set);
    let listed = match &ask {
        Ask::Keys(segments) => {
            let segments = segments.clone();
            off_worker(move || trees.list(&set, &segments)).await?
        }
        Ask::Branches | Ask::Segments(_) => Vec::new(),
    };
    antientropy::answer(&tree, &ask, SEGMENTS_PER_ASK_MAX, |_| listed)
        .ok_or_else(|| ServerError::new(ErrorKind::Malformed, "an exchange step past its bounds"))
}

/// The answer to a pull of `keys`, a request already checked
/// (`check_peer_request`: at most [`PULL_KEYS_MAX`] keys).
pub async fn pull(trees: &TreeKeeper, keys: Vec<Vec<u8>>) -> Result<Vec<(Vec<u8>, Option<Siblings>)>, ServerError> {
    let trees = trees.trees().ok_or_else(not_built)?;
    off_worker(move || trees.siblings(&keys)).await
}

fn encoded_len<T: serde::Serialize>(value: &T) -> u64 {
    postcard::experimental::serialized_size(value).map_or(0, |n| n as u64)
}

fn internal(what: &str) -> ServerError {
    ServerError::new(ErrorKind::Internal, what)
}
