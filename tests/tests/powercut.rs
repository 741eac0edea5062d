//! `hie-powercut-fs` (tests/powercut): a power cut keeps exactly what fsync
//! made durable (file data by fsync of the file, directory entries by fsync
//! of their directory) and a clean shutdown keeps everything. Each case is
//! checked in the backing directory right after the cut, and again through
//! a fresh mount of it.
//!
//! Mounting FUSE needs root and /dev/fuse: without them each test says why
//! and passes.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use anyhow::{Context, bail, ensure};
use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_hie-powercut-fs");

fn can_mount() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: mounting hie-powercut-fs (FUSE) needs root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: mounting hie-powercut-fs needs /dev/fuse");
        return false;
    }
    true
}

/// A backing directory and a mountpoint under one tempdir.
struct Fixture {
    _tmp: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
}

impl Fixture {
    fn new() -> anyhow::Result<Fixture> {
        let tmp = tempfile::tempdir()?;
        let backing = tmp.path().join("backing");
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&backing)?;
        fs::create_dir(&mnt)?;
        Ok(Fixture { _tmp: tmp, backing, mnt })
    }

    /// The visible tree as stored on the backing disk.
    fn disk(&self) -> PathBuf {
        self.backing.join("root")
    }

    fn mount(&self) -> anyhow::Result<Mounted> {
        Mounted::start(&self.backing, &self.mnt)
    }

    /// A power cut: everything not durable is thrown away; the summary.
    /// The trash must be empty at once (a fresh mount would empty it).
    fn cut(&self, m: Mounted) -> anyhow::Result<String> {
        let summary = m.power_cut()?;
        expect_trash_empty(self).context("right after the power cut")?;
        Ok(summary)
    }

    /// Runs `check` on the backing directory, then through a fresh mount.
    fn check_both(&self, check: impl Fn(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
        check(&self.disk()).context("in the backing directory")?;
        let m = self.mount()?;
        check(&self.mnt).context("through a fresh mount")?;
        m.shut_down()
    }
}

/// A running `hie-powercut-fs`; killed (by pid) and unmounted on drop
/// unless it was stopped by a signal and exited.
struct Mounted {
    child: Option<Child>,
    stdout: BufReader<ChildStdout>,
    mnt: PathBuf,
}

impl Mounted {
    fn start(backing: &Path, mnt: &Path) -> anyhow::Result<Mounted> {
        let mut child = Command::new(BIN)
            .arg(backing)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting hie-powercut-fs")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut m = Mounted { child: Some(child), stdout, mnt: mnt.to_owned() };
        let line = m.line()?;
        ensure!(line == "hie-powercut-fs: ready", "unexpected first line {line:?}");
        Ok(m)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("hie-powercut-fs closed its stdout");
        }
        Ok(line.trim_end().to_owned())
    }

    fn stop(&mut self, sig: Signal, expect: &str) -> anyhow::Result<String> {
        let child = self.child.as_mut().context("already stopped")?;
        kill(Pid::from_raw(i32::try_from(child.id())?), sig)?;
        let line = self.line()?;
        let status = self.child.take().context("already stopped")?.wait()?;
        ensure!(status.success(), "hie-powercut-fs exited with {status}");
        ensure!(line.starts_with(expect), "expected {expect:?}, got {line:?}");
        Ok(line)
    }

    /// SIGUSR1: everything not durable is thrown away; returns the summary.
    fn power_cut(mut self) -> anyhow::Result<String> {
        let line = self.stop(Signal::SIGUSR1, "hie-powercut-fs: power cut: ")?;
        eprintln!("{line}");
        Ok(line)
    }

    /// SIGTERM: a clean shutdown that keeps everything.
    fn shut_down(mut self) -> anyhow::Result<()> {
        self.stop(Signal::SIGTERM, "hie-powercut-fs: shut down")?;
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = umount2(&self.mnt, MntFlags::MNT_DETACH);
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8)).collect()
}

/// Creates (or replaces the contents of) `path` and fsyncs the file, not its directory.
fn write_synced(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn write_unsynced(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).with_context(|| format!("opening {}", dir.display()))?.sync_all()?;
    Ok(())
}

fn expect_contents(path: &Path, want: &[u8]) -> anyhow::Result<()> {
    let got = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        got == want,
        "{}: {} bytes, want {} (first difference at {:?})",
        path.display(),
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
    Ok(())
}

