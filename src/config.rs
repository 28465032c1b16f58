//! The daemon's configuration: one TOML file (kebab-case keys, unknown keys refused), then
//! command-line flags over it. Precedence, lowest first: the defaults below, the file given with
//! `--config`, `$GROVE_DATA_DIR` (data directory only), the flags.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use grove_engine::{IoChoice, PoolOptions};
use grove_mgmt_api::size::{format_size, ByteSize};
use serde::{Deserialize, Serialize};

/// Data directory used when neither the config file, `$GROVE_DATA_DIR` nor `--data-dir` names one.
pub const DATA_DIR_DEFAULT: &str = "./grove-data";
/// The NBD port assigned by IANA.
pub const NBD_PORT_DEFAULT: u16 = 10809;
/// The iSCSI port assigned by IANA.
pub const ISCSI_PORT_DEFAULT: u16 = 3260;
pub const API_PORT_DEFAULT: u16 = 8470;
pub const CACHE_SIZE_DEFAULT_BYTES: u64 = 256 << 20;
/// Smallest metadata cache accepted: below this the cache thrashes on any real volume.
pub const CACHE_SIZE_MIN_BYTES: u64 = 1 << 20;

/// Which disk I/O backend the pool uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoBackend {
    /// io_uring where the kernel allows it, else the thread pool (chosen at start and logged).
    #[default]
    Auto,
    /// io_uring only; start fails where it is unavailable.
    IoUring,
    /// A portable thread pool doing blocking reads and writes.
    Threads,
}

impl From<IoBackend> for IoChoice {
    fn from(backend: IoBackend) -> Self {
        match backend {
            IoBackend::Auto => IoChoice::Auto,
            IoBackend::IoUring => IoChoice::IoUring,
            IoBackend::Threads => IoChoice::Threads,
        }
    }
}

/// A secret from the config file: shown as `<redacted>` when the configuration is printed or
/// logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// Everything `grove serve` needs to start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Directory holding the pool; created with a new pool on first start.
    /// Default: `./grove-data` (relative to the working directory).
    pub data_dir: PathBuf,
    /// TCP address the NBD server listens on. Port 0 picks a free port.
    /// Default: `127.0.0.1:10809`.
    pub nbd_listen: SocketAddr,
    /// Unix socket path the NBD server also listens on. A stale socket left by an earlier run
    /// is replaced. Default: none.
    pub nbd_socket: Option<PathBuf>,
    /// TCP address of the iSCSI target. Port 0 picks a free port. Default: `127.0.0.1:3260`.
    pub iscsi_listen: SocketAddr,
    /// CHAP user name initiators must log in with (with `iscsi-chap-secret`). Default: none
    /// (no authentication).
    pub iscsi_chap_user: Option<String>,
    /// CHAP secret of `iscsi-chap-user`, 12 to 255 bytes. Never printed or logged.
    pub iscsi_chap_secret: Option<Secret>,
    /// Mutual CHAP: the name the target answers an initiator's challenge with (with
    /// `iscsi-mutual-chap-secret`; needs `iscsi-chap-user`). Default: none.
    pub iscsi_mutual_chap_user: Option<String>,
    /// Mutual CHAP secret, 12 to 255 bytes, different from `iscsi-chap-secret`.
    pub iscsi_mutual_chap_secret: Option<Secret>,
    /// TCP address of the HTTP API. Port 0 picks a free port. Default: `127.0.0.1:8470`.
    pub api_listen: SocketAddr,
    /// Disk I/O backend: `auto`, `io-uring` or `threads`. Default: `auto`.
    pub io_backend: IoBackend,
    /// Bound on the engine's metadata page cache, as bytes or a string such as "256MiB".
    /// Range: 1 MiB and up. Default: 256 MiB.
    pub cache_size: ByteSize,
    /// Days the event log serves events for (`GET /v1/events`, the stream). Default: none
    /// (all of them).
    pub event_retention_days: Option<u32>,
}

impl Default for Config {
    fn default() -> Self {
        let localhost = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        Config {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            nbd_listen: localhost(NBD_PORT_DEFAULT),
            nbd_socket: None,
            iscsi_listen: localhost(ISCSI_PORT_DEFAULT),
            iscsi_chap_user: None,
            iscsi_chap_secret: None,
            iscsi_mutual_chap_user: None,
            iscsi_mutual_chap_secret: None,
            api_listen: localhost(API_PORT_DEFAULT),
            io_backend: IoBackend::Auto,
            cache_size: ByteSize(CACHE_SIZE_DEFAULT_BYTES),
            event_retention_days: None,
        }
    }
}

