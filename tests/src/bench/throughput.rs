//! Throughput: a large LIST of ConfigMaps, and the pure tunnel's capacity
//! against a fast upstream versus raw loopback TCP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::client::{Endpoint, drain};
use super::env::Env;
use super::report::{Report, median_f64, mib_s};
use super::{MIB, NS, Size};
use crate::fixture::upstream::{CHUNK, CHUNK_LEN};
use crate::fixture::{ConfigMaps, raw};

pub(crate) async fn large_list(env: &Env, size: &Size, report: &mut Report) -> anyhow::Result<()> {
    let (direct, tunnel) = env.pair();
    let (count, path) = list_objects(env, size).await?;
    let (mut dc, mut tc) = (direct.connect().await?, tunnel.connect().await?);
    // Warm-up: one LIST each way.
    let (dn, tn) = (dc.get_drain(&path).await?, tc.get_drain(&path).await?);
    let (mut d, mut t) = (Vec::new(), Vec::new());
    for _ in 0..size.list_rounds {
        for (conn, out) in [(&mut dc, &mut d), (&mut tc, &mut t)] {
            let start = Instant::now();
            let n = tokio::time::timeout(Duration::from_secs(300), conn.get_drain(&path))
                .await
                .context("LIST timed out")??;
            out.push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    let (dr, tr) = (median_f64(d), median_f64(t));
    let ratio = tr / dr;
    report.row(
        format!(
            "large LIST throughput ({:.1} MiB, {count} objects, median of {})",
            tn as f64 / MIB,
            size.list_rounds
        ),
        mib_s(dr),
        mib_s(tr),
        Some(ratio),
        "≥ 0.90",
        Some(ratio >= 0.90),
    );
    report
        .counts
        .push(("LIST bytes, tunnel vs direct".into(), dn, tn));
    Ok(())
}

/// Creates the large LIST's ConfigMaps on the member (once per run); returns
/// their count and the path that LISTs them.
pub(crate) async fn list_objects(env: &Env, size: &Size) -> anyhow::Result<(usize, String)> {
    let client = env.member().client().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, NS);
    let count = size.list_bytes.div_ceil(size.list_object_bytes);
    let value = "x".repeat(size.list_object_bytes);
    let started = Instant::now();
    ConfigMaps {
        count,
        name: &|i| format!("list-{i:05}"),
        labels: &[("bench", "list")],
        value: &value,
        concurrency: 16,
        existing_ok: true,
    }
    .create(&api)
    .await?;
    eprintln!(
        "   created {count} ConfigMaps of {} KiB in {:.1?}",
        size.list_object_bytes / 1024,
        started.elapsed()
    );
    let path = format!("/api/v1/namespaces/{NS}/configmaps?labelSelector=bench%3Dlist");
    Ok((count, path))
}

pub(crate) async fn tunnel_capacity(
    env: &Env,
    size: &Size,
    report: &mut Report,
) -> anyhow::Result<()> {
    let direct_https = Arc::new(Endpoint {
        addr: env.synth.addr,
        ca_pem: env.synth.ca_pem.clone(),
        identity: None,
        bearer: None,
        prefix: String::new(),
    });
    // Warm-up.
    bulk_h2(&env.synth_tunnel, 1, 1024 * 1024).await?;
    bulk_h1(&direct_https, 1, 1024 * 1024).await?;
    for (streams, per_stream) in [
        (1, size.bulk_single),
        (size.bulk_streams, size.bulk_per_stream),
    ] {
        let (mut raw, mut https, mut tun) = (Vec::new(), Vec::new(), Vec::new());
        let (mut https_cpu, mut tun_cpu) = (Vec::new(), Vec::new());
        let gib = (per_stream * streams as u64) as f64 / (1024.0 * MIB);
        for _ in 0..size.bulk_rounds {
            raw.push(raw_tcp(streams, per_stream).await?);
            let cpu = process_cpu();
            https.push(bulk_h1(&direct_https, streams, per_stream).await?);
            https_cpu.push((process_cpu() - cpu).as_secs_f64() / gib);
            let cpu = process_cpu();
            tun.push(bulk_h2(&env.synth_tunnel, streams, per_stream).await?);
            tun_cpu.push((process_cpu() - cpu).as_secs_f64() / gib);
        }
        let (raw, https, tun) = (median_f64(raw), median_f64(https), median_f64(tun));
        let (https_cpu, tun_cpu) = (median_f64(https_cpu), median_f64(tun_cpu));
        let what = format!(
            "{streams} stream{} × {}",
            if streams == 1 { "" } else { "s" },
            if per_stream >= 1024 * 1024 {
                format!("{} MiB", per_stream / 1024 / 1024)
            } else {
                format!("{} KiB", per_stream / 1024)
            }
        );
        let ratio = tun / raw;
        report.row(
            format!("pure tunnel vs raw loopback TCP, {what}"),
            mib_s(raw),
            mib_s(tun),
            Some(ratio),
            "≥ 0.50",
            Some(ratio >= 0.5),
        );
        report.row(
            format!("pure tunnel vs direct HTTPS to the upstream, {what}"),
            mib_s(https),
            mib_s(tun),
            Some(tun / https),
            "",
            None,
        );
        report.row(
            format!("CPU per GiB moved (this whole process), direct HTTPS vs tunnel, {what}"),
            format!("{https_cpu:.2} s"),
            format!("{tun_cpu:.2} s"),
            Some(tun_cpu / https_cpu),
            "",
            None,
        );
    }
    Ok(())
}

/// CPU time (user + system) this process has used: it holds the client,
/// gateway, agent and upstream of the tunnel figures, so CPU per byte measures
/// the tunnel's cost without depending on how busy the machine is.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Bytes/s of `streams` concurrent GETs of `per_stream` bytes over HTTP/2
/// (one connection per stream) to `ep`.
pub async fn bulk_h2(ep: &Arc<Endpoint>, streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let conns = futures::future::try_join_all((0..streams).map(|_| ep.connect())).await?;
    let path = format!("/bytes?n={per_stream}");
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut c in conns {
        let path = path.clone();
        set.spawn(async move {
            tokio::time::timeout(Duration::from_secs(300), c.get_drain(&path))
                .await
                .context("bulk GET timed out")?
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    anyhow::ensure!(
        total == per_stream * streams as u64,
        "read {total} bytes, wanted {}",
        per_stream * streams as u64
    );
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Like [`bulk_h2`], over HTTP/1.1 (what the synthetic upstream speaks).
pub async fn bulk_h1(ep: &Arc<Endpoint>, streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let mut senders = Vec::new();
    for _ in 0..streams {
        let tls = raw::connect(ep.addr, &ep.ca_pem, None, false).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        senders.push(sender);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut s in senders {
        set.spawn(async move {
            let req = Request::get(format!("/bytes?n={per_stream}"))
                .header(header::HOST, "127.0.0.1")
                .body(Empty::<Bytes>::new())?;
            let resp = s.send_request(req).await?;
            tokio::time::timeout(Duration::from_secs(300), drain(resp.into_body()))
                .await
                .context("bulk GET timed out")?
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    anyhow::ensure!(total == per_stream * streams as u64, "short read: {total}");
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Bytes/s of `streams` plain loopback TCP connections each carrying `per_stream` bytes.
pub async fn raw_tcp(streams: usize, per_stream: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let sender = tokio::spawn(async move {
        let mut set = JoinSet::new();
        for _ in 0..streams {
            let (mut sock, _) = listener.accept().await?;
            sock.set_nodelay(true)?;
            set.spawn(async move {
                let mut left = per_stream;
                while left > 0 {
                    let n = left.min(CHUNK_LEN as u64) as usize;
                    sock.write_all(&CHUNK[..n]).await?;
                    left -= n as u64;
                }
                sock.shutdown().await
            });
        }
        while let Some(r) = set.join_next().await {
            r??;
        }
        anyhow::Ok(())
    });
    let mut socks = Vec::new();
    for _ in 0..streams {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    for mut s in socks {
        set.spawn(async move {
            let mut buf = vec![0u8; CHUNK_LEN];
            let mut n = 0u64;
            loop {
                let r = s.read(&mut buf).await?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            std::io::Result::Ok(n)
        });
    }
    let mut total = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(300), set.join_next())
        .await
        .context("raw TCP timed out")?
    {
        total += r??;
    }
    let elapsed = start.elapsed();
    sender.await??;
    anyhow::ensure!(total == per_stream * streams as u64, "short read: {total}");
    Ok(total as f64 / elapsed.as_secs_f64())
}
