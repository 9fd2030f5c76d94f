//! Startup: builds the engine and its adapters from the [`Config`] and runs them until a shutdown
//! signal (SIGINT/SIGTERM), then shuts down in order: stop taking readings, let every accepted
//! one become durable, stop the actors, close the store.

use std::sync::Arc;

use actix_web::{middleware, web, App, HttpServer};
use fleetwatch_domain::Thresholds;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::actors::ActorSettings;
use crate::config::{Config, StoreKind};
use crate::engine::{Engine, EngineSettings};
use crate::http::access::{Access, AccessError};
use crate::http::StreamLimits;
use crate::http::{self, AppState};
use crate::ingest::amqp::{BrokerState, BrokerStatus};
use crate::ingest::failed::FailedMessages;
use crate::rules::RulesError;
use crate::store::{
    EventStore, PostgresStore, PostgresStoreOptions, SqliteStore, SqliteStoreOptions, StoreError,
};

/// How long shutdown waits for each ingest path (HTTP requests, the RabbitMQ consumer) to finish
/// the readings it holds; the engine's own drain has the same bound.
const INGEST_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("opening the event store: {0}")]
    Store(#[from] StoreError),
    #[error("loading zones and ranges: {0}")]
    Rules(#[from] RulesError),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("opening the read models: {0}")]
    ReadModels(#[from] crate::projections::ReadModelError),
    #[error("opening the notifications: {0}")]
    Notify(#[from] crate::notify::NotifyError),
    #[error("access settings: {0}")]
    Access(#[from] AccessError),
    #[error("refusing to listen on {0} without admin tokens: anyone who can reach it could change the zones and ranges. Set FLEETWATCH_ADMIN_TOKENS (--admin-tokens), or bind a loopback address such as 127.0.0.1:8080")]
    Unprotected(std::net::SocketAddr),
}

/// SIGTERM and SIGINT (Ctrl-C), taken over from their default of killing the process.
struct ShutdownSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl ShutdownSignals {
    fn register() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next one; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = self.terminate.recv() => "SIGTERM",
            Some(()) = self.interrupt.recv() => "SIGINT",
            else => std::future::pending().await,
        }
    }
}

/// Off the loopback interface, changing the configuration must need a token; open reads and
/// ingest there are allowed (a documented choice) but logged.
fn check_exposure(config: &Config, access: &Access) -> Result<(), StartupError> {
    if config.http_addr.ip().is_loopback() {
        return Ok(());
    }
    let required = access.required();
    if !required.admin {
        return Err(StartupError::Unprotected(config.http_addr));
    }
    if !required.read || !required.ingest {
        tracing::warn!(
            addr = %config.http_addr,
            read_open = !required.read,
            ingest_open = !required.ingest,
            "listening beyond loopback with some scopes open to anyone (no FLEETWATCH_READ_TOKENS / FLEETWATCH_INGEST_TOKENS)"
        );
    }
    Ok(())
}

/// The event store `--store` names.
async fn open_store(config: &Config) -> Result<Arc<dyn EventStore>, StartupError> {
    let url = || {
        config.store_url.clone().ok_or_else(|| {
            StartupError::Config(format!(
                "--store {} needs --store-url (FLEETWATCH_STORE_URL)",
                config.store.name()
            ))
        })
    };
    Ok(match config.store {
        StoreKind::Sqlite => Arc::new(SqliteStore::open(
            &config.data_dir,
            SqliteStoreOptions {
                max_batch: config.store_max_batch,
                linger: config.store_linger,
                queue_capacity: config.max_in_flight as usize * 2 + 1024,
                ..SqliteStoreOptions::default()
            },
        )?),
        StoreKind::Postgres => Arc::new(
            PostgresStore::open(
                &url()?,
                PostgresStoreOptions {
                    max_batch: config.store_max_batch,
                    linger: config.store_linger,
                    ..PostgresStoreOptions::default()
                },
            )
            .await?,
        ),
        #[cfg(feature = "kurrentdb")]
        StoreKind::Kurrentdb => Arc::new(
            crate::store::KurrentDbStore::open(
                &url()?,
                &config.data_dir,
                crate::store::KurrentDbStoreOptions {
                    replica: SqliteStoreOptions {
                        max_batch: config.store_max_batch,
                        linger: config.store_linger,
                        queue_capacity: config.max_in_flight as usize * 2 + 1024,
                        ..SqliteStoreOptions::default()
                    },
                    ..crate::store::KurrentDbStoreOptions::default()
                },
            )
            .await?,
        ),
        #[cfg(not(feature = "kurrentdb"))]
        StoreKind::Kurrentdb => {
            return Err(StartupError::Config(
                "--store kurrentdb: this binary was built without the KurrentDB store; build it with `cargo build --release --features kurrentdb`".into(),
            ))
        }
    })
}

/// Runs fleetwatch until it is told to stop.
pub async fn run(config: Config) -> Result<(), StartupError> {
    let access = Arc::new(Access::from_config(&config)?);
    check_exposure(&config, &access)?;
    let metrics = crate::telemetry::init_metrics();
    if let Some(handle) = &metrics {
        crate::telemetry::spawn_upkeep(handle.clone());
    }
    let thresholds = Thresholds::new(config.min_move_m, config.min_temperature_delta)
        .map_err(|e| StartupError::Config(e.to_string()))?
        .with_offline_after(config.offline_after.as_secs())
        .map_err(|e| StartupError::Config(format!("--offline-after: {e}")))?;
    let store = open_store(&config).await?;
    let engine = Engine::start(
        store.clone(),
        EngineSettings {
            actor_threads: config.actor_threads(),
            max_in_flight: config.max_in_flight,
            thresholds,
            actors: ActorSettings {
                snapshot_every: config.snapshot_every,
                idle_timeout: config.idle_timeout,
            },
            max_rules: config.max_rules as usize,
        },
    )
    .await?;

    let shutdown = CancellationToken::new();
    let deadlines = engine.spawn_deadlines(shutdown.clone());
    // Only a shared store has rule changes this node did not make itself.
    if config.store != StoreKind::Sqlite {
        engine.rules().spawn_follower(shutdown.clone());
    }
    let broker = BrokerStatus::new(BrokerState::Disabled);
    let failed = FailedMessages::new(1000);
    let (read_models, read_models_thread) = crate::projections::start(
        engine.store().clone(),
        &config.data_dir,
        crate::projections::RollupRetention {
            minute: config.minute_rollup_retention,
            hour: config.hour_rollup_retention,
        },
        shutdown.clone(),
    )?;
    let (notifier, notify_thread) = crate::notify::start(
        engine.store().clone(),
        &config.data_dir,
        crate::notify::NotifySettings::from_config(&config),
        shutdown.clone(),
    )
    .await?;
    let consumer = if config.amqp_disabled {
        None
    } else {
        Some(crate::ingest::amqp::spawn(
            crate::ingest::amqp::AmqpSettings::from_config(&config),
            engine.clone(),
            broker.clone(),
            failed.clone(),
            shutdown.clone(),
        )?)
    };

    let state = AppState {
        engine: engine.clone(),
        max_body_bytes: config.max_body_bytes,
        max_clock_skew: config.max_clock_skew,
        http_ingest_timeout: config.http_ingest_timeout,
        tile_url: config.tile_url.clone(),
        broker,
        failed,
        read_models,
        notifier,
        metrics,
        rule_limits: http::RuleLimits {
            max_zone_vertices: config.max_zone_vertices as usize,
            max_rule_devices: config.max_rule_devices as usize,
        },
        streams: StreamLimits::new(
            config.max_sse_connections as usize,
            config.max_sse_per_client as usize,
            config.sse_catch_up_timeout,
        ),
        shutdown: shutdown.clone(),
        access,
        grip: config.grip,
    };
    if let Some(url) = &config.grip_publish_url {
        http::grip::spawn_publisher(state.engine.store().clone(), url.clone(), shutdown.clone());
    }
    let retention = crate::retention::spawn(
        state.engine.store().clone(),
        config.reading_retention,
        shutdown.clone(),
    );
    let mut signals = ShutdownSignals::register()?;
    let server = HttpServer::new(move || {
        // The last `wrap` runs first: time the request, log, refuse foreign origins, CORS, then
        // tokens and types.
        App::new()
            .app_data(web::Data::new(state.clone()))
            .wrap(middleware::from_fn(http::access::authorize))
            .wrap(state.access.cors())
            .wrap(middleware::from_fn(http::access::check_origin))
            .wrap(tracing_actix_web::TracingLogger::default())
            .wrap(middleware::from_fn(http::observe::request_duration))
            .configure(http::configure)
    })
    .shutdown_timeout(INGEST_STOP_TIMEOUT.as_secs())
    // SSE frames are small writes: without this, Nagle's algorithm holds each one back until the
    // client acknowledges the last, up to its delayed-ACK timeout (~40 ms on Linux).
    .tcp_nodelay(true)
    // A client that closes its side is gone: end its response at once. Otherwise a live stream
    // (and its place under --max-sse-connections) outlives its client until the next write, up to
    // the 15 s keep-alive, and a catch-up that sends nothing would scan on for nobody.
    .h1_allow_half_closed(false)
    // On a signal actix-server would stop the whole actix system, device actors included, while
    // ingest is still finishing; the shutdown order below is ours instead.
    .disable_signals()
    .bind(config.http_addr)?;
    for addr in server.addrs() {
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "fleetwatch listening");
    }
    let server = server.run();
    let http = server.handle();
    let mut serving = tokio::spawn(server);

    // Runs until a signal, or until the HTTP server fails; either way the engine shuts down in
    // order below.
    let http_failure = tokio::select! {
        name = signals.recv() => {
            tracing::info!(signal = name, "shutting down: finishing in-flight readings");
            None
        }
        stopped = &mut serving => Some(match stopped {
            Ok(Ok(())) => std::io::Error::other("the HTTP server stopped by itself"),
            Ok(Err(e)) => e,
            Err(e) => std::io::Error::other(e),
        }),
    };
    if let Some(e) = &http_failure {
        tracing::error!(error = %e, "HTTP server failed; shutting down");
    }
    tokio::spawn(async move {
        let name = signals.recv().await;
        tracing::warn!(signal = name, "second signal: exiting now; readings not yet durable were not acknowledged and will be sent again");
        std::process::exit(1);
    });

    // Stop taking readings, and let both ingest paths finish (and acknowledge) what they hold
    // while the engine still runs: HTTP requests get their answers, the RabbitMQ consumer acks.
    shutdown.cancel();
    let stop_http = async {
        if http_failure.is_none() {
            http.stop(true).await;
        }
    };
    let stop_consumer = async {
        let Some(consumer) = consumer else { return };
        if tokio::time::timeout(INGEST_STOP_TIMEOUT, consumer.stopped())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?INGEST_STOP_TIMEOUT, "the RabbitMQ consumer did not stop in time; its unacked messages will be redelivered");
        }
    };
    tokio::join!(stop_http, stop_consumer);
    if let Some(retention) = retention {
        // Cancelled above; a pass stops between two of its writes.
        let _ = retention.await;
    }
    // Cancelled above; ticks in flight hold permits, which the engine's drain waits for.
    let _ = deadlines.await;
    engine.shutdown().await;
    // Cancelled with the rest: it commits what it folded, then stops.
    if tokio::task::spawn_blocking(move || read_models_thread.join())
        .await
        .is_err()
    {
        tracing::warn!("the read models did not stop cleanly; they resume from their checkpoint");
    }
    // Cancelled with the rest: deliveries in flight end; they are delivered again at the next start.
    if tokio::task::spawn_blocking(move || notify_thread.join())
        .await
        .is_err()
    {
        tracing::warn!(
            "the notifications did not stop cleanly; they resume from their checkpoints"
        );
    }
    store.shutdown().await;
    match http_failure {
        None => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Some(e) => Err(StartupError::Http(e)),
    }
}
