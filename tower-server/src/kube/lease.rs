//! Leader election over a `coordination.k8s.io` Lease, so that several server
//! replicas can run while only one writes Cluster and Agent objects.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Whether this replica currently holds the lease.
#[derive(Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew_every: Duration,
}

/// Keeps trying to acquire and renew the lease until `shutdown`.
pub async fn run(
    client: kube::Client,
    config: LeaseConfig,
    leadership: Leadership,
    shutdown: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    loop {
        let held = match try_acquire(&api, &config).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "lease update failed");
                false
            }
        };
        if held != leadership.is_leader() {
            tracing::info!(identity = %config.identity, leader = held, "leadership changed");
        }
        leadership.0.store(held, Ordering::Relaxed);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.renew_every) => {}
        }
    }
    leadership.0.store(false, Ordering::Relaxed);
    // Step down so another replica takes over at once.
    if let Ok(mut lease) = api.get(&config.name).await
        && lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(config.identity.as_str())
    {
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        let _ = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await;
    }
}

async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> kube::Result<bool> {
    let now = MicroTime(Timestamp::now());
    let spec = LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: Some(now.clone()),
        renew_time: Some(now.clone()),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..Default::default()
            },
            spec: Some(spec),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let current = lease.spec.clone().unwrap_or_default();
    let mine = current.holder_identity.as_deref() == Some(config.identity.as_str());
    let expired = match (&current.renew_time, current.lease_duration_seconds) {
        (Some(renewed), Some(secs)) => {
            renewed.0.as_second() + i64::from(secs) < Timestamp::now().as_second()
        }
        _ => true,
    };
    if !mine && current.holder_identity.is_some() && !expired {
        return Ok(false);
    }
    let mut next = spec;
    if mine {
        next.acquire_time = current.acquire_time;
    }
    lease.spec = Some(next);
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
impl Leadership {
    /// Sets leadership by hand, as the lease loop would.
    pub fn set(&self, leader: bool) {
        self.0.store(leader, Ordering::Relaxed);
    }
}
