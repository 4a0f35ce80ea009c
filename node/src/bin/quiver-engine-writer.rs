//! A test tool, not a user command: writes through the storage engine from
//! several threads and prints one line per acknowledged write, so a test can
//! SIGKILL it at any moment and check that every printed write survived.
//!
//! Usage: `quiver-engine-writer DIR RUN THREADS`
//!
//! Each thread `t` loops over `i = 0, 1, ...`:
//! - `set`: key `r{RUN}-t{t}-{i}` = `v{i}`, then prints `set r..-t..-i`;
//! - every 10th `i`, a batch of 10 keys `r{RUN}-t{t}-b{i}-{j}` = `b{i}`, then
//!   prints `batch r..-t..-b{i}`;
//! - every 7th `i`, overwrites key `hot-r{RUN}-t{t}` with `i`, then prints
//!   `hot r{RUN}-t{t} i` (the value read back later must be at least `i`).

use std::io::Write;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use quiver_node::storage::{Engine, Op, Options};
use quiver_ring::{NodeId, Stamper};

/// The allocator `quiverd` uses (see there).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, run, threads] = args.as_slice() else {
        eprintln!("usage: quiver-engine-writer DIR RUN THREADS");
        std::process::exit(2);
    };
    let threads: usize = threads.parse().expect("THREADS is a number");
    let opts = writer_options();
    let engine = Arc::new(Engine::open(dir, opts).unwrap_or_else(|e| {
        eprintln!("open failed: {e}");
        std::process::exit(1);
    }));
    let start = engine.max_hlc();
    let stamper = Arc::new(std::sync::Mutex::new(Stamper::new(NodeId(1), start, u64::MAX)));
    println!("ready");
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, stamper, run) = (engine.clone(), stamper.clone(), run.clone());
            std::thread::spawn(move || {
                let stamp = || {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
                    stamper.lock().unwrap().next(now).expect("a test clock never refuses")
                };
                let out = std::io::stdout();
                for i in 0u64.. {
                    let s = stamp();
                    let key = format!("r{run}-t{t}-{i}").into_bytes();
                    let op = Op { key: key.clone(), version: s.blind(Some(format!("v{i}").into_bytes())) };
                    engine.write_blocking(vec![op]).expect("write");
                    writeln!(out.lock(), "set r{run}-t{t}-{i}").unwrap();
                    if i % 10 == 0 {
                        let s = stamp();
                        let ops = (0..10)
                            .map(|j| Op {
                                key: format!("r{run}-t{t}-b{i}-{j}").into_bytes(),
                                version: s.blind(Some(format!("b{i}").into_bytes())),
                            })
                            .collect();
                        engine.write_blocking(ops).expect("batch");
                        writeln!(out.lock(), "batch r{run}-t{t}-b{i}").unwrap();
                    }
                    if i % 7 == 0 {
                        let s = stamp();
                        let op = Op {
                            key: format!("hot-r{run}-t{t}").into_bytes(),
                            version: s.blind(Some(i.to_string().into_bytes())),
                        };
                        engine.write_blocking(vec![op]).expect("hot");
                        writeln!(out.lock(), "hot r{run}-t{t} {i}").unwrap();
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}

/// Small memtables and WAL segments, so that the few thousand writes of a
/// run flush, roll the log over and recycle retired segments.
fn writer_options() -> Options {
    Options {
        memtable_bytes_max: 64 << 10,
        wal_segment_bytes: 64 << 10,
        table_bytes_target: 1 << 20,
        block_bytes: 1024,
        ..Options::default()
    }
}
