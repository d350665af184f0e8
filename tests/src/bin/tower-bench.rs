//! `tower-bench`: direct-vs-tunnel benchmarks against the test bed (issue 5).
//!
//! ```sh
//! cargo run --release -p tower-tests --bin tower-bench -- [--size small|full] [--only get,list,watch,tunnel,memory,reconnect,share,port-forward,transport] [--watches N]
//! ```
//!
//! Progress and each figure go to stderr as they are measured; the final table
//! (Markdown, as in `docs/benchmarks.md`) goes to stdout. See [`tower_tests::bench`].

use tower_tests::bench::{self, Figure, Size};

fn usage() -> ! {
    eprintln!(
        "usage: tower-bench [--size small|full] [--only get,list,watch,tunnel,memory,reconnect,share,port-forward,transport] [--watches N]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let mut size = Size::full();
    let mut figures = Figure::ALL.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--size" => {
                size = match value().as_str() {
                    "small" => Size::small(),
                    "full" => Size::full(),
                    _ => usage(),
                }
            }
            "--only" => {
                figures = value()
                    .split(',')
                    .map(|f| Figure::parse(f.trim()).unwrap_or_else(|| usage()))
                    .collect()
            }
            "--watches" => size.watches = value().parse().unwrap_or_else(|_| usage()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let started = std::time::Instant::now();
    let report = bench::run(&size, &figures).await?;
    println!("\n<!-- tower-bench {command} -->");
    println!("{}", report.markdown());
    for (what, want, got) in &report.counts {
        println!(
            "- {what}: {got} of {want}{}",
            if got == want { "" } else { " (MISMATCH)" }
        );
    }
    for note in &report.notes {
        println!("- {note}");
    }
    println!(
        "- machine: {}; whole run {:.0?}",
        bench::machine(),
        started.elapsed()
    );
    Ok(())
}
