//! The filesystem's state: the inode table, open handles, and the two undo
//! logs (file data per inode, directory entries in one ordered journal) that
//! a power cut applies to the backing directory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use fuser::{Errno, FileAttr, FileType, INodeNo};
use nix::dir::{Dir, Type};
use nix::fcntl::{AT_FDCWD, OFlag, RenameFlags, openat, renameat, renameat2};
use nix::sys::stat::{FileStat, Mode, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, fdatasync, fsync, unlinkat};

/// Granularity of the saved durable contents: a write into a block within
/// the durable size saves the whole block (its durable part) once.
pub(crate) const BLOCK: u64 = 4096;

/// A backing object's identity: (`st_dev`, `st_ino`).
pub(crate) type Key = (u64, u64);

pub(crate) type Res<T> = Result<T, Errno>;

/// nix's errno as the one FUSE replies with.
pub(crate) fn ne(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

/// Locks a mutex; a panic in another request must not wedge the filesystem.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn warn(what: std::fmt::Arguments<'_>) {
    eprintln!("hie-powercut-fs: {what}");
}

/// Unsynced changes to one file's data since its last fsync: enough to put
/// back exactly what the last fsync made durable.
pub(crate) struct DataUndo {
    /// The file's size at its last fsync (at its first change after it).
    durable_size: u64,
    /// Durable contents of each block changed since, by block index; only
    /// the part within `durable_size`.
    blocks: BTreeMap<u64, Vec<u8>>,
}

/// One backing object the kernel knows by a FUSE inode number.
pub(crate) struct Inode {
    pub(crate) key: Key,
    /// `O_PATH` descriptor: names the object whatever it is called now,
    /// including after it was moved into the trash.
    pub(crate) fd: OwnedFd,
    pub(crate) kind: FileType,
    /// `Some` while the file has changes since its last fsync.
    pub(crate) data: Mutex<Option<DataUndo>>,
}

impl Inode {
    fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }

    /// A real descriptor of the object, opened through its `O_PATH` one.
    pub(crate) fn reopen(&self, flags: OFlag) -> Res<File> {
        openat(AT_FDCWD, self.proc_path().as_str(), flags | OFlag::O_CLOEXEC, Mode::empty()).map(File::from).map_err(ne)
    }
}

struct TableEntry {
    inode: Arc<Inode>,
    nlookup: u64,
}

/// FUSE inode numbers to backing objects, deduplicated by `Key`. An entry
/// whose lookups the kernel has all forgotten stays while it has unsynced
/// data, so a later lookup of the same file finds its undo state.
///
/// A FUSE inode number is the backing `st_ino` (so `stat` and `readdir`
/// agree), with the backing root's and 1 swapped: FUSE's root is 1. Every
/// entry holds its object open, so a number is not reused while known.
struct Table {
    by_ino: HashMap<u64, TableEntry>,
    by_key: HashMap<Key, u64>,
    /// `st_ino` of `BACKING_DIR/root`.
    root_ino: u64,
    /// For the unlikely object whose number is taken by one on another device.
    next_spare: u64,
}

/// The FUSE inode number of backing inode `st_ino` (see `Table`).
fn fuse_ino(root_ino: u64, st_ino: u64) -> u64 {
    if st_ino == root_ino {
        INodeNo::ROOT.0
    } else if st_ino == INodeNo::ROOT.0 {
        root_ino
    } else {
        st_ino
    }
}

pub(crate) struct OpenFile {
    pub(crate) file: File,
    pub(crate) inode: Arc<Inode>,
    /// Opened `O_APPEND`: each write goes to the current end of file.
    pub(crate) append: bool,
}

pub(crate) struct DirEnt {
    pub(crate) ino: u64,
    pub(crate) kind: FileType,
    pub(crate) name: OsString,
}

pub(crate) struct OpenDir {
    pub(crate) fd: OwnedFd,
    /// The entries as read at offset 0; later offsets index into them.
    pub(crate) entries: Mutex<Option<Vec<DirEnt>>>,
}

