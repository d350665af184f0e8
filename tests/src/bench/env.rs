//! The benchmark environment: the test bed, the in-process server, the agents
//! and the synthetic upstream; and the objects the figures read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tower_agent::TokenSource;
use tower_proto::names::UPSTREAM_KUBE_APISERVER;

use super::client::Endpoint;
use super::{CLUSTER, Figure, NS, SYNTH};
use crate::fixture::{
    HttpsUpstream, TestTransport, TowerAgent, TowerServer, agent_credential, create_namespace,
};
use crate::testbed::{ControlPlane, Testbed, install_crypto_provider};

/// The test bed, the in-process server, the agents and the synthetic upstream.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub bed: Option<Testbed>,
    pub member: Option<ControlPlane>,
    pub server: TowerServer,
    pub synth: HttpsUpstream,
    pub direct: Option<Arc<Endpoint>>,
    pub tunnel: Option<Arc<Endpoint>>,
    pub synth_tunnel: Arc<Endpoint>,
    /// The member through agents on each transport: `ssh` (the `tunnel`
    /// endpoint's agent), `ws` and `wss`, each its own cluster.
    pub transports: Vec<(&'static str, Arc<Endpoint>)>,
    _agents: Vec<TowerAgent>,
}

impl Env {
    /// Starts everything `figures` need (the test bed only when a figure uses the apiserver).
    pub async fn start(figures: &[Figure]) -> anyhow::Result<Env> {
        install_crypto_provider();
        let dir = tempfile::tempdir()?;
        // The N-client figures' clients share one certificate and source address, so for
        // the server they are one client: give it room for all of them (the figures measure
        // the tunnel, not the shares; the share figure runs its own server with defaults).
        let server = TowerServer::start_configured(&dir.path().join("server"), |c| {
            c.client_streams = 256;
        })
        .await?;
        let synth = HttpsUpstream::bytes(dir.path()).await?;
        let mut agents = Vec::new();
        let synth_token = server.mint(SYNTH, None)?;
        agents.push(TowerAgent::start_with(
            TokenSource::Literal(synth_token.encode()),
            vec![synth.upstream(UPSTREAM_KUBE_APISERVER, None)],
        )?);
        let (mut bed, mut member, mut direct, mut tunnel) = (None, None, None, None);
        let mut transports = Vec::new();
        if figures.iter().any(|f| f.needs_testbed()) {
            let started = Instant::now();
            let b = Testbed::start().await?;
            let m = b.cluster("member").await?;
            let (sa_token, sa_token_file) = agent_credential(&m, dir.path()).await?;
            let token = server.mint(CLUSTER, None)?;
            agents.push(TowerAgent::start(
                TokenSource::Literal(token.encode()),
                &m,
                &sa_token_file,
            )?);
            let port = m.port();
            let mut bearer = HeaderValue::from_str(&format!("Bearer {sa_token}"))?;
            bearer.set_sensitive(true);
            direct = Some(Arc::new(Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                ca_pem: m.ca_pem.clone(),
                identity: None,
                bearer: Some(bearer),
                prefix: String::new(),
            }));
            tunnel = Some(Arc::new(gateway_endpoint(&server, CLUSTER)?));
            if figures.contains(&Figure::Transport) {
                transports.push(("ssh", tunnel.clone().expect("just set")));
                for (name, transport) in [("ws", TestTransport::Ws), ("wss", TestTransport::Wss)] {
                    let cluster = format!("{CLUSTER}-{name}");
                    let token = server.mint_at(&cluster, server.agent_address(transport))?;
                    agents.push(TowerAgent::start(
                        TokenSource::Literal(token.encode()),
                        &m,
                        &sa_token_file,
                    )?);
                    anyhow::ensure!(
                        server
                            .wait_connected(&cluster, true, Duration::from_secs(30))
                            .await,
                        "agent for {cluster} did not connect"
                    );
                    transports.push((name, Arc::new(gateway_endpoint(&server, &cluster)?)));
                }
            }
            eprintln!(
                "test bed up in {:.1?}: member kube-apiserver {}",
                started.elapsed(),
                m.url
            );
            bed = Some(b);
            member = Some(m);
        }
        for name in [SYNTH, CLUSTER] {
            if name == CLUSTER && member.is_none() {
                continue;
            }
            anyhow::ensure!(
                server
                    .wait_connected(name, true, Duration::from_secs(30))
                    .await,
                "agent for {name} did not connect"
            );
        }
        let synth_tunnel = Arc::new(gateway_endpoint(&server, SYNTH)?);
        Ok(Env {
            dir,
            bed,
            member,
            server,
            synth,
            direct,
            tunnel,
            synth_tunnel,
            transports,
            _agents: agents,
        })
    }

    pub(crate) fn member(&self) -> &ControlPlane {
        self.member.as_ref().expect("started with the test bed")
    }

    pub(crate) fn pair(&self) -> (Arc<Endpoint>, Arc<Endpoint>) {
        (
            self.direct.clone().expect("started with the test bed"),
            self.tunnel.clone().expect("started with the test bed"),
        )
    }
}

fn gateway_endpoint(server: &TowerServer, cluster: &str) -> anyhow::Result<Endpoint> {
    let (addr, ca_pem, id) = server.client_for(cluster)?;
    Ok(Endpoint {
        addr,
        ca_pem,
        identity: Some((id.cert_pem, id.key_pem)),
        bearer: None,
        prefix: format!("/clusters/{cluster}"),
    })
}

pub(crate) async fn setup_namespace(member: &ControlPlane) -> anyhow::Result<()> {
    let client = member.client().await?;
    create_namespace(&client, NS, true).await?;
    let api: Api<ConfigMap> = Api::namespaced(client, NS);
    for name in ["small", "tick"] {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([("seq".to_string(), "init".to_string())].into()),
            ..Default::default()
        };
        api.patch(
            name,
            &PatchParams::apply("tower-bench").force(),
            &Patch::Apply(&cm),
        )
        .await?;
    }
    Ok(())
}
