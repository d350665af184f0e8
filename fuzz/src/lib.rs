//! Property checks behind Tower's fuzz targets. The same file runs in the test
//! suite (`tests/tests/abuse.rs` replays the committed corpora through it), so
//! a finding, once added to a corpus, stays fixed.
//!
//! `route.rs` is compiled here from the server's own source, so the fuzz build
//! does not drag in the server's dependency tree.

#[path = "../../tower-server/src/route.rs"]
pub mod route;

#[path = "checks.rs"]
pub mod checks;
