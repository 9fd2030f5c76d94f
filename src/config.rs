//! Settings: every one a command-line flag and a `FLEETWATCH_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the events live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// The embedded store in `--data-dir` (one node).
    Sqlite,
    /// PostgreSQL at `--store-url` (one or several nodes).
    Postgres,
    /// KurrentDB at `--store-url` (builds with the `kurrentdb` feature).
    Kurrentdb,
}

impl StoreKind {
    /// As it is written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::Kurrentdb => "kurrentdb",
        }
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleetwatch",
    version,
    about = "Live state and alarms for a fleet of devices"
)]
pub struct Config {
    /// Address the HTTP API and the map page listen on.
    #[arg(long, env = "FLEETWATCH_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Directory of the embedded event store, and of this node's read models and notification
    /// state whichever store holds the events.
    #[arg(long, env = "FLEETWATCH_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The event store: `sqlite` (embedded, in --data-dir), `postgres` or `kurrentdb` (at
    /// --store-url, shared by every node).
    #[arg(long, env = "FLEETWATCH_STORE", value_enum, default_value_t = StoreKind::Sqlite)]
    pub store: StoreKind,

    /// Where the `postgres` or `kurrentdb` store is, e.g. `postgres://fleetwatch@db/fleetwatch`.
    #[arg(long, env = "FLEETWATCH_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,

    /// A device snapshot is saved every this many events.
    #[arg(long, env = "FLEETWATCH_SNAPSHOT_EVERY", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,

    /// Raw reading events older than this (by reading time) are removed in the background, once a
    /// snapshot of their device covers them; alarm, zone and range events are kept for ever.
    /// `0` keeps everything.
    #[arg(long, env = "FLEETWATCH_READING_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub reading_retention: Duration,

    /// Per-minute temperature rollups (of every device, and of the fleet) older than this
    /// (by the minute's start) are removed in the background. `0` keeps them for ever. A device's
    /// summary takes its last hour from them: less than an hour shortens it.
    #[arg(long, env = "FLEETWATCH_MINUTE_ROLLUP_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    pub minute_rollup_retention: Duration,

    /// Per-hour temperature rollups (which also answer per-day questions) older than this are
    /// removed in the background. `0` (the default) keeps them for ever. A device's summary takes
    /// its last day and today's distance from them: less than a day shortens those.
    #[arg(long, env = "FLEETWATCH_HOUR_ROLLUP_RETENTION", default_value = "0", value_parser = humantime::parse_duration)]
    pub hour_rollup_retention: Duration,

    /// A device actor that handled nothing for this long is stopped (its state stays in the store).
    #[arg(long, env = "FLEETWATCH_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Readings accepted but not yet durable, across all devices; ingest waits beyond this.
    #[arg(long, env = "FLEETWATCH_MAX_IN_FLIGHT", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// Actor threads (arbiters); devices are spread over them by a hash of their id. 0 = one per two cores (at least one).
    #[arg(long, env = "FLEETWATCH_ACTOR_THREADS", default_value_t = 0)]
    pub actor_threads: usize,

    /// A device must move at least this many metres from its last reported location to raise LocationChanged.
    #[arg(long, env = "FLEETWATCH_MIN_MOVE_M", default_value_t = 25.0)]
    pub min_move_m: f64,

    /// The temperature must change at least this many °C to raise TemperatureChanged.
    #[arg(long, env = "FLEETWATCH_MIN_TEMPERATURE_DELTA", default_value_t = 0.5)]
    pub min_temperature_delta: f64,

    /// A device that sends nothing for this long goes offline (`DeviceWentOffline`, and an
    /// `offline` alarm); a device may have its own period (`PUT /api/devices/{id}/offline-after`).
    #[arg(long, env = "FLEETWATCH_OFFLINE_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub offline_after: Duration,

    /// A reading dated further ahead of the engine's clock than this is refused (HTTP 400,
    /// dead-lettered over AMQP): a device clock in the future would otherwise hide every later
    /// real reading of that device.
    #[arg(long, env = "FLEETWATCH_MAX_CLOCK_SKEW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,

    /// How long `POST /api/readings` may wait (for room below --max-in-flight, and for its
    /// readings to become durable) before it answers 503 with Retry-After.
    #[arg(long, env = "FLEETWATCH_HTTP_INGEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_ingest_timeout: Duration,