/// How to take back one directory-entry change.
enum Undo {
    /// An entry was created: remove it (recursively for a directory).
    Remove { dir: Arc<Inode>, name: OsString },
    /// An entry was removed, i.e. moved to the trash under `trash`: move it back.
    Restore { dir: Arc<Inode>, name: OsString, trash: OsString },
    /// An entry was renamed from `from` to `to`: rename it back.
    RenameBack { from: Arc<Inode>, from_name: OsString, to: Arc<Inode>, to_name: OsString },
}

struct NsRecord {
    seq: u64,
    /// The directories whose fsync makes the change durable, each with
    /// whether it has been fsynced since the change; durable once all are.
    deps: Vec<(Key, bool)>,
    undo: Undo,
}

#[derive(Default)]
struct Journal {
    next_seq: u64,
    records: Vec<NsRecord>,
}

impl Journal {
    fn push(&mut self, dirs: &[&Arc<Inode>], undo: Undo) {
        let mut deps: Vec<(Key, bool)> = Vec::with_capacity(dirs.len());
        for d in dirs {
            if !deps.iter().any(|(k, _)| *k == d.key) {
                deps.push((d.key, false));
            }
        }
        self.records.push(NsRecord { seq: self.next_seq, deps, undo });
        self.next_seq += 1;
    }
}

/// What a power cut undid.
#[derive(Default)]
pub(crate) struct CutSummary {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) truncated: u64,
    pub(crate) removed: u64,
    pub(crate) restored: u64,
    pub(crate) renames: u64,
    pub(crate) failed: u64,
}

pub(crate) struct State {
    table: Mutex<Table>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<OpenDir>>>,
    next_fh: AtomicU64,
    journal: Mutex<Journal>,
    /// `BACKING_DIR/trash`, opened for reading (statfs, fsync, listing).
    trash: OwnedFd,
    next_trash: AtomicU64,
    /// Set once at a power cut or shutdown: every later change fails.
    stopped: RwLock<bool>,
}

pub(crate) const TTL: Duration = Duration::from_secs(1);

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(nsec).unwrap_or(0));
    match u64::try_from(sec) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + nanos,
    }
}

pub(crate) fn attr(ino: u64, st: &FileStat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: time(st.st_ctime, st.st_ctime_nsec),
        kind: kind_of(st.st_mode),
        perm: u16::try_from(st.st_mode & 0o7777).unwrap_or(0),
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: u32::try_from(st.st_rdev).unwrap_or(0),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        flags: 0,
    }
}

