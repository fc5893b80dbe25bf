//! The request path's one durable write: an append-only journal in the sidecar's state
//! directory, written by the request's own task with one `write(2)` per record (no hand-off to
//! another thread, no transaction), and folded into the SQLite outbox in the background.
//!
//! A metered request appends a *begin* record (its worst case) before it is forwarded and a
//! *settle* record (the provider's usage) before its response completes. An appended record
//! survives the process being killed (`kill -9`): it is in the kernel's page cache, as a
//! committed transaction of the outbox in WAL mode with `synchronous = NORMAL` is; a power loss
//! may lose the last records (the folder fsyncs the outbox at its own pace).
//!
//! ```text
//!  request task: append(begin) ─► provider ─► append(settle) ─► response completes
//!  folder (every foldIntervalMs, own thread): read new records ─► one outbox transaction
//!      (insert begins, settle them) ─► delete the folded segments
//!  start-up: fold everything left ─► outbox.recover_interrupted (a begin without a settle
//!      is settled at its worst case)
//! ```
//!
//! **Record format, version 2** (binary, all integers little-endian):
//!
//! ```text
//!  0xFE  version (2)  payload length (u32)  CRC-32 of version, length and payload (u32)  payload
//!  payload of a begin:  1, id, namespace, agent, budgets, endpoint, model (each a u32 length
//!      and UTF-8), started at (i64, Unix ms), prompt estimate, output bound, reserved tokens,
//!      reserved micros (u64 each)
//!  payload of a settle: 2, id, finished at (i64), input, cached input, cache-write input,
//!      1-hour cache-write input, output, reasoning tokens, web searches, web fetches,
//!      cost micros (u64 each), estimated (u8), outcome, status (u16), unmetered (string)
//! ```
//!
//! A record whose bytes are not all there yet (being written, or cut short by a power loss) is
//! left for the next read, and ignored once its segment is closed; a record whose CRC does not
//! match is skipped, and reading resumes at the next record that checks. **Version 1** (the
//! format before this one) is one line per record, its JSON (`{"b":{…}}` or `{"s":{…}}`), a
//! space and the CRC-32 of the JSON in hex; a journal left by a sidecar of that version is still
//! folded (a record's first byte says its format: `{` or `0xFE`). A record of a version this
//! sidecar does not know (left by a newer one) is not folded, and says so in the log.
//!
//! The journal is split into segments (`journal.<n>`): the writer moves to a new segment once
//! the current one passes `SEGMENT_BYTES` (and after a failed write, so a torn record is never
//! followed by more records in a segment still written), and a segment is deleted only after
//! everything in it is committed to the outbox, so a crash at any point folds every record at
//! least once; folding is idempotent (a begin already there is kept, a settle of a settled row
//! changes nothing).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use jiff::Timestamp;
use serde::Deserialize;
use soma_metering::{Amount, Usage};

use crate::outbox::{OpenRecord, Settlement};

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// The largest payload a record may have (a record is a few hundred bytes; names and labels
/// beyond this are refused rather than written).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The record format this sidecar writes.
pub const VERSION: u8 = 2;

/// A binary record's first byte (never the first byte of a version-1 JSON line, nor of UTF-8).
const MARK: u8 = 0xFE;
/// Mark, version, length, CRC.
const HEADER: usize = 10;
const KIND_BEGIN: u8 = 1;
const KIND_SETTLE: u8 = 2;

/// A request about to leave for the provider.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Begin<'a> {
    /// Idempotency key.
    pub id: &'a str,
    /// Agent namespace.
    pub ns: &'a str,
    /// Agent name.
    pub agent: &'a str,
    /// Budget chain label.
    pub budgets: &'a str,
    /// Endpoint label.
    pub endpoint: &'a str,
    /// Model sent upstream.
    pub model: &'a str,
    /// Reservation time (Unix ms).
    pub at: i64,
    /// Pre-call prompt estimate.
    pub prompt: u64,
    /// Output tokens assumed for the worst case.
    pub max_out: u64,
    /// The worst case reserved.
    pub reserved: Amount,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settle<'a> {
    /// Idempotency key.
    pub id: &'a str,
    /// Settlement time (Unix ms).
    pub at: i64,
    /// Tokens.
    pub usage: Usage,
    /// Cost in micros.
    pub cost: u64,
    /// The sidecar's estimate, not the provider's numbers.
    pub est: bool,
    /// How it ended.
    pub outcome: &'a str,
    /// Status the client saw.
    pub status: u16,
    /// Usage fields not metered, comma-separated.
    pub unmetered: &'a str,
}