fn expect_absent(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("stat of {}", path.display())),
        Ok(_) => bail!("{} exists", path.display()),
    }
}

fn expect_trash_empty(f: &Fixture) -> anyhow::Result<()> {
    let left: Vec<_> = fs::read_dir(f.backing.join("trash"))?.collect();
    ensure!(left.is_empty(), "trash not empty: {left:?}");
    Ok(())
}

/// (1) synced file and directory survive whole; (2) appends after the fsync
/// are gone; (3) overwrites inside the synced range are undone; truncation
/// is undone; a second fsync makes the newer contents durable.
#[test]
fn file_data_rolls_back_to_its_last_fsync() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    let d = &f.mnt;
    write_synced(&d.join("whole"), &pattern(1, 10_000))?;
    write_synced(&d.join("appended"), &pattern(2, 6_000))?;
    write_synced(&d.join("overwritten"), &pattern(3, 9_000))?;
    write_synced(&d.join("truncated"), &pattern(4, 9_000))?;
    write_synced(&d.join("resynced"), &pattern(5, 5_000))?;
    fsync_dir(d)?;

    let mut a = OpenOptions::new().append(true).open(d.join("appended"))?;
    a.write_all(&pattern(6, 5_000))?;
    drop(a);
    expect_contents(&d.join("appended"), &[pattern(2, 6_000), pattern(6, 5_000)].concat())?;

    let o = OpenOptions::new().write(true).open(d.join("overwritten"))?;
    o.write_all_at(&[b'X'; 200], 4_000)?; // across a block boundary
    o.write_all_at(&[b'Y'; 20], 8_990)?; // across the durable end
    o.write_all_at(&[b'Z'; 10], 0)?;
    drop(o);

    let t = OpenOptions::new().write(true).open(d.join("truncated"))?;
    t.set_len(100)?;
    t.write_all_at(b"T", 5_000)?;
    drop(t);

    let r = OpenOptions::new().write(true).open(d.join("resynced"))?;
    r.write_all_at(&[b'R'; 3_000], 4_000)?;
    r.sync_data()?;
    drop(r);
    let mut resynced = pattern(5, 5_000);
    resynced.truncate(4_000);
    resynced.extend_from_slice(&[b'R'; 3_000]);

    let summary = f.cut(m)?;
    ensure!(summary.contains("rolled back 3 files"), "{summary}");
    f.check_both(|dir| {
        expect_contents(&dir.join("whole"), &pattern(1, 10_000))?;
        expect_contents(&dir.join("appended"), &pattern(2, 6_000))?;
        expect_contents(&dir.join("overwritten"), &pattern(3, 9_000))?;
        expect_contents(&dir.join("truncated"), &pattern(4, 9_000))?;
        expect_contents(&dir.join("resynced"), &resynced)
    })
}

/// (4) a new file fsynced in a directory never fsynced is gone; (5) a new
/// file never fsynced in a fsynced directory exists, empty; the same for
/// directories, symlinks and hard links.
#[test]
fn new_entries_need_their_directory_fsynced() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    fs::create_dir(f.mnt.join("d1"))?;
    fs::create_dir(f.mnt.join("d2"))?;
    fsync_dir(&f.mnt)?;
    m.shut_down()?;

    let m = f.mount()?;
    let (d1, d2) = (f.mnt.join("d1"), f.mnt.join("d2"));
    write_synced(&d1.join("synced"), &pattern(1, 5_000))?;
    write_unsynced(&d2.join("unsynced"), &pattern(2, 5_000))?;
    fs::create_dir(d2.join("sub"))?;
    write_synced(&d2.join("sub/f"), &pattern(3, 100))?;
    fsync_dir(&d2.join("sub"))?;
    fs::create_dir(d1.join("sub"))?;
    write_synced(&d1.join("sub/f"), &pattern(4, 100))?;
    fsync_dir(&d1.join("sub"))?;
    std::os::unix::fs::symlink("sub/f", d2.join("link"))?;
    std::os::unix::fs::symlink("sub/f", d1.join("link"))?;
    fs::hard_link(d2.join("sub/f"), d2.join("hard"))?;
    fs::hard_link(d2.join("sub/f"), d1.join("hard"))?;
    fsync_dir(&d2)?;
    let summary = f.cut(m)?;
    ensure!(summary.contains("removed 4 entries"), "{summary}");

    f.check_both(|dir| {
        let (d1, d2) = (dir.join("d1"), dir.join("d2"));
        expect_absent(&d1.join("synced"))?;
        expect_contents(&d2.join("unsynced"), b"")?;
        expect_contents(&d2.join("sub/f"), &pattern(3, 100))?;
        expect_absent(&d1.join("sub"))?;
        ensure!(fs::read_link(d2.join("link"))? == Path::new("sub/f"));
        expect_absent(&d1.join("link"))?;
        expect_contents(&d2.join("hard"), &pattern(3, 100))?;
        expect_absent(&d1.join("hard"))?;
        ensure!(fs::read_dir(&d1)?.count() == 0, "d1 not empty");
        Ok(())
    })?;
    expect_trash_empty(&f)
}

