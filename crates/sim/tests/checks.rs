//! The simulation finds no violation in a correct cluster and catches
//! storage bugs planted on purpose. (tests/sim.sh runs a thousand seeds with
//! exact replay; this is the quick version inside the workspace's tests.)

use hie_sim::runtime::seed_thread;
use hie_sim::store::Defect;
use hie_sim::world::{Options, Report, World};

fn run(seed: u64, defect: Option<Defect>) -> Report {
    std::thread::spawn(move || {
        seed_thread(seed);
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(World::new(Options { seed, nodes: 3, steps: 150, clients: 3, defect }).run())
    })
    .join()
    .expect("a run does not panic")
}

#[test]
fn correct_storage_keeps_every_safety_property() {
    for seed in 1..=20 {
        let r = run(seed, None);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert!(r.writes_acked > 10, "seed {seed}: the clients got writes through ({})", r.writes_acked);
        assert!(r.faults > 20 && r.restarts > 0, "seed {seed}: faults were injected");
        assert!(r.merges_acked > 0, "seed {seed}: the clients got merges through");
    }
}

#[test]
fn a_forgotten_vote_or_a_lost_log_tail_is_caught() {
    for defect in [Defect::ForgetVote, Defect::LoseTail] {
        let caught = (1..=40).find(|&seed| !run(seed, Some(defect)).violations.is_empty());
        assert!(caught.is_some(), "{defect:?} went unnoticed in 40 seeds");
    }
}

#[test]
fn a_merge_the_state_machine_drops_is_caught() {
    let caught = (1..=10).find(|&seed| !run(seed, Some(Defect::DropMerge)).violations.is_empty());
    assert!(caught.is_some(), "a dropped merge went unnoticed in 10 seeds");
}
