//! The manifest: which tables make up the store, as a durable log of edits.
//!
//! ```text
//! MANIFEST := magic "QVMAN\0\0\x01" (8 bytes) | frame*          (see `frame`)
//! frame payload := postcard(Edit)
//! ```
//!
//! Each edit is appended and synced before the engine acts on it, so the
//! state after replaying the log is never ahead of what is on disk. The first
//! edit of a file is a snapshot of the whole state. When the log grows past a
//! bound it is rolled over: a snapshot is written to `MANIFEST.tmp`, synced,
//! renamed over `MANIFEST`, and the directory synced.
//!
//! Recovery replays the edits; a torn last edit (cut short, or failing its
//! checksum with nothing valid after it) is truncated, because an edit is
//! only acted upon once its sync returned. A bad edit followed by valid ones
//! is corruption.

// This module decodes bytes from disk or the network: what it reads must never
// make it panic. Where an index is safe by construction, a comment says why.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::storage::disk::{read_all, File, Fs};
use crate::storage::error::{Error, IoContext, Result};
use crate::storage::frame::{self, Stop};
use crate::storage::sstable::Props;

/// First bytes of the manifest file.
pub const MAGIC: &[u8; 8] = b"QVMAN\0\0\x01";
/// The manifest's file name.
pub const FILE_NAME: &str = "MANIFEST";
const TMP_NAME: &str = "MANIFEST.tmp";

/// A table as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    pub id: u64,
    /// The sorted run the table belongs to: the tables one compaction writes
    /// share a run and never overlap in keys; a flushed table is a run alone.
    pub run: u64,
    pub size: u64,
    pub props: Props,
}

/// One change to the set of tables.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edit {
    pub added: Vec<TableMeta>,
    pub removed: Vec<u64>,
    /// Every WAL record up to this sequence is in tables.
    pub flushed_seq: Option<u64>,
    /// File ids below this are taken.
    pub next_file_id: Option<u64>,
}

/// The state the edits add up to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub tables: BTreeMap<u64, TableMeta>,
    pub flushed_seq: u64,
    pub next_file_id: u64,
}

impl State {
    fn apply(&mut self, edit: &Edit) {
        for id in &edit.removed {
            self.tables.remove(id);
        }
        for table in &edit.added {
            self.tables.insert(table.id, table.clone());
            self.next_file_id = self.next_file_id.max(table.id + 1);
        }
        if let Some(seq) = edit.flushed_seq {
            self.flushed_seq = self.flushed_seq.max(seq);
        }
        if let Some(id) = edit.next_file_id {
            self.next_file_id = self.next_file_id.max(id);
        }
    }

    fn snapshot(&self) -> Edit {
        Edit {
            added: self.tables.values().cloned().collect(),
            removed: Vec::new(),
            flushed_seq: Some(self.flushed_seq),
            next_file_id: Some(self.next_file_id),
        }
    }
}

/// The open manifest.
#[derive(Debug)]
pub struct Manifest {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    file: Box<dyn File>,
    offset: u64,
    state: State,
    edits_in_file: usize,
    edits_max: usize,
}

impl Manifest {
    /// Opens the manifest in `dir`, creating it if the directory holds no
    /// tables yet. `edits_max` bounds the log before it is rolled over.
    pub fn open(fs: Arc<dyn Fs>, dir: &Path, repair: bool, edits_max: usize) -> Result<Manifest> {
        let path = dir.join(FILE_NAME);
        let names = fs.list(dir).ctx("list", dir)?;
        if names.iter().any(|n| n == TMP_NAME) {
            // A roll-over that did not reach its rename: the old file is whole.
            let tmp = dir.join(TMP_NAME);
            fs.remove(&tmp).ctx("remove", &tmp)?;
        }
        if !names.iter().any(|n| n == FILE_NAME) {
            if names.iter().any(|n| n.ends_with(".sst")) {
                return Err(Error::corrupt(&path, 0, "the manifest is missing but table files exist"));
            }
            let mut manifest = Manifest {
                fs: fs.clone(),
                dir: dir.to_path_buf(),
                file: fs.create(&dir.join(TMP_NAME)).ctx("create", &path)?,
                offset: 0,
                state: State { next_file_id: 1, ..State::default() },
                edits_in_file: 0,
                edits_max,
            };
            let state = manifest.state.clone();
            manifest.roll_over(&state)?;
            return Ok(manifest);
        }

        let file = fs.open(&path).ctx("open", &path)?;
        let buf = read_all(file.as_ref()).ctx("read", &path)?;
        if buf.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(Error::corrupt(&path, 0, "not a Quiver manifest (bad magic)"));
        }
        let mut state = State { next_file_id: 1, ..State::default() };
        let mut edits = 0;
        let mut decode_error = None;
        let stop = frame::scan(&buf, &[], MAGIC.len(), |offset, payload| match postcard::from_bytes::<Edit>(payload) {
            Ok(edit) => {
                state.apply(&edit);
                edits += 1;
                true
            }
            Err(e) => {
                decode_error =
                    Some(Error::corrupt(&path, offset as u64, format!("manifest edit does not decode: {e}")));
                false
            }
        });
        if let Some(e) = decode_error {
            return Err(e);
        }
        let mut offset = buf.len() as u64;
        if let Stop::Bad { offset: bad, reason } = stop {
            if frame::valid_records_after(&buf, &[], bad, |_| true).next().is_some() && !repair {
                return Err(Error::corrupt(&path, bad as u64, format!("{reason}; valid edits follow it")));
            }
            tracing::info!(path = %path.display(), offset = bad, %reason, "truncating torn manifest tail");
            file.set_len(bad as u64).ctx("truncate", &path)?;
            file.sync_data().ctx("sync", &path)?;
            offset = bad as u64;
        }
        Ok(Manifest { fs, dir: dir.to_path_buf(), file, offset, state, edits_in_file: edits, edits_max })
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Reserves a file id.
    pub fn next_file_id(&mut self) -> u64 {
        let id = self.state.next_file_id;
        self.state.next_file_id += 1;
        id
    }