    /// Largest accepted HTTP request body, in bytes.
    #[arg(long, env = "FLEETWATCH_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long the store waits for more appends before it commits a small batch, when appends
    /// arrive fast enough to fill it (fewer commits and fsyncs at a steady rate, at the cost of up
    /// to that much latency; at a low rate it commits at once). `0` never waits.
    #[arg(long, env = "FLEETWATCH_STORE_LINGER", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub store_linger: Duration,

    /// Most appends and snapshots the store writes in one transaction.
    #[arg(long, env = "FLEETWATCH_STORE_MAX_BATCH", default_value_t = 4096)]
    pub store_max_batch: usize,

    /// Answer every unfiltered `/api/stream` request with GRIP instructions for Pushpin (without
    /// it, only requests that come through Pushpin, which carry `Grip-Sig`, are).
    #[arg(long, env = "FLEETWATCH_GRIP", default_value_t = false)]
    pub grip: bool,

    /// Pushpin's signing key (its `sig_key`): a stream request signed with it (`Grip-Sig`) that
    /// follows a held stream's next link (`Grip-Last`) needs no token, since Pushpin sends the
    /// client's token only with the first request.
    #[arg(long, env = "FLEETWATCH_GRIP_KEY", hide_env_values = true)]
    pub grip_key: Option<String>,

    /// Pushpin's publish endpoint (e.g. `http://127.0.0.1:5561/publish/`): every committed event
    /// is published there for the streams Pushpin holds.
    #[arg(long, env = "FLEETWATCH_GRIP_PUBLISH_URL")]
    pub grip_publish_url: Option<String>,

    /// RabbitMQ connection URL.
    #[arg(
        long,
        env = "FLEETWATCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Do not consume from RabbitMQ (HTTP ingest only).
    #[arg(long, env = "FLEETWATCH_AMQP_DISABLED", default_value_t = false)]
    pub amqp_disabled: bool,

