//! Where the bytes of upgraded streams (exec, attach, port-forward, cp) are
//! copied: threads of their own, run a few steps of CPU priority (nice) below
//! the rest of the process, so that on a busy machine the kernel serves the
//! threads carrying requests first and a bulk copy waits its turn.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::runtime::{Builder, Handle, Runtime};

/// The name of each splice thread, as `/proc/<pid>/task/*/comm` shows it.
pub const THREAD_NAME: &str = "tower-splice";

/// The highest nice value Linux has: the lowest priority.
const NICE_MAX: i32 = 19;

static SPLICERS: OnceLock<Runtime> = OnceLock::new();

/// Starts the splice threads, `steps` nice steps below the calling thread's
/// priority (capped at nice 19). With `0` nothing is started and upgraded
/// streams are copied on the caller's runtime. Call once, at start, from the
/// thread whose priority is the process's; later calls change nothing.
pub fn start(steps: u8) -> std::io::Result<()> {
    if steps == 0 || SPLICERS.get().is_some() {
        return Ok(());
    }
    let target = priority::current().map_or(i32::from(steps), |base| {
        (base + i32::from(steps)).min(NICE_MAX)
    });
    let runtime = Builder::new_multi_thread()
        .thread_name(THREAD_NAME)
        .enable_all()
        .on_thread_start(move || lower(target))
        .build()?;
    let _ = SPLICERS.set(runtime);
    Ok(())
}

/// The runtime that copies upgraded streams: the splice threads once
/// [`start`]ed, else the caller's runtime.
///
/// # Panics
/// Outside a Tokio runtime when the splice threads were not started.
pub fn handle() -> Handle {
    SPLICERS
        .get()
        .map(|r| r.handle().clone())
        .unwrap_or_else(Handle::current)
}

/// Sets the calling thread's nice value to `target`; warns once if it can't
/// (the streams are still copied, at the process's priority).
fn lower(target: i32) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(e) = priority::set(target)
        && !WARNED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            nice = target,
            error = %e,
            "could not lower the priority of the threads that copy upgraded streams; \
             they run at the process's priority (set --splice-nice 0 to silence this)"
        );
    }
}

#[cfg(target_os = "linux")]
mod priority {
    use rustix::process::{getpriority_process, setpriority_process};
    use rustix::thread::gettid;

    /// The calling thread's nice value (Linux keeps one per thread).
    pub(super) fn current() -> std::io::Result<i32> {
        Ok(getpriority_process(Some(gettid()))?)
    }

    pub(super) fn set(nice: i32) -> std::io::Result<()> {
        Ok(setpriority_process(Some(gettid()), nice)?)
    }
}

#[cfg(not(target_os = "linux"))]
mod priority {
    pub(super) fn current() -> std::io::Result<i32> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    pub(super) fn set(_nice: i32) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A thread's nice value as the kernel reports it in
    /// `/proc/self/task/<tid>/stat` (field 19).
    fn nice_of(tid: i32) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn splice_threads_run_below_the_process_priority() {
        let base = priority::current().unwrap();
        start(10).unwrap();
        let (tid, name) = handle()
            .block_on(async {
                tokio::task::spawn(async {
                    (
                        gettid_raw(),
                        std::thread::current().name().map(str::to_owned),
                    )
                })
                .await
            })
            .unwrap();
        assert_eq!(name.as_deref(), Some(THREAD_NAME));
        assert_eq!(nice_of(tid), (base + 10).min(NICE_MAX));
        assert_eq!(
            nice_of(gettid_raw()),
            base,
            "the caller's priority is unchanged"
        );
    }

    fn gettid_raw() -> i32 {
        rustix::thread::gettid().as_raw_nonzero().get()
    }
}
