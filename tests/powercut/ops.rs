//! The FUSE requests: a passthrough to the backing directory through
//! `O_PATH` descriptors (like libfuse's passthrough_ll), with every change
//! of file data or directory entries going through `State`'s undo logs.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmodat, fstat, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, Whence, fchownat, linkat, lseek, symlinkat};

use crate::state::{Res, State, TTL, attr, backing_open_flags, ne};

pub(crate) struct PowerCutFs {
    pub(crate) state: Arc<State>,
}

const GEN: Generation = Generation(0);

fn timespec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(TimeOrNow::Now) => TimeSpec::UTIME_NOW,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => TimeSpec::from_duration(d),
            Err(_) => TimeSpec::new(0, 0),
        },
    }
}

fn entry(reply: ReplyEntry, r: Res<fuser::FileAttr>) {
    match r {
        Ok(a) => reply.entry(&TTL, &a, GEN),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, r: Res<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl PowerCutFs {
    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<fuser::FileAttr> {
        let s = &self.state;
        let _g = s.gate()?;
        let inode = s.inode(ino)?;
        let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&inode.fd));
        let symlink = inode.kind == FileType::Symlink;
        if let Some(mode) = mode
            && !symlink
        {
            fchmodat(
                AT_FDCWD,
                proc_path.as_str(),
                Mode::from_bits_truncate(mode & 0o7777),
                FchmodatFlags::FollowSymlink,
            )
            .map_err(ne)?;
        }
        if uid.is_some() || gid.is_some() {
            fchownat(inode.fd.as_fd(), "", uid.map(Uid::from_raw), gid.map(Gid::from_raw), AtFlags::AT_EMPTY_PATH)
                .map_err(ne)?;
        }
        if let Some(size) = size {
            let handle = fh.and_then(|fh| s.file(fh.0).ok());
            match handle {
                Some(h) => State::truncate(&inode, &h.file, size)?,
                None => State::truncate(&inode, &inode.reopen(OFlag::O_WRONLY)?, size)?,
            }
        }
        if (atime.is_some() || mtime.is_some()) && !symlink {
            utimensat(AT_FDCWD, proc_path.as_str(), &timespec(atime), &timespec(mtime), UtimensatFlags::FollowSymlink)
                .map_err(ne)?;
        }
        Ok(attr(ino.0, &fstat(inode.fd.as_fd()).map_err(ne)?))
    }

    fn do_open(&self, ino: INodeNo, flags: i32) -> Res<u64> {
        let s = &self.state;
        let inode = s.inode(ino)?;
        let file = inode.reopen(backing_open_flags(flags))?;
        if flags & libc::O_TRUNC != 0 {
            let _g = s.gate()?;
            State::truncate(&inode, &file, 0)?;
        }
        Ok(s.add_file(file, inode, flags & libc::O_APPEND != 0))
    }

    fn do_read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        let f = self.state.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(n);
        Ok(buf)
    }

    fn do_opendir(&self, ino: INodeNo) -> Res<u64> {
        let inode = self.state.inode(ino)?;
        let fd = openat(inode.fd.as_fd(), ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(ne)?;
        Ok(self.state.add_dir(fd))
    }
}

impl Filesystem for PowerCutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = &self.state;
        entry(reply, s.inode(parent).and_then(|dir| s.lookup_name(&dir, name)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.state.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = self.state.inode(ino).and_then(|i| fstat(i.fd.as_fd()).map_err(ne));
        match r {
            Ok(st) => reply.attr(&TTL, &attr(ino.0, &st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self.state.inode(ino).and_then(|i| nix::fcntl::readlinkat(i.fd.as_fd(), "").map_err(ne));
        match r {
            Ok(target) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str())),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let s = &self.state;
        let r = s.inode(parent).and_then(|dir| {
            s.create_entry(&dir, name, |d| {
                let kind = SFlag::from_bits_truncate(mode & libc::S_IFMT);
                mknodat(d, name, kind, Mode::from_bits_truncate(mode & 0o7777), libc::dev_t::from(rdev))
            })
        });
        entry(reply, r);
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let s = &self.state;
        let r = s
            .inode(parent)
            .and_then(|dir| s.create_entry(&dir, name, |d| mkdirat(d, name, Mode::from_bits_truncate(mode & 0o7777))));
        entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = &self.state;
        empty(reply, s.inode(parent).and_then(|dir| s.remove_entry(&dir, name, false)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = &self.state;
        empty(reply, s.inode(parent).and_then(|dir| s.remove_entry(&dir, name, true)));
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let s = &self.state;
        let r = s.inode(parent).and_then(|dir| s.create_entry(&dir, link_name, |d| symlinkat(target, d, link_name)));
        entry(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(!RenameFlags::RENAME_NOREPLACE) {
            reply.error(Errno::EINVAL);
            return;
        }
        let s = &self.state;
        let r = s.inode(parent).and_then(|from| {
            let to = s.inode(newparent)?;
            s.rename(&from, name, &to, newname, flags.contains(RenameFlags::RENAME_NOREPLACE))
        });
        empty(reply, r);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let s = &self.state;
        let r = s.inode(ino).and_then(|inode| {
            let dir = s.inode(newparent)?;
            let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&inode.fd));
            s.create_entry(&dir, newname, |d| {
                linkat(AT_FDCWD, proc_path.as_str(), d, newname, AtFlags::AT_SYMLINK_FOLLOW)
            })
        });
        entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.do_read(fh.0, offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.state.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state.release_file(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty(reply, self.state.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dir = match self.state.dir(fh.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let mut entries = crate::state::lock(&dir.entries);
        if offset == 0 || entries.is_none() {
            match self.state.read_dir(&dir) {
                Ok(e) => *entries = Some(e),
                Err(e) => return reply.error(e),
            }
        }
        let entries = entries.as_deref().unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in entries.iter().enumerate().skip(start) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.state.release_dir(fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let s = &self.state;
        empty(reply, s.inode(ino).and_then(|dir| s.fsyncdir(&dir, fh.0, datasync)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.state.statfs() {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                u32::try_from(v.block_size()).unwrap_or(4096),
                u32::try_from(v.name_max()).unwrap_or(255),
                u32::try_from(v.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let r = self.state.inode(ino).and_then(|i| {
            if i.kind == FileType::Symlink {
                return Ok(());
            }
            let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&i.fd));
            nix::unistd::access(path.as_str(), nix::unistd::AccessFlags::from_bits_truncate(mask.bits())).map_err(ne)
        });
        empty(reply, r);
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let s = &self.state;
        match s.inode(parent).and_then(|dir| s.create_file(&dir, name, mode, flags)) {
            Ok((a, fh)) => reply.created(&TTL, &a, GEN, FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.state.fallocate(fh.0, offset, length, mode));
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let whence = match whence {
            libc::SEEK_SET => Whence::SeekSet,
            libc::SEEK_CUR => Whence::SeekCur,
            libc::SEEK_END => Whence::SeekEnd,
            libc::SEEK_DATA => Whence::SeekData,
            libc::SEEK_HOLE => Whence::SeekHole,
            _ => return reply.error(Errno::EINVAL),
        };
        match self.state.file(fh.0).and_then(|f| lseek(f.file.as_fd(), offset, whence).map_err(ne)) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(e),
        }
    }
}