/// Flags of `grove serve`; each overrides the same key of the config file.
#[derive(Clone, Debug, Default, Args)]
pub struct ServeArgs {
    /// TOML config file (keys as the flags without the leading dashes).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory holding the pool [default: ./grove-data].
    #[arg(long, value_name = "DIR", env = "GROVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NBD listen address [default: 127.0.0.1:10809].
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen_address)]
    pub nbd_listen: Option<SocketAddr>,
    /// Also serve NBD on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// iSCSI listen address [default: 127.0.0.1:3260].
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen_address)]
    pub iscsi_listen: Option<SocketAddr>,
    /// HTTP API listen address [default: 127.0.0.1:8470].
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_listen_address)]
    pub api_listen: Option<SocketAddr>,
    /// Disk I/O backend [default: auto].
    #[arg(long, value_name = "BACKEND")]
    pub io_backend: Option<IoBackend>,
    /// Metadata cache bound, such as 256MiB [default: 256MiB].
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<ByteSize>,
    /// Days the event log serves events for [default: all].
    #[arg(long, value_name = "DAYS")]
    pub event_retention_days: Option<u32>,
    /// Check the configuration (file, environment and flags), print it, and exit.
    #[arg(long)]
    pub check_config: bool,
}

fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("invalid address {text:?}: use IP:PORT, such as 127.0.0.1:8470 or [::1]:8470")
    })
}