/// One journal record, borrowing its strings (from the request, or from the bytes read).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Entry<'a> {
    /// A request about to leave for the provider.
    Begin(Begin<'a>),
    /// How a request ended.
    Settle(Settle<'a>),
}

impl<'a> Entry<'a> {
    /// The begin record of `r`.
    pub fn begin(r: &'a OpenRecord) -> Entry<'a> {
        Entry::Begin(Begin {
            id: &r.id,
            ns: &r.namespace,
            agent: &r.agent,
            budgets: &r.budgets,
            endpoint: r.endpoint,
            model: &r.model,
            at: r.started_at.as_millisecond(),
            prompt: r.prompt_estimate,
            max_out: r.max_output_tokens,
            reserved: r.reserved,
        })
    }

    /// The settle record of `id`.
    pub fn settle(id: &'a str, s: &'a Settlement, at: Timestamp) -> Entry<'a> {
        Entry::Settle(Settle {
            id,
            at: at.as_millisecond(),
            usage: s.usage,
            cost: s.cost_micros,
            est: s.estimated,
            outcome: s.outcome,
            status: s.http_status,
            unmetered: &s.unmetered,
        })
    }

    /// The request's idempotency key.
    pub fn id(&self) -> &'a str {
        match self {
            Entry::Begin(b) => b.id,
            Entry::Settle(s) => s.id,
        }
    }
}

/// Why the journal could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file system refused.
    #[error("journal {path}: {source}")]
    Io {
        /// The segment.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record would exceed [`MAX_PAYLOAD`] (names or labels of absurd length).
    #[error("a journal record of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(usize),
}

// ---- encoding ----

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A string longer than u32::MAX makes the record exceed MAX_PAYLOAD, refused below.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends `entry` as one version-2 record (header and payload) to `out`.
pub fn encode(entry: &Entry<'_>, out: &mut Vec<u8>) -> Result<(), JournalError> {
    let start = out.len();
    out.extend_from_slice(&[MARK, VERSION, 0, 0, 0, 0, 0, 0, 0, 0]);
    match entry {
        Entry::Begin(b) => {
            out.push(KIND_BEGIN);
            for s in [b.id, b.ns, b.agent, b.budgets, b.endpoint, b.model] {
                put_str(out, s);
            }
            out.extend_from_slice(&b.at.to_le_bytes());
            for v in [b.prompt, b.max_out, b.reserved.tokens, b.reserved.micros] {
                put_u64(out, v);
            }
        }
        Entry::Settle(s) => {
            // Every field by name: a field added to Usage fails to compile here until the
            // format (and its VERSION) says where it goes.
            let Usage {
                input_tokens,
                cached_input_tokens,
                cache_write_input_tokens,
                cache_write_1h_input_tokens,
                output_tokens,
                reasoning_tokens,
                web_search_requests,
                web_fetch_requests,
            } = s.usage;
            out.push(KIND_SETTLE);
            put_str(out, s.id);
            out.extend_from_slice(&s.at.to_le_bytes());
            for v in [
                input_tokens,
                cached_input_tokens,
                cache_write_input_tokens,
                cache_write_1h_input_tokens,
                output_tokens,
                reasoning_tokens,
                web_search_requests,
                web_fetch_requests,
                s.cost,
            ] {
                put_u64(out, v);
            }
            out.push(u8::from(s.est));
            put_str(out, s.outcome);
            out.extend_from_slice(&s.status.to_le_bytes());
            put_str(out, s.unmetered);
        }
    }
    let len = out.len() - start - HEADER;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(JournalError::TooLarge(len));
    }
    out[start + 2..start + 6].copy_from_slice(&(len as u32).to_le_bytes());
    let crc = checksum(&out[start + 1..start + 6], &out[start + HEADER..]);
    out[start + 6..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

// ---- decoding ----

/// Reads a payload field by field.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = usize::try_from(self.u32()?).ok()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// A version-2 payload; `None` when it is not one (every byte must be used).
pub fn decode(payload: &[u8]) -> Option<Entry<'_>> {
    let mut c = Cursor(payload);
    let entry = match c.u8()? {
        KIND_BEGIN => Entry::Begin(Begin {
            id: c.str()?,
            ns: c.str()?,
            agent: c.str()?,
            budgets: c.str()?,
            endpoint: c.str()?,
            model: c.str()?,
            at: c.i64()?,
            prompt: c.u64()?,
            max_out: c.u64()?,
            reserved: Amount {
                tokens: c.u64()?,
                micros: c.u64()?,
            },
        }),
        KIND_SETTLE => Entry::Settle(Settle {
            id: c.str()?,
            at: c.i64()?,
            usage: Usage {
                input_tokens: c.u64()?,
                cached_input_tokens: c.u64()?,
                cache_write_input_tokens: c.u64()?,
                cache_write_1h_input_tokens: c.u64()?,
                output_tokens: c.u64()?,
                reasoning_tokens: c.u64()?,
                web_search_requests: c.u64()?,
                web_fetch_requests: c.u64()?,
            },
            cost: c.u64()?,
            est: match c.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            },
            outcome: c.str()?,
            status: c.u16()?,
            unmetered: c.str()?,
        }),
        _ => return None,
    };
    c.0.is_empty().then_some(entry)
}

