//! A minimal NBD client that writes blocks over a Unix socket: just enough of the fixed
//! newstyle handshake (`NBD_OPT_EXPORT_NAME`) and `NBD_CMD_WRITE` with simple replies to put a
//! few changed blocks between two commits without starting a process for each.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context, Result};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

pub const BLOCK_BYTES: u64 = 4096;

/// One NBD connection to one export, writing 4 KiB blocks at pseudo-random places.
pub struct NbdWriter {
    stream: UnixStream,
    size_bytes: u64,
    next_cookie: u64,
    /// xorshift state: the same places on every run.
    random: u64,
}

impl NbdWriter {
    pub fn connect(socket: &Path, export: &str) -> Result<NbdWriter> {
        let mut stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let mut greeting = [0u8; 18];
        stream
            .read_exact(&mut greeting)
            .context("reading the NBD greeting")?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into()?);
        let opt_magic = u64::from_be_bytes(greeting[8..16].try_into()?);
        let server_flags = u16::from_be_bytes(greeting[16..18].try_into()?);
        if magic != NBDMAGIC || opt_magic != IHAVEOPT || server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("not a fixed newstyle NBD server");
        }
        let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        let mut hello = Vec::new();
        hello.extend_from_slice(&client_flags.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&u32::try_from(export.len())?.to_be_bytes());
        hello.extend_from_slice(export.as_bytes());
        stream.write_all(&hello)?;
        // Export size and transmission flags, then 124 zero bytes unless NO_ZEROES.
        let mut info = vec![0u8; if no_zeroes { 10 } else { 134 }];
        stream
            .read_exact(&mut info)
            .with_context(|| format!("opening export {export} (closed by the server?)"))?;
        let size_bytes = u64::from_be_bytes(info[0..8].try_into()?);
        Ok(NbdWriter {
            stream,
            size_bytes,
            next_cookie: 1,
            random: 0x9e37_79b9_7f4a_7c15,
        })
    }

    /// Writes `count` 4 KiB blocks at pseudo-random block-aligned offsets, one after the other.
    pub fn write_random_blocks(&mut self, count: usize) -> Result<()> {
        let blocks = self.size_bytes / BLOCK_BYTES;
        let payload = [0x5au8; BLOCK_BYTES as usize];
        for _ in 0..count {
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            let offset = (self.random % blocks) * BLOCK_BYTES;
            self.request(CMD_WRITE, offset, &payload)?;
        }
        Ok(())
    }

    fn request(&mut self, command: u16, offset: u64, payload: &[u8]) -> Result<()> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut request = Vec::with_capacity(28 + payload.len());
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&command.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&u32::try_from(payload.len())?.to_be_bytes());
        request.extend_from_slice(payload);
        self.stream.write_all(&request)?;
        if command == CMD_DISC {
            return Ok(());
        }
        let mut reply = [0u8; 16];
        self.stream
            .read_exact(&mut reply)
            .context("reading an NBD reply")?;
        let magic = u32::from_be_bytes(reply[0..4].try_into()?);
        let error = u32::from_be_bytes(reply[4..8].try_into()?);
        let got_cookie = u64::from_be_bytes(reply[8..16].try_into()?);
        if magic != SIMPLE_REPLY_MAGIC || got_cookie != cookie {
            bail!("unexpected NBD reply (magic {magic:#x}, cookie {got_cookie})");
        }
        if error != 0 {
            bail!("NBD write at {offset} failed with error {error}");
        }
        Ok(())
    }
}

impl Drop for NbdWriter {
    fn drop(&mut self) {
        // A clean goodbye, so the server logs no error; nothing to do if it fails.
        let _ = self.request(CMD_DISC, 0, &[]);
    }
}