impl Config {
    /// Parses a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)
            .map_err(|error| anyhow::anyhow!("invalid config file {origin}: {error}"))?;
        config
            .check()
            .with_context(|| format!("invalid config file {origin}"))?;
        Ok(config)
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The configuration `grove serve` runs with: defaults, then the file, then the flags.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        config.apply(args);
        config.check()?;
        Ok(config)
    }

    fn apply(&mut self, args: &ServeArgs) {
        if let Some(data_dir) = &args.data_dir {
            self.data_dir = data_dir.clone();
        }
        if let Some(address) = args.nbd_listen {
            self.nbd_listen = address;
        }
        if let Some(path) = &args.nbd_socket {
            self.nbd_socket = Some(path.clone());
        }
        if let Some(address) = args.iscsi_listen {
            self.iscsi_listen = address;
        }
        if let Some(address) = args.api_listen {
            self.api_listen = address;
        }
        if let Some(backend) = args.io_backend {
            self.io_backend = backend;
        }
        if let Some(size) = args.cache_size {
            self.cache_size = size;
        }
        if let Some(days) = args.event_retention_days {
            self.event_retention_days = Some(days);
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            anyhow::bail!("data-dir must not be empty");
        }
        if self.cache_size.bytes() < CACHE_SIZE_MIN_BYTES {
            anyhow::bail!(
                "cache-size {} is too small: the minimum is {}",
                format_size(self.cache_size.bytes()),
                format_size(CACHE_SIZE_MIN_BYTES)
            );
        }
        if self.event_retention_days == Some(0) {
            anyhow::bail!("event-retention-days must be at least 1");
        }
        if matches!(&self.nbd_socket, Some(path) if path.as_os_str().is_empty()) {
            anyhow::bail!("nbd-socket must not be empty");
        }
        self.iscsi_chap()?;
        Ok(())
    }

    /// The CHAP credentials initiators must present, checked for consistency.
    pub fn iscsi_chap(&self) -> anyhow::Result<Option<grove_iscsi::ChapConfig>> {
        let pair = |user: &Option<String>, secret: &Option<Secret>, key: &str| match (user, secret)
        {
            (None, None) => Ok(None),
            (Some(user), Some(secret)) => {
                if user.is_empty() || user.len() > 255 || user.contains('\0') {
                    anyhow::bail!("{key}-user must be 1 to 255 bytes");
                }
                if secret.0.len() < 12 || secret.0.len() > 255 {
                    anyhow::bail!("{key}-secret must be 12 to 255 bytes (RFC 7143 12.1.3)");
                }
                Ok(Some((user.clone(), secret.0.clone())))
            }
            (Some(_), None) => anyhow::bail!("{key}-user needs {key}-secret"),
            (None, Some(_)) => anyhow::bail!("{key}-secret needs {key}-user"),
        };
        let one_way = pair(&self.iscsi_chap_user, &self.iscsi_chap_secret, "iscsi-chap")?;
        let mutual = pair(
            &self.iscsi_mutual_chap_user,
            &self.iscsi_mutual_chap_secret,
            "iscsi-mutual-chap",
        )?;
        match (one_way, mutual) {
            (None, None) => Ok(None),
            (None, Some(_)) => anyhow::bail!("iscsi-mutual-chap-user needs iscsi-chap-user"),
            (Some((_, secret)), Some((_, mutual_secret))) if secret == mutual_secret => {
                anyhow::bail!("iscsi-mutual-chap-secret must differ from iscsi-chap-secret")
            }
            (Some((user, secret)), mutual) => Ok(Some(grove_iscsi::ChapConfig {
                user,
                secret,
                mutual,
            })),
        }
    }

    /// How long the event log serves events.
    pub fn event_retention(&self) -> Option<std::time::Duration> {
        self.event_retention_days
            .map(|days| std::time::Duration::from_secs(u64::from(days) * 86_400))
    }

    pub fn pool_options(&self) -> PoolOptions {
        let mut options = PoolOptions::new(&self.data_dir);
        options.io = self.io_backend.into();
        options.cache_bytes = self.cache_size.bytes();
        options
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let config = Config::parse("", "test.toml").expect("valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.data_dir, PathBuf::from("./grove-data"));
        assert_eq!(config.nbd_listen.to_string(), "127.0.0.1:10809");
        assert_eq!(config.iscsi_listen.to_string(), "127.0.0.1:3260");
        assert_eq!(config.api_listen.to_string(), "127.0.0.1:8470");
        assert_eq!(config.nbd_socket, None);
        assert_eq!(config.io_backend, IoBackend::Auto);
        assert_eq!(config.cache_size, ByteSize(256 << 20));
    }

    #[test]
    fn every_key_parses() {
        let text = r#"
            data-dir = "/var/lib/grove"
            nbd-listen = "0.0.0.0:10809"
            nbd-socket = "/run/grove/nbd.sock"
            iscsi-listen = "[::1]:3260"
            api-listen = "127.0.0.1:9000"
            io-backend = "io-uring"
            cache-size = "1GiB"
        "#;
        let config = Config::parse(text, "test.toml").expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/grove"));
        assert_eq!(config.nbd_listen.to_string(), "0.0.0.0:10809");
        assert_eq!(
            config.nbd_socket,
            Some(PathBuf::from("/run/grove/nbd.sock"))
        );
        assert_eq!(config.iscsi_listen.to_string(), "[::1]:3260");
        assert_eq!(config.api_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(config.io_backend, IoBackend::IoUring);
        assert_eq!(config.cache_size, ByteSize(1 << 30));
        let options = config.pool_options();
        assert_eq!(options.io, IoChoice::IoUring);
        assert_eq!(options.cache_bytes, 1 << 30);

        let config =
            Config::parse("cache-size = 67108864\nio-backend = \"threads\"", "t").expect("valid");
        assert_eq!(config.cache_size, ByteSize(64 << 20));
        assert_eq!(config.io_backend, IoBackend::Threads);
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let error =
            Config::parse("nbd-listn = \"127.0.0.1:1\"", "grove.toml").expect_err("unknown key");
        let message = format!("{error:#}");
        assert!(message.contains("grove.toml"), "{message}");
        assert!(message.contains("nbd-listn"), "{message}");
        // snake_case spellings are not the documented keys either.
        let error = Config::parse("data_dir = \"/x\"", "grove.toml").expect_err("unknown key");
        assert!(format!("{error:#}").contains("data_dir"));
    }

    #[test]
    fn bad_values_are_refused() {
        for text in [
            "nbd-listen = \"localhost\"",
            "api-listen = 8470",
            "io-backend = \"uring\"",
            "cache-size = \"lots\"",
            "cache-size = \"4KiB\"",
            "data-dir = \"\"",
            "[data-dir]",
        ] {
            assert!(Config::parse(text, "t").is_err(), "{text}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grove.toml");
        std::fs::write(
            &path,
            "api-listen = \"127.0.0.1:9000\"\ndata-dir = \"/from-file\"\n",
        )
        .expect("write");
        let args = ServeArgs {
            config: Some(path.clone()),
            data_dir: Some(PathBuf::from("/from-flag")),
            cache_size: Some(ByteSize(64 << 20)),
            ..ServeArgs::default()
        };
        let config = Config::resolve(&args).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/from-flag"));
        assert_eq!(config.api_listen.to_string(), "127.0.0.1:9000");
        assert_eq!(config.nbd_listen.to_string(), "127.0.0.1:10809");
        assert_eq!(config.cache_size, ByteSize(64 << 20));

        let args = ServeArgs {
            config: Some(dir.path().join("missing.toml")),
            ..ServeArgs::default()
        };
        assert!(
            format!("{:#}", Config::resolve(&args).expect_err("missing")).contains("missing.toml")
        );
    }

    #[test]
    fn listen_addresses_need_ip_and_port() {
        assert!(parse_listen_address("127.0.0.1:0").is_ok());
        assert!(parse_listen_address("[::]:10809").is_ok());
        assert!(parse_listen_address("localhost:10809")
            .unwrap_err()
            .contains("IP:PORT"));
        assert!(parse_listen_address("127.0.0.1").is_err());
    }
}
