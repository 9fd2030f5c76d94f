//! Startup: builds the engine and its adapters from the [`Config`] and runs them until a shutdown
//! signal (SIGINT/SIGTERM), then shuts down in order: stop taking readings, let every accepted
//! one become durable, stop the actors, close the store.

use std::sync::Arc;

use actix_web::{web, App, HttpServer};
use fleetwatch_domain::Thresholds;
use tokio_util::sync::CancellationToken;

use crate::actors::ActorSettings;
use crate::config::Config;
use crate::engine::{Engine, EngineSettings};
use crate::http::{self, AppState};
use crate::ingest::amqp::{BrokerState, BrokerStatus};
use crate::ingest::failed::FailedMessages;
use crate::rules::RulesError;
use crate::store::{EventStore, SqliteStore, SqliteStoreOptions, StoreError};

/// How long shutdown waits for the RabbitMQ consumer to finish its in-flight readings.
const CONSUMER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
}

/// Waits for SIGTERM or SIGINT (Ctrl-C); returns its name.
async fn shutdown_signal() -> std::io::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        interrupted = tokio::signal::ctrl_c() => interrupted.map(|()| "SIGINT"),
    }
}

/// Runs fleetwatch until it is told to stop.
pub async fn run(config: Config) -> Result<(), StartupError> {
    let metrics = crate::telemetry::init_metrics();
    let thresholds = Thresholds::new(config.min_move_m, config.min_temperature_delta)
        .map_err(|e| StartupError::Config(e.to_string()))?;
    let sqlite = Arc::new(SqliteStore::open(
        &config.data_dir,
        SqliteStoreOptions {
            max_batch: config.store_max_batch,
            queue_capacity: config.max_in_flight as usize * 2 + 1024,
            ..SqliteStoreOptions::default()
        },
    )?);
    let store: Arc<dyn EventStore> = sqlite.clone();
    let engine = Engine::start(
        store,
        EngineSettings {
            actor_threads: config.actor_threads(),
            max_in_flight: config.max_in_flight,
            thresholds,
            actors: ActorSettings {
                snapshot_every: config.snapshot_every,
                idle_timeout: config.idle_timeout,
            },
        },
    )
    .await?;

    let shutdown = CancellationToken::new();
    let broker = BrokerStatus::new(BrokerState::Disabled);
    let failed = FailedMessages::new(1000);
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
        tile_url: config.tile_url.clone(),
        broker,
        failed,
        metrics,
        shutdown: shutdown.clone(),
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .wrap(tracing_actix_web::TracingLogger::default())
            .configure(http::configure)
    })
    .shutdown_timeout(5)
    // SSE frames are small writes: without this, Nagle's algorithm holds each one back until the
    // client acknowledges the last, up to its delayed-ACK timeout (~40 ms on Linux).
    .tcp_nodelay(true)
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

    tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(signal = signal?, "shutting down: finishing in-flight readings");
        }
        stopped = &mut serving => {
            // The HTTP server only stops by itself when it fails.
            stopped.map_err(std::io::Error::other)??;
        }
    }
    // Stop taking readings, and let both ingest paths finish (and acknowledge) what they hold
    // while the engine still runs: HTTP requests get their answers, the RabbitMQ consumer acks.
    shutdown.cancel();
    let stop_consumer = async {
        let Some(consumer) = consumer else { return };
        let joined = tokio::time::timeout(
            CONSUMER_STOP_TIMEOUT,
            tokio::task::spawn_blocking(move || consumer.join()),
        )
        .await;
        if joined.is_err() {
            tracing::warn!(timeout = ?CONSUMER_STOP_TIMEOUT, "the RabbitMQ consumer did not stop in time; its unacked messages will be redelivered");
        }
    };
    tokio::join!(http.stop(true), stop_consumer);
    engine.shutdown().await;
    sqlite.close();
    tracing::info!("stopped cleanly");
    Ok(())
}
