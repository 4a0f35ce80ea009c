//! The three workloads and their checks.
//!
//! - [`Durability`]: each writer sets new keys and overwrites its own earlier
//!   ones; every acknowledged key must hold its last acknowledged value or a
//!   later value whose write was in doubt.
//! - [`BulkAtomicity`]: bulk sets of 10 to 1000 new keys whose values carry
//!   the batch id; every batch is entirely present or entirely absent, and
//!   every acknowledged batch is present.
//! - [`Isolation`]: every writer bulk-sets the same keys, each value tagged
//!   with its batch id; at checkpoints (writers paused) and at the end every
//!   key carries the same batch id.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quiver_client::Consistency;

use crate::lock;
use crate::run::{Context, Outcome, Workload};

/// Reads `keys` through one client, 1000 keys a request and 16 requests in
/// flight, retrying each request a few times. In a cluster it reads at
/// `all` (checks run with every node up): every replica's versions, merged,
/// and the replicas that answered stale are repaired. `Err` holds why a key
/// could not be read at all.
pub fn read_all(ctx: &Context, keys: &[Vec<u8>]) -> Vec<Result<Option<Vec<u8>>, String>> {
    let consistency = (ctx.addrs.len() > 1).then_some(Consistency::All);
    read_through(&ctx.addrs, false, consistency, keys)
}

/// Reads `keys` through a client seeded with `addrs` (`direct`: every
/// request to the first), at `consistency` (`None`: the node's).
pub fn read_through(
    addrs: &[String],
    direct: bool,
    consistency: Option<Consistency>,
    keys: &[Vec<u8>],
) -> Vec<Result<Option<Vec<u8>>, String>> {
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return keys.iter().map(|_| Err(format!("no runtime: {e}"))).collect(),
    };
    runtime.block_on(async {
        let client = match quiver_client::Client::connect(addrs.to_vec()).await {
            Ok(client) => {
                let client = client.with_timeout(Duration::from_secs(30));
                let client = if direct { client.direct() } else { client };
                Arc::new(match consistency {
                    Some(consistency) => client.with_consistency(consistency),
                    None => client,
                })
            }
            Err(e) => return keys.iter().map(|_| Err(e.to_string())).collect(),
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for chunk in keys.chunks(1000) {
            let (client, limit, chunk) = (client.clone(), limit.clone(), chunk.to_vec());
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let mut last = String::new();
                for _ in 0..5 {
                    match client.get_many(&chunk).await {
                        Ok(values) => return values.into_iter().map(|v| Ok(v.map(|v| v.to_vec()))).collect(),
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                chunk.iter().map(|_| Err(last.clone())).collect::<Vec<_>>()
            }));
        }
        let mut results = Vec::with_capacity(keys.len());
        for task in tasks {
            match task.await {
                Ok(values) => results.extend(values),
                Err(e) => return keys.iter().map(|_| Err(e.to_string())).collect(),
            }
        }
        results
    })
}

/// Pads values to about 100 bytes, like the benchmarks.
fn padded(tag: &str) -> String {
    format!("{tag}|{}", "x".repeat(100usize.saturating_sub(tag.len() + 1)))
}

fn tag(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()?.split('|').next()
}

// ---------------------------------------------------------------------------

/// Sets and overwrites; checks that acknowledged values survive.
#[derive(Debug, Default)]
pub struct Durability {
    /// Per key, in the order its (only) writer issued them: `(op, outcome)`.
    log: Mutex<HashMap<String, Vec<(u64, Outcome)>>>,
}

