//! `quiver load FILE`: streams a file of any size into the node in batches,
//! each one bulk set (all or nothing), one after another, with a progress
//! bar on a terminal. When a batch fails, it says which lines are stored
//! (every batch before it) and which are not (that batch and the rest).

use std::io::BufRead;

use anyhow::{anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use quiver_client::blocking::Client;

use crate::{open_input, split_entry};

/// Bytes a bulk set spends on an entry besides its key and value, on the
/// wire (two varint lengths): kept free in each batch so that its frame
/// stays under the node's limit too.
const ENTRY_OVERHEAD_BYTES: u64 = 10;

/// A batch being gathered: its entries and the lines they came from.
#[derive(Default)]
struct Batch {
    entries: Vec<(String, String)>,
    bytes: u64,
    first_line: u64,
    last_line: u64,
}

/// Loads `file` in batches of at most `batch` entries. Returns the summary
/// line; an error says which lines were stored.
pub fn load(client: &Client, file: &str, batch: usize) -> anyhow::Result<String> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let limits = client.limits()?;
    let batch = batch.min(usize::try_from(limits.bulk_entries_max).unwrap_or(usize::MAX));
    // The bulk set's byte limit counts keys and values; the frame also holds
    // the entries' lengths and the request's header.
    let bytes_max = limits.bulk_bytes_max.min(limits.frame_bytes_max.saturating_sub(1024));
    let input = open_input(file)?;
    let progress = progress_bar(file);
    let mut stored = Stored::default();
    let mut current = Batch::default();
    for (n, line) in input.lines().enumerate() {
        let n = n as u64 + 1;
        let line = line.map_err(|e| stored.failure(&format!("{file}, line {n}: {e}")))?;
        progress.inc(line.len() as u64 + 1);
        if line.is_empty() {
            continue;
        }
        let (key, value) = split_entry(file, n, &line).map_err(|e| stored.failure(&format!("{e:#}")))?;
        let bytes = (key.len() + value.len()) as u64 + ENTRY_OVERHEAD_BYTES;
        if !current.entries.is_empty() && (current.entries.len() >= batch || current.bytes + bytes > bytes_max) {
            stored.send(client, std::mem::take(&mut current), &progress)?;
        }
        if current.entries.is_empty() {
            current.first_line = n;
        }
        current.entries.push((key, value));
        current.bytes += bytes;
        current.last_line = n;
    }
    if !current.entries.is_empty() {
        stored.send(client, current, &progress)?;
    }
    progress.finish_and_clear();
    Ok(format!("OK ({} entries in {}, through line {})", stored.entries, batches(stored.batches), stored.last_line))
}

/// What is stored so far.
#[derive(Default)]
struct Stored {
    entries: u64,
    batches: u64,
    /// Every entry on lines up to this one is stored.
    last_line: u64,
}

impl Stored {
    fn send(&mut self, client: &Client, batch: Batch, progress: &ProgressBar) -> anyhow::Result<()> {
        let count = batch.entries.len() as u64;
        if let Err(error) = client.bulk_set(batch.entries) {
            let what = format!(
                "lines {}-{} (batch {}) failed: {error}{}",
                batch.first_line,
                batch.last_line,
                self.batches + 1,
                if error.is_ambiguous() { " (that batch may or may not be stored, entirely)" } else { "" }
            );
            progress.finish_and_clear();
            return Err(self.failure(&what));
        }
        self.entries += count;
        self.batches += 1;
        self.last_line = batch.last_line;
        progress.set_message(format!("{} entries stored", self.entries));
        Ok(())
    }

    /// The error for a load that stopped: what is stored, what is not.
    fn failure(&self, why: &str) -> anyhow::Error {
        match self.last_line {
            0 => anyhow!("{why}\nnothing was stored"),
            last => anyhow!(
                "{why}\nlines 1-{last} are stored ({} entries in {}); no line after {last} was stored",
                self.entries,
                batches(self.batches)
            ),
        }
    }
}

/// "1 batch", "2 batches".
fn batches(n: u64) -> String {
    if n == 1 {
        "1 batch".to_owned()
    } else {
        format!("{n} batches")
    }
}

/// A bar over the file's bytes (a spinner for stdin), drawn only on a
/// terminal.
fn progress_bar(file: &str) -> ProgressBar {
    let size = (file != "-").then(|| std::fs::metadata(file).ok()).flatten().map(|m| m.len());
    let bar = match size {
        Some(size) => ProgressBar::new(size).with_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => ProgressBar::new_spinner(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}
