//! Backup files: `hie cluster backup` writes what a node streams
//! (`hie_api::backup`) into a file that only its owner can read, sealed with
//! the operator's backup key; `hie node restore` opens one, refusing it
//! unless every byte authenticates under that key, and loads it into a new
//! node.
//!
//! File format 1:
//! ```text
//! header = "HIEBKF\0\x01" ‖ salt (32 random bytes) ‖ key id (8 bytes)
//! chunk* = [sealed len u32 LE] ‖ ChaCha20-Poly1305(body bytes, at most CHUNK_BYTES_MAX) ‖ tag (16)
//! ```
//! Each backup is sealed under its own key, HKDF-SHA256(salt, backup key);
//! chunk i's nonce is `i` (8 bytes, big-endian) ‖ 3 zero bytes ‖ 1 on the
//! last chunk, 0 before it; the header is every chunk's associated data.
//! So a changed byte, a chunk moved, dropped or added, a file cut short or
//! a header altered all fail to authenticate: the tags are a keyed
//! checksum, chained, and the content is encrypted as well. The key id
//! (HMAC-SHA256 of the key over a fixed label, first 8 bytes) says which
//! key a file needs without revealing the key.
//!
//! A backup key file holds 32 random bytes as 64 hex digits, readable by its
//! owner only (`hie cluster backup-key`; `hie dev up` makes `backup.key`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use hie_api::backup::{BackupHeader, BackupSummary, FormatError, Frame, Parser};
use ring::{aead, hkdf, hmac, rand::SecureRandom};

use crate::config::Config;

const FILE_MAGIC: &[u8; 8] = b"HIEBKF\x00\x01";
const SALT_BYTES: usize = 32;
const KEY_ID_BYTES: usize = 8;
const FILE_HEADER_BYTES: usize = FILE_MAGIC.len() + SALT_BYTES + KEY_ID_BYTES;
const KEY_BYTES: usize = 32;
/// Body bytes sealed in one chunk.
pub const CHUNK_BYTES_MAX: usize = 1 << 20;
const TAG_BYTES: usize = 16;
const KEY_ID_LABEL: &[u8] = b"hie backup key id v1";
const HKDF_INFO: &[u8] = b"hie backup v1 chacha20-poly1305";
/// Files a backup and a restore create: the owner's alone.
const FILE_MODE: u32 = 0o600;

/// The operator's backup key.
pub struct BackupKey {
    bytes: [u8; KEY_BYTES],
}

impl BackupKey {
    /// Reads a key file, refusing one that others than its owner may read.
    pub fn load(path: &Path) -> anyhow::Result<BackupKey> {
        let meta = std::fs::metadata(path).with_context(|| format!("reading the backup key {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!("the backup key {} is readable by others (mode {mode:o}): chmod 600 it", path.display());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let text = text.trim();
        let bytes: [u8; KEY_BYTES] = (text.len() == 2 * KEY_BYTES)
            .then(|| (0..KEY_BYTES).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect())
            .flatten()
            .and_then(|v: Vec<u8>| v.try_into().ok())
            .with_context(|| format!("{} does not hold a backup key ({} hex digits)", path.display(), 2 * KEY_BYTES))?;
        Ok(BackupKey { bytes })
    }

    /// Makes a new key file (mode 0600; never over an existing file).
    pub fn create(path: &Path) -> anyhow::Result<BackupKey> {
        let mut bytes = [0u8; KEY_BYTES];
        ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut f = create_private(path)?;
        f.write_all(format!("{hex}\n").as_bytes())?;
        f.sync_all()?;
        sync_parent(path)?;
        Ok(BackupKey { bytes })
    }

    /// What names this key in a backup file.
    pub fn id(&self) -> [u8; KEY_ID_BYTES] {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &self.bytes), KEY_ID_LABEL);
        tag.as_ref()[..KEY_ID_BYTES].try_into().expect("8 of 32 bytes")
    }

    fn file_key(&self, salt: &[u8]) -> aead::LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&self.bytes);
        let okm = prk.expand(&[HKDF_INFO], &aead::CHACHA20_POLY1305).expect("32 bytes is a valid length");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn nonce(i: u64, last: bool) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..8].copy_from_slice(&i.to_be_bytes());
    n[11] = u8::from(last);
    aead::Nonce::assume_unique_for_key(n)
}

/// Creates a new file readable by its owner only, failing if it exists.
fn create_private(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist: a backup file is never overwritten)", path.display()))
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// What a finished backup file holds.
pub struct Written {
    pub header: BackupHeader,
    pub summary: BackupSummary,
    pub file_bytes: u64,
    pub key_id: String,
}

