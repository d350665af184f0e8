//! A port-forward moving bulk data beside small requests to the same cluster: sequential
//! GETs through the tunnel are measured alone, and beside a port-forward (paced and at full
//! speed) straight to the member and through the tunnel. The test asserts the full-speed
//! pair (p99 at most 2×); the paced pair is reported (see docs/benchmarks.md: it is not yet
//! within the 1.25× asked of it). `tower-bench --only port-forward` measures the same in a
//! release build.
//!
//! This file is its own test binary so that no other test shares the machine while it
//! measures. The member's node is played by kwok ([`FakeNode`]); the server and the agent are
//! the real binaries.

use std::time::Duration;

use tower_tests::bench::percentile as pct;
use tower_tests::bench::port_forward::{PACE, PortForwardBed};

/// GETs per measurement.
const GETS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_gets_beside_a_port_forward_moving_bulk_data() {
    let mut bed = PortForwardBed::start().await.unwrap();
    let base = bed.gets(GETS).await.unwrap();
    let straight = bed.member.admin_kubeconfig().to_path_buf();
    let tunnel = bed.kubeconfig.clone();
    // For the record (not asserted): a port-forward moving 10 MB/s each way, its client
    // reading no faster, through the tunnel and straight to the member.
    let (paced, paced_mb_s) = bed
        .gets_beside_pump(&tunnel, Some(PACE), GETS)
        .await
        .unwrap();
    let (paced_straight, paced_straight_mb_s) = bed
        .gets_beside_pump(&straight, Some(PACE), GETS)
        .await
        .unwrap();
    // Asserted: at full speed (on two cores the pump then takes the whole machine), one
    // through the tunnel costs the GETs' p99 at most twice what one straight to the member
    // does.
    let (full_straight, straight_mb_s) = bed.gets_beside_pump(&straight, None, GETS).await.unwrap();
    let (full, full_mb_s) = bed.gets_beside_pump(&tunnel, None, GETS).await.unwrap();

    let show = |d: &[Duration]| format!("p50 {:.2?} p99 {:.2?}", pct(d, 0.5), pct(d, 0.99));
    let (s99, f99) = (pct(&full_straight, 0.99), pct(&full, 0.99));
    let ratio = f99.as_secs_f64() / s99.as_secs_f64();
    eprintln!(
        "port-forward load, {GETS} sequential GETs through the tunnel: alone {}; beside a \
         port-forward through the tunnel at {paced_mb_s:.1} MB/s (both ways) {}; beside one \
         straight to the member at {paced_straight_mb_s:.1} MB/s {}; at full speed straight \
         to the member ({straight_mb_s:.1} MB/s) {}; at full speed through the tunnel \
         ({full_mb_s:.1} MB/s) {} (p99 ratio tunnel/straight {ratio:.2})",
        show(&base),
        show(&paced),
        show(&paced_straight),
        show(&full_straight),
        show(&full),
    );
    assert!(
        ratio <= 2.0,
        "GET p99 {f99:.2?} beside a full-speed port-forward through the tunnel vs {s99:.2?} \
         beside one straight to the member (ratio {ratio:.2})"
    );
}