    /// Appends `edit` and syncs it. Returns once it is durable. On a
    /// failure the edit is not in the state, and what it may have left at
    /// the end of the file is cut off again (so a later edit, or a crash,
    /// never finds it): out of space, the error is [`Error::OutOf`] and the
    /// edit can simply be tried again.
    pub fn commit(&mut self, mut edit: Edit) -> Result<()> {
        edit.next_file_id = Some(self.state.next_file_id);
        if self.edits_in_file >= self.edits_max {
            let mut state = self.state.clone();
            state.apply(&edit);
            self.roll_over(&state)?;
            self.state = state;
            return Ok(());
        }
        let path = self.dir.join(FILE_NAME);
        // Writing, not reading.
        #[allow(clippy::expect_used)]
        let payload = postcard::to_stdvec(&edit).expect("postcard encodes an edit into a Vec without failing");
        let mut buf = Vec::with_capacity(payload.len() + frame::HEADER_LEN);
        frame::encode(&mut buf, &[], &[&payload]);
        let appended =
            self.file.write_all_at(&buf, self.offset).and_then(|()| self.file.sync_data()).ctx("append to", &path);
        if let Err(error) = appended {
            let cut = self.file.set_len(self.offset).and_then(|()| self.file.sync_data());
            return Err(match cut {
                Ok(()) => error.exhaustion_passes(),
                Err(_) => error,
            });
        }
        self.offset += buf.len() as u64;
        self.edits_in_file += 1;
        self.state.apply(&edit);
        Ok(())
    }

    /// Writes `state` whole to a new file and renames it into place. A
    /// failure before the rename leaves the old file, whole, as the
    /// manifest (out of space: [`Error::OutOf`]); one after it (syncing the
    /// directory) leaves the new one in place, its name perhaps not yet
    /// durable: never `OutOf`, since the state it holds may be in effect.
    fn roll_over(&mut self, state: &State) -> Result<()> {
        let tmp = self.dir.join(TMP_NAME);
        let path = self.dir.join(FILE_NAME);
        let file = self.fs.create(&tmp).ctx("create", &tmp)?;
        // Writing, not reading.
        #[allow(clippy::expect_used)]
        let payload =
            postcard::to_stdvec(&state.snapshot()).expect("postcard encodes an edit into a Vec without failing");
        let mut buf = MAGIC.to_vec();
        frame::encode(&mut buf, &[], &[&payload]);
        let written = file
            .write_all_at(&buf, 0)
            .and_then(|()| file.sync_data())
            .ctx("write", &tmp)
            .and_then(|()| self.fs.rename(&tmp, &path).ctx("rename", &tmp));
        if let Err(error) = written {
            // The old file is still the manifest, whole.
            let _ = self.fs.remove(&tmp);
            return Err(error.exhaustion_passes());
        }
        // From here the new file is the manifest, whether or not its name
        // is durable yet.
        self.file = file;
        self.offset = buf.len() as u64;
        self.edits_in_file = 1;
        if let Err(error) = self.fs.sync_dir(&self.dir) {
            // The rename may not survive a crash: the next edit writes the
            // whole state again rather than append to a file that may not
            // be the one recovery finds.
            self.edits_in_file = self.edits_max;
            return Err(Error::Failed(format!(
                "syncing {} after renaming a new manifest into place: {error}",
                self.dir.display()
            )));
        }
        Ok(())
    }
}
