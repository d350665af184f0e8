//! What must hold for any input to Tower's parsers of hostile input. Each
//! function panics when a property fails; the fuzz targets (`fuzz/`) and the
//! corpus replay (`proto/tests/fuzz_corpora.rs`) call them with arbitrary
//! bytes, so a finding, once added to a corpus, stays fixed.

use crate::hello::{self, Hello, Reply};
use crate::token::{JoinToken, split_credential};

/// `JoinToken::parse` never panics; what it accepts is well-formed and
/// survives an encode/parse round trip unchanged.
pub fn join_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = split_credential(text);
    let Ok(token) = JoinToken::parse(text) else {
        return;
    };
    assert!(!token.claims.servers.is_empty());
    assert!(crate::names::is_valid_cluster_name(&token.claims.cluster));
    assert!(!token.claims.id.contains(':'));
    let again = JoinToken::parse(&token.encode()).expect("an accepted token re-parses");
    assert_eq!(again, token);
    let credential = token.credential();
    let (id, secret) = split_credential(credential.expose());
    assert_eq!(id, Some(token.claims.id.as_str()));
    assert_eq!(secret, token.secret);
    // The secret (at least 22 characters) never prints; only the public
    // claims do, and they may contain anything.
    assert_eq!(format!("{:?}", token.secret), "Secret(<redacted>)");
    assert_eq!(format!("{:?}", token.credential()), "Secret(<redacted>)");
}

/// `route` never panics, and never routes a path that escapes its cluster:
/// the forwarded path starts with `/`, has no `.`/`..` segment, and the
/// cluster is a valid name.
pub fn route(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let Ok(r) = crate::route::route(path, query) else {
        return;
    };
    assert!(crate::names::is_valid_cluster_name(&r.cluster), "{r:?}");
    assert!(r.path_and_query.starts_with('/'), "{r:?}");
    let forwarded = r.path_and_query.split('?').next().unwrap_or_default();
    assert!(
        !forwarded.split('/').any(|s| s == "." || s == ".."),
        "{path:?} routed to {r:?}"
    );
    assert!(!forwarded.contains('\\'), "{r:?}");
    let lower = forwarded.to_ascii_lowercase();
    for encoded in ["%2e", "%2f", "%5c", "%00"] {
        assert!(!lower.contains(encoded), "{path:?} routed to {r:?}");
    }
    assert!(path.contains(&format!("/clusters/{}", r.cluster)), "{r:?}");
}

/// The control-line decoders never panic, reject over-long lines, and what
/// they accept re-encodes to a line that decodes to the same message.
pub fn hello(data: &[u8]) {
    let h = hello::decode_line::<Hello>(data);
    let r = hello::decode_line::<Reply>(data);
    if data.len() > hello::MAX_LINE {
        assert!(h.is_err() && r.is_err());
    }
    if let Ok(h) = h {
        let line = hello::encode_line(&h);
        let back: Hello = hello::decode_line(&line[..line.len() - 1]).expect("re-decodes");
        assert_eq!(back, h);
        let _ = crate::hello::ProtocolVersion::CURRENT.check_peer(h.protocol);
    }
    if let Ok(r) = r {
        let line = hello::encode_line(&r);
        let back: Reply = hello::decode_line(&line[..line.len() - 1]).expect("re-decodes");
        assert_eq!(back, r);
    }
}
