//! Shared machinery for the end-to-end tests: start a real `grove serve` on a private data
//! directory and private ports, drive it with its own CLI and HTTP API, and check data only
//! through independent NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) or the raw
//! protocol client in `nbd.rs`.
//!
//! Every process started here is owned by the test that started it and is killed by its PID
//! when the owning value is dropped, so a failing test never leaves a server behind.

#![allow(dead_code)]

pub mod nbd;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * 1024 * 1024;

/// How long a single client tool may run before the test calls it hung.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a freshly started server may take to answer `/healthz`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a start is retried when the server exits early (a port picked as free may
/// have been taken by a parallel test in between).
const START_ATTEMPTS_MAX: u32 = 3;

pub fn grove_bin() -> &'static str {
    env!("CARGO_BIN_EXE_grove")
}

/// Fails the test with an actionable message when an external client tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; install the Debian package `{package}` (scripts/test.sh does this when run as root)"
    );
}

pub fn require_nbd_tools() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    require_tool("nbdcopy", "libnbd-bin");
}

/// A port that was free a moment ago. There is a small window in which another process may
/// take it; `Grove::spawn` retries with new ports when the server fails to start.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The captured result of one external command.
pub struct CmdOut {
    pub description: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOut {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn report(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.description, self.status, self.stdout, self.stderr
        )
    }

    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed\n{}", self.report());
        self
    }

    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.success(),
            "command succeeded but should have failed\n{}",
            self.report()
        );
        self
    }
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        let arg = arg.to_string_lossy();
        if arg.contains(' ') || arg.is_empty() {
            text.push_str(&format!("'{arg}'"));
        } else {
            text.push_str(&arg);
        }
    }
    text
}

/// Runs a command with no stdin, capturing its output, and kills it (by its PID) if it runs
/// longer than `timeout`.
pub fn run(command: &mut Command, timeout: Duration) -> CmdOut {
    let description = describe(command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start `{description}`: {error}"));
    let mut stdout_pipe = child.stdout.take().expect("stdout is piped");
    let mut stderr_pipe = child.stderr.take().expect("stderr is piped");
    let stdout_reader = thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut buffer);
        buffer
    });
    let stderr_reader = thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut buffer);
        buffer
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = stdout_reader.join().unwrap_or_default();
            let stderr = stderr_reader.join().unwrap_or_default();
            panic!(
                "`{description}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout_reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    CmdOut {
        description,
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Sends SIGTERM to one process we started, through the shell's `kill` builtin.
fn send_sigterm(pid: u32) {
    let out = run(
        Command::new("sh")
            .arg("-c")
            .arg("kill -TERM \"$1\"")
            .arg("sh")
            .arg(pid.to_string()),
        Duration::from_secs(10),
    );
    out.assert_success();
}

static SERVE_HELP: OnceLock<String> = OnceLock::new();

/// The text of `grove serve --help`, used to pass optional listener flags only when the
/// binary knows them (so that parallel tests never fight over a default port).
pub fn serve_help() -> &'static str {
    SERVE_HELP.get_or_init(|| {
        let out = run(
            Command::new(grove_bin()).args(["serve", "--help"]),
            Duration::from_secs(30),
        );
        out.combined()
    })
}

/// How a server is told where its data and listeners are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `--data-dir`, `--nbd-listen`, `--nbd-socket`, `--api-listen` flags.
    Flags,
    /// Everything in a TOML file passed with `--config` (keys are the flag names).
    ConfigFile,
    /// A TOML file whose `api-listen` is overridden by the `--api-listen` flag.
    ConfigFileOverriddenByFlag,
    /// The data directory from `$GROVE_DATA_DIR`, listeners from flags.
    EnvDataDir,
    /// No data directory given: grove uses `./grove-data`.
    DefaultDataDir,
}

/// One `grove serve` process on a private data directory, with its API on a free TCP port and
/// its NBD server on both a free TCP port and a Unix socket.
pub struct Grove {
    root: TempDir,
    pub data_dir: PathBuf,
    child: Option<Child>,
    pub api_port: u16,
    pub nbd_port: u16,
    /// The iSCSI port of the current process.
    pub iscsi_port: u16,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    generation: u32,
    launch: Launch,
    extra_args: Vec<String>,
}

