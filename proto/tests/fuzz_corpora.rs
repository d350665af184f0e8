//! Every input of the committed fuzz corpora (`fuzz/corpus/<target>/`) still
//! satisfies its target's properties: what the fuzzers found stays fixed.

use std::path::Path;

use tower_proto::properties;

#[test]
fn fuzz_corpora_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 3] = [
        ("join_token", properties::join_token),
        ("route", properties::route),
        ("hello", properties::hello),
    ];
    let mut counts = Vec::new();
    for (target, check) in targets {
        let mut n = 0;
        for entry in std::fs::read_dir(root.join(target)).unwrap().flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            let replay = std::panic::catch_unwind(|| check(&data));
            assert!(
                replay.is_ok(),
                "fuzz corpus input {} fails its checks",
                entry.path().display()
            );
            n += 1;
        }
        assert!(n > 0, "the {target} corpus is empty");
        counts.push(format!("{target}: {n}"));
    }
    eprintln!("fuzz corpora replayed: {}", counts.join(", "));
}
