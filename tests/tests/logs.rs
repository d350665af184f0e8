//! What the binaries write to their logs: no terminal colour in a file (a
//! pod's log is one), and one JSON object per line when `--log-format json`
//! (`TOWER_LOG_FORMAT=json`) asks for it.

use std::time::Duration;

use tower_tests::fixture::{ProcessBed, workspace_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_files_hold_no_escape_sequences_and_json_logs_parse() {
    for format in ["text", "json"] {
        let mut bed = ProcessBed::start(
            &[("TOWER_LOG_FORMAT", format)],
            &["isen"],
            &["--log-format", format],
        )
        .await;
        let (state, server_log) = (bed.dir().join("state"), bed.dir().join("server.log"));
        let agent_log = bed.dir().join("agent-isen.log");
        bed.agents[0].terminate();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let towerctl =
            std::process::Command::new(workspace_bin("tower-server", "towerctl").unwrap())
                .arg("--state-dir")
                .arg(&state)
                .args(["--log-format", format, "tokens"])
                .env("RUST_LOG", "debug")
                .output()
                .unwrap();
        assert!(towerctl.status.success());
        for (name, text) in [
            (
                "tower-server",
                std::fs::read_to_string(&server_log).unwrap(),
            ),
            ("tower-agent", std::fs::read_to_string(&agent_log).unwrap()),
            ("towerctl", String::from_utf8(towerctl.stderr).unwrap()),
        ] {
            assert!(
                !text.contains('\x1b'),
                "{name} ({format}) wrote escape sequences: {}",
                text.lines()
                    .find(|l| l.contains('\x1b'))
                    .unwrap_or_default()
            );
            // The ports line is the server's stdout, printed on purpose.
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with("ssh="))
                .collect();
            assert!(!lines.is_empty(), "{name} ({format}) logged nothing");
            for line in &lines {
                if format == "json" {
                    let v: serde_json::Value = serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
                    assert!(
                        v["level"].is_string() && v["fields"].is_object(),
                        "{name}: {line}"
                    );
                } else {
                    assert!(!line.starts_with('{'), "{name}: JSON in text mode: {line}");
                }
            }
        }
    }
}
