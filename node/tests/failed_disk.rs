//! A node whose disk fails says so, and the cluster goes on around it.
//!
//! Three real `quiverd` processes; n3's data directory is on a small ext4
//! file system the test mounts itself (a loop device: mounting needs root,
//! which CI has; elsewhere the test says it is skipped), mounted
//! `errors=remount-ro`. The test makes that file system meet an error
//! (`/sys/fs/ext4/DEV/trigger_fs_error`, what ext4 does when a disk fails
//! under it): it turns read-only, and every later write fails. n3's engine
//! stops taking writes; n3
//! says so in `status` and in its answers to heartbeats; n1 and n2 show it
//! in theirs, send it no more writes and hold hints for it instead, and
//! every write through them is acknowledged at quorum.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{hints_for, wait_for};
use quiver_chaos::node::{cluster_specs, NodeProcess};
use quiver_client::blocking::Client;

/// An ext4 file system on a loop device over a sparse file, mounted on a
/// fresh directory; unmounted when dropped.
struct LoopFs {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `None` (with the reason printed) where it cannot be made here.
    fn mount(mib: u64) -> Option<LoopFs> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        std::fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let run = |command: &mut Command| {
            let out = command.output().map_err(|e| e.to_string())?;
            match out.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
            }
        };
        let made = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            .and_then(|()| run(Command::new("mount").args(["-o", "loop,errors=remount-ro"]).arg(&image).arg(&mount)));
        if let Err(why) = made {
            eprintln!("SKIPPED: cannot mount an ext4 file system on a loop device here (needs root): {why}");
            return None;
        }
        Some(LoopFs { mount, _dir: dir })
    }

    /// The file system meets an error (as ext4 does on a disk that fails
    /// under it) and, mounted `errors=remount-ro`, every later write fails
    /// (`EROFS`).
    fn fail(&self) {
        let out = Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&self.mount).output().unwrap();
        let source = String::from_utf8(out.stdout).unwrap();
        let device = Path::new(source.trim()).file_name().unwrap().to_owned();
        let trigger = Path::new("/sys/fs/ext4").join(device).join("trigger_fs_error");
        std::fs::write(&trigger, "quiver failed_disk test\n").unwrap();
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn direct(node: &NodeProcess) -> Client {
    Client::connect([node.addr.clone()]).unwrap().direct()
}

#[test]
fn a_node_whose_disk_fails_says_so_and_its_writes_are_hinted() {
    let Some(fs) = LoopFs::mount(256) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut specs = cluster_specs(Path::new(env!("CARGO_BIN_EXE_quiverd")), dir.path(), 3).unwrap();
    specs[2].data_dir = fs.mount.join("n3");
    let small = ["--disk-reserve-bytes", "0", "--wal-segment-bytes", "1048576"];
    let nodes: Vec<NodeProcess> =
        specs.iter().map(|spec| NodeProcess::start(&spec.clone().args(small)).unwrap()).collect();
    let (n1, n2, n3) = (direct(&nodes[0]), direct(&nodes[1]), direct(&nodes[2]));
    for client in [&n1, &n2, &n3] {
        wait_for(client, "every peer up", |s| s.peers.iter().all(|p| p.up));
    }
    n1.set("before", "v").unwrap();

    fs.fail();
    // n3's engine meets the failed disk at its next write.
    let mut i = 0;
    while n3.status().unwrap().storage_failure.is_none() {
        let _ = n1.set(format!("meets-{i}"), "v");
        i += 1;
        assert!(i < 1_000, "n3's engine never failed");
    }
    let failure = n3.status().unwrap().storage_failure.unwrap();
    for client in [&n1, &n2] {
        let status = wait_for(client, "n3's failure seen", |s| {
            s.peers.iter().any(|p| p.name == "n3" && p.up && p.storage_failure.is_some())
        });
        let seen = status.peers.iter().find(|p| p.name == "n3").unwrap().storage_failure.clone().unwrap();
        assert_eq!(seen, failure, "peers show what n3 says");
    }

    let held_before: u64 = [&n1, &n2].iter().map(|c| hints_for(&c.status().unwrap(), "n3")).sum();
    let keys: Vec<String> = (0..20).map(|i| format!("after-{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let through = if i % 2 == 0 { &n1 } else { &n2 };
        through.set(key, key).unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let held: u64 = [&n1, &n2].iter().map(|c| hints_for(&c.status().unwrap(), "n3")).sum();
    assert_eq!(held - held_before, keys.len() as u64, "every write's copy for n3 is held as a hint");
    let values = n1.get_many(&keys).unwrap();
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
    }
}
