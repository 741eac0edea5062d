//! `hie subscribe`: subscribe to pointer changes and watch them arrive. It
//! runs a small HTTPS receiver on loopback (certificate from the dev CA,
//! node certificates required), creates a Subscription to it as a
//! consumer, prints each notification as it comes, and deletes the
//! subscription on Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hie_api::receiver::Receiver;
use serde_json::{Value, json};

use crate::client::{Api, ClusterFile, Target};

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";

#[derive(Args, Debug)]
pub struct SubscribeArgs {
    /// Only changes of this patient's pointers (NHS Number).
    #[arg(long)]
    pub nhs: Option<String>,
    /// Only pointers of this SNOMED CT type code.
    #[arg(long = "type")]
    pub type_code: Option<String>,
    /// Only pointers held by this organisation (ODS code).
    #[arg(long)]
    pub custodian: Option<String>,
    /// What each notification carries: empty, id-only or full-resource.
    #[arg(long, default_value = "id-only")]
    pub content: String,
    /// Seconds between heartbeats while nothing changes.
    #[arg(long, default_value_t = 30)]
    pub heartbeat: u32,
    #[command(flatten)]
    pub target: Target,
}

pub fn run(args: SubscribeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(subscribe(args))
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let cluster = ClusterFile::load(&args.target.cluster).context(
        "hie subscribe runs its receiver with a certificate from the dev CA: start a cluster with `hie dev up`",
    )?;
    let ca_key = cluster.ca_key.clone().context("cluster.json names no ca_key (a dev cluster's does)")?;
    let dir = args.target.cluster.parent().unwrap_or(std::path::Path::new(".")).join("receiver");
    let rx =
        Receiver::start(&cluster.ca_cert, &ca_key, &dir).await.map_err(|e| anyhow::anyhow!("the receiver: {e}"))?;
    let api = Api::from_target(&args.target, "consumer")?;

    let mut criteria = vec![];
    if let Some(n) = &args.nhs {
        criteria.push(format!("subject:identifier=https://fhir.nhs.uk/Id/nhs-number|{n}"));
    }
    if let Some(t) = &args.type_code {
        criteria.push(format!("type=http://snomed.info/sct|{t}"));
    }
    if let Some(c) = &args.custodian {
        criteria.push(format!("custodian:identifier=https://fhir.nhs.uk/Id/ods-organization-code|{c}"));
    }
    let filters: Vec<Value> = if criteria.is_empty() {
        vec![]
    } else {
        vec![
            json!({ "url": format!("{BACKPORT}backport-filter-criteria"), "valueString": format!("DocumentReference?{}", criteria.join("&")) }),
        ]
    };
    let body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "hie subscribe: watching pointer changes",
        "criteria": hie_domain::subscription::TOPIC,
        "_criteria": { "extension": filters },
        "channel": {
            "type": "rest-hook",
            "endpoint": rx.url(),
            "payload": "application/fhir+json",
            "_payload": { "extension": [{ "url": format!("{BACKPORT}backport-payload-content"), "valueCode": args.content }] },
            "extension": [{ "url": format!("{BACKPORT}backport-heartbeat-period"), "valueUnsignedInt": args.heartbeat }],
        },
    });
    let resp = api
        .http
        .post(format!("{}/Subscription", api.base))
        .header("content-type", "application/fhir+json")
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let created: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!("the subscription was refused ({status}): {}", created["issue"][0]["diagnostics"]);
    }
    let id = created["id"].as_str().unwrap_or("").to_owned();
    println!("subscription {id} to {} (receiver {}); Ctrl-C to stop and delete it", api.base, rx.url());
    let mut shown = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let got = rx.received();
        for r in &got[shown..] {
            let events = r.events();
            if events.is_empty() {
                println!("{}", r.kind());
            }
            for (n, focus) in events {
                println!("{} event {n}: {}", r.kind(), focus.as_deref().unwrap_or("(no focus)"));
            }
        }
        shown = got.len();
    }
    let _ = api.http.delete(format!("{}/Subscription/{id}", api.base)).send().await;
    println!("subscription {id} deleted");
    Ok(())
}