impl Workload for Durability {
    fn writer(&self, ctx: &Context, index: usize) {
        let mut rng = ctx.rng(index as u64);
        let Some(client) = ctx.client() else { return };
        let mut keys: Vec<String> = Vec::new();
        for op in 0u64.. {
            ctx.pause.checkpoint();
            if ctx.over() {
                return;
            }
            let key = if keys.is_empty() || rng.chance(0.7) {
                keys.push(format!("d-w{index}-{op}"));
                keys[keys.len() - 1].clone()
            } else {
                keys[rng.between(0, keys.len() as u64 - 1) as usize].clone()
            };
            ctx.coordinating(client.node_for(&key));
            let result = client.set(&key, padded(&format!("w{index}-op{op}")));
            let outcome = Outcome::of(&result);
            ctx.counters.record(outcome);
            lock(&self.log).entry(key).or_default().push((op, outcome));
            if outcome != Outcome::Acked {
                // The node is down or restarting: do not spin.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn check(&self, ctx: &Context, _final_check: bool) -> Vec<String> {
        let values = read_all(ctx, &self.keys());
        let log = lock(&self.log);
        let keys: Vec<&String> = log.keys().collect();
        let mut violations = Vec::new();
        for (key, value) in keys.into_iter().zip(values) {
            let ops = &log[key];
            let last_ack = ops.iter().rposition(|(_, o)| *o == Outcome::Acked);
            let value = match value {
                Ok(value) => value,
                Err(e) => {
                    violations.push(format!("{key}: could not be read: {e}"));
                    continue;
                }
            };
            let found = value.as_deref().and_then(tag).and_then(|t| t.rsplit("-op").next()?.parse::<u64>().ok());
            let allowed = match found {
                // Absent is fine only if nothing was acknowledged.
                None => last_ack.is_none(),
                Some(op) => ops
                    .iter()
                    .enumerate()
                    .any(|(i, &(o, outcome))| o == op && outcome != Outcome::Failed && last_ack.is_none_or(|a| i >= a)),
            };
            if !allowed {
                let acked = last_ack.map(|i| ops[i].0);
                violations.push(format!("LOST {key}: holds op {found:?}, but op {acked:?} was acknowledged last"));
            }
        }
        violations
    }

    fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![("keys", lock(&self.log).len() as u64)]
    }

    fn keys(&self) -> Vec<Vec<u8>> {
        lock(&self.log).keys().map(|k| k.as_bytes().to_vec()).collect()
    }
}

// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Batch {
    writer: usize,
    number: u64,
    size: u64,
    outcome: Outcome,
}

impl Batch {
    fn key(&self, j: u64) -> Vec<u8> {
        format!("ba-w{}-b{}-{j}", self.writer, self.number).into_bytes()
    }
    fn tag(&self) -> String {
        format!("w{}-b{}", self.writer, self.number)
    }
}

/// Bulk sets of new keys; checks all-or-nothing.
#[derive(Debug, Default)]
pub struct BulkAtomicity {
    batches: Mutex<Vec<Batch>>,
    partial: AtomicU64,
}

