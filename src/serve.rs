//! `grove serve`: the composition root. Opens the pool, binds every listener, hands the pool to
//! the NBD server and the HTTP API, prints one ready line, and on SIGTERM or SIGINT stops the
//! listeners, flushes the pool and exits 0.

use std::io::{self, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use grove_engine::Pool;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{Config, ServeArgs};

/// How long requests in flight on the API may take to finish once shutdown starts.
const API_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long NBD and iSCSI sessions may take at shutdown to answer the requests they have.
const SESSION_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long blocking tasks may run on after the pool is flushed, before the process exits.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

pub fn main(args: ServeArgs) -> anyhow::Result<()> {
    let config = Config::resolve(&args)?;
    if args.check_config {
        // The effective configuration, as a config file would say it.
        let text = toml::to_string(&config).context("cannot print the configuration")?;
        print!("{text}");
        eprintln!("configuration OK");
        return Ok(());
    }
    tune_allocator();
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("grove")
        .build()
        .context("cannot start the async runtime")?;
    let control = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("grove-control")
        .on_thread_start(control_plane_priority())
        .build()
        .context("cannot start the control-plane runtime")?;
    let result = runtime.block_on(run(config, control.handle().clone()));
    // NBD connections still open are dropped here; everything they had acknowledged before the
    // final flush is durable. Blocking work still running gets a bounded time to finish.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    control.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
    result
}

/// How much lower than the data path the control plane runs (nice increment).
const CONTROL_PLANE_NICE: libc::c_int = 10;

/// Returns what sets a control-plane thread's scheduling priority: `CONTROL_PLANE_NICE` below
/// the data path's. The control plane (the HTTP API and the changes it makes, space scans,
/// the event log, scrubs) runs on threads set this way, so that when the CPU is short, NBD
/// and iSCSI requests come first: a thousand commit deletes in a row otherwise take the CPU
/// that reads were waiting for. Measured on 2 cores, 4 KiB random reads at QD32 beside 1,000
/// back-to-back API requests: read p99 went from 2.1-2.4 times to 1.6-2.2 times what it was
/// without them.
///
/// The value is absolute, not an increment: a thread started by a lowered one inherits its
/// priority, and must not be lowered twice.
#[allow(unsafe_code)]
fn control_plane_priority() -> impl Fn() + Send + Sync + 'static {
    // SAFETY: getpriority only reads the calling thread's nice value (per thread on Linux),
    // here the main thread's, before any thread is lowered.
    let data_path = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let control = (data_path + CONTROL_PLANE_NICE).min(19);
    move || {
        // SAFETY: setpriority with `who` 0 changes only the calling thread's priority. Failing
        // to lower it is harmless: the thread runs as it would have.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, control) };
    }
}

