//! Hooks: webhooks (an HTTP POST of the event's JSON, signed with HMAC-SHA256 over the body
//! with the hook's secret in `X-Grove-Signature: sha256=HEX`) and exec hooks (a local program
//! given the JSON on stdin).
//!
//! Event hooks are delivered from the event log itself: each hook has a cursor (the last event
//! it took, kept durable as an engine record), and a task per hook delivers the matching
//! events after it, in order, one at a time, retrying a failed one with exponential backoff
//! before going on. The log is the outbox: a restart resumes from the cursor, so every event
//! is delivered at least once (the cursor is saved at most once a second while busy, so a
//! crash may deliver the last few again; `X-Grove-Delivery` lets receivers spot repeats). A
//! dead receiver only holds back its own hook: I/O and the API never wait for deliveries.
//!
//! Blocking hooks (`pre-commit`, `pre-merge`, `pre-delete`) are called by the API before the
//! operation, once, with the hook's timeout; anything but success vetoes it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use globset::{Glob, GlobMatcher};
use grove_engine::{Event as EngineEvent, EventQuery, LoggedEvent, Pool, EVENT_TYPES};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::task::JoinHandle;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::model::Event;

/// Engine record kinds: a hook's settings, and how far its deliveries got.
const HOOK_RECORD: &str = "hook";
const PROGRESS_RECORD: &str = "hook-progress";
/// Blocking hook types: called before the operation, which they may veto.
pub const BLOCKING_TYPES: &[&str] = &["pre-commit", "pre-merge", "pre-delete"];
/// The header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Grove-Signature";
const TIMEOUT_MS_DEFAULT: u64 = 10_000;
const TIMEOUT_MS_MAX: u64 = 300_000;
/// Retry delays: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Failed attempts at one event before `hook.failed` is logged (once per event).
const FAILURES_BEFORE_EVENT: u32 = 5;
/// Recent attempts kept per hook for the API.
const ATTEMPTS_KEPT: usize = 100;
/// The cursor is saved at most this often while deliveries go on (and whenever idle).
const PROGRESS_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Most bytes of a receiver's answer quoted in an error or a veto.
const ANSWER_QUOTE_MAX: usize = 500;

/// A hook's settings, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HookConfig {
    pub id: String,
    pub url: Option<String>,
    pub exec: Option<Vec<String>>,
    pub events: Vec<String>,
    pub volume: Option<String>,
    pub branch: Option<String>,
    pub secret: Option<String>,
    pub timeout_ms: u64,
    /// Blocking hooks: an unanswered call lets the operation through instead of vetoing it.
    pub allow_on_timeout: bool,
    pub created_unix: u64,
    /// Deliveries start after this event (the last one when the hook was made).
    pub start_after: u64,
}

/// Body of `POST /v1/hooks`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateHook {
    /// Where to POST events (`http://` or `https://`); or give `exec`.
    pub url: Option<String>,
    /// A local program and its arguments, run with the event JSON on stdin; exit 0 is
    /// success.
    pub exec: Option<Vec<String>>,
    /// Event types (`commit.created`, ...) and blocking types (`pre-commit`, `pre-merge`,
    /// `pre-delete`); at least one.
    pub events: Vec<String>,
    /// Only events about volumes matching this glob (`datasets/*`, `vm-?`).
    pub volume: Option<String>,
    /// Only events about branches or tags matching this glob (`release-*`).
    pub branch: Option<String>,
    /// Signs each body: `X-Grove-Signature: sha256=HEX(HMAC-SHA256(secret, body))`.
    pub secret: Option<String>,
    /// How long a call may take, 1 to 300000 ms; default 10000.
    pub timeout_ms: Option<u64>,
    /// Blocking hooks: let the operation through when the hook does not answer in time
    /// (default: a timeout vetoes it).
    #[serde(default)]
    pub allow_on_timeout: bool,
}