/// (6) an unlink (or rmdir) without a directory fsync is undone, the file
/// back with its durable contents; with the fsync it is durable.
#[test]
fn removals_need_their_directory_fsynced() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    for d in ["d1", "d2"] {
        fs::create_dir(f.mnt.join(d))?;
        fs::create_dir(f.mnt.join(d).join("empty"))?;
        write_synced(&f.mnt.join(d).join("x"), &pattern(1, 7_000))?;
        fsync_dir(&f.mnt.join(d))?;
    }
    fsync_dir(&f.mnt)?;
    f.cut(m)?;

    let m = f.mount()?;
    for d in ["d1", "d2"] {
        let dir = f.mnt.join(d);
        let err = fs::remove_dir(&dir).expect_err("rmdir of a non-empty directory");
        ensure!(err.raw_os_error() == Some(nix::errno::Errno::ENOTEMPTY as i32), "rmdir: {err}");
        let x = OpenOptions::new().write(true).open(dir.join("x"))?;
        fs::remove_file(dir.join("x"))?;
        expect_absent(&dir.join("x"))?;
        x.write_all_at(b"after unlink", 0)?; // not synced
        drop(x);
        fs::remove_dir(dir.join("empty"))?;
        expect_absent(&dir.join("empty"))?;
    }
    fsync_dir(&f.mnt.join("d2"))?;
    let summary = f.cut(m)?;
    ensure!(summary.contains("restored 2 removed entries"), "{summary}");

    f.check_both(|dir| {
        expect_contents(&dir.join("d1/x"), &pattern(1, 7_000))?;
        ensure!(dir.join("d1/empty").is_dir(), "d1/empty missing");
        expect_absent(&dir.join("d2/x"))?;
        expect_absent(&dir.join("d2/empty"))
    })?;
    expect_trash_empty(&f)
}

/// (7) a rename over an existing file without a directory fsync is undone,
/// both names as before; with it (RocksDB's CURRENT pattern: write a temp
/// file, fsync it, rename it over CURRENT, fsync the directory) durable.
#[test]
fn renames_need_their_directories_fsynced() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    for d in ["d1", "d2"] {
        fs::create_dir(f.mnt.join(d))?;
        write_synced(&f.mnt.join(d).join("CURRENT"), b"MANIFEST-000001\n")?;
        write_synced(&f.mnt.join(d).join("moved"), b"moved\n")?;
        fsync_dir(&f.mnt.join(d))?;
    }
    fsync_dir(&f.mnt)?;
    m.shut_down()?;

    let m = f.mount()?;
    for d in ["d1", "d2"] {
        let dir = f.mnt.join(d);
        write_synced(&dir.join("CURRENT.dbtmp"), b"MANIFEST-000002\n")?;
        fs::rename(dir.join("CURRENT.dbtmp"), dir.join("CURRENT"))?;
        expect_contents(&dir.join("CURRENT"), b"MANIFEST-000002\n")?;
        expect_absent(&dir.join("CURRENT.dbtmp"))?;
    }
    // Between directories: durable only once both are fsynced.
    fs::rename(f.mnt.join("d1/moved"), f.mnt.join("d2/moved-from-d1"))?;
    fsync_dir(&f.mnt.join("d2"))?;

    // RENAME_NOREPLACE refuses an existing target; RENAME_EXCHANGE is refused.
    let (a, b) = (f.mnt.join("d2/a"), f.mnt.join("d2/b"));
    write_unsynced(&a, b"a")?;
    write_unsynced(&b, b"b")?;
    let noreplace = renameat2(AT_FDCWD, &a, AT_FDCWD, &b, RenameFlags::RENAME_NOREPLACE);
    ensure!(noreplace == Err(nix::errno::Errno::EEXIST), "RENAME_NOREPLACE: {noreplace:?}");
    let exchange = renameat2(AT_FDCWD, &a, AT_FDCWD, &b, RenameFlags::RENAME_EXCHANGE);
    ensure!(exchange == Err(nix::errno::Errno::EINVAL), "RENAME_EXCHANGE: {exchange:?}");
    expect_contents(&b, b"b")?;

    f.cut(m)?;
    f.check_both(|dir| {
        expect_contents(&dir.join("d1/CURRENT"), b"MANIFEST-000001\n")?;
        expect_absent(&dir.join("d1/CURRENT.dbtmp"))?;
        expect_contents(&dir.join("d2/CURRENT"), b"MANIFEST-000002\n")?;
        expect_absent(&dir.join("d2/CURRENT.dbtmp"))?;
        expect_contents(&dir.join("d1/moved"), b"moved\n")?;
        expect_absent(&dir.join("d2/moved-from-d1"))?;
        expect_absent(&dir.join("d2/a"))?;
        expect_absent(&dir.join("d2/b"))
    })?;
    expect_trash_empty(&f)
}

