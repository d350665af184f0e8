//! A port-forward moving bulk data beside small requests to the same cluster: sequential
//! GETs through the tunnel are measured alone, and beside a port-forward straight to the
//! member and through the tunnel, three ways ([`Pump`]): steady (client and target at
//! 10 MB/s each way), paced (the client at 10 MB/s, its target sending each 4 MB exchange at
//! once) and at full speed. The baseline of each is the same pump straight to the member, so
//! the ratio is what carrying the port-forward in the same tunnel costs the GETs.
//!
//! Asserted: at full speed, the GETs' p99 within 1.25× of the baseline; steady and paced
//! within 2× (a stream holding up the others would cost them far more; nearer than that,
//! the baseline's own spread between runs decides); and that both the server and the agent
//! copied the port-forwards on their splice threads (`tower_ops::splice`), which run 10
//! nice steps below the rest of the process, and that those threads used CPU. Reported:
//! how far each cell is from the 1.25× asked of it (paced: each exchange begins with a
//! full-speed burst while every buffer between target and client fills), how many of the
//! slowest 1% of GETs began in such a burst (the first 50 ms of one of the pump's
//! exchanges), and a port-forward's rate alone. See docs/benchmarks.md for how often each
//! cell is within 1.25×; `tower-bench --only port-forward` measures the same in a release
//! build.
//!
//! This file is its own test binary so that no other test shares the machine while it
//! measures. The member's node is played by kwok ([`FakeNode`]); the server and the agent are
//! the real binaries.

use std::time::Duration;

use tower_ops::splice::THREAD_NAME as SPLICE_THREAD;
use tower_tests::bench::percentile as pct;
use tower_tests::bench::port_forward::{BURST, BesidePump, PortForwardBed, Pump};
use tower_tests::testbed::threads;

/// How many nice steps below the process the splice threads run by default
/// (`--splice-nice`).
const SPLICE_NICE: i32 = 10;

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
    let mut report = format!(
        "port-forward load, {gets} sequential small GETs through the tunnel: alone {}",
        show(&base)
    );
    // What the splice threads' lower priority costs a port-forward with nothing beside it.
    let (alone_straight, alone_tunnel) = (
        bed.pump_alone(&straight, 10).await.unwrap(),
        bed.pump_alone(&tunnel, 10).await.unwrap(),
    );
    report += &format!(
        "\n  a port-forward alone at full speed (both ways): straight {alone_straight:.1} MB/s, \
         through the tunnel {alone_tunnel:.1} MB/s"
    );
    let mut ratios = Vec::new();
    for pump in [Pump::Steady, Pump::Paced, Pump::Full] {
        // Straight first, then through the tunnel, one right after the other.
        let s = bed.gets_beside_pump(&straight, pump, gets).await.unwrap();
        let t = bed.gets_beside_pump(&tunnel, pump, gets).await.unwrap();
        let (s99, t99) = (pct(&s.took, 0.99), pct(&t.took, 0.99));
        let ratio = t99.as_secs_f64() / s99.as_secs_f64();
        report += &format!(
            "\n  beside a port-forward {}: straight to the member {}; through the tunnel {} \
             (p99 ratio tunnel/straight {ratio:.2}: {} the 1.25 asked)",
            pump.label(),
            pumped(&s),
            pumped(&t),
            if ratio <= 1.25 {
                "within"
            } else {
                "not within"
            }
        );
        ratios.push((pump, ratio, s99, t99));
    }
    eprintln!("{report}\n  a burst: the first {BURST:?} of each of the pump's exchanges");
    // Both ends copied the port-forwards' bytes on their splice threads, which run
    // SPLICE_NICE steps below the rest of the process, so the kernel serves the GETs first.
    for (name, pid) in bed.tower_pids() {
        let threads = threads(pid).unwrap();
        let main = threads
            .iter()
            .find(|t| t.tid == pid)
            .expect("the main thread");
        let splicers: Vec<_> = threads.iter().filter(|t| t.name == SPLICE_THREAD).collect();
        assert!(
            !splicers.is_empty(),
            "{name} has no {SPLICE_THREAD} threads: {threads:?}"
        );
        for t in &splicers {
            assert_eq!(
                t.nice,
                (main.nice + SPLICE_NICE).min(19),
                "{name}'s splice thread {} runs at nice {}, its main thread at {}",
                t.tid,
                t.nice,
                main.nice
            );
        }
        let spliced: u64 = splicers.iter().map(|t| t.cpu_ticks).sum();
        let total: u64 = threads.iter().map(|t| t.cpu_ticks).sum();
        eprintln!(
            "  {name}: its {} splice threads used {:.2} s of CPU, {:.0}% of the process's",
            splicers.len(),
            spliced as f64 / 100.0,
            100.0 * spliced as f64 / total.max(1) as f64
        );
        assert!(
            spliced > 0,
            "{name}'s splice threads used no CPU: the port-forwards were copied elsewhere"
        );
    }
    for (pump, ratio, s99, t99) in ratios {
        // At full speed the splice threads' lower priority keeps the GETs within the goal
        // by a wide margin (0.57-0.81 measured, 1.03-1.28 at the same priority); steady
        // and paced are nearer 1.25 than the run-to-run spread of their own baseline
        // (docs/benchmarks.md), so only a gross regression is asserted for them.
        let limit = if pump == Pump::Full { 1.25 } else { 2.0 };
        assert!(
            ratio <= limit,
            "GET p99 {t99:.2?} beside a port-forward ({}) through the tunnel vs {s99:.2?} \
             beside one straight to the member: ratio {ratio:.2}, more than {limit}",
            pump.label()
        );
    }
}
