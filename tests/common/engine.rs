//! The real `fleetwatch` binary as a child process: started on a free port with its own data
//! directory and log file, watched, signalled and restarted. Tests and benchmarks share it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a starting engine is asked for its health: often, as benchmarks report start times.
const HEALTH_POLL: Duration = Duration::from_millis(5);

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// How to start an engine; [`EngineOptions::start`] starts one.
#[derive(Clone)]
pub struct EngineOptions {
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log_level: String,
    health_timeout: Duration,
    host: String,
    port: Option<u16>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_fleetwatch")),
            args: Vec::new(),
            env: Vec::new(),
            log_level: "info".into(),
            health_timeout: Duration::from_secs(30),
            host: "127.0.0.1".into(),
            port: None,
        }
    }
}

impl EngineOptions {
    /// Another build of the engine instead of this one's.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Arguments after `--data-dir` and `--http-addr`.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Environment variables, set after `RUST_LOG` (so they may override it).
    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        self.env.extend(env);
        self
    }

    /// `RUST_LOG` (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// How long from starting until `/api/health` must answer 200 (default 30 s).
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// The address to listen on (default 127.0.0.1), on a free port; the helpers connect to
    /// 127.0.0.1 whatever it is.
    pub fn host(mut self, host: &str) -> Self {
        self.host = host.into();
        self
    }

    /// The port to listen on (default: a free one), for what must know it before the engine
    /// starts (a proxy in front of it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Starts the engine on `data_dir` (its log beside it, `<data_dir>.log`) and waits until
    /// it is healthy.
    pub async fn start(self, data_dir: &Path) -> Engine {
        let mut engine = self.spawn(data_dir);
        engine.wait_healthy().await;
        engine
    }

    /// Starts the engine on a temporary data directory that lives as long as the engine.
    pub async fn start_temp(self) -> Engine {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut engine = self.start(&temp.path().join("data")).await;
        engine._temp = Some(temp);
        engine
    }

    /// Starts `n` engines, on `dir/node0` …, each healthy and connected to RabbitMQ.
    pub async fn start_nodes(self, dir: &Path, n: usize) -> Vec<Engine> {
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let node = self.clone().start(&dir.join(format!("node{i}"))).await;
            node.wait_broker_connected().await;
            nodes.push(node);
        }
        nodes
    }

    /// Starts the process and returns at once, healthy or not.
    pub fn spawn(self, data_dir: &Path) -> Engine {
        let port = self.port.unwrap_or_else(free_port);
        let addr = format!("{}:{port}", self.host);
        Engine {
            child: spawn(&self, data_dir, &addr),
            base: format!("http://127.0.0.1:{port}"),
            data_dir: data_dir.to_owned(),
            log: data_dir.with_extension("log"),
            healthy_after: Duration::ZERO,
            token: None,
            http: client(),
            spawned: Instant::now(),
            addr,
            options: self,
            _temp: None,
        }
    }
}

pub struct Engine {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// How long the last start took until `/api/health` answered 200.
    pub healthy_after: Duration,
    /// Sent as `Authorization: Bearer` by the helpers, when set (see [`Engine::with_token`]).
    pub token: Option<String>,
    /// The helpers' client; a new one for each process, so no pooled connection outlives it.
    pub(crate) http: reqwest::Client,
    spawned: Instant,
    addr: String,
    options: EngineOptions,
    /// Last: dropped after the process is killed.
    _temp: Option<tempfile::TempDir>,
}

impl Engine {
    pub fn options() -> EngineOptions {
        EngineOptions::default()
    }

    /// Starts the engine with HTTP ingest only.
    pub async fn start(data_dir: &Path) -> Engine {
        Self::start_with(data_dir, &["--amqp-disabled"]).await
    }

    pub async fn start_with(data_dir: &Path, args: &[&str]) -> Engine {
        Self::start_with_env(data_dir, args, &[]).await
    }

    /// Starts the engine with extra environment variables (e.g. `FAILPOINTS`).
    pub async fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Engine {
        Self::options()
            .args(args.iter().copied())
            .envs(env)
            .start(data_dir)
            .await
    }