/// A version-1 record (one JSON line), as the sidecar before version 2 wrote it.
#[derive(Debug, Deserialize)]
enum Legacy {
    #[serde(rename = "b")]
    Begin {
        id: String,
        ns: String,
        agent: String,
        budgets: String,
        endpoint: String,
        model: String,
        at: i64,
        prompt: u64,
        max_out: u64,
        reserved: Amount,
    },
    #[serde(rename = "s")]
    Settle {
        id: String,
        at: i64,
        usage: Usage,
        cost: u64,
        est: bool,
        outcome: String,
        status: u16,
        #[serde(default)]
        unmetered: String,
    },
}

impl Legacy {
    fn entry(&self) -> Entry<'_> {
        match self {
            Legacy::Begin {
                id,
                ns,
                agent,
                budgets,
                endpoint,
                model,
                at,
                prompt,
                max_out,
                reserved,
            } => Entry::Begin(Begin {
                id,
                ns,
                agent,
                budgets,
                endpoint,
                model,
                at: *at,
                prompt: *prompt,
                max_out: *max_out,
                reserved: *reserved,
            }),
            Legacy::Settle {
                id,
                at,
                usage,
                cost,
                est,
                outcome,
                status,
                unmetered,
            } => Entry::Settle(Settle {
                id,
                at: *at,
                usage: *usage,
                cost: *cost,
                est: *est,
                outcome,
                status: *status,
                unmetered,
            }),
        }
    }
}

/// Reads one version-1 line (without its newline); `None` for a corrupt one.
fn parse_legacy(line: &[u8]) -> Option<Legacy> {
    let line = std::str::from_utf8(line).ok()?;
    let (body, crc) = line.rsplit_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32(body.as_bytes()) == crc)
        .then(|| serde_json::from_str(body).ok())
        .flatten()
}

/// What the bytes at a position hold.
#[derive(Debug, PartialEq)]
enum Scan {
    /// A version-2 record, its payload at this range of the bytes.
    Record(Range<usize>),
    /// A version-1 line, decoded.
    Legacy(Range<usize>),
    /// A record of a version this sidecar does not read.
    Unknown(u8),
    /// Not a record (a flipped byte, a cut record followed by others).
    Corrupt,
    /// The start of a record whose rest is not there (yet).
    Incomplete,
}