/// A hook as the API shows it (its secret never).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Hook {
    pub id: String,
    pub url: Option<String>,
    pub exec: Option<Vec<String>>,
    pub events: Vec<String>,
    pub volume: Option<String>,
    pub branch: Option<String>,
    pub has_secret: bool,
    pub timeout_ms: u64,
    pub allow_on_timeout: bool,
    pub created_unix: u64,
    pub status: HookStatus,
}

/// How a hook's deliveries are going.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct HookStatus {
    /// The last event delivered (or skipped as not matching).
    pub delivered_seq: u64,
    /// Failed attempts in a row at the current event.
    pub consecutive_failures: u32,
    /// Set while the hook keeps failing (a `hook.failed` event was logged).
    pub failing: bool,
    pub last_error: Option<String>,
    pub deliveries_ok: u64,
    pub deliveries_failed: u64,
}

/// One delivery attempt.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Attempt {
    pub event_seq: u64,
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub event_type: String,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    pub ok: bool,
    /// The HTTP status, or the program's exit code.
    pub status: Option<i32>,
    pub error: Option<String>,
    /// Made by hand (`POST /v1/hooks/{id}/deliveries`).
    pub manual: bool,
}

/// The hooks of a pool and their delivery tasks.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    running: Mutex<HashMap<String, Running>>,
}

struct Running {
    config: Arc<HookConfig>,
    filter: Arc<Filter>,
    state: Arc<Mutex<DeliveryState>>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct DeliveryState {
    status: HookStatus,
    attempts: VecDeque<Attempt>,
}

impl DeliveryState {
    fn record(&mut self, attempt: Attempt) {
        if attempt.ok {
            self.status.deliveries_ok += 1;
        } else {
            self.status.deliveries_failed += 1;
            self.status.last_error = attempt.error.clone();
        }
        if self.attempts.len() == ATTEMPTS_KEPT {
            self.attempts.pop_front();
        }
        self.attempts.push_back(attempt);
    }
}

/// Which events a hook takes.
struct Filter {
    types: Vec<String>,
    volume: Option<GlobMatcher>,
    branch: Option<GlobMatcher>,
}

impl Filter {
    fn new(config: &HookConfig) -> Result<Filter, ApiError> {
        let glob =
            |pattern: &Option<String>, what: &str| -> Result<Option<GlobMatcher>, ApiError> {
                pattern
                    .as_deref()
                    .map(|p| {
                        Glob::new(p).map(|g| g.compile_matcher()).map_err(|e| {
                            ApiError::invalid_argument(format!("invalid {what} glob {p:?}: {e}"))
                        })
                    })
                    .transpose()
            };
        Ok(Filter {
            types: config.events.clone(),
            volume: glob(&config.volume, "volume")?,
            branch: glob(&config.branch, "branch")?,
        })
    }

    /// Whether the hook takes an event of `kind` about `volume` and `branch`. Globs only
    /// match events that name what they filter on.
    fn matches(&self, kind: &str, volume: Option<&str>, branch: Option<&str>) -> bool {
        self.types.iter().any(|t| t == kind)
            && self
                .volume
                .as_ref()
                .is_none_or(|g| volume.is_some_and(|v| g.is_match(v)))
            && self
                .branch
                .as_ref()
                .is_none_or(|g| branch.is_some_and(|b| g.is_match(b)))
    }

    /// Whether a blocking hook is asked about an operation; one on a whole volume (no
    /// branch) passes any branch glob.
    fn matches_operation(&self, kind: &str, volume: &str, branch: Option<&str>) -> bool {
        match branch {
            Some(branch) => self.matches(kind, Some(volume), Some(branch)),
            None => {
                self.types.iter().any(|t| t == kind)
                    && self.volume.as_ref().is_none_or(|g| g.is_match(volume))
            }
        }
    }

    fn takes(&self, event: &EngineEvent) -> bool {
        self.matches(event.type_name(), event.volume(), event.ref_name())
    }