fn size_of(st: &FileStat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// Reads `buf.len()` bytes at `off`; what lies beyond the end of file is zeros.
fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => {
                buf[n..].fill(0);
                break;
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The names in a directory, without `.` and `..`, with inode number and type.
fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<(OsString, u64, Option<Type>)>> {
    let fd = openat(dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut d = Dir::from_fd(fd)?;
    let mut out = Vec::new();
    for e in d.iter() {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((OsStr::from_bytes(name).to_owned(), e.ino(), e.file_type()));
    }
    Ok(out)
}

/// Removes `dir/name`, a whole tree if it is a directory; adds the keys of
/// the directories removed to `gone`.
fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr, gone: &mut HashSet<Key>) -> nix::Result<()> {
    let st = fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if !is_dir(&st) {
        return unlinkat(dir, name, UnlinkatFlags::NoRemoveDir);
    }
    let sub =
        openat(dir, name, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
    for (child, _, _) in list_dir(sub.as_fd())? {
        match remove_tree(sub.as_fd(), &child, gone) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir)?;
    gone.insert((st.st_dev, st.st_ino));
    Ok(())
}

fn fsync_dir(dir: BorrowedFd<'_>) -> nix::Result<()> {
    let fd = openat(dir, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    fsync(fd.as_fd())
}

/// Flags for the backing descriptor of a kernel open: creation and
/// truncation are done (and logged) separately; the reopen goes through a
/// /proc symlink, so `O_NOFOLLOW` cannot stay.
pub(crate) fn backing_open_flags(flags: i32) -> OFlag {
    let strip = OFlag::O_CREAT
        | OFlag::O_EXCL
        | OFlag::O_TRUNC
        | OFlag::O_NOCTTY
        | OFlag::O_NOFOLLOW
        | OFlag::O_DIRECT
        | OFlag::O_PATH;
    (OFlag::from_bits_retain(flags) - strip) | OFlag::O_CLOEXEC
}

impl State {
    /// Prepares `BACKING_DIR/root` and an empty `BACKING_DIR/trash` (what a
    /// previous instance left there is no longer needed: a cut instance
    /// already restored what it had to).
    pub(crate) fn open(backing: &Path) -> anyhow::Result<State> {
        let root = backing.join("root");
        let trash = backing.join("trash");
        for d in [&root, &trash] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        let root_fd = openat(AT_FDCWD, &root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("opening {}", root.display()))?;
        let trash_fd = openat(AT_FDCWD, &trash, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .with_context(|| format!("opening {}", trash.display()))?;
        let root_st = fstat(root_fd.as_fd())?;
        let trash_st = fstat(trash_fd.as_fd())?;
        if root_st.st_dev != trash_st.st_dev {
            bail!("{} and {} are on different filesystems", root.display(), trash.display());
        }
        let root_inode = Arc::new(Inode {
            key: (root_st.st_dev, root_st.st_ino),
            fd: root_fd,
            kind: FileType::Directory,
            data: Mutex::new(None),
        });
        let mut table =
            Table { by_ino: HashMap::new(), by_key: HashMap::new(), root_ino: root_st.st_ino, next_spare: 1 << 62 };
        table.by_key.insert(root_inode.key, INodeNo::ROOT.0);
        table.by_ino.insert(INodeNo::ROOT.0, TableEntry { inode: root_inode, nlookup: 1 });
        let state = State {
            table: Mutex::new(table),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            journal: Mutex::new(Journal::default()),
            trash: trash_fd,
            next_trash: AtomicU64::new(0),
            stopped: RwLock::new(false),
        };
        state.empty_trash().context("emptying the trash")?;
        Ok(state)
    }

    pub(crate) fn root_mode(&self) -> Res<u32> {
        let root = self.inode(INodeNo::ROOT)?;
        Ok(fstat(root.fd.as_fd()).map_err(ne)?.st_mode)
    }

    fn empty_trash(&self) -> nix::Result<()> {
        let mut gone = HashSet::new();
        for (name, _, _) in list_dir(self.trash.as_fd())? {
            remove_tree(self.trash.as_fd(), &name, &mut gone)?;
        }
        fsync(self.trash.as_fd())
    }

    /// Held (shared) by every request that changes anything; fails once stopped.
    pub(crate) fn gate(&self) -> Res<RwLockReadGuard<'_, bool>> {
        let g = self.stopped.read().unwrap_or_else(PoisonError::into_inner);
        if *g { Err(Errno::EIO) } else { Ok(g) }
    }

    /// Waits for the changes in progress, then refuses every later one.
    pub(crate) fn stop(&self) {
        *self.stopped.write().unwrap_or_else(PoisonError::into_inner) = true;
    }

    // ----- inode table -----

    pub(crate) fn inode(&self, ino: INodeNo) -> Res<Arc<Inode>> {
        lock(&self.table).by_ino.get(&ino.0).map(|e| Arc::clone(&e.inode)).ok_or(Errno::ESTALE)
    }

    /// Counts one kernel lookup of the object behind `fd`; returns its number.
    fn intern(&self, fd: OwnedFd, st: &FileStat) -> u64 {
        let key = (st.st_dev, st.st_ino);
        let mut t = lock(&self.table);
        if let Some(&ino) = t.by_key.get(&key)
            && let Some(e) = t.by_ino.get_mut(&ino)
        {
            e.nlookup += 1;
            return ino;
        }
        let mut ino = fuse_ino(t.root_ino, st.st_ino);
        if t.by_ino.contains_key(&ino) {
            ino = t.next_spare;
            t.next_spare += 1;
        }
        let inode = Arc::new(Inode { key, fd, kind: kind_of(st.st_mode), data: Mutex::new(None) });
        t.by_key.insert(key, ino);
        t.by_ino.insert(ino, TableEntry { inode, nlookup: 1 });
        ino
    }

    /// Looks `name` up in `dir`, counting a kernel lookup of it.
    pub(crate) fn lookup_name(&self, dir: &Inode, name: &OsStr) -> Res<FileAttr> {
        let fd = openat(dir.fd.as_fd(), name, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(ne)?;
        let st = fstat(fd.as_fd()).map_err(ne)?;
        let ino = self.intern(fd, &st);
        Ok(attr(ino, &st))
    }

    pub(crate) fn forget(&self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let mut t = lock(&self.table);
        let Some(e) = t.by_ino.get_mut(&ino) else { return };
        e.nlookup = e.nlookup.saturating_sub(n);
        if e.nlookup == 0 && !Self::keep_unused(&e.inode) {
            let key = e.inode.key;
            t.by_ino.remove(&ino);
            t.by_key.remove(&key);
        }
    }

    /// Whether an inode the kernel no longer knows must stay: it has unsynced
    /// data, and a name (a file deleted for good has nothing to roll back).
    fn keep_unused(inode: &Inode) -> bool {
        let mut data = lock(&inode.data);
        if data.is_none() {
            return false;
        }
        match fstat(inode.fd.as_fd()) {
            Ok(st) if st.st_nlink == 0 => {
                *data = None;
                false
            }
            _ => true,
        }
    }

    /// Drops the unused inodes whose files were deleted for good.
    fn reap_unused(&self) {
        let mut t = lock(&self.table);
        let dead: Vec<(u64, Key)> = t
            .by_ino
            .iter()
            .filter(|(_, e)| e.nlookup == 0 && !Self::keep_unused(&e.inode))
            .map(|(&ino, e)| (ino, e.inode.key))
            .collect();
        for (ino, key) in dead {
            t.by_ino.remove(&ino);
            t.by_key.remove(&key);
        }
    }

    // ----- handles -----

    pub(crate) fn add_file(&self, file: File, inode: Arc<Inode>, append: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let f = Arc::new(OpenFile { file, inode, append });
        self.files.write().unwrap_or_else(PoisonError::into_inner).insert(fh, f);
        fh
    }

    pub(crate) fn file(&self, fh: u64) -> Res<Arc<OpenFile>> {
        self.files.read().unwrap_or_else(PoisonError::into_inner).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    pub(crate) fn release_file(&self, fh: u64) {
        self.files.write().unwrap_or_else(PoisonError::into_inner).remove(&fh);
    }

    pub(crate) fn add_dir(&self, fd: OwnedFd) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let d = Arc::new(OpenDir { fd, entries: Mutex::new(None) });
        self.dirs.write().unwrap_or_else(PoisonError::into_inner).insert(fh, d);
        fh
    }

    pub(crate) fn dir(&self, fh: u64) -> Res<Arc<OpenDir>> {
        self.dirs.read().unwrap_or_else(PoisonError::into_inner).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    pub(crate) fn release_dir(&self, fh: u64) {
        self.dirs.write().unwrap_or_else(PoisonError::into_inner).remove(&fh);
    }

    /// The entries of an open directory, `.` and `..` first, numbered as
    /// `stat` through the mount numbers them.
    pub(crate) fn read_dir(&self, dir: &OpenDir) -> Res<Vec<DirEnt>> {
        let mut out = Vec::new();
        let here = fstat(dir.fd.as_fd()).map_err(ne)?;
        let up = fstatat(dir.fd.as_fd(), "..", nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(ne)?;
        let root_ino = lock(&self.table).root_ino;
        out.push(DirEnt { ino: fuse_ino(root_ino, here.st_ino), kind: FileType::Directory, name: ".".into() });
        out.push(DirEnt { ino: fuse_ino(root_ino, up.st_ino), kind: FileType::Directory, name: "..".into() });
        for (name, st_ino, ty) in list_dir(dir.fd.as_fd()).map_err(ne)? {
            let ino = fuse_ino(root_ino, st_ino);
            let kind = match ty {
                Some(Type::Directory) => FileType::Directory,
                Some(Type::File) => FileType::RegularFile,
                Some(Type::Symlink) => FileType::Symlink,
                Some(Type::Fifo) => FileType::NamedPipe,
                Some(Type::CharacterDevice) => FileType::CharDevice,
                Some(Type::BlockDevice) => FileType::BlockDevice,
                Some(Type::Socket) => FileType::Socket,
                None => match fstatat(dir.fd.as_fd(), name.as_os_str(), nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => kind_of(st.st_mode),
                    Err(_) => continue,
                },
            };
            out.push(DirEnt { ino, kind, name });
        }
        Ok(out)
    }

    // ----- file data -----

    /// Saves what changing bytes `start..end` of the file would lose of its
    /// durable contents, and its durable size at its first change since its
    /// last fsync. Call with the inode's data lock held, before the change.
    pub(crate) fn before_change(inode: &Inode, undo: &mut Option<DataUndo>, start: u64, end: u64) -> Res<()> {
        let u = match undo {
            Some(u) => u,
            None => {
                let st = fstat(inode.fd.as_fd()).map_err(ne)?;
                undo.insert(DataUndo { durable_size: size_of(&st), blocks: BTreeMap::new() })
            }
        };
        let end = end.min(u.durable_size);
        if start >= end {
            return Ok(());
        }
        let mut reader: Option<File> = None;
        for b in start / BLOCK..=(end - 1) / BLOCK {
            if u.blocks.contains_key(&b) {
                continue;
            }
            if reader.is_none() {
                reader = Some(inode.reopen(OFlag::O_RDONLY)?);
            }
            let Some(r) = reader.as_ref() else { return Err(Errno::EIO) };
            let off = b * BLOCK;
            let len = usize::try_from(BLOCK.min(u.durable_size - off)).map_err(|_| Errno::EIO)?;
            let mut buf = vec![0u8; len];
            read_full_at(r, &mut buf, off)?;
            u.blocks.insert(b, buf);
        }
        Ok(())
    }

    pub(crate) fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Res<u32> {
        let _g = self.gate()?;
        let f = self.file(fh)?;
        let mut undo = lock(&f.inode.data);
        let off = if f.append { size_of(&fstat(f.file.as_fd()).map_err(ne)?) } else { offset };
        Self::before_change(&f.inode, &mut undo, off, off.saturating_add(data.len() as u64))?;
        let n = f.file.write_at(data, off)?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Sets the size of `file` (a writable descriptor of `inode`).
    pub(crate) fn truncate(inode: &Inode, file: &File, size: u64) -> Res<()> {
        let mut undo = lock(&inode.data);
        let cur = size_of(&fstat(file.as_fd()).map_err(ne)?);
        Self::before_change(inode, &mut undo, cur.min(size), cur.max(size))?;
        file.set_len(size)?;
        Ok(())
    }

    pub(crate) fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        let _g = self.gate()?;
        let f = self.file(fh)?;
        let mut undo = lock(&f.inode.data);
        let shifts = libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE;
        let zeroes = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & shifts != 0 {
            Self::before_change(&f.inode, &mut undo, offset, u64::MAX)?;
        } else if mode & zeroes != 0 {
            Self::before_change(&f.inode, &mut undo, offset, offset.saturating_add(length))?;
        } else if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && mode & libc::FALLOC_FL_UNSHARE_RANGE == 0 {
            // Plain allocation may grow the file.
            Self::before_change(&f.inode, &mut undo, 0, 0)?;
        }
        let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let len = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
        nix::fcntl::fallocate(f.file.as_fd(), nix::fcntl::FallocateFlags::from_bits_retain(mode), off, len).map_err(ne)
    }

    /// fsync: what the file holds now is durable.
    pub(crate) fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let _g = self.gate()?;
        let f = self.file(fh)?;
        let mut undo = lock(&f.inode.data);
        if datasync { fdatasync(f.file.as_fd()) } else { fsync(f.file.as_fd()) }.map_err(ne)?;
        *undo = None;
        Ok(())
    }

    // ----- directory entries -----

    fn trash_name(&self) -> OsString {
        format!("{}", self.next_trash.fetch_add(1, Ordering::Relaxed)).into()
    }

    /// Creates `dir/name` with `make`, logging its removal as the undo.
    pub(crate) fn create_entry(
        &self,
        dir: &Arc<Inode>,
        name: &OsStr,
        make: impl FnOnce(BorrowedFd<'_>) -> nix::Result<()>,
    ) -> Res<FileAttr> {
        let _g = self.gate()?;
        {
            let mut j = lock(&self.journal);
            make(dir.fd.as_fd()).map_err(ne)?;
            j.push(&[dir], Undo::Remove { dir: Arc::clone(dir), name: name.to_owned() });
        }
        self.lookup_name(dir, name)
    }

    /// Creates and opens a regular file (`create`); an existing one is
    /// opened unless `O_EXCL`. Returns the new entry and the handle.
    pub(crate) fn create_file(&self, dir: &Arc<Inode>, name: &OsStr, mode: u32, flags: i32) -> Res<(FileAttr, u64)> {
        let _g = self.gate()?;
        let oflags = backing_open_flags(flags);
        let perm = Mode::from_bits_truncate(mode & 0o7777);
        let (fd, created) = {
            let mut j = lock(&self.journal);
            match openat(dir.fd.as_fd(), name, oflags | OFlag::O_CREAT | OFlag::O_EXCL, perm) {
                Ok(fd) => {
                    j.push(&[dir], Undo::Remove { dir: Arc::clone(dir), name: name.to_owned() });
                    (fd, true)
                }
                Err(nix::errno::Errno::EEXIST) if flags & libc::O_EXCL == 0 => {
                    (openat(dir.fd.as_fd(), name, oflags, Mode::empty()).map_err(ne)?, false)
                }
                Err(e) => return Err(ne(e)),
            }
        };
        let mut entry = self.lookup_name(dir, name)?;
        let inode = self.inode(entry.ino)?;
        let file = File::from(fd);
        if !created && flags & libc::O_TRUNC != 0 {
            Self::truncate(&inode, &file, 0)?;
            entry = attr(entry.ino.0, &fstat(file.as_fd()).map_err(ne)?);
        }
        let fh = self.add_file(file, inode, flags & libc::O_APPEND != 0);
        Ok((entry, fh))
    }

    /// unlink / rmdir: the entry moves to the trash until its directory is fsynced.
    pub(crate) fn remove_entry(&self, dir: &Arc<Inode>, name: &OsStr, want_dir: bool) -> Res<()> {
        let _g = self.gate()?;
        let mut j = lock(&self.journal);
        let st = fstatat(dir.fd.as_fd(), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(ne)?;
        match (want_dir, is_dir(&st)) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if !Self::is_empty_dir(dir, name)? => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let trash = self.trash_name();
        renameat(dir.fd.as_fd(), name, self.trash.as_fd(), trash.as_os_str()).map_err(ne)?;
        j.push(&[dir], Undo::Restore { dir: Arc::clone(dir), name: name.to_owned(), trash });
        Ok(())
    }

    fn is_empty_dir(dir: &Inode, name: &OsStr) -> Res<bool> {
        let fd = openat(
            dir.fd.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(ne)?;
        Ok(list_dir(fd.as_fd()).map_err(ne)?.is_empty())
    }

    pub(crate) fn rename(
        &self,
        from: &Arc<Inode>,
        name: &OsStr,
        to: &Arc<Inode>,
        newname: &OsStr,
        noreplace: bool,
    ) -> Res<()> {
        let _g = self.gate()?;
        let mut j = lock(&self.journal);
        let nofollow = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
        let src = fstatat(from.fd.as_fd(), name, nofollow).map_err(ne)?;
        let back = || Undo::RenameBack {
            from: Arc::clone(from),
            from_name: name.to_owned(),
            to: Arc::clone(to),
            to_name: newname.to_owned(),
        };
        match fstatat(to.fd.as_fd(), newname, nofollow) {
            Err(nix::errno::Errno::ENOENT) => {
                renameat2(from.fd.as_fd(), name, to.fd.as_fd(), newname, RenameFlags::RENAME_NOREPLACE).map_err(ne)?;
                j.push(&[from, to], back());
            }
            Err(e) => return Err(ne(e)),
            Ok(_) if noreplace => return Err(Errno::EEXIST),
            // Two names of one file: rename does nothing.
            Ok(dst) if (dst.st_dev, dst.st_ino) == (src.st_dev, src.st_ino) => {}
            Ok(dst) => {
                match (is_dir(&src), is_dir(&dst)) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    (true, true) if !Self::is_empty_dir(to, newname)? => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
                let trash = self.trash_name();
                renameat(to.fd.as_fd(), newname, self.trash.as_fd(), trash.as_os_str()).map_err(ne)?;
                if let Err(e) = renameat2(from.fd.as_fd(), name, to.fd.as_fd(), newname, RenameFlags::RENAME_NOREPLACE)
                {
                    if let Err(e2) = renameat2(
                        self.trash.as_fd(),
                        trash.as_os_str(),
                        to.fd.as_fd(),
                        newname,
                        RenameFlags::RENAME_NOREPLACE,
                    ) {
                        warn(format_args!("rename failed ({e}) and its target could not be put back: {e2}"));
                    }
                    return Err(ne(e));
                }
                // The replaced entry comes back exactly when the rename is undone.
                j.push(&[from, to], Undo::Restore { dir: Arc::clone(to), name: newname.to_owned(), trash });
                j.push(&[from, to], back());
            }
        }
        Ok(())
    }

    /// fsyncdir: the directory's entry changes made before the fsync are
    /// durable once each directory they involve has been fsynced.
    pub(crate) fn fsyncdir(&self, dir: &Inode, fh: u64, datasync: bool) -> Res<()> {
        let _g = self.gate()?;
        let upto = lock(&self.journal).next_seq;
        let sync = |fd: BorrowedFd<'_>| if datasync { fdatasync(fd) } else { fsync(fd) };
        match self.dir(fh) {
            Ok(d) => sync(d.fd.as_fd()),
            Err(_) => dir
                .reopen(OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|_| nix::errno::Errno::EIO)
                .and_then(|f| sync(f.as_fd())),
        }
        .map_err(ne)?;
        let mut j = lock(&self.journal);
        for r in j.records.iter_mut().filter(|r| r.seq < upto) {
            for d in r.deps.iter_mut().filter(|d| d.0 == dir.key) {
                d.1 = true;
            }
        }
        let records = std::mem::take(&mut j.records);
        let (durable, pending): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| r.deps.iter().all(|d| d.1));
        j.records = pending;
        let mut gone = HashSet::new();
        self.purge(durable, &mut gone);
        // Directories deleted for good can never be fsynced, and nothing
        // in them can come back: their pending changes are settled too.
        while !gone.is_empty() {
            let records = std::mem::take(&mut j.records);
            let (settled, pending): (Vec<_>, Vec<_>) =
                records.into_iter().partition(|r| r.deps.iter().any(|d| gone.contains(&d.0)));
            j.records = pending;
            gone.clear();
            self.purge(settled, &mut gone);
        }
        drop(j);
        self.reap_unused();
        Ok(())
    }

    /// Forgets durable records; entries they kept in the trash are deleted for good.
    fn purge(&self, records: Vec<NsRecord>, gone: &mut HashSet<Key>) {
        for r in records {
            if let Undo::Restore { trash, .. } = r.undo
                && let Err(e) = remove_tree(self.trash.as_fd(), &trash, gone)
                && e != nix::errno::Errno::ENOENT
            {
                warn(format_args!("deleting trash/{}: {e}", trash.to_string_lossy()));
            }
        }
    }

    // ----- power cut and shutdown -----

    /// Throws away every change not made durable: entry changes newest
    /// first, then file contents through each inode's own descriptor
    /// (whatever its name is by then). Makes the result durable.
    pub(crate) fn power_cut(&self) -> CutSummary {
        let mut s = CutSummary::default();
        let records = std::mem::take(&mut lock(&self.journal).records);
        let mut touched: Vec<Arc<Inode>> = Vec::new();
        let mut touch = |d: &Arc<Inode>| {
            if !touched.iter().any(|t| t.key == d.key) {
                touched.push(Arc::clone(d));
            }
        };
        let noreplace = RenameFlags::RENAME_NOREPLACE;
        for r in records.into_iter().rev() {
            let result = match &r.undo {
                Undo::Remove { dir, name } => {
                    touch(dir);
                    let r = remove_tree(dir.fd.as_fd(), name, &mut HashSet::new());
                    if r.is_ok() {
                        s.removed += 1;
                    }
                    r.map_err(|e| format!("removing {}: {e}", name.to_string_lossy()))
                }
                Undo::Restore { dir, name, trash } => {
                    touch(dir);
                    let r =
                        renameat2(self.trash.as_fd(), trash.as_os_str(), dir.fd.as_fd(), name.as_os_str(), noreplace);
                    if r.is_ok() {
                        s.restored += 1;
                    }
                    r.map_err(|e| format!("restoring {}: {e}", name.to_string_lossy()))
                }
                Undo::RenameBack { from, from_name, to, to_name } => {
                    touch(from);
                    touch(to);
                    let r = renameat2(
                        to.fd.as_fd(),
                        to_name.as_os_str(),
                        from.fd.as_fd(),
                        from_name.as_os_str(),
                        noreplace,
                    );
                    if r.is_ok() {
                        s.renames += 1;
                    }
                    r.map_err(|e| {
                        format!("renaming {} back to {}: {e}", to_name.to_string_lossy(), from_name.to_string_lossy())
                    })
                }
            };
            if let Err(e) = result {
                s.failed += 1;
                warn(format_args!("power cut: {e}"));
            }
        }
        let inodes: Vec<Arc<Inode>> = lock(&self.table).by_ino.values().map(|e| Arc::clone(&e.inode)).collect();
        for inode in inodes {
            let Some(u) = lock(&inode.data).take() else { continue };
            match Self::roll_back_file(&inode, &u) {
                Ok(None) => {}
                Ok(Some((bytes, truncated))) => {
                    s.files += 1;
                    s.bytes += bytes;
                    s.truncated += u64::from(truncated);
                }
                Err(e) => {
                    s.failed += 1;
                    warn(format_args!(
                        "power cut: rolling back a file's data: {}",
                        nix::errno::Errno::from_raw(e.code())
                    ));
                }
            }
        }
        for d in touched {
            if let Err(e) = fsync_dir(d.fd.as_fd()) {
                warn(format_args!("power cut: fsync of a directory: {e}"));
            }
        }
        s
    }

    /// Puts one file's durable contents back; `None` if nothing changed or
    /// the file no longer exists. Returns the unsynced bytes dropped and
    /// whether its size changed.
    fn roll_back_file(inode: &Inode, u: &DataUndo) -> Res<Option<(u64, bool)>> {
        let st = fstat(inode.fd.as_fd()).map_err(ne)?;
        let cur = size_of(&st);
        if st.st_nlink == 0 || (cur == u.durable_size && u.blocks.is_empty()) {
            return Ok(None);
        }
        let f = inode.reopen(OFlag::O_WRONLY)?;
        let mut bytes = cur.saturating_sub(u.durable_size);
        let truncated = cur != u.durable_size;
        if truncated {
            f.set_len(u.durable_size)?;
        }
        for (b, data) in &u.blocks {
            f.write_all_at(data, b * BLOCK)?;
            bytes += data.len() as u64;
        }
        f.sync_all()?;
        Ok(Some((bytes, truncated)))
    }

    /// Clean shutdown: everything written stays; the trash is emptied and
    /// the backing filesystem synced.
    pub(crate) fn shut_down(&self) {
        lock(&self.journal).records.clear();
        let inodes: Vec<Arc<Inode>> = lock(&self.table).by_ino.values().map(|e| Arc::clone(&e.inode)).collect();
        for inode in inodes {
            lock(&inode.data).take();
        }
        if let Err(e) = self.empty_trash() {
            warn(format_args!("emptying the trash: {e}"));
        }
        if let Err(e) = nix::unistd::syncfs(self.trash.as_fd()) {
            warn(format_args!("syncfs: {e}"));
        }
    }

    pub(crate) fn statfs(&self) -> Res<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::fstatvfs(self.trash.as_fd()).map_err(ne)
    }
}