/// Reads the record at `at` of `buf`; returns what it is and where the next one starts.
fn scan(buf: &[u8], at: usize) -> (Scan, usize) {
    let rest = &buf[at..];
    match rest.first() {
        Some(&MARK) => {
            if rest.len() < HEADER {
                return (Scan::Incomplete, at);
            }
            let len = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]) as usize;
            if len > MAX_PAYLOAD {
                return (Scan::Corrupt, at + 1);
            }
            if rest.len() < HEADER + len {
                return (Scan::Incomplete, at);
            }
            let crc = u32::from_le_bytes([rest[6], rest[7], rest[8], rest[9]]);
            if checksum(&rest[1..6], &rest[HEADER..HEADER + len]) != crc {
                return (Scan::Corrupt, at + 1);
            }
            let next = at + HEADER + len;
            if rest[1] != VERSION {
                return (Scan::Unknown(rest[1]), next);
            }
            // Decoded once, by Batch::entries (a payload that checks and does not decode is
            // skipped there).
            (Scan::Record(at + HEADER..next), next)
        }
        Some(b'{') => match rest.iter().position(|&b| b == b'\n') {
            None => (Scan::Incomplete, at),
            Some(n) => (Scan::Legacy(at..at + n), at + n + 1),
        },
        _ => (Scan::Corrupt, at + 1),
    }
}

/// Where the next record may start after a corrupt byte at `from - 1`: a mark, or a `{` that
/// begins a line.
fn resync(buf: &[u8], from: usize) -> usize {
    (from..buf.len())
        .find(|&i| buf[i] == MARK || (buf[i] == b'{' && i > 0 && buf[i - 1] == b'\n'))
        .unwrap_or(buf.len())
}

/// CRC-32 of a version-2 record: over its version and length bytes, then its payload.
fn checksum(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// CRC-32 (IEEE, as zlib and Ethernet use), with the CPU's carry-less multiply where it has one
/// (`crc32fast` checks at run time; a table otherwise).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

// ---- writing ----

struct Writer {
    file: File,
    seq: u64,
    len: u64,
    /// The record being written (kept to reuse its allocation).
    buf: Vec<u8>,
    /// A write failed part-way: the next record goes to a new segment.
    roll: bool,
}

/// The journal's writing end (shared by every request).
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {} ({} bytes)", self.seq, self.len)
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("journal.{seq:010}"))
}

