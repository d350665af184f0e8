//! The Agents' `tokenRef` Secrets, read from watches instead of a GET per
//! reconcile: one watch per referenced Secret (a `metadata.name` field
//! selector, so RBAC can stay narrowed to names), whose events reconcile the
//! Clusters whose Agent names it. Where the watch is not synced yet, or RBAC
//! grants `get` but not `list`/`watch`, the Secret is read with a GET.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};

use super::queue::Triggers;
use crate::kube::crd::{Agent, TokenRef};

const STARTING: u8 = 0;
const SYNCED: u8 = 1;
const FORBIDDEN: u8 = 2;

/// `(namespace, name)` of a Secret.
type Key = (String, String);

/// The watches on the Secrets Agents reference.
pub(super) struct TokenRefSecrets {
    client: kube::Client,
    agents: reflector::Store<Agent>,
    triggers: Triggers,
    watches: Mutex<HashMap<Key, Watch>>,
}

struct Watch {
    store: reflector::Store<Secret>,
    state: Arc<AtomicU8>,
    task: tokio::task::AbortHandle,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenRefSecrets {
    pub(super) fn new(
        client: kube::Client,
        agents: reflector::Store<Agent>,
        triggers: Triggers,
    ) -> Self {
        Self {
            client,
            agents,
            triggers,
            watches: Default::default(),
        }
    }

    /// The trimmed value under `r.key`; `None` when the Secret or key is missing.
    pub(super) async fn value(&self, r: &TokenRef) -> kube::Result<Option<String>> {
        if let Some(cached) = self.cached(r) {
            return Ok(cached);
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        Ok(api
            .get_opt(&r.name)
            .await?
            .and_then(|s| key_value(&s, &r.key)))
    }

    /// The value from the watch, once it is synced (starting it if needed).
    fn cached(&self, r: &TokenRef) -> Option<Option<String>> {
        let key = (r.namespace.clone(), r.name.clone());
        let mut watches = self.watches.lock().expect("poisoned");
        let watch = watches.entry(key).or_insert_with_key(|key| self.start(key));
        (watch.state.load(Ordering::Relaxed) == SYNCED).then(|| {
            watch
                .store
                .get(&ObjectRef::new(&r.name).within(&r.namespace))
                .and_then(|s| key_value(&s, &r.key))
        })
    }

    /// Stops the watches on Secrets no longer referenced.
    pub(super) fn retain(&self, refs: impl Iterator<Item = TokenRef>) {
        let keep: HashSet<Key> = refs.map(|r| (r.namespace, r.name)).collect();
        self.watches
            .lock()
            .expect("poisoned")
            .retain(|key, _| keep.contains(key));
    }

    fn start(&self, key: &Key) -> Watch {
        let (namespace, name) = key.clone();
        let (store, writer) = reflector::store::<Secret>();
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let state = Arc::new(AtomicU8::new(STARTING));
        let (agents, triggers) = (self.agents.clone(), self.triggers.clone());
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                let events = reflector::reflector(writer, watcher(api, config)).default_backoff();
                tokio::pin!(events);
                while let Some(event) = events.next().await {
                    match event {
                        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                        Ok(event) => {
                            if matches!(event, watcher::Event::InitDone) {
                                state.store(SYNCED, Ordering::Relaxed);
                            }
                            for agent in referencing(&agents, &namespace, &name) {
                                let _ = triggers.unbounded_send(ObjectRef::new(&agent));
                            }
                        }
                        Err(e) if forbidden(&e) => {
                            tracing::info!(
                                namespace,
                                secret = name,
                                "no permission to watch the tokenRef Secret; reading it on every reconcile"
                            );
                            state.store(FORBIDDEN, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => tracing::debug!(error = %e, "tokenRef Secret watch; retrying"),
                    }
                }
            }
        });
        Watch {
            store,
            state,
            task: task.abort_handle(),
        }
    }
}

/// Names of the Agents whose tokenRef is `namespace/name`.
fn referencing(agents: &reflector::Store<Agent>, namespace: &str, name: &str) -> Vec<String> {
    agents
        .state()
        .iter()
        .filter(|a| {
            a.spec
                .token_ref
                .as_ref()
                .is_some_and(|r| r.namespace == namespace && r.name == name)
        })
        .map(|a| a.name_any())
        .collect()
}

fn forbidden(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 403
    )
}

