//! Command-line flags: every one also a `FLEETWATCH_SIM_*` environment variable, but the tokens,
//! which use the names the engine's own documentation gives them (`FLEETWATCH_ADMIN_TOKEN`,
//! `FLEETWATCH_INGEST_TOKEN`).

use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

/// Where readings are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Publish to the RabbitMQ exchange the engine consumes from.
    Amqp,
    /// POST to the engine's `/api/readings`.
    Http,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "fleetwatch-sim",
    version,
    about = "Simulates a fleet of devices and sends their readings to fleetwatch"
)]
pub struct Args {
    /// Where readings go: the RabbitMQ exchange or the HTTP API.
    #[arg(long, env = "FLEETWATCH_SIM_TARGET", value_enum, default_value_t = Target::Amqp)]
    pub target: Target,

    /// Number of simulated devices.
    #[arg(long, env = "FLEETWATCH_SIM_DEVICES", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,

    /// Total readings per second, over all devices.
    #[arg(long, env = "FLEETWATCH_SIM_RATE", default_value_t = 100.0, value_parser = parse_rate)]
    pub rate: f64,

    /// Stop after this long (e.g. 60s, 5m).
    #[arg(long, env = "FLEETWATCH_SIM_DURATION", default_value = "60s", value_parser = parse_run_duration)]
    pub duration: Duration,

    /// Stop after this many readings (or at --duration, whichever comes first).
    #[arg(long, env = "FLEETWATCH_SIM_COUNT", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,

    /// RabbitMQ connection URL.
    #[arg(
        long,
        env = "FLEETWATCH_SIM_AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Exchange to publish readings to (routing key = device id); declared as a durable topic exchange.
    #[arg(
        long,
        env = "FLEETWATCH_SIM_AMQP_EXCHANGE",
        default_value = "fleetwatch.readings"
    )]
    pub amqp_exchange: String,

    /// Published readings the broker has not confirmed yet; publishing waits beyond this.
    #[arg(long, env = "FLEETWATCH_SIM_MAX_UNCONFIRMED", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_unconfirmed: u32,

    /// Base URL of the engine's HTTP API (readings with --target http, and the zone demo).
    #[arg(
        long,
        env = "FLEETWATCH_SIM_HTTP_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub http_url: String,

    /// Bearer token for defining the demo zone and range: one of the engine's admin tokens
    /// (prefer the environment variable: flags show in the process list).
    #[arg(long, env = "FLEETWATCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Bearer token for posting readings with `--target http`: one of the engine's ingest tokens.
    #[arg(long, env = "FLEETWATCH_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,

    /// Readings per HTTP POST.
    #[arg(long, env = "FLEETWATCH_SIM_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,

    /// HTTP requests in flight at once.
    #[arg(long, env = "FLEETWATCH_SIM_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,

    /// Before starting, define the `sim-depot` zone and the `sim-cold-chain` range (2..8 °C) over HTTP.
    #[arg(
        long,
        env = "FLEETWATCH_SIM_ZONE_DEMO",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        overrides_with = "no_zone_demo"
    )]
    zone_demo: bool,

    /// Do not define the demo zone and temperature range.
    #[arg(long, overrides_with = "zone_demo")]
    no_zone_demo: bool,

    /// Share of devices that leave the zone and overheat during the run.
    #[arg(long, env = "FLEETWATCH_SIM_ROGUE_FRACTION", default_value_t = 0.1, value_parser = parse_fraction)]
    pub rogue_fraction: f64,

    /// Latitude of the fleet's centre.
    #[arg(long, env = "FLEETWATCH_SIM_CENTER_LAT", default_value_t = 52.37, value_parser = parse_latitude, allow_negative_numbers = true)]
    pub center_lat: f64,

    /// Longitude of the fleet's centre.
    #[arg(long, env = "FLEETWATCH_SIM_CENTER_LON", default_value_t = 4.89, value_parser = parse_longitude, allow_negative_numbers = true)]
    pub center_lon: f64,

    /// Seed of the random paths and temperatures: the same seed gives the same fleet.
    #[arg(long, env = "FLEETWATCH_SIM_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Device ids are this prefix and a five-digit number (`sim-00001`, ...).
    #[arg(long, env = "FLEETWATCH_SIM_DEVICE_PREFIX", default_value = "sim-", value_parser = parse_device_prefix)]
    pub device_prefix: String,
}

