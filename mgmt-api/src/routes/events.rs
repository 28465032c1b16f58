//! The event log: `GET /v1/events` pages through it, `GET /v1/events/stream` follows it as
//! server-sent events, resuming after `Last-Event-ID` without gaps or duplicates.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::{Extension, Json};
use futures_util::stream::{self, Stream};
use grove_engine::{EventQuery, LoggedEvent, Pool, EVENT_TYPES};
use tokio::sync::broadcast;

use super::blocking;
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiQuery;
use crate::model::{Event, EventPage, EventsQuery};
use crate::validate;
use crate::Stopping;

/// Events returned by one `GET /v1/events` by default, and at most.
const EVENTS_LIMIT_DEFAULT: usize = 1000;
const EVENTS_LIMIT_MAX: usize = 10_000;
/// Events the stream reads from the log at a time while catching up.
const STREAM_BATCH: usize = 500;

fn engine_query(query: EventsQuery, stream: bool) -> Result<EventQuery, ApiError> {
    let types: Vec<String> = query
        .types
        .as_deref()
        .map(|types| {
            types
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if let Some(unknown) = types.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
        return Err(ApiError::invalid_argument(format!(
            "unknown event type {unknown:?}; known types: {}",
            EVENT_TYPES.join(", ")
        )));
    }
    if let Some(volume) = &query.volume {
        validate::volume_name(volume)?;
    }
    let limit = match (query.limit, stream) {
        (Some(_), true) => {
            return Err(ApiError::invalid_argument(
                "limit does not apply to the stream",
            ))
        }
        (None, true) => STREAM_BATCH,
        (None, false) => EVENTS_LIMIT_DEFAULT,
        (Some(limit), false) if (1..=EVENTS_LIMIT_MAX).contains(&limit) => limit,
        (Some(limit), false) => {
            return Err(ApiError::invalid_argument(format!(
                "invalid limit {limit}: use 1-{EVENTS_LIMIT_MAX}"
            )))
        }
    };
    Ok(EventQuery {
        since: query.since.unwrap_or(0),
        types,
        volume: query.volume,
        limit,
    })
}

/// Page through the event log, oldest first.
///
/// Every state change appends an event in the same journal record as the change itself: an
/// event exists exactly when its change does, across crashes too. Ask again with
/// `since=next_since` for the next page.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventPage),
        (status = 400, description = "Invalid query", body = ErrorBody),
    )
)]
pub async fn list_events(
    State(pool): State<Pool>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let query = engine_query(query, false)?;
    let page = blocking(pool, move |pool| Ok(pool.events(&query)?)).await?;
    Ok(Json(EventPage {
        events: page.events.iter().map(Event::from).collect(),
        next_since: page.next_since,
        first_seq: page.first_seq,
        last_seq: page.last_seq,
    }))
}

/// Follow the event log as server-sent events.
///
/// Each event is sent with `id:` its sequence number, `event:` its type and `data:` its JSON
/// (as in `GET /v1/events`). A client that reconnects with `Last-Event-ID` (or `since`) gets
/// every event after it, in order, then new ones as they happen: no gap, no duplicate.
/// Without either, the stream starts with the next event. Comments keep idle connections
/// alive.
#[utoipa::path(
    get,
    path = "/v1/events/stream",
    tag = "events",
    params(
        EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "A text/event-stream of events", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid query, or a Last-Event-ID or since past the newest event", body = ErrorBody),
    )
)]
pub async fn stream_events(
    State(pool): State<Pool>,
    Extension(Stopping {
        receiver: stopping, ..
    }): Extension<Stopping>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let resume = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_argument("Last-Event-ID must be an event sequence number")
                })?,
        ),
        None => None,
    };
    let explicit = resume.or(query.since);
    let last = pool.last_event_seq();
    if let Some(after) = explicit.filter(|&after| after > last) {
        return Err(ApiError::invalid_argument(format!(
            "event {after} does not exist yet: the newest is {last}"
        )));
    }
    let mut query = engine_query(query, true)?;
    // Subscribed before the log is read: nothing logged in between is missed.
    let live = pool.subscribe();
    query.since = explicit.unwrap_or_else(|| pool.last_event_seq());
    let follower = Follower {
        pool,
        stopping,
        live,
        query,
        backlog: VecDeque::new(),
        caught_up: false,
    };
    let events = stream::unfold(follower, |mut follower| async move {
        let event = follower.next().await?;
        let sse = SseEvent::default()
            .id(event.seq.to_string())
            .event(event.event.type_name())
            .json_data(Event::from(&*event))
            .unwrap_or_else(|_| SseEvent::default().comment("an event could not be encoded"));
        Some((Ok(sse), follower))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Reads the log from `query.since` on, then the live events, switching back to the log
/// whenever the live feed skips (the subscriber lagged).
struct Follower {
    pool: Pool,
    stopping: tokio::sync::watch::Receiver<bool>,
    live: broadcast::Receiver<Arc<LoggedEvent>>,
    /// `since`: every event up to it was sent or filtered out.
    query: EventQuery,
    backlog: VecDeque<LoggedEvent>,
    /// The log had nothing after `since` when last read.
    caught_up: bool,
}

impl Follower {
    async fn next(&mut self) -> Option<Arc<LoggedEvent>> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                return Some(Arc::new(event));
            }
            if !self.caught_up {
                let query = self.query.clone();
                let page = blocking(self.pool.clone(), move |pool| Ok(pool.events(&query)?))
                    .await
                    .ok()?;
                self.caught_up = page.next_since == self.query.since;
                self.query.since = page.next_since;
                self.backlog.extend(page.events);
                continue;
            }
            let received = tokio::select! {
                received = self.live.recv() => received,
                // The server stops: the stream ends (the client resumes elsewhere or later).
                _ = self.stopping.wait_for(|stopping| *stopping) => return None,
            };
            match received {
                Ok(event) if event.seq <= self.query.since => continue,
                Ok(event) if event.seq == self.query.since + 1 => {
                    self.query.since = event.seq;
                    if self.wanted(&event) {
                        return Some(event);
                    }
                }
                // A gap: read what was missed from the log.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn wanted(&self, event: &LoggedEvent) -> bool {
        (self.query.types.is_empty()
            || self
                .query
                .types
                .iter()
                .any(|t| t == event.event.type_name()))
            && self
                .query
                .volume
                .as_deref()
                .is_none_or(|v| event.event.volume() == Some(v))
    }
}
