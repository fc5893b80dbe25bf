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
//! A record is one line: its JSON (`{"b":{…}}` for a begin, `{"s":{…}}` for a settle), a
//! space and the CRC-32 of the JSON in hex; a line cut short by a power loss is recognised and
//! skipped. The journal is split into segments (`journal.<n>`): the writer moves
//! to a new segment once the current one passes `SEGMENT_BYTES`, and a segment is deleted only
//! after everything in it is committed to the outbox, so a crash at any point folds every record
//! at least once; folding is idempotent (a begin already there is kept, a settle of a settled
//! row changes nothing).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use soma_metering::{Amount, Usage};

use crate::outbox::{OpenRecord, Settlement};

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// One journal record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    /// A request about to leave for the provider.
    #[serde(rename = "b")]
    Begin {
        /// Idempotency key.
        id: String,
        /// Agent namespace.
        ns: String,
        /// Agent name.
        agent: String,
        /// Budget chain label.
        budgets: String,
        /// Endpoint label.
        endpoint: String,
        /// Model sent upstream.
        model: String,
        /// Reservation time (Unix ms).
        at: i64,
        /// Pre-call prompt estimate.
        prompt: u64,
        /// Output tokens assumed for the worst case.
        max_out: u64,
        /// The worst case reserved.
        reserved: Amount,
    },
    /// How a request ended.
    #[serde(rename = "s")]
    Settle {
        /// Idempotency key.
        id: String,
        /// Settlement time (Unix ms).
        at: i64,
        /// Tokens.
        usage: Usage,
        /// Cost in micros.
        cost: u64,
        /// The sidecar's estimate, not the provider's numbers.
        est: bool,
        /// How it ended.
        outcome: String,
        /// Status the client saw.
        status: u16,
        /// Usage fields not metered, comma-separated.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        unmetered: String,
    },
}

impl Entry {
    /// The begin record of `r`.
    pub fn begin(r: &OpenRecord) -> Entry {
        Entry::Begin {
            id: r.id.clone(),
            ns: r.namespace.clone(),
            agent: r.agent.clone(),
            budgets: r.budgets.clone(),
            endpoint: r.endpoint.to_owned(),
            model: r.model.clone(),
            at: r.started_at.as_millisecond(),
            prompt: r.prompt_estimate,
            max_out: r.max_output_tokens,
            reserved: r.reserved,
        }
    }

    /// The settle record of `id`.
    pub fn settle(id: &str, s: &Settlement, at: Timestamp) -> Entry {
        Entry::Settle {
            id: id.to_owned(),
            at: at.as_millisecond(),
            usage: s.usage,
            cost: s.cost_micros,
            est: s.estimated,
            outcome: s.outcome.to_owned(),
            status: s.http_status,
            unmetered: s.unmetered.clone(),
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
}

struct Writer {
    file: File,
    seq: u64,
    len: u64,
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

fn open_segment(dir: &Path, seq: u64) -> Result<Writer, JournalError> {
    let path = segment_path(dir, seq);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|source| JournalError::Io { path, source })?;
    Ok(Writer { file, seq, len: 0 })
}

/// One line: the JSON body, a space, its CRC-32 in hex, a newline.
fn line(entry: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(384);
    // An Entry is plain data: serialising it to memory cannot fail.
    let _ = serde_json::to_writer(&mut body, entry);
    let crc = crc32(&body);
    let _ = writeln!(body, " {crc:08x}");
    body
}

/// Reads one line back; `None` for a torn or corrupt line.
fn parse(line: &str) -> Option<Entry> {
    let (body, crc) = line.trim_end_matches('\n').rsplit_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32(body.as_bytes()) == crc)
        .then(|| serde_json::from_str(body).ok())
        .flatten()
}

/// CRC-32 (IEEE, as zlib and Ethernet use).
fn crc32(bytes: &[u8]) -> u32 {
    // Slice-by-16 tables: a few times fewer instructions per byte than the default table.
    const CRC: crc::Crc<u32, crc::Table<16>> =
        crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);
    CRC.checksum(bytes)
}

