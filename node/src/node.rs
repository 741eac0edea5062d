//! Running a node: load config, start the replica and both listeners, wait
//! for SIGTERM or Ctrl-C, shut down in order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use hie_domain::raft::NodeInfo;
use hie_metrics::Metrics;
use hie_replica::Replica;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::Config;

pub fn run_blocking(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("hie").build()?;
    runtime.block_on(run(config))
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{},openraft=warn,libp2p=warn", config.log.level))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

pub fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.join("hie.pid")
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let data_dir = config.node.data_dir.clone();
    if let Some(bug) = hie_store::planted_bug_setting() {
        tracing::error!(
            variable = hie_store::PLANTED_BUG_ENV,
            bug = %bug,
            planted = hie_store::planted_bug().map(hie_store::PlantedBug::name),
            "a durability bug is planted on purpose (test-only switch): this node skips an fsync it promises; never run it with patient data"
        );
    }
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let key = hie_p2p::load_or_create_key(&data_dir.join("node.key"))?;
    let peer_id = key.public().to_peer_id();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let metrics = Arc::new(Metrics::new());

    match hie_pki::not_after_unix(&config.api.cert) {
        Ok(t) => metrics.tls_cert_expiry_timestamp_seconds.set(t),
        Err(e) => tracing::warn!(error = %e, "cannot read the api certificate's expiry"),
    }
    let audit = match config.audit_config() {
        Some(c) => Some(hie_audit::AuditLog::open(c, metrics.clone()).context("opening the audit log")?),
        None => {
            tracing::warn!("audit is off (audit.enabled = false): accesses to patient data are not recorded");
            None
        }
    };
    let source = audit.clone().map(|a| a as Arc<dyn hie_domain::audit::AuditSource>);
    let replica = Replica::start(config.replica_config(&peer_id), metrics, source, shutdown_rx.clone()).await?;
    std::fs::write(pid_file(&data_dir), format!("{}\n", std::process::id())).context("writing the pid file")?;
    tracing::info!(id = config.node.id, region = %config.node.region, %peer_id, "node started");

    if config.cluster.bootstrap {
        let members: BTreeMap<u64, NodeInfo> = config
            .cluster
            .initial_members
            .iter()
            .map(|m| {
                (
                    m.id,
                    NodeInfo {
                        peer_id: m.peer_id.clone(),
                        p2p_addr: m.p2p_addr.clone(),
                        region: m.region.clone(),
                        api_url: m.api_url.clone(),
                        admin_url: m.admin_url.clone(),
                    },
                )
            })
            .collect();
        match replica.bootstrap(members).await {
            Ok(true) => tracing::info!("cluster initialized"),
            Ok(false) => tracing::info!("cluster already initialized; joining"),
            Err(e) => tracing::error!(error = %e, "bootstrap failed"),
        }
    }

    if let Some(log) = &audit {
        let interval = std::time::Duration::from_millis(config.audit.anchor_interval_ms);
        tokio::spawn(crate::anchor::run(replica.clone(), log.clone(), config.node.id, interval, shutdown_rx.clone()));
    }
    {
        let api = &config.api;
        let mut cas = vec![api.ca.as_path()];
        if let Some(b) = &config.subscriptions.ca_bundle {
            cas.push(b.as_path());
        }
        let tls = hie_pki::client_config_trusting(&cas, Some((&api.cert, &api.key)))
            .context("the TLS client for subscription endpoints")?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .pool_max_idle_per_host(64)
            .build()
            .context("the HTTP client for subscription endpoints")?;
        let s = &config.subscriptions;
        let deliver = crate::deliver::DeliverConfig {
            node_id: config.node.id,
            node_label: format!("node-{} ({})", config.node.id, config.node.region),
            base_url: api.public_url.clone(),
            hosts_allowed: s.endpoint_hosts.clone(),
            timeout: std::time::Duration::from_millis(s.timeout_ms),
            retry_min: std::time::Duration::from_millis(s.retry_min_ms),
            retry_max: std::time::Duration::from_millis(s.retry_max_ms),
            failures_before_error: s.failures_before_error,
            progress_interval: std::time::Duration::from_millis(s.progress_interval_ms),
            in_flight_max: s.in_flight_max,
        };
        tokio::spawn(crate::deliver::run(replica.clone(), audit.clone(), http, deliver, shutdown_rx.clone()));
    }
    let api = hie_api::serve_api(config.api_config(), replica.clone(), audit, shutdown_rx.clone())
        .await
        .map_err(anyhow::Error::msg)?;
    let admin = hie_api::serve_monitoring(config.admin.listen, replica.clone(), shutdown_rx.clone())
        .await
        .map_err(anyhow::Error::msg)?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stopped = None;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        reason = raft_stopped(replica.raft().clone()) => {
            // A failed fsync or a full disk during a snapshot stops openraft
            // for good. Serving on with a dead core would answer stale local
            // reads and refuse every write: exit instead, non-zero, so the
            // supervisor (systemd Restart=on-failure) starts the node afresh
            // from what is on disk. Found by tests/faults.
            tracing::error!(%reason, "the Raft core stopped; exiting so the node is restarted");
            stopped = Some(reason);
        }
    }
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = api.await;
        let _ = admin.await;
    })
    .await;
    replica.shutdown().await;
    let _ = std::fs::remove_file(pid_file(&data_dir));
    if let Some(reason) = stopped {
        anyhow::bail!("the Raft core stopped: {reason}");
    }
    tracing::info!("node stopped");
    Ok(())
}

/// Resolves when the Raft core stops (a fatal error, or its task ended).
async fn raft_stopped(raft: hie_domain::raft::Raft) -> String {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow().running_state {
            return fatal.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the Raft core's task ended".into();
        }
    }
}

pub fn print_id(key: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let key = match (key, config) {
        (Some(k), _) => k,
        (None, Some(c)) => {
            let text = std::fs::read_to_string(&c)?;
            let cfg: Config = toml::from_str(&text)?;
            cfg.node.data_dir.join("node.key")
        }
        (None, None) => anyhow::bail!("give --key or --config"),
    };
    println!("{}", hie_p2p::peer_id_of_key_file(&key)?);
    Ok(())
}
