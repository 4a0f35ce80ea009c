//! `quiver repair`: an anti-entropy round on one node, with a bar of the
//! exchanges it has done, read from the node's `status` meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use quiver_client::blocking::Client;
use quiver_client::RepairReport;

/// How often the bar asks the node how far its round is.
const POLL: Duration = Duration::from_millis(200);

/// Runs the round on `client`'s node, waiting at most `wait`; the bar
/// follows it over a second connection to `seeds`.
pub fn run(client: &Client, seeds: &[String], wait: Duration) -> anyhow::Result<RepairReport> {
    let watcher = Client::connect(seeds.to_vec())?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} exchanges, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let over = AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !over.load(Ordering::Acquire) {
                let info = watcher.status().ok().and_then(|status| status.anti_entropy);
                if let Some(info) = info {
                    if let Some((done, total)) = info.round {
                        bar.set_length(total);
                        bar.set_position(done);
                    }
                    bar.set_message(format!("{} keys repaired by this node so far", info.keys_repaired));
                }
                std::thread::sleep(POLL);
            }
        });
        let report = client.repair(wait);
        over.store(true, Ordering::Release);
        report
    });
    bar.finish_and_clear();
    Ok(report?)
}