    fn event_types(&self) -> Vec<String> {
        self.types
            .iter()
            .filter(|t| !BLOCKING_TYPES.contains(&t.as_str()))
            .cloned()
            .collect()
    }
}

/// Checks a new hook's settings.
fn validate(request: &CreateHook) -> Result<(), ApiError> {
    match (&request.url, &request.exec) {
        (Some(url), None) => {
            let parsed = url::Url::parse(url).ok().filter(|parsed| {
                matches!(parsed.scheme(), "http" | "https")
                    && parsed.host_str().is_some_and(|h| !h.is_empty())
                    && !url.chars().any(|c| c.is_whitespace() || c.is_control())
            });
            if parsed.is_none() || url.len() > 2048 {
                return Err(ApiError::invalid_argument(format!(
                    "invalid hook url {url:?}: use http://HOST[:PORT]/PATH or https://..."
                )));
            }
        }
        (None, Some(exec)) => {
            if exec.is_empty() || exec[0].is_empty() {
                return Err(ApiError::invalid_argument(
                    "exec needs a program: [\"/path/to/program\", \"arg\", ...]",
                ));
            }
        }
        _ => {
            return Err(ApiError::invalid_argument(
                "a hook needs exactly one of url and exec",
            ))
        }
    }
    if request.events.is_empty() {
        return Err(ApiError::invalid_argument(
            "a hook needs at least one event type",
        ));
    }
    for kind in &request.events {
        if !EVENT_TYPES.contains(&kind.as_str()) && !BLOCKING_TYPES.contains(&kind.as_str()) {
            return Err(ApiError::invalid_argument(format!(
                "unknown event type {kind:?}; known: {}, {}",
                EVENT_TYPES.join(", "),
                BLOCKING_TYPES.join(", ")
            )));
        }
    }
    if let Some(timeout) = request.timeout_ms {
        if !(1..=TIMEOUT_MS_MAX).contains(&timeout) {
            return Err(ApiError::invalid_argument(format!(
                "timeout_ms {timeout} is out of range: use 1-{TIMEOUT_MS_MAX}"
            )));
        }
    }
    if request
        .secret
        .as_deref()
        .is_some_and(|s| s.is_empty() || s.len() > 1024)
    {
        return Err(ApiError::invalid_argument("a secret is 1 to 1024 bytes"));
    }
    Ok(())
}

impl Hooks {
    /// The hooks stored in the pool, with their delivery tasks started (when a runtime runs).
    pub fn start(pool: Pool) -> Hooks {
        let hooks = Hooks {
            inner: Arc::new(Inner {
                pool,
                running: Mutex::new(HashMap::new()),
            }),
        };
        for (id, value) in hooks.inner.pool.records(HOOK_RECORD) {
            match serde_json::from_value::<HookConfig>(value) {
                Ok(config) => {
                    if let Err(error) = hooks.run(config) {
                        tracing::warn!(hook = %id, error = %error.message, "hook not started");
                    }
                }
                Err(error) => tracing::warn!(hook = %id, %error, "unreadable hook record"),
            }
        }
        hooks
    }

    fn run(&self, config: HookConfig) -> Result<(), ApiError> {
        let filter = Arc::new(Filter::new(&config)?);
        let progress = self
            .inner
            .pool
            .record(PROGRESS_RECORD, &config.id)
            .and_then(|v| v.get("delivered_seq").and_then(|s| s.as_u64()))
            .unwrap_or(0)
            .max(config.start_after);
        let state = Arc::new(Mutex::new(DeliveryState {
            status: HookStatus {
                delivered_seq: progress,
                ..Default::default()
            },
            attempts: VecDeque::new(),
        }));
        let config = Arc::new(config);
        let task = (!filter.event_types().is_empty())
            .then(|| tokio::runtime::Handle::try_current().ok())
            .flatten()
            .map(|runtime| {
                let worker = Worker {
                    pool: self.inner.pool.clone(),
                    config: config.clone(),
                    filter: filter.clone(),
                    state: state.clone(),
                };
                runtime.spawn(worker.run())
            });
        self.inner.running.lock().insert(
            config.id.clone(),
            Running {
                config,
                filter,
                state,
                task,
            },
        );
        Ok(())
    }

