//! `hie-powercut-fs BACKING_DIR MOUNTPOINT`: a FUSE passthrough filesystem
//! that models a machine losing power under the strict POSIX durability
//! model (as LazyFS does for etcd's robustness tests).
//!
//! The fault-injection harness mounts one over each database node's data
//! directory. Everything the node does goes straight through to
//! `BACKING_DIR/root`, but the filesystem remembers in memory how to take
//! back whatever is not yet durable:
//!
//! - file data is durable only once the file is fsynced (fsync or
//!   fdatasync, through any handle): before the first change to a block of
//!   durable bytes since the last fsync, that block's durable contents are
//!   saved, and so is the file's durable size at its first change;
//! - a directory entry (create, unlink, rename, mkdir, rmdir, link,
//!   symlink) is durable only once the directory holding it is fsynced, a
//!   rename only once both its directories are. A removed entry is not
//!   deleted but moved to `BACKING_DIR/trash`, where it waits to be put
//!   back, and is deleted for good once its removal is durable.
//!
//! So a file written and fsynced in a directory never fsynced disappears
//! at a power cut, as real filesystems allow: software that writes a temp
//! file and renames it over CURRENT must fsync the directory too, and a
//! test run on this filesystem shows whether it does.
//!
//! Signals: SIGUSR1 is the power cut: the mount is detached (the harness
//! has already killed the processes using it), every change not made
//! durable is undone in the backing directory (entries newest first, then
//! file data through each inode's own descriptor), the result is fsynced,
//! one summary line is printed and the process exits 0 (3 if an undo step
//! failed: the disk is then not what a power cut would leave); the next
//! instance mounts what the disk would hold after the crash. SIGTERM,
//! SIGINT or SIGHUP (or an unmount by anyone else) is a clean shutdown:
//! everything written stays.
//!
//! Not modelled: metadata (mode, owner, times) is passed through, and
//! extended attributes and `syncfs` are not implemented. A record of a
//! rename between two directories is dropped once both are fsynced even if
//! an older record in one of them is still pending, so a rename across
//! directories followed by an unlink or create in one of them can roll
//! back wrongly; hie renames only within one directory.

mod ops;
mod state;

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, mpsc};

use anyhow::{Context, bail};
use fuser::{Config, Session, SessionACL};
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, umask};

use crate::ops::PowerCutFs;
use crate::state::State;

const USAGE: &str = "usage: hie-powercut-fs BACKING_DIR MOUNTPOINT";

enum Event {
    Signal(Signal),
    Ended(std::io::Result<()>),
}

/// One line to the harness, which may have stopped reading.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hie-powercut-fs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let [backing, mountpoint] = args.as_slice() else { bail!(USAGE) };
    let mountpoint = Path::new(mountpoint);

    // Modes come from the kernel already masked with the caller's umask.
    umask(Mode::empty());
    // Signals are taken by one thread with sigwait; every other thread
    // (the FUSE workers included) inherits this mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("blocking signals")?;
    // Every inode the kernel knows holds a descriptor here.
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }

    let state = Arc::new(State::open(Path::new(backing))?);
    let fuse = mount_fuse(&state, mountpoint)?;
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(2, 8));
    let mut config = Config::default();
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let fs = PowerCutFs { state: Arc::clone(&state) };
    let session = match Session::from_fd(fs, fuse, SessionACL::All, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = umount2(mountpoint, MntFlags::MNT_DETACH);
            return Err(e).context("FUSE handshake");
        }
    };

    let (tx, rx) = mpsc::channel();
    let signal_tx = tx.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        while let Ok(sig) = signals.wait() {
            if signal_tx.send(Event::Signal(sig)).is_err() {
                return;
            }
        }
    })?;
    std::thread::Builder::new().name("session".into()).spawn(move || {
        let _ = tx.send(Event::Ended(session.run()));
    })?;
    say("hie-powercut-fs: ready");

    match rx.recv() {
        Ok(Event::Signal(Signal::SIGUSR1)) => {
            state.stop();
            unmount(mountpoint);
            let s = state.power_cut();
            let failed =
                if s.failed > 0 { format!(" ({} undo steps failed, see stderr)", s.failed) } else { String::new() };
            say(&format!(
                "hie-powercut-fs: power cut: rolled back {} files ({} bytes of unsynced writes dropped, {} truncated), \
                 removed {} entries made since their directory's last fsync, restored {} removed entries, \
                 undid {} renames{failed}",
                s.files, s.bytes, s.truncated, s.removed, s.restored, s.renames
            ));
            if s.failed > 0 {
                // The disk is not what a power cut would leave: say so, so
                // the harness stops rather than test on a wrong disk.
                std::process::exit(3);
            }
        }
        Ok(Event::Signal(_)) => {
            state.stop();
            unmount(mountpoint);
            state.shut_down();
            say("hie-powercut-fs: shut down cleanly (every write kept)");
        }
        other => {
            // The kernel unmounted it (someone ran umount): a clean shutdown.
            if let Ok(Event::Ended(Err(e))) = other {
                eprintln!("hie-powercut-fs: FUSE session: {e}");
            }
            state.stop();
            state.shut_down();
            say("hie-powercut-fs: unmounted; shut down cleanly (every write kept)");
        }
    }
    Ok(())
}

/// Opens /dev/fuse and mounts it at `mountpoint` with mount(2) (we run as
/// root: no fusermount helper, and no unmount behind our back at exit).
fn mount_fuse(state: &State, mountpoint: &Path) -> anyhow::Result<OwnedFd> {
    let fuse = open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty()).context("opening /dev/fuse")?;
    let root_mode = state.root_mode().map_err(|e| anyhow::anyhow!("stat of the backing root: {e:?}"))?;
    let options = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        fuse.as_raw_fd(),
        root_mode & libc::S_IFMT,
        nix::unistd::geteuid(),
        nix::unistd::getegid(),
    );
    mount(
        Some("hie-powercut-fs"),
        mountpoint,
        Some("fuse.hie-powercut-fs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .with_context(|| format!("mounting at {}", mountpoint.display()))?;
    Ok(fuse)
}

fn unmount(mountpoint: &Path) {
    if let Err(e) = umount2(mountpoint, MntFlags::MNT_DETACH) {
        eprintln!("hie-powercut-fs: unmounting {}: {e}", mountpoint.display());
    }
}