fn key_value(secret: &Secret, key: &str) -> Option<String> {
    let value = secret.data.as_ref()?.get(key)?;
    Some(String::from_utf8_lossy(&value.0).trim().to_string())
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use kube::runtime::watcher::Event;

    use super::*;
    use crate::kube::controller::testing::{Mock, agent_with_token_ref, is_secret_watch, secret};

    fn token_ref() -> TokenRef {
        TokenRef {
            namespace: "tower-tokens".into(),
            name: "agent-tokens".into(),
            key: "token".into(),
        }
    }

    #[tokio::test]
    async fn a_synced_watch_answers_without_a_get_and_reconciles_the_agents_cluster() {
        let mock = Mock::new();
        let (agents, mut writer) = reflector::store::<Agent>();
        writer.apply_watcher_event(&Event::Apply(agent_with_token_ref(
            "gondor",
            "tower-tokens",
            "agent-tokens",
            false,
        )));
        let (triggers, mut reconciles) = mpsc::unbounded();
        let secrets = TokenRefSecrets::new(mock.client.clone(), agents, triggers);
        let mut object = secret("agent-tokens", "token", "agent-token-1");
        object.metadata.namespace = Some("tower-tokens".into());
        object.metadata.resource_version = Some("5".into());
        let list = serde_json::json!({
            "kind": "SecretList", "apiVersion": "v1",
            "metadata": { "resourceVersion": "5" },
            "items": [object],
        });
        // The first read starts the watch and, until it is synced, GETs.
        let r = token_ref();
        let (value, ()) = tokio::join!(secrets.value(&r), async {
            for _ in 0..2 {
                let req = mock.any().await;
                if is_secret_watch(&req) {
                    assert_eq!(req.path, "/api/v1/namespaces/tower-tokens/secrets");
                    assert!(
                        req.query["fieldSelector"].contains("agent-tokens"),
                        "{:?}",
                        req.query
                    );
                    req.reply(200, &list);
                } else {
                    assert_eq!(req.method, "GET");
                    assert_eq!(
                        req.path,
                        "/api/v1/namespaces/tower-tokens/secrets/agent-tokens"
                    );
                    req.reply(200, &object);
                }
            }
        });
        assert_eq!(value.unwrap().as_deref(), Some("agent-token-1"));
        let watch = mock.any().await;
        assert!(is_secret_watch(&watch) && watch.query.contains_key("watch"));
        assert_eq!(reconciles.next().await, Some(ObjectRef::new("gondor")));
        // Synced: read from the watch, no request.
        let value = secrets.value(&token_ref()).await.unwrap();
        assert_eq!(value.as_deref(), Some("agent-token-1"));
        assert!(mock.next_within_100ms().await.is_none());
        // No Agent references it any more: the watch stops.
        secrets.retain(std::iter::empty());
        assert!(secrets.watches.lock().unwrap().is_empty());
        drop(watch);
    }

    #[tokio::test]
    async fn without_watch_permission_every_read_is_a_get() {
        let mock = Mock::new();
        let secrets = mock.token_ref_secrets();
        let r = token_ref();
        for _ in 0..2 {
            let (value, ()) = tokio::join!(secrets.value(&r), async {
                // Secret watches are refused with 403 by the mock.
                let req = mock.next().await;
                assert_eq!(
                    req.path,
                    "/api/v1/namespaces/tower-tokens/secrets/agent-tokens"
                );
                req.reply(200, &secret("agent-tokens", "token", "agent-token-1"));
            });
            assert_eq!(value.unwrap().as_deref(), Some("agent-token-1"));
        }
        mock.assert_quiet().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let watches = secrets.watches.lock().unwrap();
        let state = watches
            .values()
            .next()
            .unwrap()
            .state
            .load(Ordering::Relaxed);
        assert_eq!(state, FORBIDDEN);
    }
}
