//! `hie-sim`: runs seeded simulations of a cluster and checks Raft's safety
//! properties in each. A failing seed is printed with the command that
//! replays it.

use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hie_sim::runtime::seed_thread;
use hie_sim::store::Defect;
use hie_sim::world::{Options, Report, World};

const USAGE: &str = "usage: hie-sim [--seeds N] [--from S] [--seed S] [--nodes 3|5] [--steps K] [--clients C] [--threads T] [--replay] [--defect D]
  --seeds N     run N seeds starting at --from (default 1)
  --seed S      run one seed (same as --from S --seeds 1)
  --replay      run each seed twice and fail if the two runs differ
  --defect D    plant a bug (forget-vote, lose-tail, shifted-read, drop-merge): the run must fail";

fn run_one(opts: Options) -> Result<Report, String> {
    let seed = opts.seed;
    let handle = std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .spawn(move || {
            seed_thread(seed);
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder.enable_time().start_paused(true);
            #[cfg(tokio_unstable)]
            builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
            let rt = builder.build().expect("runtime");
            rt.block_on(World::new(opts).run())
        })
        .map_err(|e| e.to_string())?;
    handle.join().map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut from, mut seeds, mut nodes, mut steps, mut clients, mut replay) =
        (1u64, 100u64, 3u64, 150u32, 3u32, false);
    let mut defect = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--seeds" => seeds = num("--seeds"),
            "--from" => from = num("--from"),
            "--seed" => {
                from = num("--seed");
                seeds = 1;
            }
            "--nodes" => nodes = num("--nodes"),
            "--steps" => steps = num("--steps") as u32,
            "--clients" => clients = num("--clients") as u32,
            "--threads" => threads = num("--threads").max(1) as usize,
            "--replay" => replay = true,
            "--defect" => {
                defect = match args.next().as_deref() {
                    Some("forget-vote") => Some(Defect::ForgetVote),
                    Some("lose-tail") => Some(Defect::LoseTail),
                    Some("shifted-read") => Some(Defect::ShiftedRead),
                    Some("drop-merge") => Some(Defect::DropMerge),
                    _ => {
                        eprintln!("--defect takes forget-vote, lose-tail, shifted-read or drop-merge\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if !cfg!(tokio_unstable) {
        eprintln!(
            "note: built without --cfg tokio_unstable; tokio's select! order is unseeded, so a seed may not replay exactly (tests/sim.sh builds it right)"
        );
    }
    let started = Instant::now();
    let next = AtomicU64::new(from);
    let failures = Mutex::new(Vec::<String>::new());
    let totals = Mutex::new(Report::default());
    let count = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= from + seeds {
                        break;
                    }
                    let opts = Options { seed, nodes, steps, clients, defect };
                    let mut replay_cmd =
                        format!("hie-sim --seed {seed} --nodes {nodes} --steps {steps} --clients {clients}");
                    if let Some(d) = defect {
                        replay_cmd.push_str(&format!(" --defect {}", d.as_arg()));
                    }
                    let mut problems = Vec::new();
                    match run_one(opts.clone()) {
                        Err(panic) => problems.push(format!("panicked: {panic}")),
                        Ok(r) => {
                            problems.extend(r.violations.iter().cloned());
                            if replay {
                                match run_one(opts) {
                                    Ok(again) if again.trace == r.trace => {}
                                    Ok(again) => problems.push(format!(
                                        "replay differs: trace {} then {}",
                                        &r.trace[..16],
                                        &again.trace[..16]
                                    )),
                                    Err(panic) => problems.push(format!("replay panicked: {panic}")),
                                }
                            }
                            let mut t = totals.lock().unwrap();
                            t.faults += r.faults;
                            t.restarts += r.restarts;
                            t.writes_acked += r.writes_acked;
                            t.writes_unknown += r.writes_unknown;
                            t.merges_acked += r.merges_acked;
                            t.merges_done += r.merges_done;
                            t.pointers_moved += r.pointers_moved;
                            t.elections += r.elections;
                            t.snapshots_installed += r.snapshots_installed;
                            t.applies += r.applies;
                            t.messages += r.messages;
                            t.simulated += r.simulated;
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    if !problems.is_empty() {
                        let text = format!("seed {seed}: {}\n  replay: {replay_cmd}", problems.join("\n  "));
                        eprintln!("{text}");
                        failures.lock().unwrap().push(text);
                    }
                }
            });
        }
    });
    let t = totals.into_inner().unwrap();
    let failures = failures.into_inner().unwrap();
    println!(
        "sim: {} seeds of {nodes} nodes, {} faults, {} restarts, {} elections, {} snapshots installed, {} writes acknowledged ({} unknown), {} merges acknowledged ({} merged, {} pointers moved), {} messages, {:.0} s simulated in {:.1} s",
        count.load(Ordering::SeqCst),
        t.faults,
        t.restarts,
        t.elections,
        t.snapshots_installed,
        t.writes_acked,
        t.writes_unknown,
        t.merges_acked,
        t.merges_done,
        t.pointers_moved,
        t.messages,
        t.simulated.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "sim: {} seeds with a safety violation{}",
        failures.len(),
        if replay { ", each seed replayed and compared" } else { "" }
    );
    if failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