/// (8) a clean shutdown (SIGTERM) keeps every write, synced or not.
#[test]
fn clean_shutdown_keeps_everything() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    write_synced(&f.mnt.join("kept"), &pattern(1, 3_000))?;
    fsync_dir(&f.mnt)?;
    write_unsynced(&f.mnt.join("unsynced"), &pattern(2, 9_000))?;
    let k = OpenOptions::new().write(true).open(f.mnt.join("kept"))?;
    k.write_all_at(&pattern(3, 2_000), 2_000)?;
    drop(k);
    fs::create_dir(f.mnt.join("dir"))?;
    write_unsynced(&f.mnt.join("dir/removed"), b"x")?;
    fs::remove_file(f.mnt.join("dir/removed"))?;
    write_unsynced(&f.mnt.join("dir/old"), b"renamed")?;
    fs::rename(f.mnt.join("dir/old"), f.mnt.join("dir/new"))?;
    m.shut_down()?;

    let mut kept = pattern(1, 3_000);
    kept.truncate(2_000);
    kept.extend_from_slice(&pattern(3, 2_000));
    expect_trash_empty(&f)?;
    f.check_both(|dir| {
        expect_contents(&dir.join("kept"), &kept)?;
        expect_contents(&dir.join("unsynced"), &pattern(2, 9_000))?;
        expect_absent(&dir.join("dir/removed"))?;
        expect_absent(&dir.join("dir/old"))?;
        expect_contents(&dir.join("dir/new"), b"renamed")
    })
}

/// Cut, remount, write, cut again: each generation starts from what the
/// previous one made durable.
#[test]
fn two_generations_of_power_cuts() -> anyhow::Result<()> {
    if !can_mount() {
        return Ok(());
    }
    let f = Fixture::new()?;
    let m = f.mount()?;
    write_synced(&f.mnt.join("log"), &pattern(1, 1_000))?;
    fsync_dir(&f.mnt)?;
    let mut log = OpenOptions::new().append(true).open(f.mnt.join("log"))?;
    log.write_all(&pattern(2, 1_000))?;
    drop(log);
    f.cut(m)?;
    expect_contents(&f.disk().join("log"), &pattern(1, 1_000))?;

    let m = f.mount()?;
    let vfs = nix::sys::statvfs::statvfs(&f.mnt)?;
    ensure!(vfs.blocks() > 0, "statfs through the mount: no blocks");
    expect_contents(&f.mnt.join("log"), &pattern(1, 1_000))?;
    let mut log = OpenOptions::new().append(true).open(f.mnt.join("log"))?;
    log.write_all(&pattern(3, 1_000))?;
    log.sync_data()?;
    log.write_all(&pattern(4, 1_000))?;
    drop(log);
    write_synced(&f.mnt.join("second"), b"second generation")?;
    fsync_dir(&f.mnt)?;
    write_synced(&f.mnt.join("lost"), b"never in a synced directory")?;
    f.cut(m)?;

    f.check_both(|dir| {
        expect_contents(&dir.join("log"), &[pattern(1, 1_000), pattern(3, 1_000)].concat())?;
        expect_contents(&dir.join("second"), b"second generation")?;
        expect_absent(&dir.join("lost"))
    })
}