    /// Waits until `/api/health` answers 200; returns how long that took from the start.
    /// Panics if the process exits or the health timeout passes first.
    pub async fn wait_healthy(&mut self) -> Duration {
        let deadline = self.spawned + self.options.health_timeout;
        loop {
            self.check_running();
            if let Ok(r) = self.http.get(self.url("/api/health")).send().await {
                if r.status().is_success() {
                    self.healthy_after = self.spawned.elapsed();
                    return self.healthy_after;
                }
            }
            assert!(
                Instant::now() < deadline,
                "fleetwatch did not become healthy within {:?}: {}",
                self.options.health_timeout,
                self.log_tail()
            );
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// Panics, with the log's tail, if the process has exited.
    pub fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "fleetwatch exited early with {status}; log: {}",
                self.log_tail()
            );
        }
    }

    /// Waits for the process to exit by itself; panics after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fleetwatch did not exit within {timeout:?}: {}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait")
    }

    /// Starts a fresh process on the same data directory and address (killing the old one if it
    /// still runs); returns how long it took to become healthy.
    pub async fn restart(&mut self) -> Duration {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.options, &self.data_dir, &self.addr);
        self.http = client();
        self.spawned = Instant::now();
        self.wait_healthy().await
    }

    /// SIGSTOP: the process stops where it is, its connections open (benchmarks queue a backlog
    /// behind engines that already own their partitions).
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`Engine::pause`]. The helpers' client starts over: a connection it kept
    /// alive may not have survived the pause.
    pub fn resume(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.http = client();
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the engine");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A numeric field of `/proc/<pid>/status` (e.g. `VmRSS:` in KiB, `Threads:`).
    pub fn proc_status(&self, field: &str) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Resident memory in MiB; 0 when it cannot be read.
    pub fn rss_mib(&self) -> f64 {
        self.proc_status("VmRSS:")
            .map_or(0.0, |kib| kib as f64 / 1024.0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Everything the engine logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 4,000 bytes or so of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let mut start = text.len().saturating_sub(4000);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `FLEETWATCH_TEST_STORE=postgres`, every engine the kit starts keeps its events in
/// PostgreSQL instead of the embedded store: in a database of its own, created on the server at
/// `FLEETWATCH_TEST_POSTGRES_URL` at the first start on `data_dir` and kept for its restarts (its
/// URL is written beside the data directory). The suite runs against either store unchanged.
fn store_args(data_dir: &Path) -> Vec<String> {
    match std::env::var("FLEETWATCH_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => return Vec::new(),
        Ok("postgres") => {}
        Ok(other) => panic!("FLEETWATCH_TEST_STORE={other}: sqlite or postgres"),
    }
    let url_file = data_dir.with_extension("store-url");
    let url = match std::fs::read_to_string(&url_file) {
        Ok(url) => url,
        Err(_) => {
            let server = super::postgres::server_url();
            let name = format!("fleetwatch_test_{}", uuid::Uuid::new_v4().simple());
            let created = Command::new("psql")
                .args([server.as_str(), "-qc", &format!("CREATE DATABASE {name}")])
                .status()
                .expect("psql (FLEETWATCH_TEST_STORE=postgres needs it)");
            assert!(created.success(), "CREATE DATABASE on {server}");
            let (base, _) = server.rsplit_once('/').expect("a database URL");
            let url = format!("{base}/{name}");
            std::fs::write(&url_file, &url).expect("write the store URL");
            url
        }
    };
    vec![
        "--store".into(),
        "postgres".into(),
        "--store-url".into(),
        url,
    ]
}

fn spawn(options: &EngineOptions, data_dir: &Path, addr: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data_dir.with_extension("log"))
        .expect("log file");
    Command::new(&options.binary)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--http-addr", addr])
        .args(store_args(data_dir))
        .args(&options.args)
        .env("RUST_LOG", &options.log_level)
        .envs(options.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", options.binary.display()))
}