/// Keeps glibc's allocator from growing the daemon's memory without bound under load.
///
/// Measured with the soak test (64 connections, commits and reads of commit exports, 90 s):
/// RSS grew steadily, 14 to 195 MiB, with glibc's defaults; 14 to 99 MiB with at most two
/// arenas; 14 to 61 MiB with two arenas and a fixed mmap threshold. By default glibc keeps
/// up to 8 arenas per core, one per thread that allocates, and each holds on to what its
/// threads freed; and its mmap threshold rises after every large free, after which
/// megabyte-sized I/O buffers are carved from the arenas and fragment them. Large read buffers
/// are reused by the engine, so a fixed threshold costs little. `MALLOC_ARENA_MAX` and
/// `MALLOC_MMAP_THRESHOLD_` in the environment still take precedence.
#[allow(unsafe_code)]
fn tune_allocator() {
    const ARENAS_MAX: libc::c_int = 2;
    const MMAP_THRESHOLD_BYTES: libc::c_int = 128 * 1024;
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator parameters; it is called before the runtime
        // starts any thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS_MAX) };
    }
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`); stdout carries only the ready
/// line.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(text) if !text.is_empty() => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(error) => (
                EnvFilter::new("info"),
                Some(format!("ignoring RUST_LOG={text:?}: {error}")),
            ),
        },
        _ => (EnvFilter::new("info"), None),
    };
    // Under systemd (stderr connected to the journal) or when asked with GROVE_LOG_FORMAT=json,
    // one JSON object per line, fields kept apart for the journal and log shippers; otherwise
    // human-readable text.
    let json = match std::env::var("GROVE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => std::env::var_os("JOURNAL_STREAM").is_some() && !io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_ansi(io::stderr().is_terminal()).init();
    }
    if let Some(message) = bad_filter {
        tracing::warn!("{message}");
    }
}

/// The ways a server task can end; they all run until the process shuts them down, so an end
/// before that is a failure.
type ServerResult = (&'static str, io::Result<()>);

async fn run(config: Config, control: tokio::runtime::Handle) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        ?config,
        "starting grove"
    );

    // Signals are caught from here on, so a signal during start-up still ends in a clean stop.
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let pool = open_pool(&config).await?;
    // Scans once at start, so that space figures exist, then after deletes, resets and
    // clones. The task ends when the pool is dropped.
    // Sessions opening and closing are logged as they happen, not with the next change.
    pool.set_event_retention(config.event_retention());
    let (_reclaimer, _event_logger) = {
        let _control = control.enter();
        (pool.spawn_reclaimer(), pool.spawn_event_logger())
    };

    let nbd_listener = TcpListener::bind(config.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", config.nbd_listen))?;
    let nbd_address = nbd_listener.local_addr()?;
    let unix_listener = match &config.nbd_socket {
        Some(path) => Some(bind_unix_socket(path)?),
        None => None,
    };
    let api_listener = TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("cannot listen for the HTTP API on {}", config.api_listen))?;
    let api_address = api_listener.local_addr()?;
    let iscsi_listener = TcpListener::bind(config.iscsi_listen)
        .await
        .with_context(|| format!("cannot listen for iSCSI on {}", config.iscsi_listen))?;
    let iscsi_address = iscsi_listener.local_addr()?;
    // Turns true at shutdown: the protocol servers stop reading requests, answer those they
    // have, flush and close their sessions.
    let (stop_servers, stop) = watch::channel(false);
    let iscsi_options = grove_iscsi::TargetOptions::default()
        .with_chap(config.iscsi_chap()?)
        .with_stop(stop.clone());
    let mut nbd_options = grove_nbd_server::ServerOptions::default();
    nbd_options.stop = Some(stop);
    let nbd_provider = Arc::new(grove_nbd_server::PoolProvider::new(pool.clone()));

    let mut servers: JoinSet<ServerResult> = JoinSet::new();
    let (tcp_provider, tcp_options) = (nbd_provider.clone(), nbd_options.clone());
    servers.spawn(async move {
        (
            "NBD",
            grove_nbd_server::serve_tcp_with(tcp_provider, nbd_listener, tcp_options).await,
        )
    });
    let iscsi_pool = pool.clone();
    servers.spawn(async move {
        (
            "iSCSI",
            grove_iscsi::serve_tcp(iscsi_pool, iscsi_listener, iscsi_options).await,
        )
    });
    if let Some(listener) = unix_listener {
        servers.spawn(async move {
            (
                "NBD Unix socket",
                grove_nbd_server::serve_unix_with(nbd_provider, listener, nbd_options).await,
            )
        });
    }
    let (api_stop, api_stopped) = oneshot::channel::<()>();
    let api_pool = pool.clone();
    let mut api = control.spawn(async move {
        let shutdown = async move {
            // A dropped sender also means stop.
            let _ = api_stopped.await;
        };
        grove_mgmt_api::serve_with_shutdown(api_pool, api_listener, shutdown).await
    });

    tracing::info!(%nbd_address, %iscsi_address, %api_address, nbd_socket = ?config.nbd_socket, "listening");
    // systemd (Type=notify): ready once the pool is open and every listener is bound.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!(
            "serving NBD on {nbd_address}, iSCSI on {iscsi_address}, API on {api_address}"
        )),
    ]);
    let _watchdog = spawn_watchdog();
    println!(
        "{}",
        ready_line(
            nbd_address,
            config.nbd_socket.as_deref(),
            iscsi_address,
            api_address,
            &config.data_dir
        )
    );

    let failure = tokio::select! {
        _ = terminate.recv() => { tracing::info!("SIGTERM received; shutting down"); None }
        _ = interrupt.recv() => { tracing::info!("SIGINT received; shutting down"); None }
        Some(ended) = servers.join_next() => Some(server_ended(ended)),
        ended = &mut api => Some(server_ended(ended.map(|result| ("HTTP API", result)))),
    };

    notify_systemd(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: draining requests and flushing the pool"),
    ]);
    // Stop accepting: the API drains its requests in flight; NBD and iSCSI sessions answer
    // the requests they have read, flush and close (clients see their connection close and
    // resend the rest to whatever serves the volume next).
    let _ = api_stop.send(());
    let _ = stop_servers.send(true);
    let drained = tokio::time::timeout(SESSION_DRAIN_TIMEOUT, async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "sessions still busy after {SESSION_DRAIN_TIMEOUT:?}; closing them (their requests in flight are not answered)"
        );
        servers.abort_all();
        while servers.join_next().await.is_some() {}
    } else {
        tracing::info!("NBD and iSCSI sessions drained and closed");
    }
    if !api.is_finished() {
        match tokio::time::timeout(API_DRAIN_TIMEOUT, &mut api).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the HTTP API stopped with an error"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    "API requests still running after {API_DRAIN_TIMEOUT:?}; dropping them"
                );
                api.abort();
            }
        }
    }
    if let Some(path) = &config.nbd_socket {
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove the NBD socket");
        }
    }

    pool.close().await.context("cannot flush the pool")?;
    tracing::info!("pool flushed; stopped");
    match failure {
        None => Ok(()),
        Some(error) => Err(error),
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the service is doing.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(error) = sd_notify::notify(false, state) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval, when one is set (`WatchdogSec=`). The pings
/// come from the runtime: a wedged runtime stops them and systemd restarts the service.
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let interval = std::time::Duration::from_micros(usec / 2);
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            notify_systemd(&[sd_notify::NotifyState::Watchdog]);
        }
    }))
}

async fn open_pool(config: &Config) -> anyhow::Result<Pool> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let options = config.pool_options();
    let pool = tokio::task::spawn_blocking(move || Pool::open(options))
        .await
        .context("opening the pool failed")?
        .with_context(|| format!("cannot open the pool in {}", data_dir.display()))?;
    match pool.stats() {
        Ok(stats) => tracing::info!(
            data_dir = %config.data_dir.display(),
            io_backend = stats.io_backend,
            capacity_bytes = stats.capacity_bytes,
            used_bytes = stats.used_bytes,
            "pool open"
        ),
        Err(error) => tracing::warn!(%error, "pool open, but its statistics cannot be read"),
    }
    Ok(pool)
}

/// Binds the NBD Unix socket, replacing a stale socket file from an earlier run. A socket that
/// still accepts connections belongs to a running server and is left alone.
fn bind_unix_socket(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            anyhow::bail!(
                "cannot listen for NBD on {}: the path exists and is not a socket",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "cannot listen for NBD on {}: another server is using it",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        tracing::info!(path = %path.display(), "removed a stale NBD socket");
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen for NBD on {}", path.display()))
}

fn server_ended(ended: Result<ServerResult, tokio::task::JoinError>) -> anyhow::Error {
    match ended {
        Ok((name, Ok(()))) => anyhow::anyhow!("the {name} server stopped unexpectedly"),
        Ok((name, Err(error))) => anyhow::anyhow!("the {name} server failed: {error}"),
        Err(error) => anyhow::anyhow!("a server task failed: {error}"),
    }
}

/// The one line printed on stdout once every listener is bound, with the bound addresses (so a
/// port 0 in the config shows the port actually chosen).
fn ready_line(
    nbd: SocketAddr,
    nbd_socket: Option<&Path>,
    iscsi: SocketAddr,
    api: SocketAddr,
    data_dir: &Path,
) -> String {
    let mut line = format!("grove ready: nbd={nbd}");
    if let Some(path) = nbd_socket {
        line.push_str(&format!(" nbd-socket={}", path.display()));
    }
    line.push_str(&format!(
        " iscsi={iscsi} api=http://{api} data-dir={}",
        display_dir(data_dir).display()
    ));
    line
}

fn display_dir(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_lists_the_addresses() {
        let line = ready_line(
            "127.0.0.1:10809".parse().expect("address"),
            Some(Path::new("/run/grove.sock")),
            "127.0.0.1:3260".parse().expect("address"),
            "127.0.0.1:8470".parse().expect("address"),
            Path::new("/nonexistent/grove-data"),
        );
        assert_eq!(
            line,
            "grove ready: nbd=127.0.0.1:10809 nbd-socket=/run/grove.sock iscsi=127.0.0.1:3260 \
             api=http://127.0.0.1:8470 data-dir=/nonexistent/grove-data"
        );
    }

    #[test]
    fn stale_unix_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let live = bind_unix_socket(&path).expect("first bind");
            assert!(
                bind_unix_socket(&path).is_err(),
                "a live socket must not be replaced"
            );
            drop(live);
            // The file stays behind after the listener is dropped, as after a crash.
            assert!(path.exists());
            bind_unix_socket(&path).expect("a stale socket is replaced");
        });
        let plain = dir.path().join("file");
        std::fs::write(&plain, b"x").expect("write");
        runtime.block_on(async {
            assert!(bind_unix_socket(&plain).is_err());
        });
    }
}
