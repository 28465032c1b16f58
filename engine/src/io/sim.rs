//! The in-memory simulation backend. Every write lands in a volatile view at once and is also
//! remembered as pending until a sync of its file; `SimDisk::crash` then rebuilds the durable
//! image the way a power loss could leave it: each pending write kept, dropped, or torn at
//! 512-byte sector granularity, chosen by a seeded generator so a failing seed reproduces.
//!
//! A disk may be given a capacity (`SimDisk::set_capacity`): like a small file system it then
//! fails writes and allocations that would need more bytes than it has left with ENOSPC, as a
//! whole (nothing is written). A file takes the larger of its length and what `allocate` set
//! aside for it; images hold only bytes written, so preallocated space costs no memory.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Completion, FileKind, IoBackend, IoDone, IoOp};

/// The atomic unit of a simulated disk write.
pub const SIM_SECTOR_BYTES: usize = 512;

#[derive(Default, Clone)]
struct SimFile {
    /// What a crash right now would keep for certain.
    durable: Vec<u8>,
    /// What reads see (beyond its end, up to `len_bytes`, zeros).
    current: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// The file's length: at least `current.len()`; more after an `allocate` that extended it.
    len_bytes: u64,
    /// The length as of the last sync.
    durable_len_bytes: u64,
    /// Bytes set aside by `allocate`, from offset 0 (beyond the length with `keep_size`).
    allocated_bytes: u64,
}

impl SimFile {
    fn len(&self) -> u64 {
        self.len_bytes.max(self.current.len() as u64)
    }

    /// The bytes of the disk the file takes.
    fn footprint(&self) -> u64 {
        self.len().max(self.allocated_bytes)
    }
}

fn write_into(image: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset as usize..end].copy_from_slice(data);
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

/// A simulated disk holding the pool files; survives the backends opened on it, like a real
/// disk survives a process.
#[derive(Clone)]
pub struct SimDisk {
    files: Arc<Mutex<HashMap<FileKind, SimFile>>>,
    /// Bytes the files may take in all; `u64::MAX`: unbounded.
    capacity_bytes: Arc<AtomicU64>,
    /// Whether `allocate` works (a file system without fallocate when not).
    allocate_supported: Arc<AtomicBool>,
    /// `allocate` calls on data.grove that the disk had no room for.
    data_allocations_refused: Arc<AtomicU64>,
}

impl Default for SimDisk {
    fn default() -> Self {
        SimDisk {
            files: Default::default(),
            capacity_bytes: Arc::new(AtomicU64::new(u64::MAX)),
            allocate_supported: Arc::new(AtomicBool::new(true)),
            data_allocations_refused: Default::default(),
        }
    }
}

impl SimDisk {
    pub fn new() -> Self {
        SimDisk::default()
    }

    pub fn backend(&self) -> Arc<dyn IoBackend> {
        Arc::new(SimBackend { disk: self.clone() })
    }

