use clap::Parser;
use fleetwatch::config::Config;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    // Fault injection for the reliability tests: configured by FAILPOINTS, and compiled in only
    // with the `failpoints` feature (test builds); a no-op otherwise.
    let _failpoints = fail::FailScenario::setup();
    let config = Config::parse();
    fleetwatch::telemetry::init_logging(config.log_format);
    fleetwatch::app::run(config).await?;
    Ok(())
}
