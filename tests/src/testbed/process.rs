//! Child processes that never outlive the test process, and the exit-time cleanup behind them.
//!
//! Three layers make sure a test bed leaves nothing behind:
//! 1. [`Process`] sends SIGKILL and reaps on drop (normal completion and panics that unwind).
//! 2. An `atexit` handler kills every live [`Process`] and removes registered directories, for
//!    test beds kept in statics (which are never dropped) when the harness exits.
//! 3. `PR_SET_PDEATHSIG=SIGKILL`, set between fork and exec, kills the child when the test
//!    process dies for any reason (abort, SIGKILL, timeout). The kernel fires it when the
//!    *thread* that forked the child exits, so every child is spawned from one dedicated
//!    thread that lives as long as the process.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};

use anyhow::Context as _;

/// One thread of a running process, as `/proc/<pid>/task/<tid>/stat` shows it.
#[derive(Clone, Debug)]
pub struct ThreadStat {
    pub tid: u32,
    /// Its name (`comm`, at most 15 bytes).
    pub name: String,
    /// Its nice value: Linux keeps one per thread.
    pub nice: i32,
    /// CPU time it has used, user and system, in clock ticks (1/100 s).
    pub cpu_ticks: u64,
}

/// The threads of process `pid` now.
pub fn threads(pid: u32) -> io::Result<Vec<ThreadStat>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let bad = || io::Error::other(format!("unexpected {}: {stat:?}", path.display()));
        let (open, close) = (
            stat.find('(').ok_or_else(bad)?,
            stat.rfind(')').ok_or_else(bad)?,
        );
        // The fields after the name, from the state (field 3): utime and stime are fields
        // 14 and 15, nice is field 19.
        let rest: Vec<&str> = stat[close + 2..].split(' ').collect();
        let field = |n: usize| rest.get(n - 3).ok_or_else(bad);
        out.push(ThreadStat {
            tid: stat[..open].trim().parse().map_err(|_| bad())?,
            name: stat[open + 1..close].to_string(),
            nice: field(19)?.parse().map_err(|_| bad())?,
            cpu_ticks: field(14)?.parse::<u64>().map_err(|_| bad())?
                + field(15)?.parse::<u64>().map_err(|_| bad())?,
        });
    }
    Ok(out)
}

/// A child process, killed (SIGKILL) and reaped on drop; its stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Process {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
    ///
    /// The child gets `PR_SET_PDEATHSIG=SIGKILL` and is forked from the long-lived spawner
    /// thread, so it dies with the test process.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Process> {
        register_exit_handler();
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().context("dup log fd")?)
            .stderr(file);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (prctl, getppid, raise); it allocates only on the error path, where the
        // error is reported back through std's pipe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGKILL);
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child =
            spawn_on_spawner_thread(cmd).with_context(|| format!("spawning {name} ({program})"))?;
        let pid = child.id();
        live_pids().insert(pid);
        tracing::debug!(name, pid, log = %log.display(), "spawned");
        Ok(Process {
            name: name.to_string(),
            pid,
            child,
            log: log.to_path_buf(),
            reaped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL (if still running) and reaps the process now.
    pub fn kill9(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.mark_reaped();
        tracing::debug!(name = %self.name, pid = self.pid, "killed");
    }

    /// Sends SIGTERM (a graceful stop); [`Process::is_running`] tells when it
    /// is done.
    pub fn terminate(&mut self) {
        if !self.reaped {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        match self.child.try_wait() {
            Ok(None) => true,
            Ok(Some(_)) | Err(_) => {
                self.mark_reaped();
                false
            }
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn mark_reaped(&mut self) {
        self.reaped = true;
        live_pids().remove(&self.pid);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

// === spawner thread ===

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testbed-spawner".into())
            .spawn(move || {
                // Lives until the process exits: the static sender is never dropped.
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            })
            .expect("starting the test bed spawner thread");
        Mutex::new(tx)
    });
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(SpawnRequest { cmd, reply })
        .map_err(|_| io::Error::other("test bed spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("test bed spawner thread dropped the request"))?
}

// === exit-time cleanup ===

static LIVE_PIDS: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
static DIRS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

struct Set<'a, T>(std::sync::MutexGuard<'a, Option<HashSet<T>>>);

impl<T: std::hash::Hash + Eq> Set<'_, T> {
    fn insert(&mut self, v: T) {
        self.0.get_or_insert_with(HashSet::new).insert(v);
    }
    fn remove(&mut self, v: &T) {
        if let Some(set) = self.0.as_mut() {
            set.remove(v);
        }
    }
}

fn live_pids() -> Set<'static, u32> {
    Set(LIVE_PIDS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Registers a directory to be removed at process exit if it is still registered then.
pub(crate) fn remove_at_exit(dir: &Path) {
    register_exit_handler();
    Set(DIRS.lock().unwrap_or_else(|e| e.into_inner())).insert(dir.to_path_buf());
}

/// Forgets a directory registered with [`remove_at_exit`].
pub(crate) fn forget_at_exit(dir: &Path) {
    Set(DIRS.lock().unwrap_or_else(|e| e.into_inner())).remove(&dir.to_path_buf());
}

fn register_exit_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn` with libc.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
}

extern "C" fn cleanup_at_exit() {
    // try_lock: never block process exit on a lock held by a thread that is being torn down.
    if let Ok(mut pids) = LIVE_PIDS.try_lock() {
        for pid in pids.take().unwrap_or_default() {
            // SAFETY: plain system calls on pids of our own unreaped children.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
                libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
            }
        }
    }
    if let Ok(mut dirs) = DIRS.try_lock() {
        for dir in dirs.take().unwrap_or_default() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
