//! The reader threads (`quiver-read-N`): every point read and `get_many`
//! runs here, never on an async worker, so a large or slow read holds up no
//! other connection (and, in a cluster, no peer link).
//!
//! - Owns: a queue of [`Job`]s, first in, first out.
//! - Receives: reads from [`LocalStore::read`](super::LocalStore), on the
//!   async workers, which only queue them; and [`Task`]s: reads of every
//!   version of a key, and the causal writes of [`super::causal`].
//! - Does: each thread takes the oldest job. A read reads up to
//!   [`CHUNK_KEYS`] of its keys from the engine; a read with keys left goes
//!   to the back of the queue, so a `get_many` of 100,000 keys shares the
//!   threads with every `get` that arrives meanwhile instead of holding one
//!   for its whole length. A task runs whole.
//! - Hands on: the values (or the error) to the job's `done`, which queues
//!   the answer on the connection.
//!
//! The pool is bounded: a fixed number of threads, and each connection has
//! at most `requests_in_flight_max` requests in flight, so the queue holds
//! at most that many jobs per connection.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use quiver_ring::wire::{ErrorKind, ServerError};
use quiver_ring::Siblings;

use super::Done;
use crate::lock;
use crate::storage::storage_error;
use crate::storage::Engine;

/// Keys a job reads before it yields its thread to the next job.
const CHUNK_KEYS: usize = 256;

/// Test-only: called with the keys of each chunk before a reader thread
/// reads them (a test can hold a read there).
pub type ReadHook = Arc<dyn Fn(&[Vec<u8>]) + Send + Sync>;

/// Work for a reader thread other than a read of values.
pub(super) trait Task: Send {
    /// Does the work, and answers.
    fn run(self: Box<Self>, engine: &Engine);
    /// Answers with `error` instead (the node is shutting down).
    fn cancel(self: Box<Self>, error: ServerError);
}

/// What the reader threads take from the queue.
pub(super) enum Job {
    Read(ReadJob),
    Task(Box<dyn Task>),
}

impl Job {
    fn cancel(self, error: ServerError) {
        match self {
            Job::Read(read) => (read.done)(Err(error)),
            Job::Task(task) => task.cancel(error),
        }
    }
}

/// One read request: the keys, how far it got, and whom to tell.
pub(super) struct ReadJob {
    pub keys: Vec<Vec<u8>>,
    pub values: Vec<Option<Vec<u8>>>,
    /// Bytes of the values read so far, and the most the answer may carry.
    pub bytes: usize,
    pub bytes_max: usize,
    pub done: Done<Vec<Option<Vec<u8>>>>,
}

impl ReadJob {
    /// Reads the next chunk of keys. Returns the job if keys are left;
    /// otherwise it has answered.
    fn run(mut self, engine: &Engine, hook: Option<&ReadHook>) -> Option<ReadJob> {
        let start = self.values.len();
        let end = self.keys.len().min(start + CHUNK_KEYS);
        if let Some(hook) = hook {
            hook(self.keys.get(start..end).unwrap_or_default());
        }
        for at in start..end {
            let Some(key) = self.keys.get(at) else { break };
            let pushed = match engine.get(key) {
                Ok(siblings) => self.push(siblings.and_then(Siblings::into_value)),
                Err(error) => Err(storage_error(error)),
            };
            if let Err(error) = pushed {
                (self.done)(Err(error));
                return None;
            }
        }
        if self.values.len() < self.keys.len() {
            return Some(self);
        }
        self.answer();
        None
    }

    /// Adds the next key's value, unless the answer would then be larger
    /// than one response can carry.
    pub fn push(&mut self, value: Option<Vec<u8>>) -> Result<(), ServerError> {
        self.bytes += value.as_ref().map_or(0, Vec::len);
        if self.bytes > self.bytes_max {
            return Err(ServerError::new(
                ErrorKind::ResponseTooLarge,
                format!(
                    "the values of these {} keys exceed the {} bytes one response can carry (the frame limit less \
                     its framing); ask for fewer keys at a time",
                    self.keys.len(),
                    self.bytes_max
                ),
            ));
        }
        self.values.push(value);
        Ok(())
    }

    /// Answers with the values (all read).
    pub fn answer(self) {
        (self.done)(Ok(self.values))
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Threads waiting on the condition variable: a job is signalled only
    /// when one is (a notify is a system call even when nobody waits).
    idle: usize,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// Queues jobs for the reader threads; cheap to clone. It does not keep
/// the threads: a job that holds one (to queue more work when it is done)
/// does not keep the pool from stopping.
#[derive(Clone)]
pub(super) struct Jobs(Arc<Shared>);

impl Jobs {
    /// Queues `job`; a reader thread does it (or, once the pool is
    /// stopping, it is answered with `ShuttingDown`).
    pub fn submit(&self, job: Job) {
        let mut queue = lock(&self.0.queue);
        if queue.closing {
            drop(queue);
            return job.cancel(ServerError::new(ErrorKind::ShuttingDown, "the node is shutting down"));
        }
        queue.jobs.push_back(job);
        let wake = queue.idle > 0;
        drop(queue);
        if wake {
            self.0.ready.notify_one();
        }
    }
}

/// A fixed set of reader threads over one engine.
pub(super) struct ReadPool {
    jobs: Jobs,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ReadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadPool({} threads)", self.threads.len())
    }
}

impl ReadPool {
    /// Starts `threads` reader threads (at least one).
    pub fn new(engine: Arc<Engine>, threads: usize, hook: Option<ReadHook>) -> std::io::Result<ReadPool> {
        let shared = Arc::new(Shared::default());
        let mut pool = ReadPool { jobs: Jobs(shared.clone()), threads: Vec::new() };
        for i in 0..threads.max(1) {
            let (shared, engine, hook) = (shared.clone(), engine.clone(), hook.clone());
            let thread = std::thread::Builder::new()
                .name(format!("quiver-read-{i}"))
                .spawn(move || reader_loop(&shared, &engine, hook.as_ref()))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Where to queue jobs.
    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }
}

impl Drop for ReadPool {
    /// Answers every queued job, then stops the threads.
    fn drop(&mut self) {
        lock(&self.jobs.0.queue).closing = true;
        self.jobs.0.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn reader_loop(shared: &Shared, engine: &Engine, hook: Option<&ReadHook>) {
    loop {
        let job = {
            let mut queue = lock(&shared.queue);
            while queue.jobs.is_empty() && !queue.closing {
                queue.idle += 1;
                queue = shared.ready.wait(queue).unwrap_or_else(|p| p.into_inner());
                queue.idle -= 1;
            }
            match queue.jobs.pop_front() {
                Some(job) => job,
                None => return,
            }
        };
        match job {
            Job::Read(read) => {
                if let Some(rest) = read.run(engine, hook) {
                    // This thread takes work again right away: no one to wake.
                    lock(&shared.queue).jobs.push_back(Job::Read(rest));
                }
            }
            Job::Task(task) => task.run(engine),
        }
    }
}
