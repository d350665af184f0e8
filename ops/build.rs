//! Build script of `tower-ops`: finds the git revision the binaries are built
//! from and hands it to the crate as `TOWER_REVISION` (see `tower_ops::VERSION`).
//!
//! It reads the files under `.git` instead of running `git`, so it costs
//! nothing, and asks Cargo to run it again only when `HEAD` or the ref it
//! points at moves (a commit, a checkout), not on every edit. The environment
//! variable `TOWER_REVISION` overrides it (a build from a source tarball or a
//! container build without `.git`); without either the revision is `unknown`.
//! The revision says which commit was checked out, not whether the tree had
//! uncommitted changes on top of it.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TOWER_REVISION");
    let revision = match std::env::var("TOWER_REVISION") {
        Ok(r) if !r.trim().is_empty() => short(r.trim()),
        _ => git_revision().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=TOWER_REVISION={revision}");
}

/// The first 7 characters of a commit id; anything else unchanged.
fn short(rev: &str) -> String {
    if rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        rev[..7].to_ascii_lowercase()
    } else {
        rev.to_string()
    }
}

/// The commit `HEAD` points at, read from the repository around this crate.
fn git_revision() -> Option<String> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let git = manifest
        .ancestors()
        .map(|d| d.join(".git"))
        .find(|p| p.exists())?;
    let git_dir = resolve_git_dir(&git)?;
    // A worktree keeps HEAD in its own dir and the refs in the common one.
    let common = std::fs::read_to_string(git_dir.join("commondir"))
        .ok()
        .map(|c| git_dir.join(c.trim()))
        .unwrap_or_else(|| git_dir.clone());
    let head_file = git_dir.join("HEAD");
    watch(&head_file);
    let head = std::fs::read_to_string(&head_file).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        // Detached HEAD: the commit itself.
        return Some(short(head));
    };
    let reference = reference.trim();
    let loose = common.join(reference);
    let packed = common.join("packed-refs");
    if packed.exists() {
        watch(&packed);
    }
    if loose.exists() {
        watch(&loose);
        return std::fs::read_to_string(&loose)
            .ok()
            .map(|s| short(s.trim()));
    }
    // Not there yet as a loose file (a fresh clone packs its refs): watch the
    // folder it will appear in, then look in packed-refs.
    if let Some(dir) = loose.parent().filter(|d| d.exists()) {
        watch(dir);
    }
    let packed = std::fs::read_to_string(&packed).ok()?;
    packed.lines().find_map(|line| {
        let (id, name) = line.split_once(' ')?;
        (name == reference).then(|| short(id))
    })
}

/// `.git` is the git dir, or a file `gitdir: <path>` (worktrees, submodules).
fn resolve_git_dir(git: &Path) -> Option<PathBuf> {
    if git.is_dir() {
        return Some(git.to_path_buf());
    }
    let text = std::fs::read_to_string(git).ok()?;
    let dir = text.trim().strip_prefix("gitdir:")?.trim();
    let dir = git.parent()?.join(dir);
    watch(git);
    dir.is_dir().then_some(dir)
}

fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}