impl Args {
    /// Whether to define the demo zone and range (`--zone-demo`, unless `--no-zone-demo` came later).
    pub fn zone_demo(&self) -> bool {
        self.zone_demo && !self.no_zone_demo
    }

    /// The most readings this run sends.
    pub fn reading_limit(&self) -> u64 {
        self.count.unwrap_or(u64::MAX)
    }

    /// The readings the run is expected to send: the first bound it reaches.
    pub fn expected_readings(&self) -> u64 {
        let by_duration = (self.rate * self.duration.as_secs_f64()).floor() as u64;
        by_duration.min(self.reading_limit())
    }
}

fn parse_rate(raw: &str) -> Result<f64, String> {
    let rate: f64 = raw.parse().map_err(|e| format!("not a number: {e}"))?;
    if rate.is_finite() && rate > 0.0 {
        Ok(rate)
    } else {
        Err(format!(
            "must be a positive number of readings per second, got {raw}"
        ))
    }
}

fn parse_run_duration(raw: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        Err("must be longer than zero".to_owned())
    } else {
        Ok(duration)
    }
}

fn parse_fraction(raw: &str) -> Result<f64, String> {
    let fraction: f64 = raw.parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&fraction) {
        Ok(fraction)
    } else {
        Err(format!("must be within [0, 1], got {raw}"))
    }
}

fn parse_coordinate(raw: &str, limit: f64) -> Result<f64, String> {
    let value: f64 = raw.parse().map_err(|e| format!("not a number: {e}"))?;
    if value.is_finite() && value.abs() <= limit {
        Ok(value)
    } else {
        Err(format!("must be within [-{limit}, {limit}], got {raw}"))
    }
}

/// Latitudes near the poles are refused: the fleet's flat local map would distort too much there.
fn parse_latitude(raw: &str) -> Result<f64, String> {
    parse_coordinate(raw, 85.0)
}

fn parse_longitude(raw: &str) -> Result<f64, String> {
    parse_coordinate(raw, 180.0)
}

/// Device ids allow 1..=128 of `[A-Za-z0-9._:-]`; the prefix leaves room for the number.
fn parse_device_prefix(raw: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if raw.len() > 100 || !raw.chars().all(allowed) {
        Err(format!(
            "must be at most 100 characters of [A-Za-z0-9._:-], got {raw:?}"
        ))
    } else {
        Ok(raw.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Args {
        let argv = std::iter::once("fleetwatch-sim").chain(args.iter().copied());
        Args::try_parse_from(argv).expect("valid arguments")
    }

    #[test]
    fn the_zone_demo_is_on_by_default_and_can_be_switched_off_either_way() {
        assert!(parse(&[]).zone_demo());
        assert!(parse(&["--zone-demo"]).zone_demo());
        assert!(!parse(&["--no-zone-demo"]).zone_demo());
        assert!(!parse(&["--zone-demo=false"]).zone_demo());
        assert!(parse(&["--no-zone-demo", "--zone-demo"]).zone_demo());
    }

    #[test]
    fn the_run_ends_at_whichever_bound_comes_first() {
        let args = parse(&["--rate", "200", "--duration", "10s"]);
        assert_eq!(args.expected_readings(), 2000);
        let args = parse(&["--rate", "200", "--duration", "10s", "--count", "500"]);
        assert_eq!(args.expected_readings(), 500);
    }

    #[test]
    fn tokens_are_optional_flags() {
        let args = parse(&["--admin-token", "a", "--ingest-token", "i"]);
        assert_eq!(
            (args.admin_token.as_deref(), args.ingest_token.as_deref()),
            (Some("a"), Some("i"))
        );
    }

    #[test]
    fn nonsense_values_are_refused() {
        for bad in [
            &["--rate", "0"][..],
            &["--duration", "0s"],
            &["--rogue-fraction", "1.5"],
            &["--devices", "0"],
            &["--device-prefix", "a/b"],
        ] {
            let argv = std::iter::once("fleetwatch-sim").chain(bad.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{bad:?} was accepted");
        }
    }
}