impl Workload for BulkAtomicity {
    fn writer(&self, ctx: &Context, index: usize) {
        let mut rng = ctx.rng(index as u64);
        let Some(client) = ctx.client() else { return };
        for number in 0u64.. {
            ctx.pause.checkpoint();
            if ctx.over() {
                return;
            }
            let batch = Batch { writer: index, number, size: rng.between(10, 1000), outcome: Outcome::Failed };
            let value = padded(&batch.tag());
            ctx.coordinating(client.node_for(batch.key(0)));
            let result = client.bulk_set((0..batch.size).map(|j| (batch.key(j), value.as_bytes())));
            let outcome = Outcome::of(&result);
            ctx.counters.record(outcome);
            lock(&self.batches).push(Batch { outcome, ..batch });
            if outcome != Outcome::Acked {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn check(&self, ctx: &Context, _final_check: bool) -> Vec<String> {
        let mut values = read_all(ctx, &self.keys()).into_iter();
        let batches = lock(&self.batches);
        let mut violations = Vec::new();
        for batch in batches.iter() {
            let tag = batch.tag();
            let mut present = 0;
            for j in 0..batch.size {
                match values.next() {
                    Some(Ok(Some(value))) if self::tag(&value) == Some(tag.as_str()) => present += 1,
                    Some(Ok(None)) => {}
                    Some(Ok(Some(other))) => violations.push(format!(
                        "batch {tag}: key {j} holds {:?}",
                        String::from_utf8_lossy(&other[..other.len().min(40)])
                    )),
                    Some(Err(e)) => violations.push(format!("batch {tag}: key {j} could not be read: {e}")),
                    None => violations.push(format!("batch {tag}: missing read result")),
                }
            }
            if present != 0 && present != batch.size {
                self.partial.fetch_add(1, Ordering::Relaxed);
                violations.push(format!(
                    "PARTIAL batch {tag}: {present} of {} keys present ({:?})",
                    batch.size, batch.outcome
                ));
            } else if present == 0 && batch.outcome == Outcome::Acked {
                violations
                    .push(format!("LOST batch {tag}: acknowledged, but none of its {} keys is present", batch.size));
            }
        }
        violations
    }

    fn keys(&self) -> Vec<Vec<u8>> {
        lock(&self.batches).iter().flat_map(|b| (0..b.size).map(|j| b.key(j))).collect()
    }

    fn counts(&self) -> Vec<(&'static str, u64)> {
        let batches = lock(&self.batches);
        vec![
            ("batches", batches.len() as u64),
            ("keys in acked batches", batches.iter().filter(|b| b.outcome == Outcome::Acked).map(|b| b.size).sum()),
            ("partial batches", self.partial.load(Ordering::Relaxed)),
        ]
    }
}

// ---------------------------------------------------------------------------

/// Concurrent bulk sets over one key set; checks they never mix.
#[derive(Debug)]
pub struct Isolation {
    keys: u64,
    /// Every batch issued: tag -> outcome.
    batches: Mutex<BTreeMap<String, Outcome>>,
    mixed: AtomicU64,
}

impl Isolation {
    pub fn new(keys: u64) -> Isolation {
        Isolation { keys, batches: Mutex::default(), mixed: AtomicU64::new(0) }
    }

    fn key(j: u64) -> Vec<u8> {
        format!("iso-{j:04}").into_bytes()
    }
}

impl Workload for Isolation {
    fn writer(&self, ctx: &Context, index: usize) {
        let Some(client) = ctx.client() else { return };
        for number in 0u64.. {
            ctx.pause.checkpoint();
            if ctx.over() {
                return;
            }
            let tag = format!("w{index}-b{number}");
            let value = padded(&tag);
            ctx.coordinating(client.node_for(Isolation::key(0)));
            let result = client.bulk_set((0..self.keys).map(|j| (Isolation::key(j), value.as_bytes())));
            let outcome = Outcome::of(&result);
            ctx.counters.record(outcome);
            lock(&self.batches).insert(tag, outcome);
            if outcome != Outcome::Acked {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn check(&self, ctx: &Context, _final_check: bool) -> Vec<String> {
        let values = read_all(ctx, &self.keys());
        let mut tags: BTreeMap<String, u64> = BTreeMap::new();
        let mut violations = Vec::new();
        for (j, value) in values.into_iter().enumerate() {
            match value {
                Ok(Some(value)) => *tags.entry(tag(&value).unwrap_or("?").to_owned()).or_default() += 1,
                Ok(None) => *tags.entry("(absent)".into()).or_default() += 1,
                Err(e) => violations.push(format!("iso key {j} could not be read: {e}")),
            }
        }
        let batches = lock(&self.batches);
        let any_acked = batches.values().any(|o| *o == Outcome::Acked);
        if tags.len() > 1 {
            self.mixed.fetch_add(1, Ordering::Relaxed);
            violations.push(format!("MIXED: the key set holds values of {} batches: {tags:?}", tags.len()));
        } else if let Some(tag) = tags.keys().next() {
            match batches.get(tag) {
                Some(Outcome::Failed) => {
                    violations.push(format!("batch {tag} failed before it was sent, yet it is present"))
                }
                None if tag == "(absent)" && any_acked => {
                    violations.push("LOST: every key is absent after acknowledged batches".into())
                }
                None if tag != "(absent)" => violations.push(format!("the keys hold {tag}, which no writer wrote")),
                _ => {}
            }
        }
        violations
    }

    fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![("batches", lock(&self.batches).len() as u64), ("mixed checks", self.mixed.load(Ordering::Relaxed))]
    }

    fn keys(&self) -> Vec<Vec<u8>> {
        (0..self.keys).map(Isolation::key).collect()
    }

    fn checkpoint_every(&self) -> Option<Duration> {
        Some(Duration::from_secs(3))
    }
}
