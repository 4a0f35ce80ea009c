//! A real `quiverd` on a small file system the test mounts itself (a
//! tmpfs; mounting needs root, which CI has: elsewhere the test says it
//! is skipped): below its free-space reserve client writes get `DiskFull`
//! naming the free bytes while reads go on, the node restarts on the full
//! disk and serves reads, and when space comes back writes resume with no
//! restart. Then with no reserve at all, the file system filled to its
//! last byte: the engine refuses what it cannot write, a node restarted
//! there starts and serves reads, and once there is room again nothing
//! acknowledged is missing, also after a SIGKILL.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::start_node;
use quiver_client::blocking::Client;
use quiver_client::ErrorKind;

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted when
/// dropped.
struct SmallFs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` (with the reason printed) where a file system cannot be
    /// mounted here.
    fn mount(mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&mount)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(SmallFs { mount, _dir: dir })
    }

    /// Bytes free to write.
    fn free(&self) -> u64 {
        let stat = rustix::fs::statvfs(&self.mount).unwrap();
        stat.f_bavail * stat.f_frsize
    }

    /// Fills the file system until `leave` bytes are free (or as close as
    /// it gets, when `leave` is 0: full to the last block).
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.mount.join(format!("filler-{}", self.free()));
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xaau8; 64 << 10];
        while self.free() > leave {
            let n = (self.free() - leave).min(chunk.len() as u64) as usize;
            if file.write_all(&chunk[..n]).is_err() {
                break;
            }
            let _ = file.sync_all();
        }
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Writes `key` until it is taken (bounded: free space is looked at again
/// within a fraction of a second, and the engine retries a segment within
/// one). Not a pace.
fn set_until_taken(client: &Client, key: &str, value: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.set(key, value) {
            Ok(()) => return,
            Err(error) if error.kind() == Some(ErrorKind::DiskFull) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("{key}: {error}"),
        }
    }
}

#[test]
fn below_its_reserve_a_node_refuses_writes_serves_reads_restarts_and_resumes_when_space_comes_back() {
    let Some(fs) = SmallFs::mount(96) else { return };
    let data = fs.mount.join("data");
    let args = [
        "--disk-reserve-bytes",
        "33554432",
        "--disk-reserve-peer-bytes",
        "8388608",
        "--wal-segment-bytes",
        "4194304",
        "--memtable-bytes-max",
        "1048576",
    ];
    let mut node = start_node(&data, &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    client.set("before", "the disk filled").unwrap();

    let filler = fs.fill_leaving(24 << 20);
    // The node looks at the free space again within a fraction of a second.
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        match client.set("while", "full") {
            Ok(()) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(()) => panic!("writes still taken a minute after the disk went below its reserve"),
            Err(error) => break error,
        }
    };
    assert_eq!(error.kind(), Some(ErrorKind::DiskFull), "{error}");
    assert!(error.to_string().contains("bytes free"), "{error}");
    assert_eq!(client.get("before").unwrap().as_deref(), Some(&b"the disk filled"[..]), "reads go on");
    let reserve = common::budget_of(&client, "disk_reserve_bytes");
    assert_eq!(reserve.max, 32 << 20);
    assert!(reserve.used < reserve.max && reserve.reached >= 1, "{reserve:?}");

    // A restart on the full disk: it starts, serves reads, refuses writes.
    assert!(node.terminate().unwrap().success());
    let node = start_node(&data, &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert_eq!(client.get("before").unwrap().as_deref(), Some(&b"the disk filled"[..]));
    assert_eq!(client.set("while", "full").unwrap_err().kind(), Some(ErrorKind::DiskFull));

    std::fs::remove_file(&filler).unwrap();
    set_until_taken(&client, "after", b"room again");
    assert_eq!(client.get("after").unwrap().as_deref(), Some(&b"room again"[..]));
}

#[test]
fn filled_to_the_last_byte_the_engine_refuses_what_it_cannot_write_and_loses_nothing() {
    let Some(fs) = SmallFs::mount(64) else { return };
    let data = fs.mount.join("data");
    let args = ["--disk-reserve-bytes", "0", "--wal-segment-bytes", "1048576", "--memtable-bytes-max", "262144"];
    let mut node = start_node(&data, &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    let value = vec![b'v'; 1000];
    let mut acked = Vec::new();
    for i in 0..100 {
        let key = format!("k{i:05}");
        client.set(&key, &value).unwrap();
        acked.push(key);
    }
    let filler = fs.fill_leaving(0);
    // Writes go into the WAL's pre-allocated room until a new segment is
    // needed, and are refused from then on.
    let mut refused = None;
    for i in 100..20_000 {
        let key = format!("k{i:05}");
        match client.set(&key, &value) {
            Ok(()) => acked.push(key),
            Err(error) => {
                refused = Some(error);
                break;
            }
        }
    }
    let refused = refused.expect("a full disk refused nothing");
    assert_eq!(refused.kind(), Some(ErrorKind::DiskFull), "{refused}");
    assert!(client.get("k00000").unwrap().is_some(), "reads go on");

    // Killed and started again on the full disk, as a node from before
    // context secrets (it has none to read, and no room to keep one): it
    // starts, with no room for a WAL segment either, and serves reads.
    node.kill();
    std::fs::remove_file(data.join("CONTEXT_SECRET")).unwrap();
    let filler_again = fs.fill_leaving(0);
    let mut node = start_node(&data, &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    assert!(client.get("k00000").unwrap().is_some(), "reads go on after a restart on the full disk");

    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler_again).unwrap();
    set_until_taken(&client, "after", b"room again");
    acked.push("after".into());
    node.kill();
    let node = start_node(&data, &args);
    let client = Client::connect([node.addr.clone()]).unwrap();
    for chunk in acked.chunks(1000) {
        let values = client.get_many(chunk).unwrap();
        for (key, got) in chunk.iter().zip(values) {
            assert!(got.is_some(), "{key} was acknowledged and is missing");
        }
    }
}