impl Grove {
    /// Starts a server on a new, empty data directory (which grove must create itself).
    pub fn start() -> Grove {
        Grove::start_with(Launch::Flags, &[])
    }

    /// Starts a server configured the way `launch` says, with extra `grove serve` arguments.
    pub fn start_with(launch: Launch, extra_args: &[&str]) -> Grove {
        let root = tempfile::Builder::new()
            .prefix("grove-e2e-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = match launch {
            Launch::DefaultDataDir => root.path().join("grove-data"),
            _ => root.path().join("data"),
        };
        let mut grove = Grove {
            data_dir,
            child: None,
            api_port: 0,
            nbd_port: 0,
            iscsi_port: 0,
            socket: PathBuf::new(),
            log_path: PathBuf::new(),
            generation: 0,
            launch,
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
            root,
        };
        grove.spawn();
        grove
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn write_config(&self, api_port: u16, iscsi_port: Option<u16>) -> PathBuf {
        let path = self
            .root
            .path()
            .join(format!("grove-{}.toml", self.generation));
        let mut text = format!(
            "data-dir = \"{}\"\nnbd-listen = \"127.0.0.1:{}\"\nnbd-socket = \"{}\"\napi-listen = \"127.0.0.1:{}\"\n",
            self.data_dir.display(),
            self.nbd_port,
            self.socket.display(),
            api_port
        );
        if let Some(port) = iscsi_port {
            text.push_str(&format!("iscsi-listen = \"127.0.0.1:{port}\"\n"));
        }
        std::fs::write(&path, text).expect("write config file");
        path
    }

    /// Starts (or restarts) the server process on the same data directory with new ports, a
    /// new socket path and a new log file.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server is already running");
        for attempt in 1..=START_ATTEMPTS_MAX {
            self.generation += 1;
            self.api_port = free_port();
            self.nbd_port = free_port();
            self.socket = self
                .root
                .path()
                .join(format!("nbd-{}.sock", self.generation));
            self.log_path = self
                .root
                .path()
                .join(format!("grove-{}.log", self.generation));
            let iscsi_port = serve_help().contains("--iscsi-listen").then(free_port);
            self.iscsi_port = iscsi_port.unwrap_or(0);
            let log = File::create(&self.log_path).expect("create log file");
            let mut command = Command::new(grove_bin());
            command.arg("serve");
            let listen_flags = |command: &mut Command, grove: &Grove| {
                command
                    .arg("--api-listen")
                    .arg(format!("127.0.0.1:{}", grove.api_port))
                    .arg("--nbd-listen")
                    .arg(format!("127.0.0.1:{}", grove.nbd_port))
                    .arg("--nbd-socket")
                    .arg(&grove.socket);
                if let Some(port) = iscsi_port {
                    command
                        .arg("--iscsi-listen")
                        .arg(format!("127.0.0.1:{port}"));
                }
            };
            match self.launch {
                Launch::Flags => {
                    command.arg("--data-dir").arg(&self.data_dir);
                    listen_flags(&mut command, self);
                }
                Launch::ConfigFile => {
                    let config = self.write_config(self.api_port, iscsi_port);
                    command.arg("--config").arg(config);
                }
                Launch::ConfigFileOverriddenByFlag => {
                    let config = self.write_config(free_port(), iscsi_port);
                    command
                        .arg("--config")
                        .arg(config)
                        .arg("--api-listen")
                        .arg(format!("127.0.0.1:{}", self.api_port));
                }
                Launch::EnvDataDir => {
                    command.env("GROVE_DATA_DIR", &self.data_dir);
                    listen_flags(&mut command, self);
                }
                Launch::DefaultDataDir => listen_flags(&mut command, self),
            }
            if self.launch != Launch::EnvDataDir {
                command.env_remove("GROVE_DATA_DIR");
            }
            command
                .args(&self.extra_args)
                .current_dir(self.root.path())
                .env_remove("GROVE_API")
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("info".into()),
                )
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
                .stderr(Stdio::from(log));
            let child = command.spawn().expect("start grove serve");
            self.child = Some(child);
            match self.wait_ready() {
                Ok(()) => return,
                Err(reason) => {
                    self.kill9();
                    if attempt == START_ATTEMPTS_MAX {
                        panic!(
                            "grove serve did not become ready: {reason}\n--- server log ---\n{}",
                            self.log_text()
                        );
                    }
                }
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let mut healthy = false;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("child is running")
                .try_wait()
                .expect("try_wait")
            {
                return Err(format!("server exited during start-up with {status}"));
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                return Err(format!(
                    "not ready after {STARTUP_TIMEOUT:?} (healthz answered: {healthy})"
                ));
            }
            if !healthy {
                healthy = agent.get(&format!("{}/healthz", self.api())).call().is_ok();
            }
            if healthy
                && self.socket.exists()
                && TcpStream::connect(("127.0.0.1", self.nbd_port)).is_ok()
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Asserts that the server process is still running (it has not crashed).
    pub fn assert_alive(&mut self) {
        let status = self
            .child
            .as_mut()
            .expect("server should be running")
            .try_wait()
            .expect("try_wait");
        assert!(
            status.is_none(),
            "grove serve exited unexpectedly with {:?}\n--- server log ---\n{}",
            status,
            self.log_text()
        );
    }

    /// Graceful stop: SIGTERM, then wait for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        send_sigterm(child.id());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if started.elapsed() > SHUTDOWN_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "grove serve did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n--- server log ---\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Crash stop: SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The server's log for the current run, without terminal colour codes.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    /// The URI for listing exports over TCP (no export name).
    pub fn tcp_server_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.nbd_port)
    }