    /// Adds a hook; it takes the events logged from now on.
    pub async fn create(&self, pool: &Pool, request: CreateHook) -> Result<Hook, ApiError> {
        validate(&request)?;
        let config = HookConfig {
            id: format!("h{:016x}", rand::random::<u64>()),
            url: request.url,
            exec: request.exec,
            events: request.events,
            volume: request.volume,
            branch: request.branch,
            secret: request.secret,
            timeout_ms: request.timeout_ms.unwrap_or(TIMEOUT_MS_DEFAULT),
            allow_on_timeout: request.allow_on_timeout,
            created_unix: grove_engine::now_unix_ms() / 1000,
            start_after: pool.last_event_seq(),
        };
        Filter::new(&config)?;
        let value = serde_json::to_value(&config)
            .map_err(|e| ApiError::internal(format!("cannot encode the hook: {e}")))?;
        let event = EngineEvent::HookCreated {
            hook: config.id.clone(),
        };
        pool.put_record(HOOK_RECORD, &config.id, value, vec![event])
            .await?;
        let id = config.id.clone();
        self.run(config)?;
        self.get(&id)
    }

    pub fn list(&self) -> Vec<Hook> {
        let running = self.inner.running.lock();
        let mut hooks: Vec<Hook> = running.values().map(view).collect();
        hooks.sort_by_key(|h| (h.created_unix, h.id.clone()));
        hooks
    }

    pub fn get(&self, id: &str) -> Result<Hook, ApiError> {
        let running = self.inner.running.lock();
        running
            .get(id)
            .map(view)
            .ok_or_else(|| ApiError::not_found(format!("hook {id:?} not found")))
    }