    /// Exchange devices publish readings to (routing key = device id).
    #[arg(
        long,
        env = "FLEETWATCH_AMQP_EXCHANGE",
        default_value = "fleetwatch.readings"
    )]
    pub amqp_exchange: String,

    /// Queue the engine consumes; its dead-letter exchange and queue are named `<queue>.dead`.
    #[arg(
        long,
        env = "FLEETWATCH_AMQP_QUEUE",
        default_value = "fleetwatch.readings"
    )]
    pub amqp_queue: String,

    /// 0: consume the one queue `--amqp-queue`. N: spread devices by a consistent hash of their
    /// id over N partition queues `<queue>.p0` … (each with a single active consumer) and consume
    /// them all: several nodes with the same N share the devices, one owner per device at a time.
    #[arg(long, env = "FLEETWATCH_AMQP_PARTITIONS", default_value_t = 0)]
    pub amqp_partitions: u16,

    /// Unacknowledged deliveries the broker may send ahead (the consumer channel's prefetch;
    /// at least 1: 0 would mean no limit at all). A reading is acknowledged only once durable,
    /// so this bounds what one group commit can gather while draining a backlog: at 1000 the
    /// drain waited on the window (docs/benchmarks.md, 2026-12-01 morning).
    #[arg(long, env = "FLEETWATCH_AMQP_PREFETCH", default_value_t = 10_000, value_parser = clap::value_parser!(u16).range(1..))]
    pub amqp_prefetch: u16,

    /// Largest RabbitMQ message accepted, in bytes; a larger one is dead-lettered unread.
    #[arg(long, env = "FLEETWATCH_AMQP_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub amqp_max_message_bytes: u32,

    /// Worker tasks that parse and submit deliveries; one device always goes to the same one, so
    /// its order is kept. (One consumer on one channel feeds them.)
    #[arg(long, env = "FLEETWATCH_AMQP_CONSUMERS", default_value_t = 2)]
    pub amqp_consumers: usize,

    /// Times a reading that makes the engine fail is retried before it is dead-lettered.
    #[arg(long, env = "FLEETWATCH_AMQP_MAX_RETRIES", default_value_t = 3)]
    pub amqp_max_retries: u32,

    /// Durable topic exchange alarm changes are published to (routing key
    /// `<kind>.<severity>.<device>`), whenever AMQP ingest is enabled.
    #[arg(
        long,
        env = "FLEETWATCH_AMQP_ALARMS_EXCHANGE",
        default_value = "fleetwatch.alarms"
    )]
    pub amqp_alarms_exchange: String,

    /// Longest wait between two attempts at a failing webhook delivery (the cap of its
    /// exponential backoff with full jitter).
    #[arg(long, env = "FLEETWATCH_WEBHOOK_RETRY_MAX", default_value = "5m", value_parser = humantime::parse_duration)]
    pub webhook_retry_max: Duration,

    /// Hosts webhooks may point at (comma-separated names or IP addresses). None: any host.
    #[arg(long, env = "FLEETWATCH_WEBHOOK_HOSTS", value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,

    /// Tile URL template for the map page's base layer (e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png); unset = offline world outline.
    #[arg(long, env = "FLEETWATCH_TILE_URL")]
    pub tile_url: Option<String>,

    /// Log format.
    #[arg(long, env = "FLEETWATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Bearer tokens that may post readings (comma-separated). None: posting readings is open.
    #[arg(long, env = "FLEETWATCH_INGEST_TOKENS", value_delimiter = ',', hide_env_values = true, value_parser = parse_secret)]
    pub ingest_tokens: Vec<Secret>,

    /// Bearer tokens that may change zones and ranges, acknowledge alarms, and read everything
    /// (comma-separated). Any token may be named, `name:secret` (the client sends `secret`):
    /// acknowledgements record the name.
    /// None: configuration is open, which is refused unless --http-addr is a loopback address.
    #[arg(long, env = "FLEETWATCH_ADMIN_TOKENS", value_delimiter = ',', hide_env_values = true, value_parser = parse_secret)]
    pub admin_tokens: Vec<Secret>,

    /// Bearer tokens that may read devices, events, zones, ranges, the live stream and metrics
    /// (comma-separated). None: reading is open.
    #[arg(long, env = "FLEETWATCH_READ_TOKENS", value_delimiter = ',', hide_env_values = true, value_parser = parse_secret)]
    pub read_tokens: Vec<Secret>,

    /// Other origins whose pages may call the API, e.g. https://ops.example.com (comma-separated);
    /// they get CORS headers. Requests from any other origin but the engine's own are refused.
    #[arg(long, env = "FLEETWATCH_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// How long a live-stream ticket (POST /api/stream/tickets) stays valid.
    #[arg(long, env = "FLEETWATCH_STREAM_TICKET_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stream_ticket_ttl: Duration,

    /// Most vertices of a polygon zone (a closing vertex that repeats the first is not counted).
    #[arg(long, env = "FLEETWATCH_MAX_ZONE_VERTICES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(3..))]
    pub max_zone_vertices: u32,

    /// Most zones and temperature ranges defined at once, in total.
    #[arg(long, env = "FLEETWATCH_MAX_RULES", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rules: u32,

    /// Most devices one zone or temperature range may list.
    #[arg(long, env = "FLEETWATCH_MAX_RULE_DEVICES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rule_devices: u32,

    /// Most open live streams (`GET /api/stream`), in total.
    #[arg(long, env = "FLEETWATCH_MAX_SSE_CONNECTIONS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sse_connections: u32,

    /// Most open live streams per client IP address.
    #[arg(long, env = "FLEETWATCH_MAX_SSE_PER_CLIENT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sse_per_client: u32,

    /// How long a live stream may replay stored events before it ends with the position it got to
    /// (the client resumes from there).
    #[arg(long, env = "FLEETWATCH_SSE_CATCH_UP_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sse_catch_up_timeout: Duration,
}

/// A secret setting (a token): its value never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Tokens are trimmed, so `a, b` lists two; an empty entry is kept here and dropped by
/// `http::access`, so an empty variable means "no tokens".
fn parse_secret(raw: &str) -> Result<Secret, String> {
    Ok(Secret(raw.trim().to_owned()))
}

/// The command line: the engine's settings, or a subcommand.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleetwatch",
    version,
    about = "Live state and alarms for a fleet of devices",
    after_help = "Without a subcommand, fleetwatch runs the engine."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Checks an event store offline, read-only: reports every stored event and snapshot this
    /// build cannot read. Exit code 0: clean; 1: damage found; 2: the store could not be opened.
    Verify {
        /// Directory of the event store (default: the engine's --data-dir / FLEETWATCH_DATA_DIR).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

impl Config {
    pub fn actor_threads(&self) -> usize {
        if self.actor_threads == 0 {
            // The AMQP consumer, the store writer and the read models each keep a thread busy
            // beside the actors; an actor thread per core only adds wake-ups between them
            // (20 % more CPU per reading on two cores: docs/benchmarks.md).
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        } else {
            self.actor_threads
        }
    }
}
