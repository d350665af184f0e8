//! The file-backed token store: `<state-dir>/tokens.json`.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tower_proto::token::{Claims, JoinToken, Secret, random_id};

use super::{TokenStore, Verdict};

/// One stored token: never the secret, only its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub cluster: String,
    /// SHA-256 of the secret, lowercase hex.
    pub digest: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(default)]
    pub expires: Option<u64>,
    #[serde(default)]
    pub revoked: bool,
}

impl TokenRecord {
    fn verdict(&self, now: u64) -> Verdict {
        if self.revoked {
            Verdict::Revoked
        } else if self.expires.is_some_and(|e| e <= now) {
            Verdict::Expired
        } else {
            Verdict::Valid {
                token_id: self.id.clone(),
            }
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

// === impl FileStore ===

/// Tokens in `<state-dir>/tokens.json`.
pub struct FileStore {
    path: PathBuf,
    cache: RwLock<(Option<SystemTime>, Vec<TokenRecord>)>,
}

impl FileStore {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let store = Self {
            path: state_dir.join("tokens.json"),
            cache: RwLock::new((None, Vec::new())),
        };
        store.refresh()?;
        Ok(store)
    }

    fn load(&self) -> anyhow::Result<Vec<TokenRecord>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let file: TokenFile = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!("{} is not a valid token file: {e}", self.path.display())
                })?;
                Ok(file.tokens)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", self.path.display())),
        }
    }

    /// Runs a read-modify-write of the token file under an exclusive lock, so
    /// concurrent `towerctl` invocations do not lose each other's updates.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Vec<TokenRecord>) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", lock_path.display()))?;
        lock.lock()?;
        let mut tokens = self.load()?;
        let out = f(&mut tokens)?;
        self.save(tokens)?;
        Ok(out)
    }

    fn save(&self, tokens: Vec<TokenRecord>) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(&TokenFile { tokens })?;
        tower_certs::write(&self.path, &json, 0o600)?;
        self.refresh()
    }

    /// Creates a token for `cluster` and returns the full join token (the only
    /// time the secret exists outside the agent).
    pub fn mint(
        &self,
        cluster: &str,
        servers: Vec<String>,
        host_key: String,
        ttl: Option<Duration>,
    ) -> anyhow::Result<JoinToken> {
        anyhow::ensure!(
            tower_proto::names::is_valid_cluster_name(cluster),
            "cluster name {cluster:?} is not a valid DNS label (lowercase letters, digits, '-')"
        );
        let secret = Secret::generate();
        let now = now_secs();
        let record = TokenRecord {
            id: random_id(),
            cluster: cluster.to_string(),
            digest: secret.digest(),
            created: now,
            expires: ttl.map(|t| now + t.as_secs()),
            revoked: false,
        };
        let token = JoinToken {
            claims: Claims {
                servers,
                host_key,
                cluster: cluster.to_string(),
                id: record.id.clone(),
                expires: record.expires,
            },
            secret,
        };
        self.update(|tokens| {
            tokens.push(record);
            Ok(())
        })?;
        Ok(token)
    }

    /// Stores a digest for an externally chosen bare secret (KubeSphere sets
    /// `spec.connection.token` itself).
    pub fn import(&self, cluster: &str, secret: &Secret) -> anyhow::Result<String> {
        let mut tokens = self.load()?;
        let digest = secret.digest();
        if let Some(t) = tokens
            .iter()
            .find(|t| t.cluster == cluster && t.digest == digest)
        {
            return Ok(t.id.clone());
        }
        let id = random_id();
        tokens.push(TokenRecord {
            id: id.clone(),
            cluster: cluster.to_string(),
            digest,
            created: now_secs(),
            expires: None,
            revoked: false,
        });
        self.save(tokens)?;
        Ok(id)
    }

    /// Revokes every token of `cluster`; returns how many changed.
    pub fn revoke_cluster(&self, cluster: &str) -> anyhow::Result<usize> {
        let mut tokens = self.load()?;
        let mut n = 0;
        for t in tokens
            .iter_mut()
            .filter(|t| t.cluster == cluster && !t.revoked)
        {
            t.revoked = true;
            n += 1;
        }
        self.save(tokens)?;
        Ok(n)
    }

    /// Revokes one token by id.
    pub fn revoke_id(&self, id: &str) -> anyhow::Result<bool> {
        let mut tokens = self.load()?;
        let found = tokens
            .iter_mut()
            .find(|t| t.id == id)
            .map(|t| t.revoked = true);
        self.save(tokens)?;
        Ok(found.is_some())
    }

    pub fn list(&self) -> anyhow::Result<Vec<TokenRecord>> {
        self.load()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl TokenStore for FileStore {
    fn check(&self, cluster: &str, id: Option<&str>, secret: &Secret) -> Verdict {
        let digest = secret.digest();
        let cache = self.cache.read().expect("token cache poisoned");
        let now = now_secs();
        // Compare against every candidate so timing does not reveal which matched.
        let mut found: Option<&TokenRecord> = None;
        for record in cache.1.iter().filter(|r| r.cluster == cluster) {
            let id_ok = id.is_none_or(|id| id.as_bytes().ct_eq(record.id.as_bytes()).into());
            let digest_ok: bool = digest.as_bytes().ct_eq(record.digest.as_bytes()).into();
            if id_ok && digest_ok && found.is_none() {
                found = Some(record);
            }
        }
        found.map_or(Verdict::Unknown, |r| r.verdict(now))
    }

    fn recheck(&self, cluster: &str, token_id: &str) -> Verdict {
        let cache = self.cache.read().expect("token cache poisoned");
        cache
            .1
            .iter()
            .find(|r| r.cluster == cluster && r.id == token_id)
            .map_or(Verdict::Unknown, |r| r.verdict(now_secs()))
    }

    fn knows(&self, cluster: &str) -> bool {
        let cache = self.cache.read().expect("token cache poisoned");
        cache.1.iter().any(|r| r.cluster == cluster)
    }

    fn refresh(&self) -> anyhow::Result<()> {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        {
            let cache = self.cache.read().expect("token cache poisoned");
            if cache.0.is_some() && cache.0 == mtime {
                return Ok(());
            }
        }
        let tokens = self.load()?;
        *self.cache.write().expect("token cache poisoned") = (mtime, tokens);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh store, and a token for gondor from it living `ttl`.
    fn store_with_token(ttl: Option<Duration>) -> (tempfile::TempDir, FileStore, JoinToken) {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let token = store
            .mint(
                "gondor",
                vec!["127.0.0.1:7022".into()],
                "SHA256:x".into(),
                ttl,
            )
            .unwrap();
        (dir, store, token)
    }

    #[test]
    fn mint_check_revoke() {
        let (dir, store, token) = store_with_token(None);
        let id = token.claims.id.as_str();
        assert!(matches!(
            store.check("gondor", Some(id), &token.secret),
            Verdict::Valid { .. }
        ));
        assert_eq!(
            store.check("rohan", Some(id), &token.secret),
            Verdict::Unknown
        );
        assert_eq!(
            store.check("gondor", Some(id), &Secret::generate()),
            Verdict::Unknown
        );
        let raw = std::fs::read_to_string(store.path()).unwrap();
        assert!(
            !raw.contains(token.secret.expose()),
            "secret stored in clear"
        );
        // A second handle (towerctl) revokes; the first sees it after refresh.
        FileStore::open(dir.path())
            .unwrap()
            .revoke_cluster("gondor")
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        store.refresh().unwrap();
        assert_eq!(
            store.check("gondor", Some(id), &token.secret),
            Verdict::Revoked
        );
        assert_eq!(store.recheck("gondor", id), Verdict::Revoked);
    }

    #[test]
    fn expiry() {
        let (_dir, store, token) = store_with_token(Some(Duration::ZERO));
        assert_eq!(
            store.check("gondor", Some(&token.claims.id), &token.secret),
            Verdict::Expired
        );
    }
}