    pub async fn delete(&self, pool: &Pool, id: &str) -> Result<(), ApiError> {
        // The worker stops first, so that nothing it does (saving progress, logging a
        // failure) outlives the hook.
        let running = self
            .inner
            .running
            .lock()
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("hook {id:?} not found")))?;
        if let Some(task) = running.task {
            task.abort();
            let _ = task.await;
        }
        let event = EngineEvent::HookDeleted {
            hook: id.to_string(),
        };
        pool.delete_record(HOOK_RECORD, id, vec![event]).await?;
        pool.delete_record(PROGRESS_RECORD, id, Vec::new()).await?;
        Ok(())
    }

    /// Recent delivery attempts, oldest first.
    pub fn attempts(&self, id: &str) -> Result<Vec<Attempt>, ApiError> {
        let running = self.inner.running.lock();
        let running = running
            .get(id)
            .ok_or_else(|| ApiError::not_found(format!("hook {id:?} not found")))?;
        let attempts = running.state.lock().attempts.iter().cloned().collect();
        Ok(attempts)
    }

    /// Delivers event `seq` to the hook once more, now, whether or not it matches.
    pub async fn redeliver(&self, id: &str, seq: u64) -> Result<Attempt, ApiError> {
        let (config, state) = {
            let running = self.inner.running.lock();
            let running = running
                .get(id)
                .ok_or_else(|| ApiError::not_found(format!("hook {id:?} not found")))?;
            (running.config.clone(), running.state.clone())
        };
        let query = EventQuery {
            since: seq.saturating_sub(1),
            limit: 1,
            ..Default::default()
        };
        let pool = self.inner.pool.clone();
        let page = tokio::task::spawn_blocking(move || pool.events(&query))
            .await
            .map_err(|e| ApiError::internal(format!("reading the event log failed: {e}")))??;
        let event = page
            .events
            .into_iter()
            .find(|e| e.seq == seq)
            .ok_or_else(|| ApiError::not_found(format!("event {seq} not found in the log")))?;
        let mut attempt = deliver(&config, &event).await;
        attempt.manual = true;
        state.lock().record(attempt.clone());
        Ok(attempt)
    }

    /// Whether any blocking hook of `kind` takes an operation on `volume` and `branch`.
    pub fn has_blocking(&self, kind: &str, volume: &str, branch: Option<&str>) -> bool {
        let running = self.inner.running.lock();
        running
            .values()
            .any(|r| r.filter.matches_operation(kind, volume, branch))
    }

    /// Calls the blocking hooks of `kind` (`pre-commit`, ...) that match `volume` and
    /// `branch`, in turn; the first that does not approve vetoes the operation.
    pub async fn check(
        &self,
        kind: &str,
        volume: &str,
        branch: Option<&str>,
        payload: serde_json::Value,
    ) -> Result<(), ApiError> {
        let hooks: Vec<Arc<HookConfig>> = {
            let running = self.inner.running.lock();
            // An operation on a whole volume (branch None) concerns every branch: a hook
            // watching some branches is asked too.
            let mut hooks: Vec<Arc<HookConfig>> = running
                .values()
                .filter(|r| r.filter.matches_operation(kind, volume, branch))
                .map(|r| r.config.clone())
                .collect();
            hooks.sort_by_key(|h| (h.created_unix, h.id.clone()));
            hooks
        };
        if hooks.is_empty() {
            return Ok(());
        }
        let mut body = payload;
        body["type"] = serde_json::json!(kind);
        let body = serde_json::to_vec(&body)
            .map_err(|e| ApiError::internal(format!("cannot encode the hook call: {e}")))?;
        for hook in hooks {
            let started = Instant::now();
            let outcome = call(&hook, kind, &format!("{}:{kind}", hook.id), &body).await;
            let elapsed_ms = started.elapsed().as_millis();
            match outcome {
                Outcome::Ok(_) => {}
                Outcome::TimedOut if hook.allow_on_timeout => {
                    tracing::warn!(hook = %hook.id, kind, "blocking hook timed out; allowed by its setting");
                }
                Outcome::TimedOut => {
                    return Err(ApiError::vetoed(format!(
                        "{kind} hook {} did not answer within {} ms ({elapsed_ms} ms): the operation is refused",
                        hook.id, hook.timeout_ms
                    )))
                }
                Outcome::Refused(status, reason) => {
                    let status = status.map(|s| format!(" ({s})")).unwrap_or_default();
                    return Err(ApiError::vetoed(format!(
                        "{kind} hook {} refused{status}: {reason}",
                        hook.id
                    )));
                }
            }
        }
        Ok(())
    }
}

fn view(running: &Running) -> Hook {
    let config = &running.config;
    Hook {
        id: config.id.clone(),
        url: config.url.clone(),
        exec: config.exec.clone(),
        events: config.events.clone(),
        volume: config.volume.clone(),
        branch: config.branch.clone(),
        has_secret: config.secret.is_some(),
        timeout_ms: config.timeout_ms,
        allow_on_timeout: config.allow_on_timeout,
        created_unix: config.created_unix,
        status: running.state.lock().status.clone(),
    }
}

/// Delivers a hook's events in order, from its cursor on.
struct Worker {
    pool: Pool,
    config: Arc<HookConfig>,
    filter: Arc<Filter>,
    state: Arc<Mutex<DeliveryState>>,
}