/// The segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let io = |source| JournalError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let seq = name.strip_prefix("journal.")?.parse::<u64>().ok()?;
            Some((seq, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn open_segment(dir: &Path, seq: u64, buf: Vec<u8>) -> Result<Writer, JournalError> {
    let path = segment_path(dir, seq);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| JournalError::Io { path, source })?;
    Ok(Writer {
        file,
        seq,
        len: 0,
        buf,
        roll: false,
    })
}

impl Journal {
    /// Opens the journal in `dir`, appending to a new segment after any that exist (those are
    /// folded by [`Folder::read`] first).
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let next = segments(dir)?.last().map_or(1, |(seq, _)| seq + 1);
        Ok(Journal {
            dir: dir.to_owned(),
            writer: Mutex::new(open_segment(dir, next, Vec::with_capacity(512))?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic mid-write leaves at worst a torn record, which readers skip.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `entry`: one `write(2)` on the caller's thread.
    pub fn append(&self, entry: &Entry<'_>) -> Result<(), JournalError> {
        let mut guard = self.lock();
        let w = &mut *guard;
        if w.len >= SEGMENT_BYTES || w.roll {
            let buf = std::mem::take(&mut w.buf);
            *w = open_segment(&self.dir, w.seq + 1, buf)?;
        }
        w.buf.clear();
        encode(entry, &mut w.buf)?;
        if let Err(source) = w.file.write_all(&w.buf) {
            w.roll = true;
            return Err(JournalError::Io {
                path: segment_path(&self.dir, w.seq),
                source,
            });
        }
        w.len += w.buf.len() as u64;
        Ok(())
    }

    /// The segment being written.
    pub fn current(&self) -> u64 {
        self.lock().seq
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

// ---- reading ----

/// The records one [`Folder::read`] found, and the segments it finished.
#[derive(Debug, Default)]
pub struct Batch {
    /// The bytes read (version-2 payloads are decoded from here).
    bytes: Vec<u8>,
    /// Version-1 records, parsed.
    legacy: Vec<Legacy>,
    /// Each record, in journal order: a payload's range in `bytes`, or an index in `legacy`.
    records: Vec<Src>,
    /// Segments fully read and closed (safe to delete once the records are committed).
    pub done: Vec<PathBuf>,
}

#[derive(Debug)]
enum Src {
    Bytes(Range<usize>),
    Legacy(usize),
}

impl Batch {
    /// The records, in journal order.
    pub fn entries(&self) -> Vec<Entry<'_>> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Src::Bytes(range) => {
                    let entry = decode(&self.bytes[range.clone()]);
                    if entry.is_none() {
                        // Its CRC checks: written by a sidecar with a bug, not torn.
                        tracing::error!("a journal record that checks does not decode; skipped");
                    }
                    entry
                }
                Src::Legacy(i) => self.legacy.get(*i).map(Legacy::entry),
            })
            .collect()
    }

    /// How many records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// No records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Reads the journal for folding: where it stopped, with the segment being written kept open
/// between folds.
#[derive(Debug, Default)]
pub struct Folder {
    /// The segment being read and the offset of its next unread byte.
    at: Option<(u64, u64)>,
    /// That segment, open.
    open: Option<(u64, File)>,
}

impl Folder {
    /// Reads the complete records after where the last call stopped, and the segments that
    /// are fully read and closed. A segment below `current` is closed: the writer has moved
    /// on. While the reader is on the segment being written, the directory is not listed
    /// again.
    pub fn read(&mut self, dir: &Path, current: u64) -> Result<Batch, JournalError> {
        let mut batch = Batch::default();
        let list = match self.at {
            Some((seq, _)) if seq == current => vec![(seq, segment_path(dir, seq))],
            _ => segments(dir)?,
        };
        for (seq, path) in list {
            let offset = match self.at {
                Some((s, o)) if s == seq => o,
                Some((s, _)) if s > seq => continue,
                _ => 0,
            };
            let io = |source| JournalError::Io {
                path: path.clone(),
                source,
            };
            let file = match self.open.take() {
                Some((s, f)) if s == seq => f,
                _ => File::open(&path).map_err(io)?,
            };
            let closed = seq < current;
            let read = read_records(&file, offset, closed, &mut batch, &path).map_err(io)?;
            self.at = Some((seq, read));
            if closed {
                batch.done.push(path);
            } else {
                self.open = Some((seq, file));
            }
        }
        Ok(batch)
    }
}

/// Appends the complete records of `file` from `offset` to `batch`; returns the offset after
/// the last complete record (a record still being written is read next time; in a `closed`
/// segment nothing more will come, so a cut record there is skipped).
fn read_records(
    mut file: &File,
    offset: u64,
    closed: bool,
    batch: &mut Batch,
    path: &Path,
) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(offset))?;
    let base = batch.bytes.len();
    file.read_to_end(&mut batch.bytes)?;
    let buf = &batch.bytes[..];
    let mut at = base;
    while at < buf.len() {
        let (what, next) = scan(buf, at);
        match what {
            Scan::Record(payload) => batch.records.push(Src::Bytes(payload)),
            Scan::Legacy(line) => match parse_legacy(&buf[line]) {
                Some(l) => {
                    batch.records.push(Src::Legacy(batch.legacy.len()));
                    batch.legacy.push(l);
                }
                None => {
                    tracing::warn!(segment = %path.display(), "a journal record is corrupt; skipped")
                }
            },
            Scan::Unknown(version) => tracing::error!(
                segment = %path.display(),
                version,
                "a journal record of a newer format than this sidecar reads is not folded"
            ),
            Scan::Incomplete if !closed => break,
            Scan::Incomplete | Scan::Corrupt => {
                tracing::warn!(segment = %path.display(), "a journal record is corrupt or cut short; skipped");
                at = resync(buf, at + 1);
                continue;
            }
        }
        at = next;
    }
    Ok(offset + (at - base) as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn begin(id: &str) -> Entry<'_> {
        Entry::Begin(Begin {
            id,
            ns: "a",
            agent: "bot",
            budgets: "a/team",
            endpoint: "chat_completions",
            model: "gpt-4o",
            at: 1,
            prompt: 10,
            max_out: 20,
            reserved: Amount {
                tokens: 30,
                micros: 40,
            },
        })
    }

    fn settle(id: &str) -> Entry<'_> {
        Entry::Settle(Settle {
            id,
            at: -5,
            usage: Usage {
                input_tokens: 1,
                cached_input_tokens: 2,
                cache_write_input_tokens: 3,
                cache_write_1h_input_tokens: 4,
                output_tokens: 5,
                reasoning_tokens: 6,
                web_search_requests: 7,
                web_fetch_requests: u64::MAX,
            },
            cost: 9,
            est: true,
            outcome: "ok",
            status: 200,
            unmetered: "usage.x,usage.ü",
        })
    }

    fn record(e: &Entry<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(e, &mut out).unwrap();
        out
    }

    fn scan_all(buf: &[u8], closed: bool) -> (Vec<Scan>, usize) {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let (s, next) = scan(buf, at);
            match s {
                Scan::Incomplete if !closed => break,
                Scan::Incomplete | Scan::Corrupt => {
                    out.push(Scan::Corrupt);
                    at = resync(buf, at + 1);
                    continue;
                }
                s => out.push(s),
            }
            at = next;
        }
        (out, at)
    }

    /// A version-1 line, as the sidecar before version 2 wrote it (JSON, space, CRC in hex).
    fn v1_line(json: &str) -> String {
        format!("{json} {:08x}\n", crc32(json.as_bytes()))
    }

    #[test]
    fn records_round_trip_and_damaged_ones_are_not_records() {
        for e in [begin("x"), settle("y")] {
            let r = record(&e);
            assert_eq!(r[0], MARK);
            assert_eq!(r[1], VERSION);
            assert_eq!(decode(&r[HEADER..]), Some(e));
            // Every flipped byte is caught (header or payload).
            for i in 0..r.len() {
                let mut bad = r.clone();
                bad[i] ^= 0x10;
                assert!(
                    !matches!(scan(&bad, 0).0, Scan::Record(_)),
                    "flipped byte {i} passed"
                );
            }
            // Every cut short is incomplete, never a record.
            for n in 1..r.len() {
                assert_eq!(scan(&r[..n], 0).0, Scan::Incomplete, "cut at {n}");
            }
        }
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn a_corrupt_record_is_skipped_and_the_next_one_read() {
        let mut buf = record(&begin("1"));
        let second = buf.len();
        buf.extend(record(&settle("1")));
        buf.extend(record(&begin("2")));
        buf[second + 12] ^= 1; // inside the settle's payload
        let (found, _) = scan_all(&buf, true);
        assert_eq!(found.len(), 3);
        assert!(matches!(found[0], Scan::Record(_)));
        assert_eq!(found[1], Scan::Corrupt);
        let Scan::Record(r) = &found[2] else {
            panic!("{found:?}")
        };
        assert_eq!(decode(&buf[r.clone()]), Some(begin("2")));
    }

    #[test]
    fn a_record_of_an_unknown_version_is_not_read_as_this_one() {
        let mut r = record(&begin("1"));
        r[1] = 3;
        let crc = checksum(&r[1..6], &r[HEADER..]);
        r[6..HEADER].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(scan(&r, 0), (Scan::Unknown(3), r.len()));
    }

    #[test]
    fn an_oversized_record_is_refused_and_nothing_is_written() {
        let big = "m".repeat(MAX_PAYLOAD);
        let mut e = begin("1");
        if let Entry::Begin(b) = &mut e {
            b.model = &big;
        }
        let mut out = vec![7];
        assert!(matches!(
            encode(&e, &mut out),
            Err(JournalError::TooLarge(_))
        ));
        assert_eq!(out, vec![7]);
    }

    #[test]
    fn version_1_lines_are_read() {
        let json = r#"{"s":{"id":"y","at":-5,"usage":{"inputTokens":1,"cachedInputTokens":2,"cacheWriteInputTokens":3,"cacheWrite1hInputTokens":4,"outputTokens":5,"reasoningTokens":6,"webSearchRequests":7,"webFetchRequests":18446744073709551615},"cost":9,"est":true,"outcome":"ok","status":200,"unmetered":"usage.x,usage.ü"}}"#;
        let l = parse_legacy(v1_line(json).trim_end().as_bytes()).unwrap();
        assert_eq!(l.entry(), settle("y"));
        let mut bad = v1_line(json).into_bytes();
        bad[10] ^= 1;
        assert!(parse_legacy(bad.trim_ascii_end()).is_none());
    }

    #[test]
    fn the_folder_reads_each_record_once_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&begin("1")).unwrap();
        let mut f = Folder::default();
        let b = f.read(dir.path(), j.current()).unwrap();
        assert_eq!(b.entries(), vec![begin("1")]);
        assert!(b.done.is_empty(), "the current segment is still written");
        // A record still being written is left for later, then read once, whole.
        let seg = segment_path(dir.path(), j.current());
        let whole = record(&settle("1"));
        let mut file = OpenOptions::new().append(true).open(&seg).unwrap();
        file.write_all(&whole[..7]).unwrap();
        assert!(f.read(dir.path(), j.current()).unwrap().is_empty());
        file.write_all(&whole[7..]).unwrap();
        assert_eq!(
            f.read(dir.path(), j.current()).unwrap().entries(),
            vec![settle("1")]
        );
        // A cut record at the end of a segment (a power loss) ...
        file.write_all(&record(&begin("lost"))[..20]).unwrap();
        assert!(f.read(dir.path(), j.current()).unwrap().is_empty());
        // ... is skipped once a newer segment exists.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        j.append(&begin("2")).unwrap();
        let b = f.read(dir.path(), j.current()).unwrap();
        assert_eq!(b.entries(), vec![begin("2")]);
        assert_eq!(b.done.len(), 1);
    }

    #[test]
    fn a_version_1_journal_is_folded_beside_version_2_segments() {
        let dir = tempfile::tempdir().unwrap();
        // What a sidecar of the previous version left: two records and a torn line.
        let begin_json = r#"{"b":{"id":"old","ns":"a","agent":"bot","budgets":"a/team","endpoint":"chat_completions","model":"gpt-4o","at":1,"prompt":10,"max_out":20,"reserved":{"tokens":30,"micros":40}}}"#;
        let settle_json = r#"{"s":{"id":"old","at":-5,"usage":{"inputTokens":1,"cachedInputTokens":2,"cacheWriteInputTokens":3,"outputTokens":5,"reasoningTokens":6},"cost":9,"est":false,"outcome":"ok","status":200}}"#;
        let old = format!(
            "{}{}{{\"b\":{{\"id\"",
            v1_line(begin_json),
            v1_line(settle_json)
        );
        std::fs::write(segment_path(dir.path(), 7), old).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(
            j.current(),
            8,
            "the new version writes after the old segments"
        );
        j.append(&begin("new")).unwrap();
        let b = Folder::default().read(dir.path(), j.current()).unwrap();
        let e = b.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].id(), "old");
        assert_eq!(
            e[0],
            Entry::Begin(Begin {
                id: "old",
                ..match begin("x") {
                    Entry::Begin(b) => b,
                    Entry::Settle(_) => unreachable!(),
                }
            })
        );
        let Entry::Settle(s) = e[1] else {
            panic!("{e:?}")
        };
        assert_eq!((s.usage.output_tokens, s.unmetered), (5, ""));
        assert_eq!(e[2], begin("new"));
        assert_eq!(b.done, vec![segment_path(dir.path(), 7)]);
    }
}
