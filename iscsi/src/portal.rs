//! The portal: what every connection of one listener shares — the pool, the login settings,
//! the logical units' shared SCSI state, and the sessions alive (for reinstatement).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grove_engine::Pool;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::login::{LoginConfig, TargetDirectory};
use crate::names;
use crate::scsi::LuShared;

/// Limits and settings of the target. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TargetOptions {
    pub login: LoginConfig,
    /// Connections served at once; more are closed at accept. Default 1024.
    pub connections_max: usize,
    /// Time from accepting a connection to full feature phase. Default 30 s.
    pub login_timeout: Duration,
    /// Commands of one session in the command window (queued or running). Default 128.
    pub queue_depth: u32,
    /// An idle connection is pinged (NOP-In) after this long, and closed if the ping is not
    /// answered within as long again. Default 30 s.
    pub nop_interval: Duration,
    /// Turns true to stop gracefully: the listener stops accepting; each session stops
    /// taking commands, answers those it has, flushes and closes; `serve_tcp` returns once
    /// all are closed. Default: none (serve until dropped).
    pub stop: Option<watch::Receiver<bool>>,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            login: LoginConfig {
                chap: None,
                max_recv_data_segment_length: 256 * 1024,
                max_burst_length: 1024 * 1024,
                first_burst_length: 256 * 1024,
                max_outstanding_r2t: 1,
            },
            connections_max: 1024,
            login_timeout: Duration::from_secs(30),
            queue_depth: 128,
            nop_interval: Duration::from_secs(30),
            stop: None,
        }
    }
}

impl TargetOptions {
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    pub fn with_chap(mut self, chap: Option<crate::login::ChapConfig>) -> Self {
        self.login.chap = chap;
        self
    }
}

/// Identifies a session for reinstatement (RFC 7143 6.3.5): a new login with the same
/// initiator, ISID and target replaces the old session.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: String,
}

struct LiveSession {
    /// Distinguishes this registration from a later one under the same key.
    nexus: u64,
    /// Set to true to make the session end.
    stop: watch::Sender<bool>,
}

pub(crate) struct Portal {
    pub pool: Pool,
    pub options: TargetOptions,
    pub login: Arc<LoginConfig>,
    /// Shared SCSI state per logical unit, by canonical export name. Kept while the process
    /// lives: persistent reservations outlive the sessions that made them.
    units: Mutex<HashMap<String, Arc<LuShared>>>,
    sessions: Mutex<HashMap<SessionKey, LiveSession>>,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
}

impl Portal {
    pub fn new(pool: Pool, options: TargetOptions) -> Arc<Portal> {
        Arc::new(Portal {
            pool,
            login: Arc::new(options.login.clone()),
            options,
            units: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            next_nexus: AtomicU64::new(1),
        })
    }

    /// A TSIH for a new session: never 0, which means "new session" in a login request.
    pub fn next_tsih(&self) -> u16 {
        loop {
            let tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if tsih != 0 {
                return tsih;
            }
        }
    }

    pub fn next_nexus(&self) -> u64 {
        self.next_nexus.fetch_add(1, Ordering::Relaxed)
    }

    pub fn unit(&self, canonical_export: &str) -> Arc<LuShared> {
        self.units
            .lock()
            .entry(canonical_export.to_string())
            .or_default()
            .clone()
    }

    /// Registers a session; an older one with the same key is told to stop (reinstatement).
    /// The receiver turns true when this session must end.
    pub fn register(&self, key: SessionKey, nexus: u64) -> watch::Receiver<bool> {
        let (stop, stopped) = watch::channel(false);
        if let Some(old) = self
            .sessions
            .lock()
            .insert(key, LiveSession { nexus, stop })
        {
            tracing::info!(
                nexus = old.nexus,
                "session reinstated by a new login; closing the old one"
            );
            let _ = old.stop.send(true);
        }
        stopped
    }

    pub fn unregister(&self, key: &SessionKey, nexus: u64) {
        let mut sessions = self.sessions.lock();
        if sessions.get(key).is_some_and(|s| s.nexus == nexus) {
            sessions.remove(key);
        }
    }

    /// Every target name with its export, for SendTargets.
    pub fn targets(&self) -> Vec<String> {
        self.pool
            .exports()
            .into_iter()
            .map(|export| names::target_name(&export.name))
            .collect()
    }
}

/// Completes once `stop` turns true; never without one.
pub(crate) async fn stop_requested(stop: &Option<watch::Receiver<bool>>) {
    if let Some(stop) = stop {
        let mut stop = stop.clone();
        if stop.wait_for(|stopping| *stopping).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

impl TargetDirectory for Portal {
    fn exists(&self, target_name: &str) -> bool {
        names::export_name(target_name).is_some_and(|export| self.pool.export_info(&export).is_ok())
    }
}
