use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use fleetwatch::config::{Cli, Command};

/// mimalloc instead of the system allocator: the engine allocates and frees small buffers per
/// reading on several threads, and glibc's malloc was about a tenth of its CPU at a steady rate
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Fault injection for the reliability tests: configured by FAILPOINTS, and compiled in only
    // with the `failpoints` feature (test builds); a no-op otherwise.
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Verify { data_dir }) => verify(&data_dir.unwrap_or(cli.config.data_dir)),
        None => {
            fleetwatch::telemetry::init_logging(cli.config.log_format);
            let run = actix_web::rt::System::new().block_on(fleetwatch::app::run(cli.config));
            match run {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("fleetwatch stopped: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `fleetwatch verify`: the report on stdout; exit 0 clean, 1 damaged, 2 the store cannot be read.
fn verify(data_dir: &Path) -> ExitCode {
    match fleetwatch::verify::verify_store(data_dir) {
        Ok(report) => {
            print!("{report}");
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("fleetwatch verify: {e}");
            ExitCode::from(2)
        }
    }
}
