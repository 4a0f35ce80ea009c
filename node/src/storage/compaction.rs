//! Compaction: which tables to merge (a pure policy) and the merge itself.
//!
//! The policy is size-tiered over *sorted runs*: a flushed table is a run; the
//! tables one compaction writes (its output split into files of about
//! `table_bytes_target`) form one run and never overlap in keys. Runs of
//! similar size are grouped, and a group of at least `min_runs` is merged
//! into one run. Each byte is rewritten about once per size tier, so write
//! amplification grows with the logarithm of the data size. (Planning over
//! files instead of runs would see a merge's equal-sized output files as a
//! new tier and merge them again, forever.)
//!
//! Merging applies the sibling rule to every key found in several tables,
//! which drops shadowed versions. A key whose versions are all tombstones is
//! dropped when its newest tombstone is older than the grace period *and* no
//! table outside the merge may hold an older version of it (checked with
//! their timestamp ranges and bloom filters), so a delete never uncovers the
//! value it deleted.

use quiver_ring::Siblings;

use crate::storage::error::Result;

/// A sorted run as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunSize {
    pub run: u64,
    pub bytes: u64,
}

/// Knobs of the size-tiered policy.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// A group needs this many runs to be merged.
    pub min_runs: usize,
    /// At most this many runs are merged at once.
    pub max_runs: usize,
    /// Runs below this size all count as one tier.
    pub small_run_bytes: u64,
}

/// The runs to merge next, if any group is ready.
pub fn plan(runs: &[RunSize], policy: &Policy) -> Option<Vec<u64>> {
    let mut by_size = runs.to_vec();
    by_size.sort_by_key(|t| (t.bytes, t.run));
    let mut buckets: Vec<Vec<RunSize>> = Vec::new();
    for table in by_size {
        let fits = buckets.last().is_some_and(|bucket| {
            let avg = bucket.iter().map(|t| t.bytes).sum::<u64>() / bucket.len() as u64;
            table.bytes <= policy.small_run_bytes || table.bytes <= avg.saturating_mul(3) / 2
        });
        match buckets.last_mut() {
            Some(bucket) if fits => bucket.push(table),
            _ => buckets.push(vec![table]),
        }
    }
    // Smallest tier first: cheap merges keep the table count down.
    let bucket = buckets.into_iter().find(|bucket| bucket.len() >= policy.min_runs.max(2))?;
    Some(bucket.into_iter().take(policy.max_runs.max(2)).map(|t| t.run).collect())
}

/// A sorted source of `(key, value)`: a memtable range or a table, with the
/// value decoded ([`Siblings`]) or as stored (bytes).
pub type EntryIter<'a, V> = Box<dyn Iterator<Item = Result<(Vec<u8>, V)>> + 'a>;

/// Merges sorted sources into one sorted stream of keys, each with the values
/// of every source that holds it (in source order). Errors come first.
pub struct MergeIter<'a, V> {
    sources: Vec<std::iter::Peekable<EntryIter<'a, V>>>,
}

impl<V> std::fmt::Debug for MergeIter<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeIter").field("sources", &self.sources.len()).finish()
    }
}

impl<'a, V> MergeIter<'a, V> {
    /// Merges `sources`, each sorted by key without duplicates.
    pub fn new(sources: Vec<EntryIter<'a, V>>) -> MergeIter<'a, V> {
        MergeIter { sources: sources.into_iter().map(Iterator::peekable).collect() }
    }
}

impl<V> Iterator for MergeIter<'_, V> {
    /// A key and `(source index, value)` for each source holding it.
    type Item = Result<(Vec<u8>, Vec<(usize, V)>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut smallest: Option<Vec<u8>> = None;
        for source in &mut self.sources {
            match source.peek() {
                Some(Err(_)) => return source.next().and_then(Result::err).map(Err),
                Some(Ok((key, _))) if smallest.as_ref().is_none_or(|s| key < s) => smallest = Some(key.clone()),
                _ => {}
            }
        }
        let key = smallest?;
        let mut values = Vec::with_capacity(1);
        for (index, source) in self.sources.iter_mut().enumerate() {
            if matches!(source.peek(), Some(Ok((head, _))) if *head == key) {
                if let Some(Ok((_, value))) = source.next() {
                    values.push((index, value));
                }
            }
        }
        Some(Ok((key, values)))
    }
}

/// Merges the versions of one key found in several sources.
pub fn merge_siblings(values: Vec<(usize, Siblings)>) -> Siblings {
    let mut merged = Siblings::default();
    for (_, siblings) in values {
        merged.merge(siblings);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy { min_runs: 4, max_runs: 32, small_run_bytes: 1 << 20 };

    fn sizes(bytes: &[u64]) -> Vec<RunSize> {
        bytes.iter().enumerate().map(|(i, &bytes)| RunSize { run: i as u64, bytes }).collect()
    }

    #[test]
    fn nothing_to_do_below_the_threshold() {
        assert_eq!(plan(&sizes(&[10 << 20, 10 << 20, 10 << 20]), &POLICY), None);
    }

    #[test]
    fn merges_a_tier_of_similar_tables_and_leaves_big_ones() {
        let tables = sizes(&[100 << 20, 8 << 20, 9 << 20, 10 << 20, 8 << 20]);
        assert_eq!(plan(&tables, &POLICY), Some(vec![1, 4, 2, 3]));
    }

    #[test]
    fn small_tables_form_one_tier() {
        let tables = sizes(&[1000, 50_000, 200_000, 900_000, 40 << 20]);
        assert_eq!(plan(&tables, &POLICY), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn repeated_flushes_give_logarithmic_tiers() {
        // Simulate 64 equal flushes: the table count stays small and every
        // byte is rewritten only a few times.
        let mut tables: Vec<RunSize> = Vec::new();
        let (mut next_id, mut written) = (0, 0u64);
        for _ in 0..64 {
            tables.push(RunSize { run: next_id, bytes: 8 << 20 });
            next_id += 1;
            written += 8 << 20;
            while let Some(ids) = plan(&tables, &POLICY) {
                let bytes: u64 = tables.iter().filter(|t| ids.contains(&t.run)).map(|t| t.bytes).sum();
                tables.retain(|t| !ids.contains(&t.run));
                tables.push(RunSize { run: next_id, bytes });
                next_id += 1;
                written += bytes;
            }
            assert!(tables.len() < 12, "{} tables", tables.len());
        }
        let amplification = written as f64 / (64.0 * (8 << 20) as f64);
        assert!(amplification <= 4.0, "write amplification {amplification}");
    }
}
