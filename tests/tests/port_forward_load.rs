//! A port-forward moving bulk data beside small requests to the same cluster: sequential
//! GETs through the tunnel are measured alone, and beside a port-forward (paced and at full
//! speed) straight to the member and through the tunnel. The test asserts the full-speed
//! pair (p99 at most 2×); the paced pair is reported (see docs/benchmarks.md: it is not yet
//! within the 1.25× asked of it). For each, it reports how many of the slowest 1% of GETs
//! began in a burst: the first 50 ms of one of the pump's exchanges, when its target sends
//! 4 MB at once and every buffer between it and the paced client fills at full speed.
//! `tower-bench --only port-forward` measures the same in a release build.
//!
//! This file is its own test binary so that no other test shares the machine while it
//! measures. The member's node is played by kwok ([`FakeNode`]); the server and the agent are
//! the real binaries.

use std::time::Duration;

use tower_tests::bench::percentile as pct;
use tower_tests::bench::port_forward::{BURST, BesidePump, PACE, PortForwardBed};

/// GETs per measurement: 400, or `TOWER_TEST_PF_GETS` (more for a steadier p99).
fn gets_per_measurement() -> usize {
    std::env::var("TOWER_TEST_PF_GETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_gets_beside_a_port_forward_moving_bulk_data() {
    let mut bed = PortForwardBed::start().await.unwrap();
    let gets = gets_per_measurement();
    let base = bed.gets(gets).await.unwrap();
    let straight = bed.member.admin_kubeconfig().to_path_buf();
    let tunnel = bed.kubeconfig.clone();
    // For the record (not asserted): a port-forward moving 10 MB/s each way, its client
    // reading no faster, through the tunnel and straight to the member.
    let paced = bed
        .gets_beside_pump(&tunnel, Some(PACE), gets)
        .await
        .unwrap();
    let paced_straight = bed
        .gets_beside_pump(&straight, Some(PACE), gets)
        .await
        .unwrap();
    // Asserted: at full speed (on two cores the pump then takes the whole machine), one
    // through the tunnel costs the GETs' p99 at most twice what one straight to the member
    // does.
    let full_straight = bed.gets_beside_pump(&straight, None, gets).await.unwrap();
    let full = bed.gets_beside_pump(&tunnel, None, gets).await.unwrap();

    let show = |d: &[Duration]| format!("p50 {:.2?} p99 {:.2?}", pct(d, 0.5), pct(d, 0.99));
    let pumped = |b: &BesidePump| {
        format!(
            "at {:.1} MB/s (both ways) {}, {} of the slowest {} begun in a burst",
            b.mb_s,
            show(&b.took),
            b.slow_in_burst.0,
            b.slow_in_burst.1
        )
    };
    let (s99, f99) = (pct(&full_straight.took, 0.99), pct(&full.took, 0.99));
    let ratio = f99.as_secs_f64() / s99.as_secs_f64();
    eprintln!(
        "port-forward load, {gets} sequential GETs through the tunnel: alone {}; beside a paced \
         port-forward through the tunnel {}; beside one straight to the member {}; at full \
         speed straight to the member {}; at full speed through the tunnel {} (p99 ratio \
         tunnel/straight {ratio:.2}). A burst: the first {BURST:?} of each of the pump's \
         exchanges, when its target sends 4 MB at once.",
        show(&base),
        pumped(&paced),
        pumped(&paced_straight),
        pumped(&full_straight),
        pumped(&full),
    );
    assert!(
        ratio <= 2.0,
        "GET p99 {f99:.2?} beside a full-speed port-forward through the tunnel vs {s99:.2?} \
         beside one straight to the member (ratio {ratio:.2})"
    );
}
