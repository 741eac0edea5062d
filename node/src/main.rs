//! `hie`: runs a regional node, a local dev cluster, and the command-line
//! client for the record-locator API and the operator's admin commands.

mod anchor;
mod audit;
mod backup;
mod bench;
mod client;
mod config;
mod deliver;
mod dev;
mod node;
mod progress;
mod subscribe;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// glibc's allocator showed as a quarter of a node's CPU time under load
// (docs/BENCHMARKS.md); mimalloc's thread-local heaps avoid most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hie", version, about = "hie: a federated record locator for the NHS", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run or inspect a regional node.
    Node {
        #[command(subcommand)]
        command: NodeCmd,
    },
    /// A local multi-region cluster on loopback with sample data. Without a
    /// subcommand: start it in the foreground until Ctrl-C.
    Dev(dev::DevArgs),
    /// Find a patient's current record pointers (consumer).
    Search(client::SearchArgs),
    /// Which organisations hold records for a patient (consumer).
    Holders(client::HoldersArgs),
    /// Create, read, update, delete a record pointer, or read its history.
    Pointer {
        #[command(subcommand)]
        command: client::PointerCmd,
    },
    /// Patient identity: feed a local identifier, query PIXm, merge NHS Numbers.
    Patient {
        #[command(subcommand)]
        command: client::PatientCmd,
    },
    /// Operator commands: status, membership, snapshots, digests.
    Cluster {
        #[command(subcommand)]
        command: client::ClusterCmd,
    },
    /// The replicated registry (operator): pointer types, what each
    /// producer may publish, what each consumer may read, and who assigns
    /// each local identifier system.
    Registry {
        #[command(subcommand)]
        command: client::RegistryCmd,
    },
    /// Subscribe to pointer changes (consumer) and print each notification
    /// as it arrives, from a small HTTPS receiver on loopback; Ctrl-C deletes
    /// the subscription.
    Subscribe(subscribe::SubscribeArgs),
    /// The load generator: create, search, linearizable and mixed workloads
    /// over HTTPS with client certificates, against hie or etcd.
    Bench(bench::BenchArgs),
    /// A node's audit log: verify its hash chain (and against the cluster's anchor), export it for a SIEM, list break-glass uses for review.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCmd,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Run a node until SIGTERM or Ctrl-C.
    Run {
        /// The node's TOML configuration (see cluster/node.example.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the node's libp2p PeerId (creating its key if it has none).
    Id {
        /// The node key file (default: <data_dir>/node.key of --config).
        #[arg(long, conflicts_with = "config")]
        key: Option<PathBuf>,
        /// The node's TOML configuration (its data_dir holds node.key).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and exit.
    CheckConfig {
        /// The TOML configuration to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// Load a backup (`hie cluster backup`) into a new node's empty data
    /// directory, before its first start; then add it as a learner. The
    /// whole file must authenticate under the backup key first. The audit
    /// segments of the node it was taken from go to
    /// <data_dir>/backup-audit/node-<id>/ (read them with `hie audit
    /// verify|export --dir`).
    Restore {
        /// The new node's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The backup key the file was sealed with.
        #[arg(long, env = "HIE_BACKUP_KEY_FILE")]
        key_file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    hie_pki::install_default_provider();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Node { command: NodeCmd::Run { config } } => node::run_blocking(&config),
        Cmd::Node { command: NodeCmd::Id { key, config } } => node::print_id(key, config),
        Cmd::Node { command: NodeCmd::CheckConfig { config } } => {
            config::Config::load(&config).map(|_| println!("{}: ok", config.display()))
        }
        Cmd::Node { command: NodeCmd::Restore { config, from, key_file } } => {
            backup::restore(&config, &from, &key_file)
        }
        Cmd::Dev(args) => dev::main(args),
        Cmd::Search(args) => client::run(client::Op::Search(args)),
        Cmd::Holders(args) => client::run(client::Op::Holders(args)),
        Cmd::Pointer { command } => client::run(client::Op::Pointer(command)),
        Cmd::Cluster { command } => client::run(client::Op::Cluster(command)),
        Cmd::Registry { command } => client::run(client::Op::Registry(command)),
        Cmd::Patient { command } => client::run(client::Op::Patient(command)),
        Cmd::Audit { command } => audit::run(command),
        Cmd::Bench(args) => bench::main(args),
        Cmd::Subscribe(args) => subscribe::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every command says what it does and every argument has help text.
    #[test]
    fn help_is_complete() {
        let mut cli = Cli::command();
        cli.build();
        let mut missing = vec![];
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && path != "hie" {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() {
                    missing.push(format!("{path} --{id}: no help"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        walk(&cli, "hie", &mut missing);
        assert!(missing.is_empty(), "help text missing:\n{}", missing.join("\n"));
    }
}
