//! Tower's fuzz targets call the property checks in
//! `tower_proto::properties`; the same checks replay the committed corpora in
//! the test suite (`proto/tests/fuzz_corpora.rs`), so a finding, once added to
//! a corpus, stays fixed.

pub use tower_proto::properties as checks;
