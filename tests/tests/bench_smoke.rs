//! Smoke run of `tower-bench` at its tiny size: every figure's code runs end to
//! end against the test bed. No timing is asserted; only counts that hold
//! whatever the machine (no watch event lost, every agent back after a restart).

use tower_tests::bench::{self, Figure, Size};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_at_tiny_size() {
    let size = Size::small();
    let report = bench::run(&size, &Figure::ALL).await.unwrap();
    eprintln!("{}", report.markdown());
    for fig in [
        "small GET p50, 1 client",
        "large LIST throughput",
        "watches: event delivery p99",
        "pure tunnel vs raw loopback TCP, 1 stream",
        "pure tunnel vs raw loopback TCP, 16 streams",
        "server memory per idle agent, 1 agent",
        "reconnect after a server restart",
    ] {
        assert!(
            report.rows.iter().any(|r| r.figure.contains(fig)),
            "no row for {fig:?}"
        );
    }
    for (what, want, got) in &report.counts {
        assert_eq!(got, want, "{what}");
    }
}