    /// Bounds the bytes the files may take (`None`: unbounded). Lowering it below what they take
    /// already fails every write that needs more; raising it is freeing space on the disk.
    pub fn set_capacity(&self, capacity_bytes: Option<u64>) {
        self.capacity_bytes
            .store(capacity_bytes.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Makes `allocate` unsupported (`false`), like a file system without fallocate.
    pub fn set_allocate_supported(&self, supported: bool) {
        self.allocate_supported.store(supported, Ordering::SeqCst);
    }

    /// How many times growing data.grove (`allocate`) was refused for want of room.
    pub fn data_allocations_refused(&self) -> u64 {
        self.data_allocations_refused.load(Ordering::SeqCst)
    }

    /// The bytes the files take on the disk.
    pub fn used_bytes(&self) -> u64 {
        self.files.lock().values().map(SimFile::footprint).sum()
    }

    /// Loses or tears every write not covered by a sync, as a power cut would.
    pub fn crash(&self, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut files = self.files.lock();
        for file in FileKind::ALL {
            let sim = files.entry(file).or_default();
            let mut image = sim.durable.clone();
            for (offset, data) in std::mem::take(&mut sim.pending) {
                match rng.gen_range(0..3) {
                    0 => {}
                    1 => write_into(&mut image, offset, &data),
                    _ => {
                        for (i, sector) in data.chunks(SIM_SECTOR_BYTES).enumerate() {
                            if rng.gen_bool(0.5) {
                                write_into(
                                    &mut image,
                                    offset + (i * SIM_SECTOR_BYTES) as u64,
                                    sector,
                                );
                            }
                        }
                    }
                }
            }
            sim.len_bytes = sim.durable_len_bytes.max(image.len() as u64);
            sim.durable = image.clone();
            sim.current = image;
        }
    }

    /// A file's length, as the file system would report it.
    pub fn file_len(&self, file: FileKind) -> u64 {
        self.files.lock().get(&file).map_or(0, SimFile::len)
    }

    /// Bytes of a file as reads see them (for tests that corrupt a pool on purpose).
    pub fn file_image(&self, file: FileKind) -> Vec<u8> {
        self.files
            .lock()
            .get(&file)
            .map(|f| f.current.clone())
            .unwrap_or_default()
    }

    /// Overwrites bytes of a file durably (for corruption tests).
    pub fn corrupt(&self, file: FileKind, offset: u64, data: &[u8]) {
        let mut files = self.files.lock();
        let sim = files.entry(file).or_default();
        write_into(&mut sim.current, offset, data);
        write_into(&mut sim.durable, offset, data);
    }

    /// Refuses a change that makes `file` take `footprint` bytes when the disk has no room.
    fn check_room(
        &self,
        files: &HashMap<FileKind, SimFile>,
        file: FileKind,
        footprint: u64,
    ) -> io::Result<()> {
        let capacity = self.capacity_bytes.load(Ordering::SeqCst);
        let others: u64 = files
            .iter()
            .filter(|(&kind, _)| kind != file)
            .map(|(_, f)| f.footprint())
            .sum();
        let before = files.get(&file).map_or(0, SimFile::footprint);
        if footprint > before && others.saturating_add(footprint) > capacity {
            return Err(enospc());
        }
        Ok(())
    }

    /// Refuses a write reaching `end` in `file` when the disk has no room for it.
    fn check_write(
        &self,
        files: &HashMap<FileKind, SimFile>,
        file: FileKind,
        end: u64,
    ) -> io::Result<()> {
        let footprint = files.get(&file).map_or(0, SimFile::footprint).max(end);
        self.check_room(files, file, footprint)
    }
}

struct SimBackend {
    disk: SimDisk,
}

impl IoBackend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn submit(&self, op: IoOp, done: Completion) {
        let result = {
            let mut files = self.disk.files.lock();
            match op {
                IoOp::Read {
                    file,
                    offset,
                    mut buf,
                } => {
                    let image = &files.entry(file).or_default().current;
                    let start = (offset as usize).min(image.len());
                    let end = (offset as usize + buf.len()).min(image.len());
                    let n = end - start;
                    buf[..n].copy_from_slice(&image[start..end]);
                    buf[n..].fill(0);
                    IoDone {
                        buf,
                        result: Ok(()),
                    }
                }
                IoOp::Write { file, offset, buf } => {
                    let end = offset + buf.len() as u64;
                    match self.disk.check_write(&files, file, end) {
                        Ok(()) => {
                            let sim = files.entry(file).or_default();
                            write_into(&mut sim.current, offset, &buf);
                            sim.pending.push((offset, buf.clone()));
                            IoDone {
                                buf,
                                result: Ok(()),
                            }
                        }
                        Err(err) => IoDone {
                            buf,
                            result: Err(err),
                        },
                    }
                }
                IoOp::ReadMany { buf, pieces, .. }
                | IoOp::WriteMany { buf, pieces, .. }
                | IoOp::WriteDirect { buf, pieces, .. }
                    if !IoOp::pieces_fit(&buf, &pieces) =>
                {
                    IoDone {
                        buf,
                        result: Err(super::piece_outside_buffer()),
                    }
                }
                IoOp::ReadMany {
                    file,
                    mut buf,
                    pieces,
                } => {
                    let image = &files.entry(file).or_default().current;
                    for p in pieces {
                        let start = (p.file_offset as usize).min(image.len());
                        let end = (p.file_offset as usize + p.len).min(image.len());
                        let n = end - start;
                        buf[p.buf_offset..p.buf_offset + n].copy_from_slice(&image[start..end]);
                        buf[p.buf_offset + n..p.buf_offset + p.len].fill(0);
                    }
                    IoDone {
                        buf,
                        result: Ok(()),
                    }
                }
                // No page cache here: a direct write is a write like any other.
                IoOp::WriteMany { file, buf, pieces } | IoOp::WriteDirect { file, buf, pieces } => {
                    let end = pieces
                        .iter()
                        .map(|p| p.file_offset + p.len as u64)
                        .max()
                        .unwrap_or(0);
                    match self.disk.check_write(&files, file, end) {
                        Ok(()) => {
                            let sim = files.entry(file).or_default();
                            for p in pieces {
                                let data = &buf[p.buf_offset..p.buf_offset + p.len];
                                write_into(&mut sim.current, p.file_offset, data);
                                sim.pending.push((p.file_offset, data.to_vec()));
                            }
                            IoDone {
                                buf,
                                result: Ok(()),
                            }
                        }
                        Err(err) => IoDone {
                            buf,
                            result: Err(err),
                        },
                    }
                }
                IoOp::Sync { file } => {
                    let sim = files.entry(file).or_default();
                    sim.durable = sim.current.clone();
                    sim.durable_len_bytes = sim.len();
                    sim.pending.clear();
                    IoDone {
                        buf: Vec::new(),
                        result: Ok(()),
                    }
                }
            }
        };
        done(result);
    }

    fn file_len(&self, file: FileKind) -> io::Result<u64> {
        Ok(self
            .disk
            .files
            .lock()
            .get(&file)
            .map(SimFile::len)
            .unwrap_or(0))
    }

    fn set_len(&self, file: FileKind, len: u64) -> io::Result<()> {
        let mut files = self.disk.files.lock();
        let sim = files.entry(file).or_default();
        sim.current.resize(len as usize, 0);
        // A truncation is a metadata change that the simulation treats as immediately durable.
        sim.durable.resize(len as usize, 0);
        sim.len_bytes = len;
        sim.durable_len_bytes = len;
        // Like ftruncate, it releases what was set aside beyond the new end.
        sim.allocated_bytes = sim.allocated_bytes.min(len);
        Ok(())
    }

    fn allocate(&self, file: FileKind, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
        if !self.disk.allocate_supported.load(Ordering::SeqCst) {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut files = self.disk.files.lock();
        let (allocated, file_len) = files
            .get(&file)
            .map_or((0, 0), |f| (f.allocated_bytes.max(end), f.len()));
        let new_len = if keep_size {
            file_len
        } else {
            file_len.max(end)
        };
        if let Err(err) = self.disk.check_room(&files, file, allocated.max(new_len)) {
            if file == FileKind::Data {
                self.disk
                    .data_allocations_refused
                    .fetch_add(1, Ordering::SeqCst);
            }
            return Err(err);
        }
        let sim = files.entry(file).or_default();
        sim.allocated_bytes = allocated;
        sim.len_bytes = new_len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_blocking, sync_blocking, write_blocking};

    #[test]
    fn synced_writes_survive_a_crash() {
        let disk = SimDisk::new();
        let backend = disk.backend();
        write_blocking(&*backend, FileKind::Data, 0, vec![7; 4096]).unwrap();
        sync_blocking(&*backend, FileKind::Data).unwrap();
        write_blocking(&*backend, FileKind::Data, 4096, vec![9; 4096]).unwrap();
        disk.crash(1);
        let backend = disk.backend();
        assert_eq!(
            read_blocking(&*backend, FileKind::Data, 0, 4096).unwrap(),
            vec![7; 4096]
        );
    }

    #[test]
    fn unsynced_writes_may_be_torn() {
        let mut saw_torn = false;
        for seed in 0..64 {
            let disk = SimDisk::new();
            let backend = disk.backend();
            write_blocking(&*backend, FileKind::Data, 0, vec![1; 4096]).unwrap();
            disk.crash(seed);
            let image = read_blocking(&*disk.backend(), FileKind::Data, 0, 4096).unwrap();
            let ones = image.iter().filter(|&&b| b == 1).count();
            assert!(ones % SIM_SECTOR_BYTES == 0);
            saw_torn |= ones != 0 && ones != 4096;
        }
        assert!(saw_torn);
    }
}