impl Journal {
    /// Opens the journal in `dir`, appending to a new segment after any that exist (those are
    /// folded by [`Folder::fold`] first).
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|source| JournalError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let next = segments(dir)?.last().map_or(1, |(seq, _)| seq + 1);
        Ok(Journal {
            dir: dir.to_owned(),
            writer: Mutex::new(open_segment(dir, next)?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic mid-write leaves at worst a torn line, which readers skip.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `entry`: one `write(2)` on the caller's thread.
    pub fn append(&self, entry: &Entry) -> Result<(), JournalError> {
        let bytes = line(entry);
        let mut w = self.lock();
        if w.len >= SEGMENT_BYTES {
            *w = open_segment(&self.dir, w.seq + 1)?;
        }
        w.file
            .write_all(&bytes)
            .map_err(|source| JournalError::Io {
                path: segment_path(&self.dir, w.seq),
                source,
            })?;
        w.len += bytes.len() as u64;
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
    /// are fully read and closed (safe to delete once the records are committed). A segment
    /// below `current` is closed: the writer has moved on. While the reader is on the segment
    /// being written, the directory is not listed again.
    pub fn read(
        &mut self,
        dir: &Path,
        current: u64,
    ) -> Result<(Vec<Entry>, Vec<PathBuf>), JournalError> {
        let mut entries = Vec::new();
        let mut done = Vec::new();
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
            let read = read_records(&file, offset, &mut entries, &path).map_err(io)?;
            self.at = Some((seq, read));
            if seq < current {
                done.push(path);
            } else {
                self.open = Some((seq, file));
            }
        }
        Ok((entries, done))
    }
}

/// Appends the complete records of `file` from `offset` to `entries`; returns the offset after
/// the last complete line (a line still being written is read next time).
fn read_records(
    mut file: &File,
    offset: u64,
    entries: &mut Vec<Entry>,
    path: &Path,
) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut read = offset;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf)?;
        if n == 0 || !buf.ends_with('\n') {
            return Ok(read);
        }
        read += n as u64;
        match parse(&buf) {
            Some(e) => entries.push(e),
            None => {
                tracing::warn!(segment = %path.display(), "a journal record is corrupt; skipped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn begin(id: &str) -> Entry {
        Entry::Begin {
            id: id.into(),
            ns: "a".into(),
            agent: "bot".into(),
            budgets: "a/team".into(),
            endpoint: "chat_completions".into(),
            model: "gpt-4o".into(),
            at: 1,
            prompt: 10,
            max_out: 20,
            reserved: Amount {
                tokens: 30,
                micros: 40,
            },
        }
    }

    #[test]
    fn records_round_trip_and_torn_lines_are_skipped() {
        let l = line(&begin("x"));
        let text = String::from_utf8(l.clone()).unwrap();
        assert_eq!(parse(&text), Some(begin("x")));
        // A flipped byte or a cut line is not a record.
        let mut bad = l.clone();
        bad[10] ^= 1;
        assert_eq!(parse(&String::from_utf8_lossy(&bad)), None);
        assert_eq!(parse(&text[..text.len() / 2]), None);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_folder_reads_each_record_once_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.append(&begin("1")).unwrap();
        let mut f = Folder::default();
        let (e, done) = f.read(dir.path(), j.current()).unwrap();
        assert_eq!(e.len(), 1);
        assert!(done.is_empty(), "the current segment is still written");
        // A torn tail is left for later; the next complete record is read once.
        let seg = segment_path(dir.path(), j.current());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(b"{\"t\":\"b\"")
            .unwrap();
        let (e, _) = f.read(dir.path(), j.current()).unwrap();
        assert!(e.is_empty());
        // A reopened journal starts a new segment; the old one is then closed.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        j.append(&begin("2")).unwrap();
        let (e, done) = f.read(dir.path(), j.current()).unwrap();
        assert_eq!(
            e,
            vec![begin("2")],
            "the torn line is skipped once a newer segment exists"
        );
        assert_eq!(done.len(), 1);
    }
}
