//! `hie audit verify | export | break-glass`: check a node's audit chain,
//! write its events as NDJSON for a SIEM, or list its break-glass events
//! for the privacy officer's review. All read the segment files only, so
//! they run beside a running node.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::config::Config;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check every record's hash and the chain; name the first bad record.
    /// With --cluster, also check the chain against the head the cluster
    /// anchored for this node (records cut off the end or rewritten).
    Verify {
        #[command(flatten)]
        at: Where,
        /// The cluster's cluster.json: read the anchored heads from it as
        /// its operator (needs --config, for this node's id).
        #[arg(long, requires = "config")]
        cluster: Option<PathBuf>,
    },
    /// Write every event (FHIR AuditEvent, one per line) to stdout or a file.
    Export {
        #[command(flatten)]
        at: Where,
        /// Only events recorded at or after this instant (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List every break-glass event (emergency override, purposeOfEvent
    /// ETREAT) this node recorded since an instant, refused attempts
    /// included: when, who (ODS), which patient, the reason, the outcome.
    /// For the privacy officer's review; run it on every node.
    BreakGlass {
        #[command(flatten)]
        at: Where,
        /// From this instant: RFC 3339 (`2026-05-01T00:00:00Z`), or a span
        /// back from now (`24h`, `7d`).
        #[arg(long)]
        since: String,
        /// One JSON array of the events, for machine use, instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct Where {
    /// The node's configuration (its audit directory is used).
    #[arg(long, conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// The audit directory itself.
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl Where {
    fn dir(&self) -> anyhow::Result<PathBuf> {
        match (&self.dir, &self.config) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(c)) => Ok(Config::load(c)?.audit_dir()),
            (None, None) => bail!("give --config or --dir"),
        }
    }
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{} is not an audit directory", dir.display());
    }
    Ok(())
}

pub fn run(cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Verify { at, cluster } => {
            let dir = at.dir()?;
            check_dir(&dir)?;
            let v = match hie_audit::chain::verify(&dir) {
                Ok(v) => v,
                Err(b) => bail!("audit chain broken: {b}"),
            };
            println!("audit chain intact: {} records in {} segments, head {}", v.records, v.segments, v.head);
            if let Some(cluster) = cluster {
                let config = at.config.as_ref().context("--cluster needs --config")?;
                let node = Config::load(config)?.node.id;
                verify_anchor(&dir, node, &cluster)?;
            }
            Ok(())
        }
        AuditCmd::BreakGlass { at, since, json } => {
            let dir = at.dir()?;
            check_dir(&dir)?;
            let since = since_millis(&since, chrono::Utc::now().timestamp_millis())?;
            break_glass_review(&dir, since, json)
        }
        AuditCmd::Export { at, since, out } => {
            let dir = at.dir()?;
            check_dir(&dir)?;
            let since = since
                .map(|s| chrono::DateTime::parse_from_rfc3339(&s).map(|t| t.timestamp_millis()))
                .transpose()
                .context("--since must be an RFC 3339 instant")?;
            let mut sink: Box<dyn Write> = match &out {
                Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut buffered = std::io::BufWriter::new(&mut sink);
            let result = hie_audit::chain::export(&dir, since, &mut buffered);
            buffered.flush()?;
            match result {
                Ok(v) => {
                    eprintln!("exported from {} records (chain intact)", v.records);
                    Ok(())
                }
                Err(b) => bail!("export stopped, audit chain broken: {b}"),
            }
        }
    }
}

/// Checks the chain in `dir` against the head the cluster anchored for
/// `node`; fails naming the anchor when records were cut off or rewritten.
fn verify_anchor(dir: &Path, node: u64, cluster: &Path) -> anyhow::Result<()> {
    use hie_audit::chain::{AnchorCheck, check_anchor};
    let anchors = crate::client::audit_anchors(cluster).context("reading the cluster's audit anchors")?;
    let Some(a) = anchors.iter().find(|a| a.node == node) else {
        println!("the cluster holds no audit anchor for node {node} yet: nothing to check against");
        return Ok(());
    };
    match check_anchor(dir, a.seq, &a.hash).map_err(anyhow::Error::msg)? {
        AnchorCheck::Holds => {
            println!("audit chain holds the cluster's anchor for node {node}: record {} hash {}", a.seq, a.hash);
            Ok(())
        }
        AnchorCheck::CutShort { records } => bail!(
            "audit chain cut short: the cluster's anchor for node {node} is record {} hash {}, but the chain ends at record {records}",
            a.seq,
            a.hash
        ),
        AnchorCheck::Rewritten { found } => bail!(
            "audit chain rewritten: the cluster's anchor for node {node} is record {} hash {}, but that record's hash is {found}",
            a.seq,
            a.hash
        ),
    }
}

/// `--since`: an RFC 3339 instant, or `<N>h` / `<N>d` back from `now` (ms).
fn since_millis(s: &str, now: i64) -> anyhow::Result<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    let hours = |n: &str, per: i64| n.parse::<i64>().ok().filter(|n| *n >= 0).map(|n| n.saturating_mul(per));
    let span = match s.char_indices().last() {
        Some((i, 'h')) => hours(&s[..i], 1),
        Some((i, 'd')) => hours(&s[..i], 24),
        _ => None,
    };
    let hours =
        span.with_context(|| format!("--since must be an RFC 3339 instant or a span such as 24h or 7d, not {s:?}"))?;
    Ok(now.saturating_sub(hours.saturating_mul(3_600_000)))
}

