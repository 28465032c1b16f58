//! A small blocking client of the grove HTTP API. API errors become the server's message; an
//! unreachable server says where it looked.

use std::time::Duration;

use anyhow::Context;
use grove_mgmt_api::error::ErrorBody;
use serde::de::DeserializeOwned;

/// How long to wait for the TCP connection to the API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take in all; a commit waits for a flush, so be generous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// A stream silent for this long is taken as dropped.
const STREAM_SILENCE_MAX: Duration = Duration::from_secs(60);
/// Most bytes of a non-JSON error body quoted in a message.
const ERROR_TEXT_LEN_MAX: usize = 300;

/// An error answer of the API, kept whole so that a command can show more than its message
/// (the conflicting ranges of a merge). It displays as the server's message.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub body: ErrorBody,
    /// The body as the server sent it.
    pub text: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.body.error.message)
    }
}

impl std::error::Error for ApiFailure {}

pub struct Client {
    base_url: String,
    agent: ureq::Agent,
    /// For streams: no bound on the whole response, only on silence (the server sends a
    /// keep-alive comment every 15 s).
    stream_agent: ureq::Agent,
    /// Who the changes are logged as made by (`X-Grove-Actor`): `$GROVE_ACTOR`, else `$USER`.
    actor: Option<String>,
}

impl Client {
    pub fn new(api_url: &str) -> anyhow::Result<Client> {
        let base_url = api_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            anyhow::bail!(
                "invalid API URL {api_url:?}: use http://HOST:PORT, such as {}",
                super::API_URL_DEFAULT
            );
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("grove/", env!("CARGO_PKG_VERSION")))
            .build();
        let stream_agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(STREAM_SILENCE_MAX)
            .user_agent(concat!("grove/", env!("CARGO_PKG_VERSION")))
            .build();
        let actor = ["GROVE_ACTOR", "USER"]
            .iter()
            .filter_map(|name| std::env::var(name).ok())
            .find(|value| {
                (1..=128).contains(&value.len())
                    && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            });
        Ok(Client {
            base_url,
            agent,
            stream_agent,
            actor,
        })
    }

    /// GETs a stream (server-sent events) and returns its body as it arrives.
    pub fn stream(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<impl std::io::Read + Send> {
        let mut request = self
            .stream_agent
            .get(&self.url(path))
            .set("Accept", "text/event-stream");
        for (name, value) in query {
            request = request.query(name, value);
        }
        match request.call() {
            Ok(response) => Ok(response.into_reader()),
            Err(error) => Err(self.failure(error)),
        }
    }

    fn with_actor(&self, request: ureq::Request) -> ureq::Request {
        match &self.actor {
            Some(actor) => request.set("X-Grove-Actor", actor),
            None => request,
        }
    }

    /// The API's address.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// GETs `path` (already encoded, starting with '/') and returns the body.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
        let mut request = self.agent.get(&self.url(path));
        for (name, value) in query {
            request = request.query(name, value);
        }
        self.finish(request.call())
    }

    /// POSTs a JSON body to `path` and returns the answer's body.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<String> {
        self.finish(
            self.with_actor(self.agent.post(&self.url(path)))
                .send_json(body),
        )
    }

    /// PUTs a JSON body to `path` and returns the answer's body.
    pub fn put(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<String> {
        self.finish(
            self.with_actor(self.agent.put(&self.url(path)))
                .send_json(body),
        )
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<String> {
        self.finish(self.with_actor(self.agent.delete(&self.url(path))).call())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    fn finish(&self, result: Result<ureq::Response, ureq::Error>) -> anyhow::Result<String> {
        match result {
            Ok(response) => response
                .into_string()
                .context("cannot read the API's answer"),
            Err(error) => Err(self.failure(error)),
        }
    }

    /// An error answer, or no answer, as an error that says what went wrong.
    fn failure(&self, error: ureq::Error) -> anyhow::Error {
        match error {
            ureq::Error::Status(status, response) => {
                let text = response.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => ApiFailure { status, body, text }.into(),
                    Err(_) => {
                        let text: String = text.trim().chars().take(ERROR_TEXT_LEN_MAX).collect();
                        anyhow::anyhow!("the API answered HTTP {status}: {text}")
                    }
                }
            }
            ureq::Error::Transport(transport) => anyhow::anyhow!(
                "cannot reach the grove API at {} ({transport}); is `grove serve` running? \
                 (set --api or GROVE_API to use another address)",
                self.base_url
            ),
        }
    }
}

/// Decodes an API answer into `T`.
pub fn decode<T: DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    serde_json::from_str(text).context("unexpected answer from the API")
}

/// Percent-encodes a name for use as one path segment (so '/' in a branch name becomes %2F).
///
/// `.` and `..` are refused: URL parsers treat them (even percent-encoded) as dot segments and
/// would send the request to the parent resource.
pub fn segment(name: &str) -> anyhow::Result<String> {
    if name == "." || name == ".." {
        anyhow::bail!("the name {name:?} cannot be used: it is a relative path step in URLs");
    }
    let mut encoded = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("main").unwrap(), "main");
        assert_eq!(segment("feature/x-1.2_b").unwrap(), "feature%2Fx-1.2_b");
        assert_eq!(segment("a b@c").unwrap(), "a%20b%40c");
        assert_eq!(segment("...").unwrap(), "...");
        assert!(segment("..").is_err());
        assert!(segment(".").is_err());
    }

    #[test]
    fn api_urls_need_a_scheme() {
        assert!(Client::new("http://127.0.0.1:8470/").is_ok());
        assert!(Client::new("https://grove.example").is_ok());
        assert!(Client::new("127.0.0.1:8470").is_err());
    }

    #[test]
    fn unreachable_api_says_where_it_looked() {
        // A port that was free a moment ago: nothing listens on it now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let client = Client::new(&url).expect("client");
        let error = client.get("/v1/pool", &[]).expect_err("nothing listens");
        assert!(error.to_string().contains(&url), "{error}");
    }
}