impl Worker {
    async fn run(self) {
        let mut live = self.pool.subscribe();
        let mut since = self.state.lock().status.delivered_seq;
        let mut saved = since;
        let mut saved_at = Instant::now();
        loop {
            let query = EventQuery {
                since,
                types: self.filter.event_types(),
                volume: None,
                limit: 100,
            };
            let pool = self.pool.clone();
            let page = match tokio::task::spawn_blocking(move || pool.events(&query)).await {
                Ok(Ok(page)) => page,
                Ok(Err(error)) => {
                    tracing::warn!(hook = %self.config.id, %error, "cannot read the event log");
                    tokio::time::sleep(RETRY_MAX).await;
                    continue;
                }
                Err(_) => return,
            };
            if page.first_seq > since + 1 {
                // Out of retention before this hook could take them: say so once.
                let lost = EngineEvent::HookFailed {
                    hook: self.config.id.clone(),
                    event_seq: since + 1,
                    attempts: 0,
                    error: format!(
                        "events {} to {} fell out of the event log's retention before delivery",
                        since + 1,
                        page.first_seq - 1
                    ),
                };
                tracing::warn!(hook = %self.config.id, from = since + 1, to = page.first_seq - 1, "events lost to retention before delivery");
                if let Err(error) = self.pool.log_event(lost).await {
                    tracing::warn!(hook = %self.config.id, %error, "cannot log hook.failed");
                }
                since = page.first_seq - 1;
            }
            for event in &page.events {
                if self.filter.takes(&event.event) {
                    self.deliver_until_taken(event).await;
                }
                since = event.seq;
                self.state.lock().status.delivered_seq = since;
                if saved_at.elapsed() >= PROGRESS_SAVE_INTERVAL {
                    saved = self.save(since).await.unwrap_or(saved);
                    saved_at = Instant::now();
                }
            }
            let caught_up = page.next_since == since || page.events.is_empty();
            since = since.max(page.next_since);
            self.state.lock().status.delivered_seq = since;
            if !caught_up {
                continue;
            }
            if saved != since {
                saved = self.save(since).await.unwrap_or(saved);
                saved_at = Instant::now();
            }
            // Wait for anything new; a lagging receiver just reads the log again.
            match live.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    async fn save(&self, seq: u64) -> Option<u64> {
        let value = serde_json::json!({ "delivered_seq": seq });
        match self
            .pool
            .put_record(PROGRESS_RECORD, &self.config.id, value, Vec::new())
            .await
        {
            Ok(()) => Some(seq),
            Err(error) => {
                tracing::warn!(hook = %self.config.id, %error, "cannot save the hook's progress");
                None
            }
        }
    }

    /// Retries one event with exponential backoff until the receiver takes it.
    async fn deliver_until_taken(&self, event: &LoggedEvent) {
        let mut delay = RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            let attempt = deliver(&self.config, event).await;
            let ok = attempt.ok;
            let error = attempt.error.clone().unwrap_or_default();
            {
                let mut state = self.state.lock();
                state.record(attempt);
                if ok {
                    state.status.consecutive_failures = 0;
                    state.status.failing = false;
                    return;
                }
                failures += 1;
                state.status.consecutive_failures = failures;
            }
            if failures == FAILURES_BEFORE_EVENT {
                self.state.lock().status.failing = true;
                let failed = EngineEvent::HookFailed {
                    hook: self.config.id.clone(),
                    event_seq: event.seq,
                    attempts: failures,
                    error,
                };
                if let Err(error) = self.pool.log_event(failed).await {
                    tracing::warn!(hook = %self.config.id, %error, "cannot log hook.failed");
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }
}

/// How a call ended.
enum Outcome {
    /// HTTP status, or exit code.
    Ok(i32),
    Refused(Option<i32>, String),
    TimedOut,
}

/// One attempt at delivering an event.
async fn deliver(config: &HookConfig, event: &LoggedEvent) -> Attempt {
    let body = serde_json::to_vec(&Event::from(event)).unwrap_or_default();
    let kind = event.event.type_name();
    let started_unix_ms = grove_engine::now_unix_ms();
    let started = Instant::now();
    let delivery = format!("{}:{}", config.id, event.seq);
    let outcome = call(config, kind, &delivery, &body).await;
    let (ok, status, error) = match outcome {
        Outcome::Ok(status) => (true, Some(status), None),
        Outcome::Refused(status, reason) => (false, status, Some(reason)),
        Outcome::TimedOut => (
            false,
            None,
            Some(format!("no answer within {} ms", config.timeout_ms)),
        ),
    };
    Attempt {
        event_seq: event.seq,
        event_type: kind.to_string(),
        started_unix_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        ok,
        status,
        error,
        manual: false,
    }
}

/// Sends `body` to the hook: POSTs it, or runs the program with it on stdin.
async fn call(config: &HookConfig, kind: &str, delivery: &str, body: &[u8]) -> Outcome {
    let timeout = Duration::from_millis(config.timeout_ms);
    if let Some(url) = &config.url {
        let request = ureq::AgentBuilder::new()
            .timeout(timeout)
            .build()
            .post(url)
            .set("Content-Type", "application/json")
            .set("User-Agent", concat!("grove/", env!("CARGO_PKG_VERSION")))
            .set("X-Grove-Event", kind)
            .set("X-Grove-Delivery", delivery);
        let request = match &config.secret {
            Some(secret) => request.set(SIGNATURE_HEADER, &signature(secret, body)),
            None => request,
        };
        let body = body.to_vec();
        let answer = tokio::task::spawn_blocking(move || match request.send_bytes(&body) {
            Ok(response) => Outcome::Ok(i32::from(response.status())),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                Outcome::Refused(Some(i32::from(status)), quote(&text))
            }
            Err(ureq::Error::Transport(transport))
                if transport.kind() == ureq::ErrorKind::Io
                    && transport.to_string().contains("timed out") =>
            {
                Outcome::TimedOut
            }
            Err(ureq::Error::Transport(transport)) => Outcome::Refused(None, transport.to_string()),
        })
        .await;
        return answer
            .unwrap_or_else(|error| Outcome::Refused(None, format!("the call failed: {error}")));
    }
    let Some(exec) = &config.exec else {
        return Outcome::Refused(None, "the hook has neither url nor exec".into());
    };
    let mut command = tokio::process::Command::new(&exec[0]);
    command
        .args(&exec[1..])
        .env("GROVE_EVENT", kind)
        .env("GROVE_DELIVERY", delivery)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return Outcome::Refused(None, format!("cannot run {:?}: {error}", exec[0])),
    };
    let input = child.stdin.take();
    let body = body.to_vec();
    let run = async move {
        if let Some(mut input) = input {
            use tokio::io::AsyncWriteExt;
            // A program that does not read its input is its own business.
            let _ = input.write_all(&body).await;
        }
        child.wait_with_output().await
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Outcome::TimedOut,
        Ok(Err(error)) => Outcome::Refused(None, format!("running {:?} failed: {error}", exec[0])),
        Ok(Ok(output)) if output.status.success() => Outcome::Ok(0),
        Ok(Ok(output)) => Outcome::Refused(
            output.status.code(),
            quote(&String::from_utf8_lossy(&output.stderr)),
        ),
    }
}

/// `sha256=HEX` of the HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn quote(text: &str) -> String {
    let text = text.trim();
    let mut quoted: String = text.chars().take(ANSWER_QUOTE_MAX).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    if quoted.is_empty() {
        quoted.push_str("(no reason given)");
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn filters_match_types_and_globs() {
        let config = HookConfig {
            id: "h".into(),
            url: Some("http://x".into()),
            exec: None,
            events: vec!["commit.created".into(), "pre-commit".into()],
            volume: Some("datasets/*".into()),
            branch: Some("release-*".into()),
            secret: None,
            timeout_ms: 1,
            allow_on_timeout: false,
            created_unix: 0,
            start_after: 0,
        };
        let filter = Filter::new(&config).unwrap();
        assert!(filter.matches("commit.created", Some("datasets/a"), Some("release-1")));
        assert!(!filter.matches("commit.created", Some("datasets/a"), Some("main")));
        assert!(!filter.matches("commit.created", Some("other"), Some("release-1")));
        assert!(!filter.matches("tag.created", Some("datasets/a"), Some("release-1")));
        assert!(!filter.matches("commit.created", Some("datasets/a"), None));
        assert_eq!(filter.event_types(), vec!["commit.created".to_string()]);
    }
}