/// Writes a node's backup body into a sealed file, as it arrives: into
/// `<out>.partial` (created with mode 0600, never over an existing file),
/// then, once the body's end frame is in and the file is fsynced, linked
/// to `out` (which must not exist) and the partial file removed. Dropped
/// unfinished, it removes the partial file.
pub struct BackupWriter {
    out: PathBuf,
    partial: PathBuf,
    file: Option<BufWriter<File>>,
    key: aead::LessSafeKey,
    aad: [u8; FILE_HEADER_BYTES],
    key_id: [u8; KEY_ID_BYTES],
    chunk: Vec<u8>,
    chunks: u64,
    bytes: u64,
    parser: Parser,
    header: Option<BackupHeader>,
    summary: Option<BackupSummary>,
}

impl BackupWriter {
    pub fn create(out: &Path, key: &BackupKey) -> anyhow::Result<BackupWriter> {
        if out.exists() {
            bail!("{} exists: a backup file is never overwritten", out.display());
        }
        let mut name = out.file_name().context("--out names no file")?.to_owned();
        name.push(".partial");
        let partial = out.with_file_name(name);
        let file = create_private(&partial)?;
        let mut salt = [0u8; SALT_BYTES];
        ring::rand::SystemRandom::new().fill(&mut salt).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let key_id = key.id();
        let mut aad = [0u8; FILE_HEADER_BYTES];
        aad[..FILE_MAGIC.len()].copy_from_slice(FILE_MAGIC);
        aad[FILE_MAGIC.len()..FILE_MAGIC.len() + SALT_BYTES].copy_from_slice(&salt);
        aad[FILE_MAGIC.len() + SALT_BYTES..].copy_from_slice(&key_id);
        let mut w = BackupWriter {
            out: out.to_owned(),
            partial,
            file: Some(BufWriter::with_capacity(CHUNK_BYTES_MAX + 64, file)),
            key: key.file_key(&salt),
            aad,
            key_id,
            chunk: Vec::with_capacity(CHUNK_BYTES_MAX + TAG_BYTES),
            chunks: 0,
            bytes: 0,
            parser: Parser::new(),
            header: None,
            summary: None,
        };
        w.put(&aad)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> anyhow::Result<()> {
        let f = self.file.as_mut().expect("open until finished");
        f.write_all(b).with_context(|| format!("writing {}", self.partial.display()))?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn seal(&mut self, last: bool) -> anyhow::Result<()> {
        let mut chunk = std::mem::take(&mut self.chunk);
        self.key
            .seal_in_place_append_tag(nonce(self.chunks, last), aead::Aad::from(&self.aad), &mut chunk)
            .map_err(|_| anyhow::anyhow!("sealing chunk {}", self.chunks))?;
        self.put(&(chunk.len() as u32).to_le_bytes())?;
        self.put(&chunk)?;
        self.chunks += 1;
        chunk.clear();
        self.chunk = chunk;
        Ok(())
    }

    /// The next bytes of the node's answer.
    pub fn write(&mut self, mut body: &[u8]) -> anyhow::Result<()> {
        let (header, summary) = (&mut self.header, &mut self.summary);
        self.parser.feed(body, |f| -> Result<(), FormatError> {
            match f {
                Frame::Header(h) => *header = Some(h),
                Frame::End(s) => *summary = Some(s),
                Frame::State(_) | Frame::AuditSegment(_) | Frame::AuditData(_) => {}
            }
            Ok(())
        })?;
        while !body.is_empty() {
            let n = body.len().min(CHUNK_BYTES_MAX - self.chunk.len());
            self.chunk.extend_from_slice(&body[..n]);
            body = &body[n..];
            if self.chunk.len() == CHUNK_BYTES_MAX {
                self.seal(false)?;
            }
        }
        Ok(())
    }

    /// The answer has ended: checks it was whole, seals the last chunk,
    /// fsyncs and puts the file in place.
    pub fn finish(mut self) -> anyhow::Result<Written> {
        self.parser.finish()?;
        self.seal(true)?;
        let file = self.file.take().expect("open until finished");
        let file = file.into_inner().map_err(|e| e.into_error()).context("writing the backup")?;
        file.sync_all().with_context(|| format!("syncing {}", self.partial.display()))?;
        drop(file);
        // A link fails if `out` exists, where a rename would replace it.
        std::fs::hard_link(&self.partial, &self.out)
            .with_context(|| format!("{} exists: a backup file is never overwritten", self.out.display()))?;
        std::fs::remove_file(&self.partial)?;
        sync_parent(&self.out)?;
        Ok(Written {
            header: self.header.take().context("no header")?,
            summary: self.summary.take().context("no end frame")?,
            file_bytes: self.bytes,
            key_id: hex(&self.key_id),
        })
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Why a backup file is refused.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed hie backup file (no {:?} at its start)", String::from_utf8_lossy(FILE_MAGIC))]
    NotABackup,
    #[error("the backup was sealed with another key (key id {file}; this key's id is {given})")]
    OtherKey { file: String, given: String },
    #[error(
        "the backup does not authenticate under this key at chunk {chunk} (byte {offset}): the file was altered or damaged; it is refused"
    )]
    Tampered { chunk: u64, offset: u64 },
    #[error("the backup is cut short: chunk {chunk} (byte {offset}) is not its last, and nothing follows it")]
    CutShort { chunk: u64, offset: u64 },
    #[error("the backup is cut short in its header or in chunk {chunk} (byte {offset})")]
    Truncated { chunk: u64, offset: u64 },
    #[error("chunk {chunk} (byte {offset}) claims {len} bytes, more than a chunk holds: the file is damaged")]
    ChunkTooLarge { chunk: u64, offset: u64, len: usize },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads a sealed file, handing on each chunk's body bytes once that
/// chunk authenticates. A caller must make nothing final before this
/// returns Ok: only then is the file known whole and unaltered.
pub fn open_sealed(
    r: &mut impl Read,
    key: &BackupKey,
    mut each: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let mut aad = [0u8; FILE_HEADER_BYTES];
    read_full(r, &mut aad)?.then_some(()).ok_or(OpenError::Truncated { chunk: 0, offset: 0 })?;
    if &aad[..FILE_MAGIC.len()] != FILE_MAGIC {
        return Err(OpenError::NotABackup.into());
    }
    let (salt, id) = aad[FILE_MAGIC.len()..].split_at(SALT_BYTES);
    if id != key.id() {
        return Err(OpenError::OtherKey { file: hex(id), given: hex(&key.id()) }.into());
    }
    let file_key = key.file_key(salt);
    let mut offset = FILE_HEADER_BYTES as u64;
    let mut buf = Vec::with_capacity(CHUNK_BYTES_MAX + TAG_BYTES);
    let mut len = [0u8; 4];
    if !read_full(r, &mut len)? {
        return Err(OpenError::Truncated { chunk: 0, offset }.into());
    }
    for chunk in 0u64.. {
        let n = u32::from_le_bytes(len) as usize;
        if !(TAG_BYTES..=CHUNK_BYTES_MAX + TAG_BYTES).contains(&n) {
            return Err(OpenError::ChunkTooLarge { chunk, offset, len: n }.into());
        }
        buf.resize(n, 0);
        if !read_full(r, &mut buf)? {
            return Err(OpenError::Truncated { chunk, offset }.into());
        }
        // The last chunk is the one nothing follows.
        let last = !read_full(r, &mut len)?;
        let kept = last.then(|| buf.clone());
        match file_key.open_in_place(nonce(chunk, last), aead::Aad::from(&aad), &mut buf) {
            Ok(plain) => each(plain)?,
            Err(_) => {
                let cut = kept.is_some_and(|mut b| {
                    file_key.open_in_place(nonce(chunk, false), aead::Aad::from(&aad), &mut b).is_ok()
                });
                return Err(if cut {
                    OpenError::CutShort { chunk, offset }
                } else {
                    OpenError::Tampered { chunk, offset }
                }
                .into());
            }
        }
        offset += 4 + n as u64;
        if last {
            return Ok(chunk + 1);
        }
    }
    unreachable!("the loop returns")
}

/// Fills `buf`; false if the input ended before its first byte, an error
/// if it ended part way.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, OpenError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short").into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Where `hie node restore` puts the audit segments of the node a backup
/// was taken from: beside the new node's own audit log, never in it (they
/// are another node's chain). `hie audit verify --dir` and `export --dir`
/// read them there.
pub fn restored_audit_dir(data_dir: &Path, source_node: u64) -> PathBuf {
    data_dir.join("backup-audit").join(format!("node-{source_node}"))
}

/// `hie node restore`: checks the backup whole under `key_file`, then loads
/// its state into the (new, empty) data directory of `config_path` and its
/// audit segments into [`restored_audit_dir`].
pub fn restore(config_path: &Path, backup: &Path, key_file: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let key = BackupKey::load(key_file)?;
    let data_dir = &config.node.data_dir;
    let store_dir = data_dir.join("store");
    hie_store::Store::check_new(&store_dir)?;
    // Staged beside the store (the same file system, so the state file
    // moves into it), and only made final once the whole file authenticated.
    let staging = data_dir.join("restore.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir_all(staging.join("audit"))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700))?;
    let result = stage(backup, &key, &staging).and_then(|staged| {
        let audit_to = restored_audit_dir(data_dir, staged.header.node_id);
        if audit_to.exists() {
            std::fs::remove_dir_all(&audit_to)?;
        }
        std::fs::create_dir_all(audit_to.parent().expect("has a parent"))?;
        std::fs::rename(staging.join("audit"), &audit_to)?;
        sync_parent(&audit_to)?;
        let meta = hie_store::Store::restore(&store_dir, &staging.join("state.snap"))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        if index != staged.header.applied_index {
            bail!("the backup's state is at index {index}, its header says {}", staged.header.applied_index);
        }
        Ok((staged, audit_to, index))
    });
    let _ = std::fs::remove_dir_all(&staging);
    let (staged, audit_to, index) = result?;
    let h = &staged.header;
    println!(
        "restored {} bytes at log index {index} into {} (backup of {} taken {}, key {})",
        staged.file_bytes,
        data_dir.display(),
        h.node,
        chrono::DateTime::from_timestamp_millis(h.taken_ms).map(|t| t.to_rfc3339()).unwrap_or_default(),
        hex(&key.id()),
    );
    match hie_audit::chain::verify(&audit_to) {
        Ok(v) => println!(
            "audit trail of {}: {} records in {} segments, chain intact, in {}",
            h.node,
            v.records,
            v.segments,
            audit_to.display()
        ),
        Err(b) => eprintln!("warning: the audit trail of {} in {} does not verify: {b}", h.node, audit_to.display()),
    }
    Ok(())
}

struct Staged {
    header: BackupHeader,
    file_bytes: u64,
}

/// Reads the whole backup into `staging` (`state.snap`, `audit/`), checking
/// it: sealed under `key`, well formed, complete. Nothing outside `staging`
/// is touched.
fn stage(backup: &Path, key: &BackupKey, staging: &Path) -> anyhow::Result<Staged> {
    let file = File::open(backup).with_context(|| format!("opening {}", backup.display()))?;
    let file_bytes = file.metadata()?.len();
    let mut r = std::io::BufReader::with_capacity(CHUNK_BYTES_MAX, file);
    let mut state = BufWriter::with_capacity(CHUNK_BYTES_MAX, create_private(&staging.join("state.snap"))?);
    let mut segment: Option<BufWriter<File>> = None;
    let mut header = None;
    let mut summary = None;
    let (mut state_bytes, mut audit_bytes, mut segments) = (0u64, 0u64, 0u64);
    let mut parser = Parser::new();
    open_sealed(&mut r, key, |plain| {
        parser.feed(plain, |f| -> anyhow::Result<()> {
            match f {
                Frame::Header(h) => header = Some(h),
                Frame::State(b) => {
                    state.write_all(b)?;
                    state_bytes += b.len() as u64;
                }
                Frame::AuditSegment(name) => {
                    if let Some(s) = segment.take() {
                        s.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                    }
                    segment = Some(BufWriter::new(create_private(&staging.join("audit").join(name))?));
                    segments += 1;
                }
                Frame::AuditData(b) => {
                    segment.as_mut().expect("the parser checks a segment was named").write_all(b)?;
                    audit_bytes += b.len() as u64;
                }
                Frame::End(s) => summary = Some(s),
            }
            Ok(())
        })
    })
    .with_context(|| format!("{} is refused", backup.display()))?;
    parser.finish().with_context(|| format!("{} is refused", backup.display()))?;
    let summary = summary.context("no end frame")?;
    let got = BackupSummary { state_bytes, audit_segments: segments, audit_bytes };
    if got != summary {
        bail!("{} holds {got:?}, but its end frame says {summary:?}", backup.display());
    }
    if let Some(s) = segment.take() {
        s.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    state.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    File::open(staging.join("audit")).and_then(|d| d.sync_all())?;
    Ok(Staged { header: header.context("no header")?, file_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: hie_api::backup::Kind, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![kind as u8];
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b
    }

    /// A body as a node sends one: header, `state_len` bytes of state, one
    /// audit segment, end.
    fn body(state_len: usize) -> Vec<u8> {
        use hie_api::backup::{Kind, MAGIC};
        let h = BackupHeader {
            format: hie_api::backup::FORMAT,
            node_id: 2,
            node: "node-2 (north)".into(),
            applied_index: 9,
            snapshot_id: "backup-9".into(),
            taken_ms: 0,
            request_id: "r".into(),
        };
        let mut b = MAGIC.to_vec();
        b.extend(frame(Kind::Header, &serde_json::to_vec(&h).unwrap()));
        let state: Vec<u8> = (0..state_len).map(|i| (i % 251) as u8).collect();
        for part in state.chunks(hie_api::backup::FRAME_BYTES_MAX) {
            b.extend(frame(Kind::State, part));
        }
        b.extend(frame(Kind::AuditSegment, b"00000001.ndjson"));
        b.extend(frame(Kind::AuditData, b"{}\n"));
        let s = BackupSummary { state_bytes: state_len as u64, audit_segments: 1, audit_bytes: 3 };
        b.extend(frame(Kind::End, &serde_json::to_vec(&s).unwrap()));
        b
    }

    fn write(dir: &Path, name: &str, key: &BackupKey, body: &[u8], piece: usize) -> anyhow::Result<PathBuf> {
        let out = dir.join(name);
        let mut w = BackupWriter::create(&out, key)?;
        for p in body.chunks(piece) {
            w.write(p)?;
        }
        w.finish()?;
        Ok(out)
    }

    fn read(path: &Path, key: &BackupKey) -> anyhow::Result<Vec<u8>> {
        let mut got = Vec::new();
        open_sealed(&mut File::open(path)?, key, |p| {
            got.extend_from_slice(p);
            Ok(())
        })?;
        Ok(got)
    }

    /// A sealed backup reads back as written, mode 0600, and is refused,
    /// saying why, when a byte is changed, it is cut short at a chunk's
    /// end, it is opened with another key, or the body was incomplete.
    #[test]
    fn a_sealed_backup_file_is_private_and_refused_when_altered() {
        let dir = tempfile::tempdir().unwrap();
        let key = BackupKey::create(&dir.path().join("k")).unwrap();
        assert_eq!(std::fs::metadata(dir.path().join("k")).unwrap().permissions().mode() & 0o777, 0o600);
        let body = body(3 * CHUNK_BYTES_MAX + 1000);
        let path = write(dir.path(), "b", &key, &body, 70_000).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("b.partial").exists());
        assert_eq!(read(&path, &BackupKey::load(&dir.path().join("k")).unwrap()).unwrap(), body);
        // Never over an existing file.
        assert!(write(dir.path(), "b", &key, &body, 70_000).is_err());

        let sealed = std::fs::read(&path).unwrap();
        let altered = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = sealed.clone();
            f(&mut b);
            let p = dir.path().join("altered");
            std::fs::write(&p, &b).unwrap();
            read(&p, &key).unwrap_err().to_string()
        };
        let e = altered(&|b| b[FILE_HEADER_BYTES + 4 + CHUNK_BYTES_MAX + 100] ^= 1);
        assert!(e.contains("does not authenticate under this key at chunk 1"), "{e}");
        let e = altered(&|b| b[12] ^= 1);
        assert!(e.contains("at chunk 0"), "a changed salt: {e}");
        let e = altered(&|b| b.truncate(FILE_HEADER_BYTES + 2 * (4 + CHUNK_BYTES_MAX + TAG_BYTES)));
        assert!(e.contains("cut short: chunk 1"), "{e}");
        let e = altered(&|b| b.truncate(b.len() - 1));
        assert!(e.contains("cut short") || e.contains("does not authenticate"), "{e}");
        let e = altered(&|b| b.extend_from_slice(&sealed[FILE_HEADER_BYTES..]));
        assert!(e.contains("does not authenticate"), "chunks appended: {e}");

        let other = BackupKey::create(&dir.path().join("k2")).unwrap();
        let e = read(&path, &other).unwrap_err().to_string();
        assert!(e.contains("sealed with another key"), "{e}");

        // A body without its end frame is not made a backup file.
        let e = write(dir.path(), "c", &key, &body[..body.len() - 3], 4096).unwrap_err().to_string();
        assert!(e.contains("cut short"), "{e}");
        assert!(!dir.path().join("c").exists() && !dir.path().join("c.partial").exists());

        // A key others may read is refused.
        std::fs::set_permissions(dir.path().join("k"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = BackupKey::load(&dir.path().join("k")).err().unwrap().to_string();
        assert!(e.contains("readable by others"), "{e}");
    }
}