    /// Runs `grove --api URL ARGS...`.
    pub fn cli(&self, args: &[&str]) -> CmdOut {
        let mut command = Command::new(grove_bin());
        command
            .arg("--api")
            .arg(self.api())
            .args(args)
            .env_remove("GROVE_API")
            .current_dir(self.root.path());
        run(&mut command, TOOL_TIMEOUT)
    }

    /// Runs a CLI command that must succeed and returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        out.assert_success();
        out.stdout
    }

    /// Runs a CLI command with `--json` that must succeed and print one JSON document.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        out.assert_success();
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|error| panic!("--json output is not JSON ({error})\n{}", out.report()))
    }

    /// Runs a CLI command that must fail: non-zero exit, a message on stderr, no panic.
    pub fn cli_err(&self, args: &[&str]) -> CmdOut {
        let out = self.cli(args);
        out.assert_failure();
        assert!(
            !out.stderr.trim().is_empty(),
            "a failing command must explain itself on stderr\n{}",
            out.report()
        );
        assert!(
            !out.combined().contains("panicked"),
            "the CLI panicked instead of reporting an error\n{}",
            out.report()
        );
        out
    }

    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    /// `grove commit REF -m MSG`: prints the new commit id, and only that.
    pub fn commit(&self, reference: &str, message: &str) -> String {
        let out = self.cli(&["commit", reference, "-m", message]);
        out.assert_success();
        let id = out.stdout.trim().to_string();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "`grove commit` should print the commit id alone\n{}",
            out.report()
        );
        id
    }

    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> HttpReply {
        http(method, &format!("{}{path}", self.api()), body)
    }

    /// Waits until the server has closed every session (a client tool that exited may still
    /// be disconnecting), so that operations refused while sessions are open can run.
    pub fn wait_no_sessions(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.http("GET", "/v1/sessions", None);
            assert_eq!(reply.status, 200, "GET /v1/sessions: {reply:?}");
            if reply.json().as_array().is_some_and(|s| s.is_empty()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sessions still open after 30 s: {}",
                reply.body
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the server has closed the session of the client at `address`. A client
    /// that hangs up with requests in flight does not wait for the server to finish them; a
    /// test that then writes the same blocks over another connection must wait for this.
    pub fn wait_session_closed(&self, address: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.http("GET", "/v1/sessions", None);
            assert_eq!(reply.status, 200, "GET /v1/sessions: {reply:?}");
            let open = reply.json().as_array().is_some_and(|sessions| {
                sessions
                    .iter()
                    .any(|session| session["client"]["address"] == address)
            });
            if !open {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the session of {address} is still open 30 s after its client hung up"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn assert_healthy(&mut self) {
        self.assert_alive();
        let reply = self.http("GET", "/healthz", None);
        assert_eq!(reply.status, 200, "/healthz should answer 200: {reply:?}");
    }
}

impl Drop for Grove {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- last {} lines of the grove log {} ---\n{}",
                tail.len(),
                self.log_path.display(),
                tail.join("\n")
            );
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(character) = chars.next() {
        if character == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(character);
        }
    }
    out
}