/// One break-glass event, as the review lists it.
#[derive(Debug, serde::Serialize)]
struct GlassUse {
    recorded: String,
    /// The caller's ODS code.
    org: String,
    node: String,
    /// The NHS Number, when the request named the patient (a refused read
    /// by id names the pointer instead).
    patient: Option<String>,
    interaction: String,
    resource: Option<String>,
    /// The reason the clinician gave.
    reason: String,
    /// Whether the override was allowed and the read answered.
    allowed: bool,
    /// How it ended: `ok`, or the HTTP status and error code.
    outcome: String,
    request_id: String,
    event_id: String,
}

impl GlassUse {
    /// The break-glass event a rendered AuditEvent is, if it is one.
    fn of(e: &serde_json::Value) -> Option<GlassUse> {
        let purpose = &e["purposeOfEvent"][0];
        if purpose["coding"][0]["code"] != "ETREAT" {
            return None;
        }
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let entities = e["entity"].as_array().map(Vec::as_slice).unwrap_or_default();
        let patient = entities
            .iter()
            .find(|x| x["what"]["identifier"]["system"] == hie_domain::NhsNumber::SYSTEM)
            .map(|x| text(&x["what"]["identifier"]["value"]));
        let request_id = entities
            .iter()
            .find(|x| x["what"]["identifier"]["system"] == "urn:hie:request-id")
            .map(|x| text(&x["what"]["identifier"]["value"]))
            .unwrap_or_default();
        let resource = entities.iter().find_map(|x| x["what"]["reference"].as_str()).map(str::to_owned);
        let allowed = e["outcome"] == "0";
        Some(GlassUse {
            recorded: text(&e["recorded"]),
            org: text(&e["agent"][0]["who"]["identifier"]["value"]),
            node: text(&e["source"]["observer"]["display"]),
            patient,
            interaction: text(&e["subtype"][0]["code"]),
            resource,
            reason: text(&purpose["text"]),
            allowed,
            outcome: if allowed { "ok".into() } else { text(&e["outcomeDesc"]) },
            request_id,
            event_id: text(&e["id"]),
        })
    }
}

/// Lists the break-glass events recorded in `dir` at or after `since` (ms),
/// checking the chain as it goes: a table, or JSON. A broken chain is
/// reported after the events read before the break.
fn break_glass_review(dir: &Path, since: i64, json: bool) -> anyhow::Result<()> {
    let mut uses = Vec::new();
    let walked = hie_audit::chain::walk(dir, |r| {
        if hie_audit::event::recorded_millis(&r.event).is_some_and(|t| t < since) {
            return Ok(());
        }
        let event = hie_audit::render(&r.event).map_err(std::io::Error::other)?;
        uses.extend(GlassUse::of(&event));
        Ok(())
    });
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &uses)?;
        writeln!(out)?;
    } else {
        let from = chrono::DateTime::from_timestamp_millis(since).map(|t| t.to_rfc3339()).unwrap_or_default();
        let refused = uses.iter().filter(|u| !u.allowed).count();
        writeln!(
            out,
            "{} break-glass event(s) since {from} in {} ({} answered, {refused} not: refused or failed)",
            uses.len(),
            dir.display(),
            uses.len() - refused,
        )?;
        if !uses.is_empty() {
            let header = ["RECORDED", "ORG", "NODE", "PATIENT", "INTERACTION", "OUTCOME", "REQUEST", "REASON"];
            let rows: Vec<[String; 8]> = uses
                .iter()
                .map(|u| {
                    [
                        u.recorded.clone(),
                        u.org.clone(),
                        u.node.clone(),
                        u.patient.clone().or_else(|| u.resource.clone()).unwrap_or_else(|| "-".into()),
                        u.interaction.clone(),
                        u.outcome.clone(),
                        u.request_id.clone(),
                        // Free text: on one line.
                        u.reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect(),
                    ]
                })
                .collect();
            let widths: Vec<usize> = (0..header.len())
                .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
                .collect();
            let line = |cells: Vec<&str>| {
                let mut s = String::new();
                for (i, c) in cells.iter().enumerate() {
                    if i + 1 == cells.len() {
                        s.push_str(c);
                    } else {
                        s.push_str(&format!("{c:<w$}  ", w = widths[i]));
                    }
                }
                s
            };
            writeln!(out, "{}", line(header.to_vec()))?;
            for r in &rows {
                writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
            }
        }
    }
    out.flush()?;
    match walked {
        Ok(_) => Ok(()),
        Err(b) => bail!("audit chain broken, events after the break are not listed: {b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_an_instant_or_a_span() {
        let now = 1_800_000_000_000;
        assert_eq!(since_millis("2026-05-01T00:00:00Z", now).unwrap(), 1_777_593_600_000);
        assert_eq!(since_millis("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(since_millis("7d", now).unwrap(), now - 7 * 86_400_000);
        for bad in ["", "h", "-1h", "yesterday", "5m"] {
            assert!(since_millis(bad, now).is_err(), "{bad}");
        }
    }
}
