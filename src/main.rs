use clap::Parser;
use fleetwatch::config::Config;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    fleetwatch::telemetry::init_logging(config.log_format);
    fleetwatch::app::run(config).await?;
    Ok(())
}