#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {self:?}"))
    }

    /// Asserts the status and the documented error shape `{"error":{"code","message"}}`.
    pub fn assert_error(&self, allowed_statuses: &[u16], context: &str) {
        assert!(
            allowed_statuses.contains(&self.status),
            "{context}: expected status in {allowed_statuses:?}, got {self:?}"
        );
        let body: Value = serde_json::from_str(&self.body).unwrap_or_else(|error| {
            panic!("{context}: error body is not JSON ({error}): {self:?}")
        });
        let code = body["error"]["code"].as_str().unwrap_or_default();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && !message.is_empty(),
            "{context}: error body must be {{\"error\":{{\"code\":..,\"message\":..}}}}, got {self:?}"
        );
    }
}

pub fn http(method: &str, url: &str, body: Option<&str>) -> HttpReply {
    http_with_headers(method, url, body, &[])
}

/// `http` with extra request headers.
pub fn http_with_headers(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> HttpReply {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut request = agent.request(method, url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = match body {
        Some(body) => request
            .set("Content-Type", "application/json")
            .send_string(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("{method} {url}: transport error: {error}"),
    };
    let status = response.status();
    let content_type = response.header("Content-Type").unwrap_or("").to_string();
    let body = response.into_string().unwrap_or_default();
    HttpReply {
        status,
        content_type,
        body,
    }
}

/// True when `value` contains, anywhere, a string equal to `needle`.
pub fn json_has_str(value: &Value, needle: &str) -> bool {
    match value {
        Value::String(text) => text == needle,
        Value::Array(items) => items.iter().any(|item| json_has_str(item, needle)),
        Value::Object(map) => map.values().any(|item| json_has_str(item, needle)),
        _ => false,
    }
}

/// True when `value` contains, anywhere, the number `needle`.
pub fn json_has_u64(value: &Value, needle: u64) -> bool {
    match value {
        Value::Number(number) => number.as_u64() == Some(needle),
        Value::Array(items) => items.iter().any(|item| json_has_u64(item, needle)),
        Value::Object(map) => map.values().any(|item| json_has_u64(item, needle)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// qemu-io

/// Runs qemu-io on a raw NBD URI with the given `-c` commands.
pub fn qemu_io(uri: &str, commands: &[String], read_only: bool) -> CmdOut {
    let mut command = Command::new("qemu-io");
    command.arg("-f").arg("raw");
    if read_only {
        command.arg("-r");
    }
    for item in commands {
        command.arg("-c").arg(item);
    }
    command.arg(uri);
    run(&mut command, TOOL_TIMEOUT)
}

/// Writes through qemu-io; every command must succeed. `commands` are qemu-io commands such
/// as `write -P 0xaa 0 1M`, `write -z 4k 4k`, `discard 0 64k`, `flush`.
pub fn qio_write(uri: &str, commands: &[&str]) {
    let commands: Vec<String> = commands.iter().map(|item| item.to_string()).collect();
    let out = qemu_io(uri, &commands, false);
    let text = out.combined();
    assert!(
        out.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io write on {uri} failed\n{}",
        out.report()
    );
}

/// Writes `pattern` over `[offset, offset+length)` with qemu-io.
pub fn write_pattern(uri: &str, pattern: u8, offset: u64, length: u64) {
    qio_write(
        uri,
        &[&format!("write -P 0x{pattern:02x} {offset} {length}")],
    );
}

/// Reads every `(pattern, offset, length)` range read-only with qemu-io and checks its bytes.
pub fn assert_patterns(uri: &str, ranges: &[(u8, u64, u64)]) {
    let commands: Vec<String> = ranges
        .iter()
        .map(|(pattern, offset, length)| format!("read -P 0x{pattern:02x} {offset} {length}"))
        .collect();
    let out = qemu_io(uri, &commands, true);
    let text = out.combined();
    let reads_done = text
        .lines()
        .filter(|line| line.starts_with("read "))
        .count();
    assert!(
        out.success() && !text.contains("verification failed") && reads_done == ranges.len(),
        "data check on {uri} failed (expected ranges {ranges:?})\n{}",
        out.report()
    );
}

pub fn assert_pattern(uri: &str, pattern: u8, offset: u64, length: u64) {
    assert_patterns(uri, &[(pattern, offset, length)]);
}

// ---------------------------------------------------------------------------------------------
// nbdinfo

pub fn nbdinfo_size(uri: &str) -> u64 {
    let out = run(Command::new("nbdinfo").arg("--size").arg(uri), TOOL_TIMEOUT);
    out.assert_success();
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("nbdinfo --size printed no number\n{}", out.report()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// `base:allocation` flags: bit 0 hole, bit 1 reads as zero.
    pub kind: u64,
}

impl Extent {
    pub fn is_hole(&self) -> bool {
        self.kind & 1 != 0
    }
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

pub fn nbdinfo_map(uri: &str) -> Vec<Extent> {
    let out = run(
        Command::new("nbdinfo").args(["--map", "--json"]).arg(uri),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    let value: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|error| panic!("nbdinfo --map --json: {error}\n{}", out.report()));
    value
        .as_array()
        .expect("nbdinfo --map --json prints an array")
        .iter()
        .map(|entry| Extent {
            offset: entry["offset"].as_u64().expect("offset"),
            length: entry["length"].as_u64().expect("length"),
            kind: entry["type"].as_u64().expect("type"),
        })
        .collect()
}

/// The extents overlapping `[offset, offset+length)`, after checking that the map is
/// contiguous.
pub fn extents_in(map: &[Extent], offset: u64, length: u64) -> Vec<Extent> {
    for pair in map.windows(2) {
        assert_eq!(
            pair[0].end(),
            pair[1].offset,
            "nbdinfo map is not contiguous: {map:?}"
        );
    }
    map.iter()
        .filter(|extent| extent.offset < offset + length && extent.end() > offset)
        .copied()
        .collect()
}

pub fn nbdinfo_list(server_uri: &str) -> Value {
    let out = run(
        Command::new("nbdinfo")
            .args(["--list", "--json"])
            .arg(server_uri),
        TOOL_TIMEOUT,
    );
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|error| panic!("nbdinfo --list --json: {error}\n{}", out.report()))
}

// ---------------------------------------------------------------------------------------------
// Data

/// Deterministic pseudo-random bytes (xorshift64*), so failures are reproducible.
pub fn pseudo_random_bytes(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(length + 8);
    while bytes.len() < length {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.truncate(length);
    bytes
}

/// Asserts two byte buffers are equal, naming the first differing offset.
pub fn assert_same_bytes(expected: &[u8], actual: &[u8], context: &str) {
    assert_eq!(
        expected.len(),
        actual.len(),
        "{context}: length differs (expected {}, got {})",
        expected.len(),
        actual.len()
    );
    if let Some(offset) = expected
        .iter()
        .zip(actual.iter())
        .position(|(left, right)| left != right)
    {
        panic!(
            "{context}: first difference at byte offset {offset} (expected 0x{:02x}, got 0x{:02x})",
            expected[offset], actual[offset]
        );
    }
}

/// A small deterministic random generator (xorshift64*) for reproducible workloads.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Copies a whole export into a file with nbdcopy and returns its bytes.
pub fn nbdcopy_out(uri: &str, path: &Path) -> Vec<u8> {
    let out = run(Command::new("nbdcopy").arg(uri).arg(path), TOOL_TIMEOUT);
    out.assert_success();
    let bytes = std::fs::read(path).expect("read nbdcopy output");
    let _ = std::fs::remove_file(path);
    bytes
}

/// Fails unless `promtool check metrics` accepts the scrape `text`.
pub fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample `name{labels}` in a Prometheus scrape (labels in any order, others
/// ignored), if present.
pub fn metric_sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let wanted = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        wanted.then(|| value.parse().ok()).flatten()
    })
}
