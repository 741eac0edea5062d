//! `hie audit verify | export`: check a node's audit chain, or write its
//! events as NDJSON for a SIEM. Both read the segment files only, so they
//! run beside a running node.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::config::Config;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Check every record's hash and the chain; name the first bad record.
    Verify(Where),
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
        AuditCmd::Verify(at) => {
            let dir = at.dir()?;
            check_dir(&dir)?;
            match hie_audit::chain::verify(&dir) {
                Ok(v) => {
                    println!("audit chain intact: {} records in {} segments, head {}", v.records, v.segments, v.head);
                    Ok(())
                }
                Err(b) => bail!("audit chain broken: {b}"),
            }
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
